"""`megacpt eval finance`: run financial tasks on one model and write a results JSON.

Results schema (``format: megacpt-eval-results/1``)::

    {"format": ..., "model": {path, loader, vocab_size, padded_vocab_size, max_length, dtype, tokenizer},
     "config": {tasks, data_dir, shots, seed, label_scoring, bootstrap, batch_size, ...},
     "tasks": {name: {kind, metric, value, n, ci95: [lo, hi], shots, template, template_sha256,
                      n_truncated, ...task extras}},
     "created": ISO time, "megacpt_version": ...}
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megacpt.errors import UserError
from megacpt.eval.prompts import load_template
from megacpt.eval.tasks import METRIC_NAMES, RUNNERS, load_task_data, resolve_task

RESULTS_FORMAT = "megacpt-eval-results/1"


@dataclass
class FinanceConfig:
    tasks: tuple[str, ...]
    data_dir: str
    shots: int | None = None        # None: each task's default (FPB/FiQA/Headline 5, NER 20)
    seed: int = 0
    label_scoring: str = "sum"      # sum | mean (per-token) of the label verbalisation's log-probs
    bootstrap: int = 1000           # resamples for the 95% CI
    predictions: bool = False       # keep per-example predictions in the results


def load_tasks(cfg: FinanceConfig) -> list[tuple]:
    """Resolve, template and validate every task's data up front, so bad input fails before any model is
    loaded. Returns [(spec, shots, template, train, test)]."""
    if not cfg.tasks:
        raise UserError("--tasks is empty")
    if cfg.label_scoring not in ("sum", "mean"):
        raise UserError(f"--label-scoring {cfg.label_scoring!r}: expected sum or mean")
    out = []
    for name in cfg.tasks:
        spec = resolve_task(name, cfg.data_dir)
        k = spec.shots if cfg.shots is None else cfg.shots
        if k < 0:
            raise UserError(f"--shots {k} must be >= 0")
        out.append((spec, k, load_template(spec.template), *load_task_data(spec, cfg.data_dir, k)))
    return out


def run_finance(lm, cfg: FinanceConfig, tasks: list[tuple] | None = None, log=print) -> dict:
    out_tasks = {}
    for spec, k, template, train, test in tasks if tasks is not None else load_tasks(cfg):
        t0, trunc0 = time.perf_counter(), lm.n_truncated
        value, ci, extra, preds = RUNNERS[spec.kind](lm, spec, template, train, test, k, cfg.seed, cfg.bootstrap,
                                                     cfg.label_scoring)
        res = {"kind": spec.kind, "metric": METRIC_NAMES[spec.kind], "value": value, "n": len(test),
               "ci95": list(ci), "shots": k, "n_train": len(train), "template": template.source,
               "template_sha256": hashlib.sha256(Path(template.source).read_bytes()).hexdigest(),
               "labels": list(spec.labels), "n_truncated": lm.n_truncated - trunc0,
               "seconds": round(time.perf_counter() - t0, 3), **extra}
        if cfg.predictions:
            res["predictions"] = [{"where": e.where, "gold": e.label, "pred": p} for e, p in zip(test, preds)]
        out_tasks[spec.name] = res
        log(f"[eval] {spec.name}: {res['metric']}={value:.4f} n={len(test)} ({res['seconds']:.1f}s)")
    return results_document(lm, {"tasks": list(cfg.tasks), "data_dir": str(Path(cfg.data_dir).resolve()),
                                 "shots": cfg.shots, "seed": cfg.seed, "label_scoring": cfg.label_scoring,
                                 "bootstrap": cfg.bootstrap}, out_tasks)


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
    """``model | fpb weighted_f1 0.512 [0.451, 0.570] n=100 | ...`` on one line."""
    label = name or Path(results.get("model", {}).get("model_path", "model")).name
    cells = [f"{t} {r['metric']} {r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] n={r['n']}"
             for t, r in results["tasks"].items()]
    return " | ".join([label, *cells])


def task_list(s: str | Sequence[str]) -> tuple[str, ...]:
    items = s.split(",") if isinstance(s, str) else list(s)
    out = tuple(x.strip() for x in items if x.strip())
    return out
