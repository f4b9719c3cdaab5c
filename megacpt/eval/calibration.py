"""Calibrated label scoring for classification by label likelihood (small models are biased to one label).

Raw scoring predicts ``argmax_y log p(verbal(y) | prompt)``. A small LM's label likelihoods carry a
prior that does not depend on the input (a frequent word wins every time), so it predicts one label for
every example. Two published corrections, both selectable with ``megacpt eval finance --label-scoring``:

- ``contextual`` — contextual calibration (Zhao et al. 2021, "Calibrate Before Use", arXiv 2102.09690):
  the label distribution the prompt produces for *content-free* inputs ("N/A", "", "[MASK]" in place of
  every field of the query, the same shots) estimates the bias ``p_cf``; the prediction is
  ``argmax_y p(y | prompt) / p_cf(y)`` with both distributions normalised over the labels
  (their ``W = diag(p_cf)^-1, b = 0``), ``p_cf`` the mean over the content-free inputs.
- ``pmi`` — domain-conditional PMI (Holtzman et al. 2021, "Surface Form Competition", arXiv
  2104.08315): ``argmax_y log p(y | prompt) − log p(y | domain premise)``, the premise being the
  template's text after the query's last field (e.g. ``"Question: what is the sentiment?\\nAnswer:"``).

Both cost extra forward passes (3 content-free prompts per query; 1 premise for the whole task).
"""
from __future__ import annotations

import string
from typing import Sequence

import numpy as np

from megacpt.errors import UserError
from megacpt.eval.prompts import Template, build_prompt

CALIBRATIONS = ("contextual", "pmi")
CONTENT_FREE = ("N/A", "", "[MASK]")


def label_log_softmax(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities normalised over the labels (last axis)."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.max(axis=-1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=-1, keepdims=True))


def contextual_calibration(raw: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Calibrated scores ``log p(y|x) − log p_cf(y)`` (both over the labels).

    ``raw``: [n, L] label log-likelihoods; ``content_free``: [n, k, L] (k content-free inputs per query,
    averaged as probabilities) or [L] (one estimate shared by every query).
    """
    cf = np.asarray(content_free, dtype=np.float64)
    p_cf = np.exp(label_log_softmax(cf))
    if p_cf.ndim == 3:
        p_cf = p_cf.mean(axis=1)
    return label_log_softmax(raw) - np.log(p_cf)


def domain_pmi(raw: np.ndarray, premise: np.ndarray) -> np.ndarray:
    """``log p(y | prompt) − log p(y | premise)`` (raw log-likelihoods; ``premise``: [L] or [n, L])."""
    return np.asarray(raw, dtype=np.float64) - np.asarray(premise, dtype=np.float64)


def domain_premise(template: Template) -> str:
    """The query text after its last field up to the answer: what every label follows in every prompt."""
    parts = list(string.Formatter().parse(template.example))          # (literal before, field, ...)
    answer = max(i for i, p in enumerate(parts) if p[1] == "answer")
    last = max((i for i, p in enumerate(parts[:answer]) if p[1] is not None), default=-1)
    premise = "".join(p[0] for p in parts[last + 1: answer + 1]).strip()
    if not premise:
        raise UserError(f"template {template.source}: no text between the last field and {{answer}} to use as "
                        "the domain premise of --label-scoring pmi; use --label-scoring contextual")
    return premise


def _requests(template: Template, queries: Sequence[dict[str, str]], shots, verbal: dict[str, str]):
    out = []
    for q, sh in zip(queries, shots):
        ctx, lead = build_prompt(template, sh, q)
        out += [(ctx, lead + verbal[lab]) for lab in verbal]
    return out


def calibrate(lm, method: str, raw: np.ndarray, template: Template, queries: Sequence[dict[str, str]],
              shots, verbal: dict[str, str]) -> np.ndarray:
    """Calibrated [n, L] scores for ``raw`` [n, L] (summed label log-likelihoods) by ``method``."""
    labels = list(verbal)
    n, L = len(queries), len(labels)
    if method == "contextual":
        cf_queries = [{k: c for k in q} for c in CONTENT_FREE for q in queries]           # [k * n]
        cf_shots = [sh for _ in CONTENT_FREE for sh in shots]
        ll = lm.loglikelihood(_requests(template, cf_queries, cf_shots, verbal))
        cf = np.array([s for s, _ in ll], dtype=np.float64).reshape(len(CONTENT_FREE), n, L).transpose(1, 0, 2)
        return contextual_calibration(raw, cf)
    if method == "pmi":
        premise = domain_premise(template)
        lead = template.split_query({f: "" for f in template.fields})[1]
        ll = lm.loglikelihood([(premise, lead + verbal[lab]) for lab in labels])
        return domain_pmi(raw, np.array([s for s, _ in ll], dtype=np.float64))
    raise UserError(f"unknown label calibration {method!r}: expected one of {', '.join(CALIBRATIONS)}")
