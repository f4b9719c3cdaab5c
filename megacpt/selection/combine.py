"""Metrics from score files -> percentile ranks -> one combined score per document (docs/method.md §2).

Metric names and the score-file column each one reads (higher column value = more useful, except
where noted):
    sim   similarity        task similarity (ETS-DACP)
    ppl   nll_mean          novelty under the base model; perplexity = exp(nll_mean) is monotone in it
    ent   pos_entropy       POS-tag diversity (ETA-DACP)
    dsir  dsir_log_weight   DSIR hashed n-gram importance weight
Percentile rank: ``(average rank - 0.5) / n`` in (0, 1) (ties share their mean rank), so every
document has a positive soft-sampling weight and scales of different metrics never mix.
Documents with ``n_pred = 0`` in a perplexity file (fewer than 2 tokens: nothing to predict) have no
perplexity; they rank as the least novel (tied at the bottom). Any other NaN is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megacpt.errors import UserError
from megacpt.data.identity import same_dataset
from megacpt.score.files import ScoreFile

METRIC_COLUMNS: dict[str, str] = {"sim": "similarity", "ppl": "nll_mean", "ent": "pos_entropy",
                                  "dsir": "dsir_log_weight"}
STRATEGIES: dict[str, tuple[str, ...] | None] = {
    "ets": ("sim",), "eta-ppl": ("ppl",), "eta-ent": ("ent",), "dsir": ("dsir",),
    "combined": None,  # the --weights metrics, default: every metric given, equal weights
    "random": (), "full": (),
}


@dataclass
class Metric:
    name: str
    values: np.ndarray      # float64 [num_documents]; NaN only where undefined
    undefined: np.ndarray   # bool [num_documents]: no value by definition (ppl with n_pred = 0)
    source: str             # score file path


def percentile_rank(values: np.ndarray, undefined: np.ndarray | None = None) -> np.ndarray:
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64).copy()
    if undefined is not None:
        v[undefined] = -np.inf  # below every defined value, tied among themselves
    if v.size == 0:
        return v
    return (rankdata(v, method="average") - 0.5) / v.size


def metric_of(sf: ScoreFile) -> str:
    name = sf.meta.get("metric")
    by_column = [m for m, c in METRIC_COLUMNS.items() if c == name or (name is None and c in sf.columns)]
    if len(by_column) != 1:
        raise UserError(f"{sf.path}: cannot tell which metric it holds (columns: {', '.join(sf.columns)}; "
                        f"expected one of {', '.join(METRIC_COLUMNS.values())})")
    return by_column[0]


def load_metrics(files: list[ScoreFile], dataset: dict) -> dict[str, Metric]:
    """Check each score file belongs to ``dataset`` (an identity dict) and extract its metric."""
    out: dict[str, Metric] = {}
    n = dataset["num_documents"]
    for sf in files:
        if sf.num_rows != n:
            raise UserError(f"{sf.path}: has {sf.num_rows} rows but the dataset has {n} documents "
                            "(scores of a different dataset?)")
        their = sf.meta.get("dataset")
        if their and not same_dataset(their, dataset):
            raise UserError(f"{sf.path}: scores dataset {their.get('prefix')} (idx sha256 "
                            f"{str(their.get('idx_sha256'))[:12]}…), not {dataset['prefix']} "
                            f"(idx sha256 {dataset['idx_sha256'][:12]}…)")
        name = metric_of(sf)
        if name in out:
            raise UserError(f"{sf.path}: metric {name!r} is also given by {out[name].source}")
        col = METRIC_COLUMNS[name]
        if col not in sf.columns:
            raise UserError(f"{sf.path}: metadata says metric {col!r} but there is no such column")
        values = np.asarray(sf.columns[col], dtype=np.float64)
        undefined = np.zeros(n, dtype=bool)
        if name == "ppl" and "n_pred" in sf.columns:
            undefined = np.asarray(sf.columns["n_pred"]) == 0
        bad = ~np.isfinite(values) & ~undefined
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise UserError(f"{sf.path}: {int(bad.sum())} non-finite {col} values (first at doc_id {first})")
        out[name] = Metric(name, values, undefined, sf.path)
    return out


def parse_weights(spec: str | None) -> dict[str, float] | None:
    if spec is None:
        return None
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, val = part.partition("=")
        if not eq or key not in METRIC_COLUMNS:
            raise UserError(f"--weights: bad entry {part!r}; expected NAME=W with NAME in {', '.join(METRIC_COLUMNS)}")
        try:
            w = float(val)
        except ValueError:
            raise UserError(f"--weights: {part!r}: weight is not a number") from None
        if not np.isfinite(w) or w < 0:
            raise UserError(f"--weights: {part!r}: weight must be finite and >= 0")
        weights[key] = w
    if not weights or sum(weights.values()) <= 0:
        raise UserError("--weights: at least one positive weight is needed")
    return weights


def strategy_weights(strategy: str, metrics: dict[str, Metric], weights: dict[str, float] | None) -> dict[str, float]:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    fixed = STRATEGIES[strategy]
    if fixed is not None:
        if weights is not None:
            raise UserError(f"--weights applies to --strategy combined only, not {strategy}")
        need = {m: 1.0 for m in fixed}
    else:
        need = weights or {m: 1.0 for m in metrics}
        if not need:
            raise UserError("--strategy combined needs score files (--scores) for the metrics to combine")
    missing = [m for m in need if m not in metrics and need[m] > 0]
    if missing:
        raise UserError(f"--strategy {strategy} needs a {' and a '.join(METRIC_COLUMNS[m] for m in missing)} "
                        "score file (--scores)")
    return {m: w for m, w in need.items() if w > 0}


def combined_score(metrics: dict[str, Metric], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of percentile ranks, in (0, 1)."""
    total = sum(weights.values())
    return sum(w * percentile_rank(metrics[m].values, metrics[m].undefined) for m, w in weights.items()) / total
