"""`megacpt` entry point: dispatch a subcommand to its package's ``cli`` module, nothing else.

Each package's ``cli.py`` holds argparse and ``run`` for its commands: ``COMMANDS[name] = (add_arguments(parser),
run(args) -> int)``; a command may add its own sub-subcommands. Those modules are imported only for the
command asked for, so `megacpt --help` stays instant and a command never pays for another's imports
(torch, spaCy, ...).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from megacpt import __version__
from megacpt.errors import UserError
from megacpt.io import handle_signals, report_interrupt

# name -> (package cli module, one-line help). Order is the order shown in `megacpt --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("megacpt.data.cli", "train a byte-level BPE tokenizer (GPT-NeoX style)"),
    "preprocess": ("megacpt.data.cli", "raw text (jsonl/gz/zst/parquet/HF) -> Megatron .bin/.idx"),
    "merge": ("megacpt.data.cli", "merge indexed datasets (Megatron's tools/merge_datasets.py)"),
    "inspect": ("megacpt.data.cli", "summarise an indexed dataset: counts, lengths, first docs"),
    "convert": ("megacpt.convert.cli", "HF GPT-NeoX <-> megacpt checkpoint conversion (with resharding)"),
    "checkpoint": ("megacpt.checkpoint.cli", "checkpoint verify: check files against their recorded sizes/checksums"),
    "score": ("megacpt.selection.cli", "per-document scores: perplexity, pos-entropy, similarity, dsir"),
    "select": ("megacpt.selection.cli", "select a subset to a token budget (ETS/ETA-DACP, random)"),
    "report": ("megacpt.selection.cli", "reports over selections"),
    "train": ("megacpt.train.cli", "continual pre-training (torchrun / Slurm)"),
    "eval": ("megacpt.eval.cli", "financial tasks, held-out perplexity, comparisons"),
    "demo": ("megacpt.demo.cli", "the whole pipeline end to end on CPU, with a report"),
}


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="megacpt",
        description="Megatron-style domain-adaptive continual pre-training of GPT-NeoX/Pythia.",
        epilog=epilog + "\n\nRun `megacpt COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    return f"megacpt {__version__}"


def build_command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one command (used by `main` and by the CLI-interface tests)."""
    add_arguments, run = importlib.import_module(COMMANDS[name][0]).COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"megacpt {name}", description=COMMANDS[name][1])
    add_arguments(parser)
    parser.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        finally:  # argparse's --help exits too: a closed pipe surfaces here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a worker's): a real error
        return _quiet_exit_on_closed_pipe()


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().parse_args([name])  # prints the choices and exits 2
    args = build_command_parser(name).parse_args(rest)
    # SIGTERM/SIGINT/SIGHUP unwind the command (its temporaries removed) into one line and exit 128 + signal
    with handle_signals():
        try:
            return int(args._run(args) or 0)
        except UserError as e:  # bad input or config: one clear line, no traceback
            print(f"megacpt {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # megacpt.io.Interrupted: what was interrupted and how to go on
            return report_interrupt(f"megacpt {name}", e)


# `megacpt inspect --json | head`: the reader went away, which is how a pipe ends, not an error. Exit as a
# command killed by SIGPIPE would (128 + 13, what the shell reports for `yes | head`), without a traceback.
SIGPIPE_EXIT = 141


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has closed it (poll reports POLLERR on its write end)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: assume it was stdout
        return True


def _quiet_exit_on_closed_pipe() -> int:
    # Python's recipe (docs, "Note on SIGPIPE"): point stdout at devnull so the flush at interpreter exit
    # does not raise again ("Exception ignored ... BrokenPipeError")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
