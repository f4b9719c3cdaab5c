"""The selection commands' flags are an interface (scripts and the demo call them): freeze them."""
import argparse

import pytest

from megacpt.cli import build_command_parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


FROZEN = {
    ("select",): {"--data", "--scores", "--strategy", "--weights", "--sampling", "--temperature", "--soft-weighting",
                  "--budget-fraction", "--budget-tokens", "--budget-docs", "--seed", "--output-prefix",
                  "--from-manifest", "--overwrite"},
    ("score", "pos-entropy"): {"--data", "--out", "--workers", "--max-chars", "--piece-chars", "--batch-size",
                               "--shard-docs", "--spacy-model", "--tokenizer", "--overwrite"},
    ("score", "similarity"): {"--data", "--task-data", "--json-keys", "--out", "--reduce", "--embedding-model",
                              "--batch-size", "--chunk-tokens", "--max-chunks", "--device", "--dtype", "--shard-docs",
                              "--tokenizer", "--overwrite"},
    ("score", "dsir"): {"--data", "--task-data", "--json-keys", "--out", "--num-buckets", "--ngram", "--smoothing",
                        "--normalize", "--raw-sample-docs", "--seed", "--shard-docs", "--tokenizer", "--overwrite"},
    ("score", "perplexity"): {"--model", "--data", "--seq-length", "--out", "--micro-batch-size", "--tokens-per-batch",
                              "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--dtype",
                              "--device", "--impl", "--compile-loss", "--compile", "--shard-docs", "--resume", "--collective-timeout-s",
                              "--no-progress"},
    ("report", "selection"): {"--manifests", "--out", "--scores", "--data", "--snippets", "--snippet-chars",
                              "--random-seed", "--tokenizer"},
}


@pytest.mark.parametrize("path", list(FROZEN), ids=" ".join)
def test_flags_frozen(path):
    parser = build_command_parser(path[0])
    if len(path) == 1:
        assert _flags(parser) == FROZEN[path]
        return
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = action._name_parser_map[path[1]]
    if path[0] == "score":  # scorer options are added lazily, on first use
        from megacpt.selection.cli import SCORERS

        SCORERS[path[1]].add_arguments(sub)
    assert _flags(sub) == FROZEN[path]


def test_select_strategies_and_scorers():
    from megacpt.selection.combine import STRATEGIES
    from megacpt.selection.cli import SCORERS

    assert set(STRATEGIES) == {"ets", "eta-ppl", "eta-ent", "combined", "random", "dsir", "full"}
    assert set(SCORERS) == {"perplexity", "pos-entropy", "similarity", "dsir"}
