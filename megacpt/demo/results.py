"""The study's numbers: per-seed values of every arm, intervals, paired differences, verdicts (plain data).

Read from the stage outputs (per-document NLL score files, probe and calibrated-scoring results with
their per-example predictions, training logs, selection manifests); everything written to report.json.
Metrics (docs/method.md §4.2), each with the direction that is better:

| key | what | better |
|---|---|---|
| ``domain`` | token-weighted NLL (nats/token) on domain_eval; shown as perplexity exp(NLL) | lower |
| ``general`` | the same on general_eval (forgetting) | lower |
| ``task_inputs`` | the same on the inputs of the tasks' test splits (what ETS targets) | lower |
| ``probe`` | linear-probe macro-F1, mean over the tasks (the primary task metric) | higher |
| ``calibrated`` | macro-F1 of calibrated label scoring, mean over the tasks | higher |
| ``probe:<task>``, ``calibrated:<task>`` | per task (also balanced accuracy in ``tasks``) | higher |
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from megacpt.demo.corpora.build import TASKS
from megacpt.demo.pipeline import (CRAWLS, SELECTION_STRATEGIES, Arm, DemoSettings, eval_dir, matched_arms, pct,
                                   read_json, run_dir, study_arms)
from megacpt.demo.stats import (HOLDS, INCONCLUSIVE, REFUTED, Interval, bootstrap_test_var, paired_difference,
                                t_interval, verdict)
from megacpt.eval.probe import chance_scores, scores as task_scores

PPL_METRICS = {"domain": "domain_eval", "general": "general_eval", "task_inputs": "task_inputs_eval",
               "domain_val": "domain_val"}
TASK_METHODS = ("probe", "calibrated")
LOWER_IS_BETTER = set(PPL_METRICS)


@dataclass
class ModelEval:
    """One trained model's evaluation, kept per item for the paired test-set bootstrap."""

    nll: dict[str, np.ndarray]                 # held-out set -> [docs, 2] (nll_sum, n_pred)
    tasks: dict[str, dict[str, dict]]          # method -> task -> {gold, pred, labels, macro_f1, ...}
    tokens_trained: int = 0
    train_iters: int = 0

    def value(self, metric: str, rows: dict[str, np.ndarray] | None = None) -> float:
        """The metric on all items, or on ``rows`` (resampled item indices per held-out set / task)."""
        if metric in PPL_METRICS:
            a = self.nll[PPL_METRICS[metric]]
            if rows is not None:
                a = a[rows[metric]]
            return float(a[:, 0].sum() / max(a[:, 1].sum(), 1))
        method, _, task = metric.partition(":")
        names = [task] if task else list(TASKS)
        vals = []
        for t in names:
            r = self.tasks[method][t]
            g, p = r["gold_idx"], r["pred_idx"]
            if rows is not None:
                idx = rows[f"{method}:{t}"]
                g, p = g[idx], p[idx]
            vals.append(macro_f1_idx(g, p, len(r["labels"])))
        return float(np.mean(vals))

    def n_items(self) -> dict[str, int]:
        out = {m: len(self.nll[n]) for m, n in PPL_METRICS.items()}
        out.update({f"{m}:{t}": len(r["gold"]) for m, per in self.tasks.items() for t, r in per.items()})
        return out


