"""Megatron-LM's own code, for the side-by-side tests.

``MEGATRON_LM_DIR`` names a Megatron-LM git clone: a working tree (``git clone
https://github.com/NVIDIA/Megatron-LM``) or a bare/mirror git directory. Each test reads the exact commit
or tag it compares with out of that history (``git show`` / ``git archive``), so one full clone serves
them all. Unset, or without the commit: the test is skipped with the reason.
"""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ENV = "MEGATRON_LM_DIR"


def git_dir() -> Path:
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"set {ENV} to a Megatron-LM git clone to compare with Megatron-LM's own tools")
    path = Path(root)
    return path / ".git" if (path / ".git").exists() else path


def _git(rev: str, *args: str) -> bytes:
    gd = git_dir()
    try:
        return subprocess.run(["git", "--git-dir", str(gd), *args], capture_output=True, check=True,
                              timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        pytest.skip(f"{ENV}={os.environ[ENV]}: no Megatron-LM history with {rev} ({err.decode(errors='replace').strip()})")


def show(rev: str, path: str) -> bytes:
    """One file of Megatron-LM at ``rev``."""
    return _git(rev, "show", f"{rev}:{path}")


def extract(rev: str, paths: list[str], dest: Path) -> Path:
    """``paths`` of Megatron-LM at ``rev`` extracted under ``dest`` (returned)."""
    archive = _git(rev, "archive", rev, *paths)
    dest.mkdir(parents=True, exist_ok=True)
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest, filter="data")
    return dest
