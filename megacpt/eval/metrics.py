"""Task metrics: weighted F1 (classification), entity-level F1 (NER), bootstrap confidence intervals.

Written out here (not imported from scikit-learn, which is a test-only dependency) and checked against
``sklearn.metrics.f1_score(average="weighted")`` in the tests.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Sequence

import numpy as np


def weighted_f1(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """Per-class F1 averaged with weights = gold support (sklearn's ``average="weighted"``).

    ``labels``: the classes to average over (default: every label in gold or pred). A class with no
    gold example has weight 0; a class never predicted has F1 0 (precision 0/0 taken as 0, like sklearn's
    ``zero_division=0``). Returns 0.0 when there is no gold example at all.
    """
    if len(gold) != len(pred):
        raise ValueError(f"weighted_f1: {len(gold)} gold labels vs {len(pred)} predictions")
    classes = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=str)
    tp, n_gold, n_pred = Counter(), Counter(gold), Counter(pred)
    for g, p in zip(gold, pred):
        if g == p:
            tp[g] += 1
    total = sum(n_gold[c] for c in classes)
    if total == 0:
        return 0.0
    score = 0.0
    for c in classes:
        if n_gold[c] == 0:
            continue
        denom = n_gold[c] + n_pred[c]  # F1 = 2 tp / (|gold| + |pred|)
        score += n_gold[c] * (2.0 * tp[c] / denom if denom else 0.0)
    return score / total


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, pred)])) if len(gold) else 0.0


Entity = tuple[str, str]  # (normalised span text, type)


def normalize_span(text: str) -> str:
    """Spans are compared after collapsing whitespace and case-folding (generation may re-space tokens)."""
    return " ".join(text.split()).casefold()


def entity_counts(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> tuple[int, int, int]:
    """(true positives, #gold, #pred) over examples; entities are multisets of (span, type) per example, so a
    span predicted twice but present once counts one hit and one false positive."""
    if len(gold) != len(pred):
        raise ValueError(f"entity_f1: {len(gold)} gold examples vs {len(pred)} predicted")
    tp = n_g = n_p = 0
    for g, p in zip(gold, pred):
        cg = Counter((normalize_span(s), t) for s, t in g)
        cp = Counter((normalize_span(s), t) for s, t in p)
        tp += sum((cg & cp).values())
        n_g += sum(cg.values())
        n_p += sum(cp.values())
    return tp, n_g, n_p


def entity_f1(gold: Sequence[Sequence[Entity]], pred: Sequence[Sequence[Entity]]) -> float:
    """Micro entity-level F1: an entity counts only if span text and type both match exactly.

    Both empty (no gold and no predicted entity anywhere) is a perfect 1.0; otherwise 2 tp / (|gold| + |pred|).
    """
    tp, n_g, n_p = entity_counts(gold, pred)
    if n_g + n_p == 0:
        return 1.0
    return 2.0 * tp / (n_g + n_p)


def bootstrap_ci(metric: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(idx)`` where ``idx`` resamples the n examples with replacement.

    ``metric`` receives an index array and recomputes the statistic on that resample (so a corpus-level
    metric such as F1 is recomputed, not averaged per example).
    """
    if n == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = np.array([metric(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))
