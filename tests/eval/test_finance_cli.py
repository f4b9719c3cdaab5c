"""`megacpt eval finance` end to end on a tiny random model, with invented task files."""
import json

import pytest

from megacpt.cli import main
from megacpt.eval.data import HEADLINE_QUESTIONS

from .conftest import save_tiny_model, write_jsonl

SENT = ["Profits rose sharply this quarter.", "Shares fell after the warning.", "Revenue was flat.",
        "The outlook is positive.", "Analysts were negative on the bank.", "The dividend was unchanged.",
        "Gold climbed on Monday.", "The forecast was cut."]
LABS = ["positive", "negative", "neutral"]


def _make_data(root):
    for task in ("fpb",):
        write_jsonl(root / task / "train.jsonl", [{"text": s, "label": LABS[i % 3]} for i, s in enumerate(SENT)])
        write_jsonl(root / task / "test.jsonl", [{"text": s + " Again.", "label": LABS[(i + 1) % 3]} for i, s in enumerate(SENT[:5])])
    scores = [0.5, -0.4, 0.0, 0.1, -0.1, 0.3]
    write_jsonl(root / "fiqa_sa/train.jsonl", [{"text": s, "target": "Acme", "score": sc} for s, sc in zip(SENT, scores)])
    write_jsonl(root / "fiqa_sa/test.jsonl", [{"text": s, "target": "Globex", "score": -sc} for s, sc in zip(SENT[2:], scores)])
    qs = list(HEADLINE_QUESTIONS)
    write_jsonl(root / "headline/train.jsonl",
                [{"text": s, "labels": {q: (i + j) % 2 for j, q in enumerate(qs)}} for i, s in enumerate(SENT)])
    write_jsonl(root / "headline/test.jsonl",
                [{"text": "gold " + s, "labels": {q: "yes" if (i * j) % 3 else "no" for j, q in enumerate(qs)}}
                 for i, s in enumerate(SENT[:4])])
    ner = [{"text": "Acme Holdings hired John Smith in London.", "entities": [
               {"text": "Acme Holdings", "type": "ORG"}, {"text": "John Smith", "type": "PER"}, {"text": "London", "type": "LOC"}]},
           {"text": "Nothing here.", "entities": []},
           {"text": "Jane Doe joined Globex.", "entities": [{"text": "Jane Doe", "type": "PER"}, {"text": "Globex", "type": "ORG"}]},
           {"text": "Bob Stone moved to Paris.", "entities": [{"text": "Bob Stone", "type": "PER"}, {"text": "Paris", "type": "LOC"}]}]
    write_jsonl(root / "ner/train.jsonl", ner)
    write_jsonl(root / "ner/test.jsonl", ner[:2])
    (root / "ner/task.yaml").write_text("max_new_tokens: 12\n")  # a built-in task with one field overridden
    # a generic classification task (what the demo uses): labels + verbalizers + template in task.yaml
    (root / "topics").mkdir()
    (root / "topics/task.yaml").write_text(
        "kind: classification\nlabels: [earnings, merger]\nverbalizers: {earnings: results, merger: deal}\n"
        "template: my_template.yaml\nshots: 2\nlabel_field: topic\n")
    (root / "topics/my_template.yaml").write_text("example: 'News: {text}\\nTopic: {answer}'\nseparator: '\\n'\n")
    write_jsonl(root / "topics/train.jsonl", [{"text": s, "topic": ["earnings", "merger"][i % 2]} for i, s in enumerate(SENT)])
    write_jsonl(root / "topics/test.jsonl", [{"text": s + "!", "topic": ["earnings", "merger"][i % 2]} for i, s in enumerate(SENT)])
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _make_data(tmp_path_factory.mktemp("tasks"))


