import pytest

from megacpt.cli import build_command_parser
from megacpt.eval.prompts import load_template
from megacpt.eval.tasks import BUILTIN_TASKS, format_entities, parse_entities, resolve_task
from megacpt.errors import UserError


def test_ner_answer_format_round_trips_and_counts_junk():
    t = load_template("ner")
    ents = [("Acme Holdings Inc", "ORG"), ("John Smith", "PER"), ("London", "LOC")]
    text = format_entities(ents, t)
    # BloombergGPT's Table 7 answer format: "span (type), span (type)"
    assert text == "Acme Holdings Inc (organization), John Smith (person), London (location)"
    assert parse_entities(text, t) == (ents, 0)
    assert parse_entities(format_entities([], t), t) == ([], 0)
    assert parse_entities("None ", t) == ([], 0)
    # type by its tag or verbalisation, any case; trailing junk and empty spans are counted, the rest kept
    assert parse_entities("Bob (PER), Acme (Organization), garbage, X (currency),", t) == \
        ([("Bob", "PER"), ("Acme", "ORG")], 1)
    assert parse_entities("(person), Bob (person)", t) == ([("Bob", "PER")], 1)
    assert parse_entities("Foo (bar) Baz (location)", t) == ([("Foo (bar) Baz", "LOC")], 0)
    # spans keep the separator and parentheses of the release's tokenised text
    assert parse_entities("EVERGREEN SOLAR , INC (organization), Acme (UK) Ltd (organization)", t) == \
        ([("EVERGREEN SOLAR , INC", "ORG"), ("Acme (UK) Ltd", "ORG")], 0)
    # a type outside the protocol's kept types is not a prediction: counted as unparsed
    assert parse_entities("English (miscellaneous), London (location)", t, ("PER", "ORG", "LOC")) == \
        ([("London", "LOC")], 1)


def test_builtin_task_defaults_follow_bloomberggpt():
    assert {n: (s.kind, s.shots) for n, s in BUILTIN_TASKS.items()} == {
        "fpb": ("classification", 5), "fiqa_sa": ("classification", 5), "headline": ("headline", 5), "ner": ("ner", 20)}


def test_task_yaml_errors(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t/task.yaml").write_text("kind: classification\nlabels: [a, a]\n")
    with pytest.raises(UserError, match="distinct labels"):
        resolve_task("t", tmp_path)
    (tmp_path / "t/task.yaml").write_text("kind: regression\nlabels: [a]\n")
    with pytest.raises(UserError, match="kind 'regression'"):
        resolve_task("t", tmp_path)
    (tmp_path / "t/task.yaml").write_text("labels: [a]\nlabel_set: [b]\n")
    with pytest.raises(UserError, match="expected a mapping with keys from"):
        resolve_task("t", tmp_path)


# CLI flags are an interface: this freezes them (add new flags here on purpose, never rename silently)
FLAGS = {
    "finance": {"--model", "--tokenizer", "--dtype", "--device", "--micro-batch-size", "--seq-length", "--seed",
                "--bootstrap", "--out", "--tasks", "--data-dir", "--shots", "--label-scoring", "--predictions",
                "--shot-seeds", "--ner-types", "--ner-sentences"},
    "perplexity": {"--model", "--tokenizer", "--dtype", "--device", "--micro-batch-size", "--seq-length", "--seed",
                   "--bootstrap", "--out", "--data", "--max-documents"},
    "probe": {"--model", "--tokenizer", "--dtype", "--device", "--micro-batch-size", "--seq-length", "--seed",
              "--bootstrap", "--out", "--tasks", "--data-dir", "--C", "--predictions"},
    "compare": {"--names", "--out-md", "--out-png"},
    "convert-data": {"--task", "--input", "--test-input", "--test-fraction", "--seed", "--out-dir"},
    "lm-eval": {"--model", "--tasks", "--include-path", "--micro-batch-size", "--dtype", "--device", "--limit", "--log-samples",
                "--out", "--preset", "--num-fewshot"},
}


def test_eval_cli_flags_frozen():
    parser = build_command_parser("eval")
    sub = next(a for a in parser._actions if a.dest == "eval_command")
    assert set(sub.choices) == set(FLAGS)
    for name, p in sub.choices.items():
        got = {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        assert got == FLAGS[name], name
