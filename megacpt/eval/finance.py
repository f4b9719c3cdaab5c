"""`megacpt eval finance`: run financial tasks on one model, write a results JSON and per-example predictions.

Results schema (``format: megacpt-eval-results/1``)::

    {"format": ..., "model": {path, loader, vocab_size, padded_vocab_size, max_length, dtype, tokenizer},
     "config": {tasks, data_dir, shots, task_shots, shot_seeds, seed, label_scoring, bootstrap, ner_protocol, ...},
     "tasks": {name: {kind, metric, value, n, ci95: [lo, hi], shots, shot_draws: {seeds, values, mean, sd},
                      template, template_sha256, n_truncated, ...task extras}},
     "predictions_file": "<results stem>.predictions.jsonl", "created": ISO time, "megacpt_version": ...}

With ``shot_seeds = K`` every task is scored K times, draw j with shots drawn from seed ``seed + j``:
``value`` is the mean over draws, ``shot_draws.sd`` their standard deviation (the few-shot variance), and
``ci95`` a percentile bootstrap of the draw-mean over the same test resamples (the test-set variance).
Per-draw details (``confusion``, ``per_question``, NER counts) are those of the first draw.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megacpt.errors import UserError
from megacpt.eval.calibration import CALIBRATIONS
from megacpt.eval.data import Example, write_jsonl
from megacpt.eval.metrics import bootstrap_indices, percentile_ci
from megacpt.eval.prompts import Template, load_template
from megacpt.eval.tasks import METRIC_NAMES, RUNNERS, TaskSpec, load_task_data, resolve_task

RESULTS_FORMAT = "megacpt-eval-results/1"


@dataclass
class FinanceConfig:
    tasks: tuple[str, ...]
    data_dir: str
    shots: int | None = None        # None: each task's default (FPB/FiQA/Headline 5, NER 20)
    seed: int = 0
    label_scoring: str = "sum"      # sum | mean (per-token) of the label log-probs | contextual | pmi
    bootstrap: int = 1000           # resamples for the 95% CI
    predictions: bool = False       # also keep per-example predictions (first draw) inside the results JSON
    task_shots: dict[str, int] = field(default_factory=dict)  # per-task k, over `shots` and the task's own
    shot_seeds: int = 1             # K shot draws (seeds seed .. seed + K - 1)
    ner_types: tuple[str, ...] | None = None  # NER protocol overrides; None: each NER task's own
    ner_include_empty: bool | None = None     # (default BloombergGPT's: PER/ORG/LOC, sentences with entities)


@dataclass
class LoadedTask:
    spec: TaskSpec
    shots: int
    template: Template
    train: list[Example]
    test: list[Example]
    notes: dict


@dataclass
class FinanceRun:
    results: dict
    predictions: list[dict]         # one row per (task, draw, test example)


def load_tasks(cfg: FinanceConfig) -> list[LoadedTask]:
    """Resolve, template and validate every task's data up front, so bad input fails before any model is
    loaded."""
    if not cfg.tasks:
        raise UserError("--tasks is empty")
    if cfg.label_scoring not in ("sum", "mean", *CALIBRATIONS):
        raise UserError(f"--label-scoring {cfg.label_scoring!r}: expected sum, mean, {', '.join(CALIBRATIONS)}")
    if cfg.shot_seeds < 1:
        raise UserError(f"--shot-seeds {cfg.shot_seeds} must be >= 1")
    unknown = sorted(set(cfg.task_shots) - set(cfg.tasks))
    if unknown:
        raise UserError(f"--shots names task(s) {unknown} that are not in --tasks {list(cfg.tasks)}")
    out = []
    for name in cfg.tasks:
        spec = resolve_task(name, cfg.data_dir)
        if spec.kind == "ner":
            if cfg.ner_types is not None:
                spec.entity_types = tuple(cfg.ner_types)
            if cfg.ner_include_empty is not None:
                spec.include_empty = cfg.ner_include_empty
        k = cfg.task_shots.get(name, spec.shots if cfg.shots is None else cfg.shots)
        if k < 0:
            raise UserError(f"--shots {k} must be >= 0")
        template = load_template(spec.template)
        train, test, notes = load_task_data(spec, cfg.data_dir, k)
        _check_pool(spec.name, train, test, k)
        out.append(LoadedTask(spec, k, template, train, test, notes))
    return out


def _check_pool(name: str, train: list[Example], test: list[Example], k: int) -> None:
    """Every test example must find k shots in the pool that are not itself (same text): say so now,
    before a model is loaded, not after the first tasks have run."""
    if k == 0:
        return
    from collections import Counter

    from megacpt.eval.metrics import normalize_span

    counts = Counter(normalize_span(e.text) for e in train)
    worst = min(test, key=lambda e: len(train) - counts[normalize_span(e.text)])
    usable = len(train) - counts[normalize_span(worst.text)]
    if usable < k:
        raise UserError(f"task {name}: {k}-shot prompts need {k} train examples other than the test example, "
                        f"{worst.where} has only {usable} (pool of {len(train)} after the task's filters)")


def _draw_seeds(cfg: FinanceConfig) -> list[int]:
    return [cfg.seed + j for j in range(cfg.shot_seeds)]


def _prediction_rows(task: LoadedTask, draw: int, seed: int, preds: list, scores: list) -> list[dict]:
    rows = []
    for i, (ex, pred, sc) in enumerate(zip(task.test, preds, scores)):
        gold = [list(x) for x in ex.label] if task.spec.kind == "ner" else ex.label
        row = {"task": task.spec.name, "draw": draw, "shot_seed": seed, "index": i, "id": ex.id, "where": ex.where,
               "gold": gold, "pred": pred if task.spec.kind != "ner" else
               {"generated": pred["generated"], "entities": [list(x) for x in pred["entities"]]}}
        if sc is not None:
            row["scores"] = sc
        rows.append(row)
    return rows


def run_finance(lm, cfg: FinanceConfig, tasks: list[LoadedTask] | None = None, log=print) -> FinanceRun:
    out_tasks, rows = {}, []
    seeds = _draw_seeds(cfg)
    tasks = tasks if tasks is not None else load_tasks(cfg)
    for task in tasks:
        spec, k = task.spec, task.shots
        t0, trunc0 = time.perf_counter(), lm.n_truncated
        draws = [RUNNERS[spec.kind](lm, spec, task.template, task.train, task.test, k, s, cfg.label_scoring)
                 for s in seeds]
        values = [d.value for d in draws]
        idx = bootstrap_indices(len(task.test), cfg.bootstrap, cfg.seed)  # shared by every draw
        ci = percentile_ci(np.mean([d.resampled(idx) for d in draws], axis=0)) if len(idx) else (math.nan, math.nan)
        res = {"kind": spec.kind, "metric": METRIC_NAMES[spec.kind], "value": float(np.mean(values)),
               "n": len(task.test), "ci95": list(ci), "shots": k,
               "shot_draws": {"seeds": seeds, "values": values, "mean": float(np.mean(values)),
                              "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None},
               "n_train": len(task.train), "template": task.template.source,
               "template_sha256": hashlib.sha256(Path(task.template.source).read_bytes()).hexdigest(),
               "labels": list(spec.labels), "n_truncated": lm.n_truncated - trunc0,
               "seconds": round(time.perf_counter() - t0, 3), **task.notes, **draws[0].extra}
        if cfg.predictions:
            res["predictions"] = [{"where": e.where, "gold": e.label, "pred": p} for e, p in zip(task.test, draws[0].preds)]
        for j, (s, d) in enumerate(zip(seeds, draws)):
            rows += _prediction_rows(task, j, s, d.preds, d.scores)
        out_tasks[spec.name] = res
        sd = res["shot_draws"]["sd"]
        log(f"[eval] {spec.name}: {res['metric']}={res['value']:.4f}"
            + (f" (sd {sd:.4f} over {len(seeds)} shot draws)" if sd is not None else "")
            + f" n={len(task.test)} ({res['seconds']:.1f}s)")
    ner = next((t.notes["protocol"] for t in tasks if "protocol" in t.notes), None)
    config = {"tasks": list(cfg.tasks), "data_dir": str(Path(cfg.data_dir).resolve()), "shots": cfg.shots,
              "task_shots": dict(cfg.task_shots), "shot_seeds": cfg.shot_seeds, "seed": cfg.seed,
              "label_scoring": cfg.label_scoring, "bootstrap": cfg.bootstrap, "ner_protocol": ner}
    return FinanceRun(results_document(lm, config, out_tasks), rows)


def predictions_path(results_path: str | Path) -> Path:
    """``results/x.json`` -> ``results/x.predictions.jsonl`` (beside the results)."""
    p = Path(results_path)
    return p.with_name((p.stem if p.suffix == ".json" else p.name) + ".predictions.jsonl")


def write_run(run: FinanceRun, results_path: str | Path) -> Path:
    """Write the per-example predictions JSONL and the results JSON (which names it), both atomically."""
    from megacpt.io import write_json_atomic

    pred = predictions_path(results_path)
    write_jsonl(pred, run.predictions)
    run.results["predictions_file"] = pred.name
    write_json_atomic(results_path, run.results)
    return pred


def results_document(lm, config: dict, tasks: dict) -> dict:
    """The results JSON shared by `eval finance` and `eval perplexity` (and read by `eval compare`)."""
    from megacpt import __version__

    return {
        "format": RESULTS_FORMAT,
        "model": dict(vars(lm.info)) if lm.info else {},
        "config": {**config, "batch_size": lm.batch_size, "max_length": lm.max_length},
        "tasks": tasks,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "megacpt_version": __version__,
    }


def one_line_table(results: dict, name: str | None = None) -> str:
    """``model | fpb weighted_f1 0.512 [0.451, 0.570] n=100 | ...`` on one line; with several shot draws a
    task's cell adds ``sd 0.012/3 draws``."""
    label = name or Path(results.get("model", {}).get("model_path", "model")).name
    cells = []
    for t, r in results["tasks"].items():
        cell = f"{t} {r['metric']} {r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        sd = (r.get("shot_draws") or {}).get("sd")
        if sd is not None:
            cell += f" sd {sd:.3f}/{len(r['shot_draws']['values'])} draws"
        cells.append(f"{cell} n={r['n']}")
    return " | ".join([label, *cells])


def parse_shots(spec: str | int | None) -> tuple[int | None, dict[str, int]]:
    """``--shots``: ``5`` (every task), ``ner=20,fpb=5`` (per task) or both (``5,ner=20``)."""
    if spec is None:
        return None, {}
    if isinstance(spec, int):
        return spec, {}
    default, per = None, {}
    for item in (x.strip() for x in str(spec).split(",") if x.strip()):
        name, eq, val = item.partition("=")
        try:
            k = int(val if eq else name)
        except ValueError:
            raise UserError(f"--shots {spec!r}: expected K or TASK=K[,TASK=K...], e.g. 5 or ner=20,fpb=5") from None
        if k < 0:
            raise UserError(f"--shots {spec!r}: shot counts must be >= 0")
        if eq:
            per[name.strip()] = k
        else:
            default = k
    return default, per


def task_list(s: str | Sequence[str]) -> tuple[str, ...]:
    items = s.split(",") if isinstance(s, str) else list(s)
    out = tuple(x.strip() for x in items if x.strip())
    return out
