"""Turning scores into a subset under a budget: hard (top-k), soft (Efraimidis–Spirakis), random.

Every function returns an *order* over candidate documents; ``take_budget`` walks an order and stops
at the first document that reaches the budget, so the selection never overshoots by more than that
one document (and never undershoots). Ties in hard order break by doc_id (stable sort).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megacpt.errors import UserError


@dataclass
class Budget:
    kind: str      # tokens | fraction | docs
    value: float

    def validate(self) -> "Budget":
        if self.kind not in ("tokens", "fraction", "docs"):
            raise UserError(f"unknown budget kind {self.kind!r}")
        if self.kind == "fraction" and not 0 < self.value <= 1:
            raise UserError(f"--budget-fraction must be in (0, 1], got {self.value}")
        if self.kind in ("tokens", "docs") and (self.value <= 0 or self.value != int(self.value)):
            raise UserError(f"--budget-{self.kind} must be a positive integer, got {self.value}")
        return self

    def resolve(self, total_tokens: int, total_docs: int) -> tuple[str, int]:
        """-> ("tokens", N) or ("docs", N), checked against the corpus size."""
        if self.kind == "fraction":
            return "tokens", max(1, int(np.ceil(self.value * total_tokens)))
        n = int(self.value)
        have = total_tokens if self.kind == "tokens" else total_docs
        if n > have:
            raise UserError(f"--budget-{self.kind} {n} exceeds the corpus ({have} {self.kind}); "
                            "a budget over 100% cannot be met")
        return self.kind, n


def hard_order(score: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")


# Soft-sampling weight w(d) of a document's score r (a percentile rank in (0, 1) for every strategy),
# name -> (log w as a function of (r, T), default T). docs/method.md §2.6: "exp" with T = 0.1 puts ~56%
# of a 10% sample in the score's top decile, halfway between random (10%) and hard (100%); the
# former default "power" (w = r^(1/T), T = 1) puts ~18% there, barely more than random.
SOFT_WEIGHTINGS = {
    "exp": (lambda r, t: r / t, 0.1),                  # w = exp(r / T)
    "power": (lambda r, t: np.log(r) / t, 1.0),        # w = r^(1/T); r = 0 never drawn before r > 0
}
DEFAULT_SOFT_WEIGHTING = "exp"


def soft_order(score: np.ndarray, temperature: float, seed: int, *, weighting: str) -> np.ndarray:
    """Weighted sampling without replacement, weight w(score) of ``weighting``: Efraimidis–Spirakis keys
    u^(1/w), in descending order.

    Successive draws of this order follow the sequential-sampling law: the first is i with probability
    w_i / sum(w), the next among the rest likewise. Keys are compared as log w − log(−log u) (the same
    order as u^(1/w)), finite for any weight, so exp(r / T) never overflows.
    """
    if not temperature > 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    if weighting not in SOFT_WEIGHTINGS:
        raise UserError(f"--soft-weighting {weighting!r}: expected one of {', '.join(SOFT_WEIGHTINGS)}")
    score = np.asarray(score, dtype=np.float64)
    if (score < 0).any():
        raise UserError("soft sampling needs non-negative scores")
    u = np.random.default_rng(seed).random(score.size)
    with np.errstate(divide="ignore"):
        log_w = SOFT_WEIGHTINGS[weighting][0](score, temperature)
        keys = np.where(np.isfinite(log_w), log_w - np.log(-np.log(u)), -np.inf)
    return np.argsort(-keys, kind="stable")


def random_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def take_budget(order: np.ndarray, lengths: np.ndarray, kind: str, n: int) -> np.ndarray:
    """Prefix of ``order`` meeting the budget: ``n`` documents, or the fewest reaching ``n`` tokens."""
    if kind == "docs":
        if n > order.size:
            raise UserError(f"--budget-docs {n} exceeds the {order.size} selectable documents")
        return order[:n]
    cum = np.cumsum(np.asarray(lengths, dtype=np.int64)[order])
    if cum.size == 0 or cum[-1] < n:
        raise UserError(f"token budget {n} exceeds the {int(cum[-1]) if cum.size else 0} tokens of the "
                        "selectable documents")
    k = int(np.searchsorted(cum, n, side="left")) + 1
    return order[:k]
