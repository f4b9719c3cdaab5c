"""The demo's report: results table, plots and a verdict on the paper's claim, as Markdown + HTML.

Input is plain data gathered from the stage outputs (``DemoResults``), so the writer is testable
without running the pipeline. Lower perplexity is better; the task score is weighted F1 (higher
is better). The verdict compares, at the same schedule, each selected 10% against the full corpus
on the domain, and every CPT model against the base on general text (forgetting).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megacpt.io import atomic_path, write_json_atomic
from megacpt.selection.report import write_markdown_report

GENERAL_TOLERANCE = 0.02  # relative general-ppl increase over the base still called "no loss"


@dataclass
class RunResult:
    name: str                      # "base", "full", "random", "ets", ...
    tokens_trained: int            # CPT tokens (0 for base)
    selected_docs: int | None
    selected_tokens: int | None
    domain_ppl: float
    general_ppl: float
    task_score: float              # weighted F1 of the financial classification task
    task_extra: dict = field(default_factory=dict)   # other task metrics by name
    wall_s: float = 0.0            # CPT wall time (train stage)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, train loss)


@dataclass
class DemoResults:
    title: str
    date: str
    origin: str                    # "real" | "synthetic"
    seed: int
    budget_fraction: float
    runs: list[RunResult]
    stages: list[dict]             # runner summary rows: name, wall_s, peak_rss_mb, skipped
    corpora: dict                  # the corpus card (corpora.json)
    settings: dict                 # model shape, schedule, seq length, ...
    selection_plots: list[str] = field(default_factory=list)  # PNGs made by `megacpt report selection`
    selection_report: str | None = None                       # its report.md, relative to the work dir
    # strategy -> {crawl source kind -> selected documents}: the crawl's composition is known, so this shows
    # whether a strategy picked financial text or the off-domain noise
    selection_sources: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fmt(x: float | int | None, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{nd}f}" if math.isfinite(x) else str(x)


def verdict(res: DemoResults) -> list[str]:
    """Plain statements: which parts of the paper's ordering held here, which did not."""
    by = {r.name: r for r in res.runs}
    base, full = by.get("base"), by.get("full")
    selected = [r for r in res.runs if r.name not in ("base", "full", "random")]
    out: list[str] = []
    if full is None or not selected:
        return ["The claim needs the full-corpus run and at least one selection strategy; not all ran."]
    best = min(selected, key=lambda r: r.domain_ppl)
    frac = best.tokens_trained / max(full.tokens_trained, 1)
    if best.domain_ppl <= full.domain_ppl:
        out.append(f"**Domain: held.** The best selection ({best.name}) reached domain perplexity "
                   f"{best.domain_ppl:.2f} vs {full.domain_ppl:.2f} for the full corpus, training on "
                   f"{frac:.0%} of its tokens.")
    else:
        out.append(f"**Domain: did not hold.** The best selection ({best.name}, {frac:.0%} of the tokens) reached "
                   f"domain perplexity {best.domain_ppl:.2f}, worse than the full corpus's {full.domain_ppl:.2f}: at "
                   f"this scale more in-domain tokens beat a better choice of fewer tokens.")
    rnd = by.get("random")
    if rnd is not None:
        beat = [r.name for r in selected if r.domain_ppl < rnd.domain_ppl]
        out.append(f"Against a random subset of the same budget (domain ppl {rnd.domain_ppl:.2f}), "
                   + (f"{', '.join(beat)} did better." if beat else "no selection strategy did better."))
    if len({round(r.task_score, 6) for r in res.runs}) == 1:
        out.append(f"Task: every model scored the same weighted F1 ({full.task_score:.3f}): each predicts one "
                   "label for every example, so the classification task does not discriminate at this model size.")
    else:
        best_task = max(selected, key=lambda r: r.task_score)
        out.append(f"Task (weighted F1): best selection {best_task.name} {best_task.task_score:.3f} vs full corpus "
                   f"{full.task_score:.3f}" + (f" and base {base.task_score:.3f}" if base else "")
                   + "; at this model size differences of a few points are within noise.")
    crawl = res.selection_sources.get("(whole crawl)")
    if crawl:
        def noise(d: dict) -> float:
            return sum(v for k, v in d.items() if k.startswith("noise")) / max(sum(d.values()), 1)

        out.append(f"Off-domain noise is {noise(crawl):.0%} of the crawl's documents; in the selections: "
                   + ", ".join(f"{st} {noise(d):.0%}" for st, d in res.selection_sources.items()
                               if st != "(whole crawl)") + ".")
    if base is not None:
        worse = [r for r in res.runs if r.name != "base"
                 and r.general_ppl > base.general_ppl * (1 + GENERAL_TOLERANCE)]
        if worse:
            out.append(f"**General: forgetting.** General perplexity rose more than {GENERAL_TOLERANCE:.0%} over the "
                       f"base ({base.general_ppl:.2f}) for " + ", ".join(f"{r.name} ({r.general_ppl:.2f})" for r in worse)
                       + ".")
        else:
            out.append(f"**General: no loss.** No CPT run raised general perplexity more than {GENERAL_TOLERANCE:.0%} "
                       f"over the base ({base.general_ppl:.2f}).")
    if res.origin == "synthetic":
        out.append("These numbers come from *synthetic* template text: they exercise the pipeline and say "
                   "nothing about the paper's claim.")
    return out


