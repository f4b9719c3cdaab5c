"""Errors a user can fix (bad input, bad config): the CLI prints them as one line, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input, config or environment, with a message that says where and what was expected."""


class InputError(UserError):
    """A problem at a specific place of an input file: ``file:line: what was wrong``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
