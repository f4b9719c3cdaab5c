"""The evaluation protocol's switches on constructed models whose answers are known.

- shot draws (``--shot-seeds K``): a model that copies the label of the last shot in its prompt, so each
  draw's predictions follow from the drawn shots; value = mean over draws, sd across draws, CI = bootstrap
  of the draw-mean (recomputed here with scikit-learn);
- NER protocol (kept types, entity-less sentences, shot count): oracle models that answer with the gold
  entities (with / without MISC, with a spurious extra entity), F1 computed by hand.
"""
import json
import re
import statistics

import numpy as np
import pytest
from sklearn.metrics import f1_score

from megacpt.cli import main
from megacpt.errors import UserError
from megacpt.eval.finance import FinanceConfig, load_tasks, parse_shots, predictions_path, run_finance, write_run
from megacpt.eval.metrics import (bootstrap_indices, encode, entity_counts_per_example, macro_f1_resampled,
                                  weighted_f1_resampled)
from megacpt.eval.prompts import example_rng, select_shots

from .conftest import write_jsonl

LABS = ("negative", "neutral", "positive")


class FakeLM:
    """Duck-typed EvalLM: scores / generations come from ``answer(prompt)``; prompts are recorded."""

    batch_size, max_length, n_truncated, info = 8, 2048, 0, None

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def loglikelihood(self, requests):
        self.prompts += [c for c, _ in requests]
        return [(0.0 if cont.strip() == self.answer(ctx) else -1.0, 1) for ctx, cont in requests]

    def greedy_generate(self, prompts, max_new_tokens, stop="\n"):
        self.prompts += list(prompts)
        return [self.answer(p) for p in prompts]


def last_shot_label(ctx: str) -> str:
    return re.findall(r"Answer: (\w+)\n\n", ctx)[-1]


@pytest.fixture
def fpb_dir(tmp_path):
    rng = np.random.default_rng(0)
    train = [{"text": f"train sentence {i}", "label": LABS[int(rng.integers(3))]} for i in range(12)]
    test = [{"text": f"test sentence {i}", "label": LABS[int(rng.integers(3))]} for i in range(15)]
    write_jsonl(tmp_path / "fpb/train.jsonl", train)
    write_jsonl(tmp_path / "fpb/test.jsonl", test)
    return tmp_path


def _expected_preds(tasks, seed, k=3):
    t = tasks[0]
    return [select_shots(t.train, k, ex, example_rng(seed, "fpb", i))[-1].label for i, ex in enumerate(t.test)]


