"""The `megacpt` entry point: every registered command imports and builds its parser."""
import subprocess
import sys

import pytest

from megacpt.cli import COMMANDS, build_command_parser, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_builds_its_parser(name):
    parser = build_command_parser(name)
    assert parser.format_help().startswith(f"usage: megacpt {name}")


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "megacpt", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert f"\n  {name} " in out.stdout


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
