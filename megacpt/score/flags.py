"""The flags every `megacpt score SCORER` shares, built in one place (flags are an interface: a scorer
that reads a dataset and writes a resumable score file spells them the same way).

Used by ``megacpt.score.cli`` (perplexity) and ``megacpt.selection.cli`` (pos-entropy, similarity, dsir).
Kept apart from ``score.cli`` so the text scorers build their flags without importing torch.
"""
from __future__ import annotations

import argparse
from typing import Sequence


def add_scorer_arguments(p: argparse.ArgumentParser, columns: Sequence[str], shard_docs: int,
                         data_help: str = "indexed dataset prefix (PREFIX.bin/.idx)") -> None:
    """``--data PREFIX``, ``--out F.parquet`` (its columns named in the help) and ``--shard-docs``."""
    p.add_argument("--data", required=True, metavar="PREFIX", help=data_help)
    p.add_argument("--out", required=True, help=f"output Parquet: {', '.join(['doc_id', *columns])}")
    p.add_argument("--shard-docs", type=int, default=shard_docs, help="documents per committed (resumable) shard")


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    """Scorers that decode the documents to text: the tokenizer to decode with, and replacing old output."""
    p.add_argument("--tokenizer", default=None, help="override the tokenizer path named in PREFIX.meta.json")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and discard shards of another config")


def add_task_data_arguments(p: argparse.ArgumentParser) -> None:
    """The target/task examples of the task-aware scorers (similarity, DSIR)."""
    p.add_argument("--task-data", required=True, metavar="TASKS.jsonl", help="task (target) examples, JSONL")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys of a task example (joined by newline)")
