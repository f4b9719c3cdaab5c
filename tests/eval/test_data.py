import json

import pytest

from megacpt.errors import InputError, UserError
from megacpt.eval.data import fiqa_bin, load_examples
from megacpt.eval.originals import convert, parse_conll, parse_fiqa, parse_fpb, parse_headline

from .conftest import FIXTURES, write_jsonl


def test_fpb_latin1_and_last_at():
    rows = parse_fpb(FIXTURES / "fpb_sentences.txt").rows
    assert len(rows) == 7  # blank line skipped
    assert rows[3]["text"].startswith("Orders for the café chain's")
    assert rows[4] == {"id": "fpb_sentences:6", "text": "Email contact: investor@example.com was published today .",
                       "label": "neutral"}
    assert [r["label"] for r in rows[:3]] == ["positive", "negative", "neutral"]


def test_fiqa_binning_boundaries():
    assert [fiqa_bin(s) for s in (-0.5, -0.1, -0.0999, 0.0999, 0.1, 0.7)] == \
        ["negative", "neutral", "neutral", "neutral", "positive", "positive"]
    rows = parse_fiqa(FIXTURES / "fiqa_headlines.json").rows
    assert [(r["target"], r["label"]) for r in rows] == [
        ("Acme", "positive"), ("Globex", "negative"), ("Initech", "neutral"), ("Umbrella Corp", "neutral"), ("Hooli", "positive")]
    assert rows[1]["text"] == rows[2]["text"]  # one example per (sentence, target)


def test_headline_csv():
    rows = parse_headline(FIXTURES / "gold_headlines.csv").rows
    assert len(rows) == 4 and rows[0]["text"] == "gold climbs 1% as dollar slips, set for weekly gain"
    assert rows[1]["labels"]["price_constant"] == "yes" and rows[1]["labels"]["future_news"] == "yes"
    assert rows[3]["labels"]["price_or_not"] == "no" and len(rows[0]["labels"]) == 9


def test_conll_spans():
    rows = parse_conll(FIXTURES / "finer.conll").rows
    assert [r["entities"] for r in rows] == [
        [{"text": "Acme Holdings Inc", "type": "ORG"}, {"text": "John Smith", "type": "PER"}, {"text": "London", "type": "LOC"}],
        [],
        [{"text": "Jane Doe", "type": "PER"}, {"text": "Bob", "type": "PER"}],
    ]
    assert rows[0]["text"].startswith("This Agreement is made by Acme Holdings Inc and")


def test_convert_split_and_roundtrip(tmp_path):
    counts = convert("fpb", [str(FIXTURES / "fpb_sentences.txt")], tmp_path, test_fraction=0.34, seed=1)
    assert counts["train"] + counts["test"] == 7
    train = load_examples(tmp_path / "fpb/train.jsonl", "classification", ("negative", "neutral", "positive"))
    test = load_examples(tmp_path / "fpb/test.jsonl", "classification", ("negative", "neutral", "positive"))
    # the duplicated sentence stays on one side of the split
    assert not {e.text for e in train} & {e.text for e in test}
    counts = convert("ner", [str(FIXTURES / "finer.conll")], tmp_path, test_inputs=[str(FIXTURES / "finer.conll")])
    assert (counts["train"], counts["test"]) == (0, 3)
    ner = load_examples(tmp_path / "ner/test.jsonl", "ner", ("PER", "ORG", "LOC", "MISC"))
    assert ner[2].label == [("Jane Doe", "PER"), ("Bob", "PER")]
    convert("fiqa_sa", [str(FIXTURES / "fiqa_headlines.json")], tmp_path, seed=0)
    convert("headline", [str(FIXTURES / "gold_headlines.csv")], tmp_path, seed=0)
    h = load_examples(tmp_path / "headline/train.jsonl", "headline", tuple(json.loads(
        (tmp_path / "headline/train.jsonl").read_text().splitlines()[0])["labels"]))
    assert h and all(len(e.label) == 9 for e in h)


def test_schema_errors_name_file_and_line(tmp_path):
    labs = ("negative", "neutral", "positive")
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "bullish"}])
    with pytest.raises(InputError, match=r"t.jsonl:2: label 'bullish' is not in the task's label set"):
        load_examples(p, "classification", labs)
    p.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": \n')
    with pytest.raises(InputError, match=r"t.jsonl:2: malformed JSON"):
        load_examples(p, "classification", labs)
    write_jsonl(p, [{"label": "positive"}])
    with pytest.raises(InputError, match=r"t.jsonl:1: missing field 'text'"):
        load_examples(p, "classification", labs)
    write_jsonl(p, [{"text": "s", "score": 0.3, "label": "negative"}])
    with pytest.raises(InputError, match=r"t.jsonl:1: label 'negative' disagrees with score 0.3"):
        load_examples(p, "classification", labs, score_binning=True)
    write_jsonl(p, [{"text": "s", "score": 1.5}])
    with pytest.raises(InputError, match=r"score must be a number in \[-1, 1\]"):
        load_examples(p, "classification", labs, score_binning=True)
    write_jsonl(p, [{"text": "Acme sued Bob", "entities": [{"text": "Globex", "type": "ORG"}]}])
    with pytest.raises(InputError, match=r"t.jsonl:1: entities\[0\]: span 'Globex' does not occur"):
        load_examples(p, "ner", ("PER", "ORG"))
    write_jsonl(p, [{"text": "h", "labels": {"price_or_not": "maybe"}}])
    with pytest.raises(InputError, match=r"labels.price_or_not: expected yes/no"):
        load_examples(p, "headline", ("price_or_not",))
    p.write_text("\n")
    with pytest.raises(InputError, match="no examples"):
        load_examples(p, "classification", labs)
    with pytest.raises(UserError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", "classification", labs)


def test_integer_labels_match_their_string_form(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "0"}])
    assert [e.label for e in load_examples(p, "classification", ("0", "1"))] == ["1", "0"]
    write_jsonl(p, [{"text": "a", "label": True}])
    with pytest.raises(InputError, match="label True is not in"):
        load_examples(p, "classification", ("0", "1"))


def test_convert_data_cli(tmp_path, capsys):
    from megacpt.cli import main

    assert main(["eval", "convert-data", "--task", "fiqa_sa", "--input", str(FIXTURES / "fiqa_headlines.json"),
                 "--out-dir", str(tmp_path), "--test-fraction", "0.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "fiqa_sa: wrote" in out and (tmp_path / "fiqa_sa/train.jsonl").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"sentence": "x", "info": [{"target": "A"}]}}')
    assert main(["eval", "convert-data", "--task", "fiqa_sa", "--input", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "entry '1' info[0]: need 'target' and a numeric 'sentiment_score'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
