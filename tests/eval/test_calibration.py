"""Calibrated label scoring removes a label bias that does not depend on the input."""
from __future__ import annotations

import re

import numpy as np
import pytest

from megacpt.eval.calibration import contextual_calibration, domain_pmi, domain_premise, label_log_softmax
from megacpt.eval.prompts import load_template
from megacpt.eval.tasks import classify

LABELS = ("negative", "neutral", "positive")
CUE = {"negative": "slump", "neutral": "steady", "positive": "surge"}
BIAS = {"negative": -1.0, "neutral": 0.5, "positive": 4.0}    # raw likelihoods favour "positive" by far


class BiasedLM:
    """log p(label | prompt) = prior(label) + 2 if the query text holds the label's cue word.

    The prior is what a small LM's label likelihoods look like: it outweighs the evidence, so raw
    scoring predicts "positive" for everything. The query is the text after the prompt's last "Text:".
    """

    def __init__(self):
        self.calls = 0

    def loglikelihood(self, requests):
        self.calls += 1
        out = []
        for ctx, cont in requests:
            label = cont.strip()
            m = re.findall(r"Text: (.*)\nLabel:$", ctx)
            query = m[-1] if m and ctx.endswith("Label:") else ""
            evidence = 2.0 if CUE[label] in query.split() else 0.0
            out.append((BIAS[label] + evidence, 1))
        return out


def _data(n_per_label=8):
    queries, gold = [], []
    for i in range(n_per_label):
        for lab in LABELS:
            queries.append({"text": f"Acme shares {CUE[lab]} in trading day {i}"})
            gold.append(lab)
    shots = [[({"text": "Borealis shares surge"}, "positive"), ({"text": "Cobalt steady"}, "neutral")]
             for _ in queries]
    return queries, shots, gold


@pytest.mark.parametrize("method", ["contextual", "pmi"])
def test_calibration_removes_a_constant_label_bias(method):
    template = load_template("classification")
    queries, shots, gold = _data()
    verbal = {lab: lab for lab in LABELS}
    raw = classify(BiasedLM(), template, queries, shots, verbal, "sum")
    assert set(raw) == {"positive"}                      # the bias wins every example
    fixed = classify(BiasedLM(), template, queries, shots, verbal, method)
    assert fixed == gold                                 # calibrated: the evidence decides


def test_contextual_calibration_numbers():
    raw = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]]))
    cf = np.log(np.array([0.6, 0.2, 0.2]))
    cal = contextual_calibration(raw, cf)
    # W p with W = diag(p_cf)^-1: [0.7/0.6, 1, 0.5] and [0.5/0.6, 0.5, 2]
    assert np.argmax(cal, axis=1).tolist() == [0, 2]
    np.testing.assert_allclose(np.exp(cal[0]), [0.7 / 0.6, 1.0, 0.5])
    # several content-free inputs are averaged as probabilities
    two = np.log(np.array([[[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]]] * 2))
    np.testing.assert_allclose(np.exp(contextual_calibration(raw, two)[0]), [0.7 / 0.4, 0.2 / 0.4, 0.1 / 0.2])
    np.testing.assert_allclose(np.exp(label_log_softmax(np.log([[2.0, 2.0]]))), [[0.5, 0.5]])
    np.testing.assert_allclose(domain_pmi([[1.0, 2.0]], [0.5, 3.0]), [[0.5, -1.0]])


def test_domain_premise_of_builtin_templates():
    assert domain_premise(load_template("fpb")) == "Question: what is the sentiment?\nAnswer:"
    assert domain_premise(load_template("classification")) == "Label:"