def test_finance_end_to_end(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "finance", "--model", str(model_dir), "--tasks", "fpb,fiqa_sa,headline,ner,topics",
               "--data-dir", str(data_dir), "--shots", "2", "--seed", "1", "--bootstrap", "50",
               "--micro-batch-size", "4", "--out", str(out), "--predictions"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"fpb", "fiqa_sa", "headline", "ner", "topics"}
    for name, r in res["tasks"].items():
        assert 0.0 <= r["value"] <= 1.0 and r["ci95"][0] <= r["ci95"][1] and r["shots"] == 2, name
        assert len(r["predictions"]) == r["n"]
    assert res["tasks"]["fpb"]["metric"] == "weighted_f1" and res["tasks"]["fpb"]["n"] == 5
    assert res["tasks"]["headline"]["metric"] == "avg_weighted_f1" and len(res["tasks"]["headline"]["per_question"]) == 9
    assert res["tasks"]["ner"]["metric"] == "entity_f1" and res["tasks"]["ner"]["labels"] == ["PER", "ORG", "LOC", "MISC"]
    assert all(len(lm_tokens) <= 12 for lm_tokens in (p["pred"]["generated"].split() for p in res["tasks"]["ner"]["predictions"]))
    assert res["tasks"]["topics"]["verbalizers"] == {"earnings": "results", "merger": "deal"}
    assert res["tasks"]["topics"]["template"].endswith("my_template.yaml")
    assert [p["gold"] for p in res["tasks"]["fiqa_sa"]["predictions"]] == \
        ["negative", "positive", "neutral", "neutral", "positive", "negative"]  # -score binned at -0.1/0.1
    assert res["config"]["seed"] == 1 and res["model"]["tokenizer"]["vocab_size"] == 300
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(model_dir.name + " | fpb weighted_f1 ") and "topics" in line
    # same seed -> same predictions (shots are drawn per example from the seed)
    out2 = tmp_path / "res2.json"
    assert main(["eval", "finance", "--model", str(model_dir), "--tasks", "fpb", "--data-dir", str(data_dir),
                 "--shots", "2", "--seed", "1", "--bootstrap", "0", "--out", str(out2), "--predictions"]) == 0
    assert json.loads(out2.read_text())["tasks"]["fpb"]["predictions"] == res["tasks"]["fpb"]["predictions"]


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_finance_bad_input(model_dir, data_dir, tmp_path, capsys):
    base = ["eval", "finance", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(tmp_path / "r.json")]
    assert "task 'nope': not a built-in task" in _err(capsys, base + ["--tasks", "nope"])
    bad = tmp_path / "bad"
    _make_data(bad)
    (bad / "fpb/test.jsonl").write_text('{"text": "x", "label": "positive"}\n{"text": "y", "label": "bullish"}\n')
    err = _err(capsys, base[:5] + [str(bad)] + base[6:] + ["--tasks", "fpb"])
    assert "fpb/test.jsonl:2: label 'bullish' is not in the task's label set" in err
    (bad / "fpb/test.jsonl").write_text('{"text": "x", "label": "positive"}\n')
    (bad / "fpb/train.jsonl").unlink()
    assert "5-shot prompts need" in _err(capsys, base[:5] + [str(bad)] + base[6:] + ["--tasks", "fpb"])
    (bad / "fpb/test.jsonl").unlink()
    assert "fpb/test.jsonl" in _err(capsys, base[:5] + [str(bad)] + base[6:] + ["--tasks", "fpb"])
    assert not (tmp_path / "r.json").exists()
    # data errors are reported before the model is loaded (a missing model is not what the user sees first)
    err = _err(capsys, ["eval", "finance", "--model", str(tmp_path / "no-model"), "--tasks", "fpb",
                        "--data-dir", str(bad), "--out", str(tmp_path / "r.json")])
    assert "fpb/test.jsonl" in err


def test_vocab_mismatch_is_an_error(tmp_path, tok_dir, capsys, data_dir):
    small = save_tiny_model(tmp_path / "m", tok_dir, padded_vocab=256)  # fewer rows than the 300 tokens
    err = _err(capsys, ["eval", "finance", "--model", str(small), "--tasks", "fpb", "--data-dir", str(data_dir),
                        "--out", str(tmp_path / "r.json")])
    assert "vocab" in err and "300" in err
