"""Linear probe on frozen features: how much task information a model's representation holds.

For each classification task, every text (train and test split) is encoded by the frozen model; its
feature is the mean over its tokens of the final-layer-normed hidden state (the text is cut to the
model's length, from the left end). A multinomial logistic regression (scikit-learn, L2, ``C``,
standardised features, fixed seed) is fit on the train split and scored on the test split. Unlike
label likelihoods, a probe does not depend on the model generating a label word, so it separates
models at sizes where prompting predicts one label for everything (docs/method.md §4.2).

Metrics per task: macro-F1 (primary), balanced accuracy, accuracy, weighted F1, each test-set
bootstrap CI, beside two baselines computed from the labels alone: the majority class of the train
split, and chance (labels drawn uniformly at random: expected balanced accuracy 1/K, expected
macro-F1 ``mean_c 2 p_c (1/K) / (p_c + 1/K)`` with p_c the test share of class c).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megacpt.errors import UserError
from megacpt.eval.metrics import bootstrap_indices, encode, macro_f1_resampled, percentile_ci
from megacpt.eval.tasks import load_task_data, resolve_task

PROBE_METRIC = "macro_f1"


@dataclass
class ProbeConfig:
    tasks: tuple[str, ...]
    data_dir: str
    C: float = 1.0                 # inverse L2 strength of the logistic regression
    seed: int = 0
    bootstrap: int = 1000
    max_tokens: int | None = None  # per text (default: the model's length)
    predictions: bool = False


@torch.inference_mode()
def features(lm, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
    """[n, H] float64: mean final hidden state over each text's tokens (length-sorted batches)."""
    limit = min(max_tokens or lm.max_length, lm.max_length)
    ids = [(lm.tok.encode(t) or [lm._start_token()])[:limit] for t in texts]
    out = np.zeros((len(ids), lm.model.cfg.hidden_size))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    for b in range(0, len(order), lm.batch_size):
        rows = order[b:b + lm.batch_size]
        h = lm._forward_hidden([ids[i] for i in rows]).float()          # [b, s, H], right-padded
        lens = torch.tensor([len(ids[i]) for i in rows])
        mask = (torch.arange(h.shape[1])[None, :] < lens[:, None]).to(h.device, h.dtype)[..., None]
        out[rows] = ((h * mask).sum(1) / lens[:, None].to(h.device, h.dtype)).cpu().double().numpy()
    return out


def chance_scores(gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Expected scores of predictions drawn uniformly at random from ``labels``."""
    k = len(labels)
    p = np.array([np.mean([g == c for g in gold]) for c in labels])
    f1 = np.where(p > 0, 2 * p * (1 / k) / (p + 1 / k), 0.0)
    return {"macro_f1": float(f1.mean()), "balanced_accuracy": 1.0 / k, "accuracy": 1.0 / k}


def scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    kw = {"labels": list(labels), "zero_division": 0}
    return {"macro_f1": float(f1_score(gold, pred, average="macro", **kw)),
            "balanced_accuracy": float(balanced_accuracy_score(gold, pred)) if len(set(gold)) > 1 else
            float(accuracy_score(gold, pred)),
            "accuracy": float(accuracy_score(gold, pred)),
            "weighted_f1": float(f1_score(gold, pred, average="weighted", **kw))}


def fit_predict(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, C: float, seed: int) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(y_train)) < 2:
        raise UserError(f"a probe needs at least two classes in the train split, got {sorted(set(y_train))}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    clf.fit(x_train, list(y_train))
    return [str(p) for p in clf.predict(x_test)]


def run_probe(lm, cfg: ProbeConfig, log=print) -> dict:
    """The results document of `megacpt eval probe` (same format as `eval finance`)."""
    from megacpt.eval.finance import results_document

    out = {}
    for name in cfg.tasks:
        spec = resolve_task(name, cfg.data_dir)
        if spec.kind != "classification":
            raise UserError(f"task {name}: the probe handles classification tasks, not {spec.kind}")
        t0 = time.perf_counter()
        train, test, _ = load_task_data(spec, cfg.data_dir, shots=1)
        gold = [e.label for e in test]
        pred = fit_predict(features(lm, [e.text for e in train], cfg.max_tokens), [e.label for e in train],
                           features(lm, [e.text for e in test], cfg.max_tokens), cfg.C, cfg.seed)
        res = scores(gold, pred, spec.labels)
        # every resample at once from class counts (scikit-learn per resample cost ~8 s per model here)
        ci = percentile_ci(macro_f1_resampled(encode(gold, spec.labels), encode(pred, spec.labels),
                                              len(spec.labels), bootstrap_indices(len(test), cfg.bootstrap, cfg.seed)))
        majority = max(spec.labels, key=lambda c: (sum(e.label == c for e in train), -spec.labels.index(c)))
        out[name] = {"kind": "probe", "metric": PROBE_METRIC, "value": res[PROBE_METRIC], "n": len(test),
                     "ci95": list(ci), "n_train": len(train), "labels": list(spec.labels), **res,
                     "baselines": {"majority": {"label": majority, **scores(gold, [majority] * len(gold), spec.labels)},
                                   "chance": chance_scores(gold, spec.labels)},
                     "C": cfg.C, "seconds": round(time.perf_counter() - t0, 3)}
        if cfg.predictions:
            out[name]["predictions"] = [{"where": e.where, "gold": e.label, "pred": q} for e, q in zip(test, pred)]
        log(f"[eval] probe {name}: macro_f1={res['macro_f1']:.4f} balanced_acc={res['balanced_accuracy']:.4f} "
            f"n={len(test)} ({out[name]['seconds']:.1f}s)")
    return results_document(lm, {"tasks": list(cfg.tasks), "data_dir": cfg.data_dir, "probe": "logistic regression "
                                 "on mean final hidden states", "C": cfg.C, "seed": cfg.seed,
                                 "bootstrap": cfg.bootstrap}, out)
