"""`megacpt score {perplexity,pos-entropy,similarity,dsir}`: per-document scores of an indexed dataset.

Each scorer module exposes ``add_arguments(parser)`` and ``run(args)``; modules load lazily so one
scorer never pays for another's imports (torch, spaCy, sentence-transformers).
"""
from __future__ import annotations

import argparse
import importlib

SCORERS: dict[str, tuple[str, str]] = {
    "perplexity": ("megacpt.score.cli", "novelty: per-document NLL under the base model"),
    "pos-entropy": ("megacpt.selection.pos_entropy", "diversity: entropy of universal POS tags (spaCy)"),
    "similarity": ("megacpt.selection.similarity", "task similarity: cosine to task-example embeddings"),
    "dsir": ("megacpt.selection.dsir", "DSIR hashed n-gram importance weight (target = task data)"),
}


class _LazySubparsers(argparse._SubParsersAction):
    """Build a scorer's options only when it is the one asked for (`--help` lists names only)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        if name in SCORERS and not getattr(self._name_parser_map[name], "_megacpt_loaded", False):
            sub = self._name_parser_map[name]
            try:
                module = importlib.import_module(SCORERS[name][0])
            except ModuleNotFoundError as e:
                if e.name != SCORERS[name][0]:
                    raise
                parser.error(f"scorer {name!r} is not available in this installation ({e.name} missing)")
            module.add_arguments(sub)
            sub.set_defaults(_scorer_run=module.run)
            sub._megacpt_loaded = True
        super().__call__(parser, namespace, values, option_string)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.register("action", "lazy_parsers", _LazySubparsers)
    subs = parser.add_subparsers(dest="scorer", metavar="SCORER", required=True, action="lazy_parsers")
    for name, (_, help_) in SCORERS.items():
        subs.add_parser(name, help=help_, description=help_)


def run(args: argparse.Namespace) -> int:
    return int(args._scorer_run(args) or 0)
