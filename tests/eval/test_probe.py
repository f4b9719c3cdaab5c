"""Linear probe on frozen features: separable classes are found, baselines are exact, the CLI writes results."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.eval.probe import chance_scores, fit_predict, scores
from tests.eval.conftest import write_jsonl

CUES = {"up": "Profits rose sharply", "down": "Shares fell after the bank cut"}


def _task(root, n_train=40, n_test=30, seed=0):
    rng = random.Random(seed)
    fill = ["at the company", "this quarter", "on Monday", "in London", "analysts said"]

    def rows(n):
        return [{"text": f"{CUES[lab]} {rng.choice(fill)} {rng.choice(fill)}", "label": lab}
                for lab in (rng.choice(list(CUES)) for _ in range(n))]

    write_jsonl(root / "updown" / "train.jsonl", rows(n_train))
    write_jsonl(root / "updown" / "test.jsonl", rows(n_test))
    (root / "updown" / "task.yaml").write_text("kind: classification\nlabels: [up, down]\n")
    return root


def test_probe_cli_separates_cue_words_with_a_random_model(tmp_path, model_dir):
    """Even random features keep token identity: a linear probe must separate two cue phrases."""
    data = _task(tmp_path / "tasks")
    out = tmp_path / "probe.json"
    assert main(["eval", "probe", "--model", str(model_dir), "--tasks", "updown", "--data-dir", str(data),
                 "--bootstrap", "50", "--out", str(out), "--predictions"]) == 0
    r = json.loads(out.read_text())["tasks"]["updown"]
    assert r["metric"] == "macro_f1" and r["value"] > 0.9 and r["balanced_accuracy"] > 0.9
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1] and len(r["predictions"]) == r["n"] == 30
    assert r["baselines"]["chance"]["balanced_accuracy"] == 0.5
    maj = r["baselines"]["majority"]
    assert maj["balanced_accuracy"] == 0.5 and maj["macro_f1"] < 0.5


def test_scores_and_baselines_against_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    gold = ["a", "a", "a", "b", "c", "c"]
    pred = ["a", "b", "a", "b", "a", "c"]
    s = scores(gold, pred, ["a", "b", "c"])
    assert s["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(gold, pred))
    # chance: the expected score of uniform random labels, checked by simulation
    rng = np.random.default_rng(0)
    big_gold = gold * 200
    sims = [f1_score(big_gold, list(rng.choice(["a", "b", "c"], len(big_gold))), average="macro",
                     labels=["a", "b", "c"], zero_division=0) for _ in range(50)]
    assert chance_scores(big_gold, ["a", "b", "c"])["macro_f1"] == pytest.approx(np.mean(sims), abs=0.01)


def test_probe_needs_two_classes():
    from megacpt.errors import UserError

    with pytest.raises(UserError, match="two classes"):
        fit_predict(np.zeros((3, 2)), ["a", "a", "a"], np.zeros((1, 2)), 1.0, 0)