def macro_f1_idx(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over ``k`` classes of integer labels (sklearn's, zero_division=0), for the bootstrap's speed."""
    tp = np.bincount(gold[gold == pred], minlength=k)
    denom = np.bincount(gold, minlength=k) + np.bincount(pred, minlength=k)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def load_model_eval(workdir: Path, arm: str, seed: int | None, seq_length: int) -> ModelEval:
    from megacpt.score.files import read_scores

    d = workdir / eval_dir(arm, seed)
    nll = {}
    for name in PPL_METRICS.values():
        cols = read_scores(d / f"{name}.parquet").columns
        nll[name] = np.stack([cols["nll_sum"].astype(np.float64), cols["n_pred"].astype(np.float64)], axis=1)
    tasks: dict[str, dict[str, dict]] = {}
    for method, file in (("probe", "probe.json"), ("calibrated", "finance.json")):
        tasks[method] = {}
        for t, r in read_json(d / file)["tasks"].items():
            gold = np.array([x["gold"] for x in r["predictions"]], dtype=object)
            pred = np.array([x["pred"] for x in r["predictions"]], dtype=object)
            code = {lab: i for i, lab in enumerate(r["labels"])}
            tasks[method][t] = {"gold": gold, "pred": pred, "labels": r["labels"],
                                "gold_idx": np.array([code[x] for x in gold], dtype=np.int64),
                                "pred_idx": np.array([code[x] for x in pred], dtype=np.int64),
                                **task_scores(list(gold), list(pred), r["labels"])}
    me = ModelEval(nll, tasks)
    if arm != "base":
        me.tokens_trained, me.train_iters = _trained(workdir / run_dir(arm, seed), seq_length)
    return me


def _trained(run: Path, seq_length: int) -> tuple[int, int]:
    """(tokens, iterations) from the run's own log: samples consumed x sequence length."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    consumed = max((r["consumed_samples"] for r in recs if r.get("consumed_samples") is not None), default=0)
    return int(consumed) * seq_length, max((int(r.get("iteration", 0)) for r in recs), default=0)


def loss_curve(run: Path, kind: str = "train") -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    out: dict[int, float] = {}  # a resumed run appends: the last record of an iteration wins
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r.get("kind") == kind and r.get("loss") is not None:
            out[int(r["iteration"])] = float(r["loss"])
    return sorted(out.items())


# ------------------------------------------------------------------------------------------- statistics

def _interval_of(evals: list[ModelEval], metric: str, n_boot: int, seed: int) -> Interval:
    vals = [e.value(metric) for e in evals]
    return t_interval(vals, _test_var(evals, [None] * len(evals), metric, n_boot, seed))


def _test_var(a: list[ModelEval], b: list[ModelEval | None], metric: str, n_boot: int, seed: int) -> float:
    """Test-set variance of mean_s (metric(a_s) − metric(b_s)) (b None: of mean_s metric(a_s)); a task mean
    resamples each task's test items independently (stats.bootstrap_test_var)."""
    sizes = a[0].n_items()
    keys = [metric] if metric in PPL_METRICS or ":" in metric else [f"{metric}:{t}" for t in TASKS]
    return bootstrap_test_var({k: sizes[k] for k in keys}, lambda rows: float(np.mean(
        [x.value(metric, rows) - (y.value(metric, rows) if y is not None else 0.0) for x, y in zip(a, b)])),
        n_boot, seed)


@dataclass
class ArmResult:
    name: str
    group: str                         # main | ablation | base
    strategy: str
    sampling: str
    fraction: float                    # of the crawl's tokens selected (1 for full)
    matched: bool
    seeds: list[int]
    per_seed: dict[str, list[float]]   # metric -> value per seed (NLL for perplexities)
    intervals: dict[str, dict]         # metric -> Interval as dict
    tokens_trained: list[int]
    train_iters: list[int]
    selected_docs: list[int] = field(default_factory=list)
    selected_tokens: list[int] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)   # selected documents by crawl source (first seed)
    tasks: dict[str, dict[str, dict]] = field(default_factory=dict)   # method -> task -> mean scores over seeds
    equivalent_random_budget: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Claim:
    claim: str
    group: str
    arm: str
    reference: str
    metric: str
    kind: str                          # at_least | better
    margin: float
    difference: dict                   # Interval of the difference (positive favours the claim)
    verdict: str


@dataclass
class StudyResults:
    title: str
    date: str
    origin: str
    settings: dict
    arms: list[ArmResult]
    claims: list[Claim]
    regime: dict
    base_curve: dict
    best_strategy: dict
    stages: list[dict]
    wall_s: float
    peak_rss_mb: float
    corpora: dict
    selection_reports: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def arm(self, name: str) -> ArmResult | None:
        return next((a for a in self.arms if a.name == name), None)

    def summary_lines(self) -> list[str]:
        out = []
        for a in self.arms:
            d, g, p = (a.intervals[m] for m in ("domain", "general", "probe"))
            out.append(f"{a.name:<24} domain ppl {math.exp(d['mean']):8.2f}  general ppl {math.exp(g['mean']):8.2f}  "
                       f"probe macro-F1 {p['mean']:.3f}  (seeds: {len(a.seeds)})")
        counts = Counter((c.claim, c.verdict) for c in self.claims if c.group == "main")
        for claim in dict.fromkeys(c.claim for c in self.claims if c.group == "main"):
            out.append(f"{claim}: " + ", ".join(f"{v} {counts[(claim, v)]}" for v in (HOLDS, REFUTED, INCONCLUSIVE)))
        out.append(f"regime: {self.regime.get('status')}")
        return out

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- collection

def _oriented(metric: str, a: list[float], b: list[float]) -> tuple[list[float], list[float]]:
    """Per-seed values so that a − b > 0 favours a."""
    return (b, a) if metric in LOWER_IS_BETTER else (a, b)


def _claim(name, group, arm, ref, metric, kind, margin, ev, s: DemoSettings) -> Claim:
    xa, xb = ev[arm], ev[ref]
    if len(xb) == 1 and len(xa) > 1:      # the base: one model, the reference of every seed
        xb = xb * len(xa)
    va, vb = [e.value(metric) for e in xa], [e.value(metric) for e in xb]
    hi_first, lo_first = _oriented(metric, va, vb)
    if metric in LOWER_IS_BETTER:
        tv = _test_var(xb, xa, metric, s.stats_bootstrap, s.seed)
    else:
        tv = _test_var(xa, xb, metric, s.stats_bootstrap, s.seed)
    d = paired_difference(hi_first, lo_first, tv)
    return Claim(name, group, arm, ref, metric, kind, margin, d.as_dict(), verdict(d, kind, margin))


def _equivalent_budget(curve: list[tuple[float, float]], value: float, lower_better: bool) -> float | None:
    """Random-token share whose (interpolated, log-fraction) metric equals ``value``; None off the curve or
    when the curve is not monotone."""
    xs = np.log([f for f, _ in curve])
    ys = np.array([v for _, v in curve]) * (-1 if lower_better else 1)   # increasing when it improves
    if not np.all(np.diff(ys) > 0):
        return None
    y = value * (-1 if lower_better else 1)
    if y <= ys[0]:
        return 0.0 if y < ys[0] else curve[0][0]
    if y >= ys[-1]:
        return float("inf") if y > ys[-1] else 1.0
    return float(np.exp(np.interp(y, ys, xs)))


def collect_results(workdir: Path, s: DemoSettings, summary: list[dict], wall_s: float = 0.0,
                    peak_rss_mb: float = 0.0) -> StudyResults:
    best = read_json(workdir / "configs/best-strategy.json") if s.compute_matched else {"best": None}
    arms = study_arms(s)
    # compute-matched arms: evaluated as matched-best / matched-random, shown under their real names
    matched = []
    for a in matched_arms(s, _arm_named(arms, best.get("best"))):
        slot = "random" if a.strategy == "random" else "best"
        matched.append((Arm(f"matched-{slot}", "", a.strategy, a.sampling, a.fraction, matched=True), a.name))
    ev: dict[str, list[ModelEval]] = {"base": [load_model_eval(workdir, "base", None, s.seq_length)]}
    for a in arms:
        ev[a.name] = [load_model_eval(workdir, a.name, sd, s.seq_length) for sd in s.seeds]
    for a, _ in matched:
        ev[a.name] = [load_model_eval(workdir, a.name, sd, s.seq_length) for sd in s.seeds]

    metrics = ["domain", "general", "task_inputs", "probe", "calibrated",
               *[f"{m}:{t}" for m in TASK_METHODS for t in TASKS]]
    sources = _sources(workdir, s)

    def arm_result(name: str, group: str, arm: Arm | None, label: str | None = None) -> ArmResult:
        evals = ev[name]
        per_seed = {m: [e.value(m) for e in evals] for m in metrics}
        intervals = {m: _interval_of(evals, m, s.stats_bootstrap, s.seed).as_dict() for m in metrics}
        seeds = [s.seed] if name == "base" else s.seeds
        res = ArmResult(label or name, group, arm.strategy if arm else "base", arm.sampling if arm else "",
                        arm.fraction if arm else 0.0, bool(arm and arm.matched), seeds, per_seed, intervals,
                        [e.tokens_trained for e in evals], [e.train_iters for e in evals])
        res.tasks = {m: {t: {k: float(np.mean([e.tasks[m][t][k] for e in evals]))
                             for k in ("macro_f1", "balanced_accuracy", "accuracy", "weighted_f1")}
                         for t in TASKS} for m in TASK_METHODS}
        if arm is not None:
            sel = arm.selection(s.seeds[0]) if arm.strategy != "full" else None
            for sd in s.seeds:
                p = arm.selection(sd)
                if p is None:
                    from megacpt.data.indexed import IndexedDataset

                    ds = IndexedDataset(workdir / f"data/{CRAWLS[arm.crawl]}_text_document")
                    res.selected_docs.append(int(ds.num_documents))
                    res.selected_tokens.append(int(ds.num_tokens))
                else:
                    m = read_json(workdir / f"{p}.manifest.json")
                    res.selected_docs.append(m["budget"]["achieved_documents"])
                    res.selected_tokens.append(m["budget"]["achieved_tokens"])
            res.sources = sources[arm.crawl](sel)
        return res

    results = [arm_result("base", "base", None)]
    results += [arm_result(a.name, a.group, a) for a in arms]
    results += [arm_result(a.name, "main", a, label=label) for a, label in matched]
    # the random-budget curves (random at each fraction, full = 100%) and where each arm falls on them
    for group, crawl in (("main", ""), ("ablation", "noisy-")):
        curve_arms = [r for r in results if r.group == group and r.strategy in ("random", "full") and not r.matched]
        curve_arms.sort(key=lambda r: r.fraction)
        for metric in ("domain", "probe"):
            curve = [(r.fraction, r.intervals[metric]["mean"]) for r in curve_arms]
            if len(curve) < 2:
                continue
            for r in results:
                if r.group == group:
                    r.equivalent_random_budget[metric] = _equivalent_budget(curve, r.intervals[metric]["mean"],
                                                                            metric in LOWER_IS_BETTER)

    claims = _claims(s, results, ev, {a.name: lab for a, lab in matched})
    regime = _regime(s, ev)
    return StudyResults(
        title="megacpt demo: does selecting 10% of a domain corpus match continual pre-training on all of it?",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        origin=read_json(workdir / "corpora/corpora.json")["origin"], settings=_settings(s), arms=results,
        claims=claims, regime=regime, base_curve=_base_curve(workdir), best_strategy=best,
        stages=[{k: x.get(k) for k in ("name", "wall_s", "cpu_s", "peak_rss_mb", "skipped", "finished_at")}
                for x in summary],
        wall_s=wall_s, peak_rss_mb=peak_rss_mb, corpora=read_json(workdir / "corpora/corpora.json"),
        selection_reports=[f"{c}selection-report/report.md" for c in CRAWLS
                           if (workdir / f"{c}selection-report/report.md").exists()],
    )


def _arm_named(arms: list[Arm], name: str | None) -> Arm | None:
    return next((a for a in arms if a.name == name), None)


def _sources(workdir: Path, s: DemoSettings) -> dict[str, Callable]:
    out = {}
    for crawl, name in CRAWLS.items():
        path = workdir / "corpora" / f"{name}.jsonl"
        if not path.exists():
            continue
        src = [json.loads(x)["source"] for x in path.read_text(encoding="utf-8").splitlines()]

        def by_source(sel: str | None, src=src) -> dict[str, int]:
            ids = range(len(src)) if sel is None else read_json(workdir / f"{sel}.manifest.json")["selected_doc_ids"]
            return dict(sorted(Counter(src[i] for i in ids).items()))

        out[crawl] = by_source
    return out


def _claims(s: DemoSettings, results: list[ArmResult], ev: dict, matched_labels: dict[str, str]) -> list[Claim]:
    out = []
    for group, crawl in (("main", ""), ("ablation", "noisy-")):
        full, rnd = f"{crawl}full", f"{crawl}random-{pct(s.budget_fraction)}"
        selected = [r.name for r in results if r.group == group and r.strategy in SELECTION_STRATEGIES
                    and not r.matched]
        if full not in ev:
            continue
        for arm in selected:
            for metric, margin in (("probe", s.task_margin), ("domain", s.ppl_margin)):
                out.append(_claim("10% selection >= full DACP", group, arm, full, metric, "at_least", margin, ev, s))
                out.append(_claim("selection > random", group, arm, rnd, metric, "better", margin, ev, s))
        for arm in [r.name for r in results if r.group == group and r.name != "base" and not r.matched]:
            out.append(_claim("no general-domain degradation", group, arm, "base", "general", "at_least",
                              s.ppl_margin, ev, s))
    for key in matched_labels:
        if key == "matched-best":
            out.append(_claim("compute-matched selection >= full DACP", "main", key, "full", "probe", "at_least",
                              s.task_margin, ev, s))
            out.append(_claim("compute-matched selection > random", "main", key, "matched-random", "probe",
                              "better", s.task_margin, ev, s))
            out.append(_claim("compute-matched selection > random", "main", key, "matched-random", "domain",
                              "better", s.ppl_margin, ev, s))
    for c in out:   # report under the labels the arms are shown with
        c.arm, c.reference = matched_labels.get(c.arm, c.arm), matched_labels.get(c.reference, c.reference)
    return out


def _regime(s: DemoSettings, ev: dict) -> dict:
    """Token starvation: is the domain metric still improving from the largest random share to 100%?"""
    below = [f for f in s.random_fractions if f < 1]
    if not below or "full" not in ev:
        return {"status": INCONCLUSIVE, "text": "no random-budget curve"}
    f = max(below)
    ref = f"random-{pct(f)}"
    va, vb = [e.value("domain") for e in ev[ref]], [e.value("domain") for e in ev["full"]]
    d = paired_difference(va, vb, _test_var(ev[ref], ev["full"], "domain", s.stats_bootstrap, s.seed))
    # d > 0: full is better; starved when 100% beats the largest share by more than the margin, for sure
    starved = d.lo > s.ppl_margin
    flat = d.hi < s.ppl_margin
    status = "starved" if starved else "flat" if flat else INCONCLUSIVE
    return {"status": status, "from_fraction": f, "difference_nll": d.as_dict(), "margin": s.ppl_margin,
            "in_paper_regime": {"starved": False, "flat": True}.get(status)}


def _base_curve(workdir: Path) -> dict:
    run = workdir / "runs/base"
    curves = {k: loss_curve(run, f"eval/{k}") for k in ("general", "domain")}
    g = curves["general"]
    plateau = None
    if len(g) >= 4:
        last_quarter = [v for it, v in g if it >= g[-1][0] * 0.75]
        plateau = {"rel_ppl_gain_last_quarter": math.exp(last_quarter[0] - last_quarter[-1]) - 1,
                   "threshold": 0.02}
        plateau["plateaued"] = plateau["rel_ppl_gain_last_quarter"] < plateau["threshold"]
    return {"train": loss_curve(run), **curves, "plateau": plateau}


def _settings(s: DemoSettings) -> dict:
    return {"model": f"GPT-NeoX {s.model.num_layers}L/{s.model.hidden_size}H/{s.model.num_heads} heads, "
                     f"vocab {s.vocab_size} (BPE trained on the general corpus)",
            "sequence length": s.seq_length, "global batch": s.global_batch_size,
            "seeds": s.seeds,
            "base": f"{s.base_epochs:g} epochs of general_train, peak LR {s.base_lr:g}, cosine; held-out loss "
                    f"logged {s.base_eval_points} times",
            "CPT": f"{s.cpt_epochs:g} epoch of each dataset from the base, peak LR {s.cpt_lr:g}, warm-up "
                   f"{s.warmup_fraction:.0%}, cosine to {s.min_lr_ratio:g}x; compute-matched arms: as many steps "
                   "as full",
            "budget": f"{s.budget_fraction:.0%} of the crawl's tokens; random curve at "
                      f"{', '.join(pct(f) + '%' for f in s.random_fractions)} and 100% (full)",
            "strategies": f"{', '.join(s.strategies)} x {', '.join(s.samplings)} sampling (soft: exp(r/T), T = 0.1)",
            "task scoring": f"linear probe (logistic regression, C={s.probe_C:g}) on mean final hidden states; "
                            f"label likelihood with {s.label_scoring} calibration, 0-shot",
            "margins": f"perplexity {math.exp(s.ppl_margin) - 1:.0%}, macro-F1 {s.task_margin:g}",
            "mode": "quick" if s.quick else "default"}


def chance_and_majority(workdir: Path) -> dict[str, dict]:
    """Per task: chance and majority-class macro-F1 / balanced accuracy on the test split."""
    out = {}
    for t in TASKS:
        rows = [json.loads(x) for x in (workdir / f"corpora/tasks/{t}/test.jsonl").read_text().splitlines()]
        train = [json.loads(x) for x in (workdir / f"corpora/tasks/{t}/train.jsonl").read_text().splitlines()]
        labels = sorted({r["label"] for r in rows + train})
        gold = [r["label"] for r in rows]
        maj = Counter(r["label"] for r in train).most_common(1)[0][0]
        out[t] = {"majority": {"label": maj, **task_scores(gold, [maj] * len(gold), labels)},
                  "chance": chance_scores(gold, labels), "n_test": len(gold),
                  "label_counts": dict(Counter(gold))}
    return out


__all__ = ["StudyResults", "ArmResult", "Claim", "collect_results", "chance_and_majority", "HOLDS", "REFUTED",
           "INCONCLUSIVE"]