def test_shot_seeds_mean_sd_and_bootstrap_of_the_draw_mean(fpb_dir):
    cfg = FinanceConfig(tasks=("fpb",), data_dir=str(fpb_dir), shots=3, seed=5, bootstrap=200, shot_seeds=4)
    tasks = load_tasks(cfg)
    run = run_finance(FakeLM(last_shot_label), cfg, tasks, log=lambda *_: None)
    r = run.results["tasks"]["fpb"]
    gold = [e.label for e in tasks[0].test]
    preds = [_expected_preds(tasks, 5 + j) for j in range(4)]
    values = [f1_score(gold, p, labels=list(LABS), average="weighted", zero_division=0) for p in preds]
    assert r["shot_draws"]["seeds"] == [5, 6, 7, 8]
    assert r["shot_draws"]["values"] == pytest.approx(values, abs=1e-12)
    assert len(set(np.round(values, 9))) > 1  # the draws really differ
    assert r["value"] == pytest.approx(statistics.mean(values))
    assert r["shot_draws"]["sd"] == pytest.approx(statistics.stdev(values))
    # CI: the same test resamples for every draw, metric averaged over draws, then percentiles
    idx = bootstrap_indices(len(gold), 200, 5)
    boot = [np.mean([f1_score([gold[i] for i in row], [p[i] for i in row], labels=list(LABS), average="weighted",
                              zero_division=0) for p in preds]) for row in idx]
    assert r["ci95"] == pytest.approx(list(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    # predictions: one row per (draw, example), with gold, prediction and every label's score
    assert len(run.predictions) == 4 * 15
    row = run.predictions[15 + 2]
    assert (row["draw"], row["shot_seed"], row["index"], row["gold"]) == (1, 6, 2, gold[2])
    assert row["pred"] == preds[1][2] and set(row["scores"]) == set(LABS) and row["scores"][row["pred"]] == 0.0
    # one draw == the first draw of several (draw j always uses seed + j)
    one = run_finance(FakeLM(last_shot_label), FinanceConfig(tasks=("fpb",), data_dir=str(fpb_dir), shots=3, seed=5,
                                                             bootstrap=0), log=lambda *_: None)
    assert one.results["tasks"]["fpb"]["value"] == pytest.approx(values[0])
    assert one.results["tasks"]["fpb"]["shot_draws"]["sd"] is None


def test_weighted_f1_resampled_equals_sklearn_per_resample():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    gold, pred = list(rng.choice(labels[:3], 40)), list(rng.choice(labels, 40))
    idx = bootstrap_indices(40, 50, 2)
    got = weighted_f1_resampled(encode(gold, labels), encode(pred, labels), 4, idx)
    ref = [f1_score([gold[i] for i in row], [pred[i] for i in row], labels=labels, average="weighted", zero_division=0)
           for row in idx]
    assert got == pytest.approx(ref, abs=1e-12)
    # labels outside the label set are ignored, as sklearn's `labels=` does
    got = weighted_f1_resampled(encode(gold, labels[:2]), encode(pred, labels[:2]), 2, idx)
    ref = [f1_score([gold[i] for i in row], [pred[i] for i in row], labels=labels[:2], average="weighted",
                    zero_division=0) for row in idx]
    assert got == pytest.approx(ref, abs=1e-12)


def test_macro_f1_resampled_equals_sklearn_per_resample():
    """Including a label no resample has in gold or predictions (it counts 0, as sklearn's zero_division=0)."""
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    gold, pred = list(rng.choice(labels[:3], 40)), list(rng.choice(labels[:3], 40))
    idx = bootstrap_indices(40, 50, 4)
    got = macro_f1_resampled(encode(gold, labels), encode(pred, labels), 4, idx)
    ref = [f1_score([gold[i] for i in row], [pred[i] for i in row], labels=labels, average="macro", zero_division=0)
           for row in idx]
    assert got == pytest.approx(ref, abs=1e-12)
    assert len(set(np.round(got, 12))) > 10  # the resamples differ: not one value repeated


# --- NER protocol -------------------------------------------------------------------------------------

NER_TEST = [
    {"text": "Acme Corp hired Jane Doe in London .", "entities": [
        {"text": "Acme Corp", "type": "ORG"}, {"text": "Jane Doe", "type": "PER"}, {"text": "London", "type": "LOC"}]},
    {"text": "Governed by English law .", "entities": [{"text": "English", "type": "MISC"}]},
    {"text": "Page 1 of 12 .", "entities": []},
    {"text": "Globex signed the German addendum .", "entities": [
        {"text": "Globex", "type": "ORG"}, {"text": "German", "type": "MISC"}]},
]
NER_TRAIN = [
    {"text": "Initech LLC of Delaware .", "entities": [{"text": "Initech LLC", "type": "ORG"}, {"text": "Delaware", "type": "LOC"}]},
    {"text": "Signed by Bob Stone .", "entities": [{"text": "Bob Stone", "type": "PER"}]},
    {"text": "Subject to French law .", "entities": [{"text": "French", "type": "MISC"}]},
    {"text": "Table of contents .", "entities": []},
    {"text": "Hooli Bank in Zurich .", "entities": [{"text": "Hooli Bank", "type": "ORG"}, {"text": "Zurich", "type": "LOC"}]},
]
VERB = {"PER": "person", "ORG": "organization", "LOC": "location", "MISC": "miscellaneous"}
GOLD = {r["text"]: [(e["text"], e["type"]) for e in r["entities"]] for r in NER_TEST + NER_TRAIN}


def oracle(keep=("PER", "ORG", "LOC", "MISC"), spurious=False):
    """Answers with the gold entities of the query sentence (of the types in ``keep``)."""
    def answer(prompt):
        sentence = prompt.rsplit("\n\n", 1)[-1].split("\nExtract named entity:")[0]
        ents = [f"{s} ({VERB[t]})" for s, t in GOLD[sentence] if t in keep] + (["Zzz (person)"] if spurious else [])
        return ", ".join(ents) or "none"
    return answer


@pytest.fixture
def ner_dir(tmp_path):
    write_jsonl(tmp_path / "ner/train.jsonl", NER_TRAIN)
    write_jsonl(tmp_path / "ner/test.jsonl", NER_TEST)
    return tmp_path


def _ner(ner_dir, model, shots=2, **kw):
    cfg = FinanceConfig(tasks=("ner",), data_dir=str(ner_dir), shots=shots, bootstrap=0, **kw)
    lm = FakeLM(model)
    run = run_finance(lm, cfg, load_tasks(cfg), log=lambda *_: None)
    return run.results["tasks"]["ner"], lm, run


def test_ner_default_is_bloomberggpt_protocol(ner_dir):
    r, lm, run = _ner(ner_dir, oracle())
    assert r["protocol"] == {"entity_types": ["PER", "ORG", "LOC"], "sentences": "with-entities"}
    assert run.results["config"]["ner_protocol"] == r["protocol"]
    assert r["n"] == 2 and r["dropped_sentences"] == {"train": 2, "test": 2}
    assert r["dropped_entities"] == {"train": 1, "test": 2}  # French; English and German
    # the oracle's MISC answer ("German (miscellaneous)") is outside the protocol: not a prediction
    assert (r["value"], r["tp"], r["n_gold_entities"], r["n_pred_entities"], r["unparsed_items"]) == (1.0, 4, 4, 4, 1)
    assert all("miscellaneous" not in p.rsplit("\n\n", 1)[0] for p in lm.prompts)  # no MISC in any shot


def test_ner_keep_misc_switch(ner_dir):
    r, _, _ = _ner(ner_dir, oracle(), ner_types=("PER", "ORG", "LOC", "MISC"))
    assert r["n"] == 3 and r["value"] == 1.0 and r["n_gold_entities"] == 6
    # an oracle that never names MISC: tp 4 of 6 gold, 4 predicted -> F1 = 2*4/(6+4)
    r, _, _ = _ner(ner_dir, oracle(keep=("PER", "ORG", "LOC")), ner_types=("PER", "ORG", "LOC", "MISC"))
    assert (r["tp"], r["n_gold_entities"], r["n_pred_entities"]) == (4, 6, 4) and r["value"] == pytest.approx(0.8)


def test_ner_empty_sentence_switch(ner_dir):
    # one spurious entity per sentence: with-entities -> 2 sentences, 4 gold, 4 + 2 predicted: F1 = 8/10
    r, _, _ = _ner(ner_dir, oracle(spurious=True))
    assert (r["n"], r["tp"], r["n_pred_entities"], r["value"]) == (2, 4, 6, pytest.approx(0.8))
    # all sentences -> 4 sentences, 4 gold, 4 + 4 predicted: F1 = 8/12
    r, _, _ = _ner(ner_dir, oracle(spurious=True), ner_include_empty=True)
    assert r["protocol"]["sentences"] == "all" and r["dropped_sentences"] == {"train": 0, "test": 0}
    assert (r["n"], r["tp"], r["n_pred_entities"], r["value"]) == (4, 4, 8, pytest.approx(2 / 3))


def test_ner_shot_count_switch(ner_dir):
    for k in (1, 2):
        r, lm, _ = _ner(ner_dir, oracle(), shots=None, task_shots={"ner": k})
        assert r["shots"] == k and {p.count("Extract named entity:") for p in lm.prompts} == {k + 1}
    with pytest.raises(UserError, match=r"task ner: 4-shot prompts need 4 train examples other than the test example"):
        _ner(ner_dir, oracle(), shots=4)  # 3 sentences keep an entity under the default protocol
    with pytest.raises(UserError, match="entity types"):
        _ner(ner_dir, oracle(), ner_types=("PER", "MONEY"))


def test_parse_shots():
    assert parse_shots(None) == (None, {})
    assert parse_shots("3") == (3, {})
    assert parse_shots("ner=20,fpb=5") == (None, {"ner": 20, "fpb": 5})
    assert parse_shots("5, ner=20") == (5, {"ner": 20})
    with pytest.raises(UserError, match="expected K or TASK=K"):
        parse_shots("ner:20")


def test_cli_switches_end_to_end(model_dir, ner_dir, tmp_path, capsys):
    write_jsonl(ner_dir / "fpb/train.jsonl", [{"text": f"s {i}", "label": LABS[i % 3]} for i in range(6)])
    write_jsonl(ner_dir / "fpb/test.jsonl", [{"text": f"t {i}", "label": LABS[i % 3]} for i in range(4)])
    out = tmp_path / "r.json"
    assert main(["eval", "finance", "--model", str(model_dir), "--tasks", "fpb,ner", "--data-dir", str(ner_dir),
                 "--shots", "2,ner=1", "--shot-seeds", "2", "--ner-types", "per,org,loc,misc", "--ner-sentences", "all",
                 "--bootstrap", "20", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["shot_seeds"] == 2 and res["config"]["task_shots"] == {"ner": 1}
    assert res["tasks"]["fpb"]["shots"] == 2 and res["tasks"]["ner"]["shots"] == 1
    assert res["tasks"]["ner"]["protocol"] == {"entity_types": ["PER", "ORG", "LOC", "MISC"], "sentences": "all"}
    assert res["tasks"]["ner"]["n"] == 4 and len(res["tasks"]["fpb"]["shot_draws"]["values"]) == 2
    assert res["predictions_file"] == "r.predictions.jsonl" and predictions_path(out) == tmp_path / "r.predictions.jsonl"
    rows = [json.loads(x) for x in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 + 2 * 4
    fpb = [r for r in rows if r["task"] == "fpb"]
    assert all(set(r["scores"]) == set(LABS) and r["pred"] == max(r["scores"], key=r["scores"].get) for r in fpb)
    ner = [r for r in rows if r["task"] == "ner"]
    assert ner[0]["gold"] == [["Acme Corp", "ORG"], ["Jane Doe", "PER"], ["London", "LOC"]] and "generated" in ner[0]["pred"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(model_dir.name + " | fpb weighted_f1 ") and " draws n=4 | ner entity_f1 " in lines[-1]
    assert lines[-2].endswith("r.predictions.jsonl")


def test_write_run_is_beside_results(tmp_path, fpb_dir):
    cfg = FinanceConfig(tasks=("fpb",), data_dir=str(fpb_dir), shots=1, bootstrap=0)
    run = run_finance(FakeLM(last_shot_label), cfg, log=lambda *_: None)
    pred = write_run(run, tmp_path / "res")  # no .json suffix
    assert pred == tmp_path / "res.predictions.jsonl" and json.loads((tmp_path / "res").read_text())["tasks"]
    assert entity_counts_per_example([[("A", "PER")]], [[("a", "PER"), ("B", "ORG")]]).tolist() == [[1, 1, 2]]
