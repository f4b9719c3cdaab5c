"""`megacpt eval compare`: tasks x models from several results JSONs, as a markdown table and a bar plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from megacpt.errors import UserError
from megacpt.io import atomic_path

LOWER_IS_BETTER = {"perplexity"}


def load_results(path: str | Path) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: not JSON: {e.msg}") from None
    if not isinstance(d, dict) or not isinstance(d.get("tasks"), dict):
        raise UserError(f"{p}: not a megacpt eval results file (no 'tasks' object)")
    for t, r in d["tasks"].items():
        if not isinstance(r, dict) or not {"metric", "value"} <= set(r):
            raise UserError(f"{p}: task {t!r} has no metric/value")
    return d


def model_names(paths: Sequence[str | Path], results: Sequence[dict], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(paths):
            raise UserError(f"--names has {len(names)} names for {len(paths)} results files")
        return list(names)
    out = [Path(r.get("model", {}).get("model_path") or p).name for p, r in zip(paths, results)]
    if len(set(out)) != len(out):  # same model dir name twice: fall back to the results file names
        out = [Path(p).stem for p in paths]
    return out


def _fmt(r: dict | None) -> str:
    if r is None:
        return "–"
    v, ci = r["value"], r.get("ci95") or [math.nan, math.nan]
    digits = 2 if r["metric"] in LOWER_IS_BETTER else 3  # perplexities: 2 decimals; scores in [0, 1]: 3
    s = f"{v:.{digits}f}"
    if all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def compare_table(results: Sequence[dict], names: Sequence[str]) -> tuple[list[str], str]:
    """(task order, markdown). Tasks in first-seen order; the best value per row is bold."""
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for t in tasks:
        cells = [r["tasks"].get(t) for r in results]
        metric = next(c["metric"] for c in cells if c)
        vals = [c["value"] for c in cells if c]
        best = (min if metric in LOWER_IS_BETTER else max)(vals)
        text = [(f"**{_fmt(c)}**" if c and c["value"] == best and len(vals) > 1 else _fmt(c)) for c in cells]
        arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
        lines.append(f"| {t} | {metric} {arrow} | " + " | ".join(text) + " |")
    return tasks, "\n".join(lines) + "\n"


def compare_plot(results: Sequence[dict], names: Sequence[str], tasks: Sequence[str], out_png: str | Path) -> None:
    """One panel per task (metrics have different scales), one bar per model with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes.flat, tasks):
        cells = [r["tasks"].get(t) for r in results]
        vals = [c["value"] if c else math.nan for c in cells]
        err = [[0.0 if not c or not c.get("ci95") or not math.isfinite(c["ci95"][0]) else max(c["value"] - c["ci95"][0], 0)
                for c in cells],
               [0.0 if not c or not c.get("ci95") or not math.isfinite(c["ci95"][1]) else max(c["ci95"][1] - c["value"], 0)
                for c in cells]]
        ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=[colors[i % len(colors)] for i in range(len(names))])
        metric = next(c["metric"] for c in cells if c)
        ax.set_title(f"{t}\n{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def compare(paths: Sequence[str], names: Sequence[str] | None = None, out_md: str | None = None,
            out_png: str | None = None) -> str:
    if not paths:
        raise UserError("compare needs at least one results file")
    results = [load_results(p) for p in paths]
    names = model_names(paths, results, names)
    tasks, md = compare_table(results, names)
    if out_md:
        with atomic_path(out_md) as tmp:
            tmp.write_text(md, encoding="utf-8")
    if out_png:
        compare_plot(results, names, tasks, out_png)
    return md