def _plots(res: DemoResults, out_dir: Path) -> list[tuple[str, str]]:
    """PNG files (title, relative path) written into ``out_dir``/plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        with atomic_path(pdir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append((title, f"plots/{name}"))

    curves = [r for r in res.runs if r.loss_curve]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in curves:
            it, loss = zip(*r.loss_curve)
            ax.plot(it, loss, label=r.name)
        ax.set(xlabel="iteration", ylabel="train loss (nats/token)", title="Training loss")
        ax.legend()
        save(fig, "loss_curves.png", "Training loss curves (base pre-training and each CPT run)")

    names = [r.name for r in res.runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (attr, label) in zip(axes, [("domain_ppl", "domain perplexity (lower is better)"),
                                        ("general_ppl", "general perplexity (lower is better)"),
                                        ("task_score", "task weighted F1 (higher is better)")]):
        ax.bar(names, [getattr(r, attr) for r in res.runs], color=["#888" if n in ("base", "full", "random")
                                                                    else "#2a7" for n in names])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
    save(fig, "results.png", "Results by strategy")
    return made


def write_report(res: DemoResults, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir``/report.md, report.html (+ plots/) and report.json (the same data); return md, html."""
    plots = _plots(res, out_dir) + [(f"Selection: {Path(p).stem}", p) for p in res.selection_plots]
    md: list[str] = [f"# {res.title}", "",
                     f"Date: {res.date}  ·  corpus: **{res.origin}**  ·  seed: {res.seed}  ·  budget: "
                     f"{res.budget_fraction:.0%} of the domain corpus's tokens", ""]
    md += ["## Results", "",
           "| strategy | selected docs | tokens trained | domain ppl | general ppl | task F1 | train wall (s) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res.runs:
        md.append(f"| {r.name} | {_fmt(r.selected_docs)} | {_fmt(r.tokens_trained)} | {_fmt(r.domain_ppl)} | "
                  f"{_fmt(r.general_ppl)} | {_fmt(r.task_score, 3)} | {_fmt(r.wall_s, 1)} |")
    extra = sorted({k for r in res.runs for k in r.task_extra})
    if extra:
        md += ["", "Other task metrics:", "", "| strategy | " + " | ".join(extra) + " |",
               "|---|" + "---:|" * len(extra)]
        md += [f"| {r.name} | " + " | ".join(_fmt(r.task_extra.get(k), 3) for k in extra) + " |" for r in res.runs]
    md += ["", "## Verdict", ""] + [f"- {v}" for v in verdict(res)]
    if res.selection_sources:
        kinds = sorted({k for v in res.selection_sources.values() for k in v})
        md += ["", "## What each strategy selected", "",
               "Documents of each kind in the selection (the crawl's composition is known by construction):", "",
               "| strategy | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        md += [f"| {st} | " + " | ".join(_fmt(v.get(k, 0)) for k in kinds) + " |"
               for st, v in res.selection_sources.items()]
    if res.selection_report:
        md += ["", f"Per-metric histograms, selected vs rest, overlaps and examples: [{res.selection_report}]"
                   f"({res.selection_report}) (`megacpt report selection`)."]
    md += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in sorted(res.settings.items())]
    card = res.corpora
    md += ["", "## Corpora", "", "| file | docs | words |", "|---|---:|---:|"]
    md += [f"| {k} | {_fmt(v['docs'])} | {_fmt(v['words'])} |" for k, v in card.get("files", {}).items()]
    md += ["", f"Domain crawl composition: {card.get('domain_crawl_sources')}",
           f"Task labels (test): {card.get('task_label_counts')} — {card.get('weak_labels', '')}", "",
           "Sources:"] + [f"- {p}" for p in card.get("provenance", [])]
    md += ["", "## Stages", "", "Wall and CPU time of each stage when it last ran (CPU = user + system of the demo and "
           "its children; with one thread per command it is the wall time an idle machine would show).", "",
           "| stage | wall (s) | CPU (s) | peak RSS (MB) |", "|---|---:|---:|---:|"]
    md += [f"| {s['name']} | {s['wall_s']:.1f} | {_fmt(s.get('cpu_s'), 1)} | {s['peak_rss_mb']:.0f} |"
           for s in res.stages]
    if res.stages:
        md.append(f"\nTotal: wall {sum(s['wall_s'] for s in res.stages):.0f} s, CPU "
                  f"{sum(s.get('cpu_s') or 0 for s in res.stages):.0f} s; peak RSS over all stages "
                  f"{max(s['peak_rss_mb'] for s in res.stages):.0f} MB")
    md += ["", "## Plots", ""] + [f"![{t}]({p})" for t, p in plots]
    if res.notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    md_path, html_path = write_markdown_report(out_dir, "\n".join(md) + "\n", res.title)
    write_json_atomic(out_dir / "report.json", {**asdict(res), "verdict": verdict(res)})
    return md_path, html_path
