"""Task metrics: weighted F1 and accuracy (scikit-learn), entity-level F1 (NER), bootstrap intervals.

Point estimates of classification metrics are scikit-learn's (``f1_score(average="weighted")``,
``accuracy_score``, ``confusion_matrix``). A bootstrap needs the metric on ~1,000 resamples per task, shot
draw and Headline question; calling ``f1_score`` 1,000 times costs ~5 s per 1k examples, so
``weighted_f1_resampled`` / ``macro_f1_resampled`` compute the same formulas for all resamples at once from
per-resample class counts (tested equal to scikit-learn on resamples). Entity F1 has no scikit-learn equivalent.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def weighted_f1(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """scikit-learn's ``f1_score(average="weighted", zero_division=0)``: per-class F1 averaged with weights =
    gold support, over ``labels`` (default: every label in gold or pred). 0.0 when no gold example has a
    label in ``labels``."""
    if len(gold) != len(pred):
        raise ValueError(f"weighted_f1: {len(gold)} gold labels vs {len(pred)} predictions")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=str)
    if not set(classes) & set(gold):
        return 0.0
    return float(f1_score(list(gold), list(pred), labels=classes, average="weighted", zero_division=0))


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    return float(accuracy_score(list(gold), list(pred))) if len(gold) else 0.0


def confusion(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable]) -> dict[str, dict[str, int]]:
    """{gold label: {predicted label: count}} (scikit-learn's ``confusion_matrix`` as a nested dict)."""
    m = confusion_matrix(list(gold), list(pred), labels=list(labels)) if len(gold) else np.zeros((len(labels),) * 2, int)
    return {str(g): {str(p): int(m[i, j]) for j, p in enumerate(labels)} for i, g in enumerate(labels)}


def encode(values: Sequence[Hashable], labels: Sequence[Hashable]) -> np.ndarray:
    """Class index of each value; values outside ``labels`` get index len(labels)."""
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index.get(v, len(labels)) for v in values], dtype=np.int64)


def class_counts_resampled(gold: np.ndarray, pred: np.ndarray, n_labels: int,
                           idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample and class: (true positives, |gold_c|, |pred_c|), each [B, n_labels]. ``gold``/``pred``:
    class indices [n] (``encode``; index n_labels = outside the labels, not counted); ``idx``: [B, n]."""
    b = idx.shape[0]
    k = n_labels + 1  # + the "outside labels" bucket, dropped below
    g, p = gold[idx], pred[idx]                                  # [B, n]
    off = (np.arange(b) * k)[:, None]
    n_gold = np.bincount((g + off).ravel(), minlength=b * k).reshape(b, k)[:, :n_labels]
    n_pred = np.bincount((p + off).ravel(), minlength=b * k).reshape(b, k)[:, :n_labels]
    hit = g == p
    tp = np.bincount((g + off)[hit], minlength=b * k).reshape(b, k)[:, :n_labels]
    return tp, n_gold, n_pred


def _class_f1(tp: np.ndarray, n_gold: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """F1_c = 2 tp_c / (|gold_c| + |pred_c|), 0 when both are 0 (scikit-learn's zero_division=0)."""
    denom = n_gold + n_pred
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


def weighted_f1_resampled(gold: np.ndarray, pred: np.ndarray, n_labels: int, idx: np.ndarray) -> np.ndarray:
    """Weighted F1 of every resample at once (``class_counts_resampled``): per-class F1 averaged with weights
    |gold_c| over the ``n_labels`` classes -> [B]."""
    tp, n_gold, n_pred = class_counts_resampled(gold, pred, n_labels, idx)
    f1 = _class_f1(tp, n_gold, n_pred)
    total = n_gold.sum(1)
    return np.where(total > 0, (n_gold * f1).sum(1) / np.maximum(total, 1), 0.0)


def macro_f1_resampled(gold: np.ndarray, pred: np.ndarray, n_labels: int, idx: np.ndarray) -> np.ndarray:
    """Macro F1 of every resample at once: the unweighted mean of the ``n_labels`` per-class F1s (a class with
    no gold and no predicted example counts 0, as scikit-learn's ``average="macro", zero_division=0``) -> [B]."""
    return _class_f1(*class_counts_resampled(gold, pred, n_labels, idx)).mean(1)


Entity = tuple[str, str]  # (span text, type)


def normalize_span(text: str) -> str:
    """Spans are compared after collapsing whitespace and case-folding (generation may re-space tokens)."""
    return " ".join(text.split()).casefold()


def entity_counts_per_example(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> np.ndarray:
    """[n, 3] int: (true positives, #gold, #pred) per example. Entities are multisets of (normalised span,
    type), so a span predicted twice but present once is one hit and one false positive."""
    if len(gold) != len(pred):
        raise ValueError(f"entity_f1: {len(gold)} gold examples vs {len(pred)} predicted")
    out = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred)):
        cg = Counter((normalize_span(s), t) for s, t in g)
        cp = Counter((normalize_span(s), t) for s, t in p)
        out[i] = (sum((cg & cp).values()), sum(cg.values()), sum(cp.values()))
    return out


def entity_counts(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> tuple[int, int, int]:
    """(true positives, #gold, #pred) summed over examples."""
    tp, n_g, n_p = entity_counts_per_example(gold, pred).sum(0) if len(gold) else (0, 0, 0)
    return int(tp), int(n_g), int(n_p)


def f1_from_counts(tp, n_gold, n_pred):
    """Micro F1 = 2 tp / (|gold| + |pred|); 1.0 when there is no gold and no predicted entity at all.
    Works on scalars and on arrays of resampled counts."""
    tp, n_gold, n_pred = (np.asarray(x, dtype=np.float64) for x in (tp, n_gold, n_pred))
    denom = n_gold + n_pred
    out = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1.0), 1.0)
    return float(out) if out.ndim == 0 else out


def entity_f1(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> float:
    """Micro entity-level F1: an entity counts only if span text and type both match exactly."""
    return f1_from_counts(*entity_counts(gold, pred))


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] example indices drawn with replacement (the resamples every metric of a run shares)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n and n_boot > 0 \
        else np.zeros((0, n), dtype=np.int64)


def percentile_ci(stats: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    if len(stats) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(np.asarray(stats, dtype=np.float64), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def bootstrap_ci(metric: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(idx)``, ``idx`` one resample of the n examples (with replacement);
    the statistic is recomputed on each resample (corpus-level metrics are not averaged per example)."""
    return percentile_ci(np.array([metric(i) for i in bootstrap_indices(n, n_boot, seed)]), alpha)
