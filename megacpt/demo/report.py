"""The study's report: verdicts, tables with intervals, the random-budget curve, costs (md + html + json).

Input is ``StudyResults`` (results.py), plain data, so the writer is testable without running the
pipeline. Perplexities are shown as exp(mean NLL) with the interval mapped the same way; differences of
perplexity as the relative change exp(d) − 1. Markdown is rendered to HTML by the selection report's
renderer (one renderer for every megacpt report).
"""
from __future__ import annotations

import math
from pathlib import Path

from megacpt.demo.results import ArmResult, StudyResults, chance_and_majority
from megacpt.demo.stats import HOLDS, INCONCLUSIVE, REFUTED
from megacpt.io import atomic_path, write_json_atomic
from megacpt.selection.report import MarkdownDoc, write_markdown_report

PPL = {"domain", "general", "task_inputs", "domain_val"}
COLUMNS = [("domain", "domain ppl"), ("general", "general ppl"), ("task_inputs", "task-input ppl"),
           ("probe", "probe macro-F1"), ("calibrated", "calibrated macro-F1")]


def fmt_interval(iv: dict, metric: str) -> str:
    if metric.split(":")[0] in PPL:
        if not math.isfinite(iv["lo"]):
            return f"{math.exp(iv['mean']):.2f}"
        return f"{math.exp(iv['mean']):.2f} [{math.exp(iv['lo']):.2f}, {math.exp(iv['hi']):.2f}]"
    if not math.isfinite(iv["lo"]):
        return f"{iv['mean']:.3f}"
    return f"{iv['mean']:.3f} ± {(iv['hi'] - iv['lo']) / 2:.3f}"


def fmt_difference(d: dict, metric: str) -> str:
    """A difference oriented so that + favours the arm; perplexity NLL differences d shown as the ratio
    ppl(arm) / ppl(reference) = exp(−d) (below 1: the arm is better)."""
    if metric.split(":")[0] in PPL:
        r = lambda x: f"{math.exp(-x):.3f}"  # noqa: E731
        core = f"×{r(d['mean'])}"
        return core if not math.isfinite(d["lo"]) else f"{core} [{r(d['hi'])}, {r(d['lo'])}]"
    core = f"{d['mean']:+.3f}"
    return core if not math.isfinite(d["lo"]) else f"{core} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _finite(x):
    """Strict JSON: non-finite floats (an interval of one seed, a budget off the curve) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _budget(x: float | None) -> str:
    if x is None:
        return "–"
    if x == float("inf"):
        return "> 100%"
    if x == 0.0:
        return "below the curve"
    return f"{100 * x:.0f}%"


def _arm_rows(arms: list[ArmResult]) -> list[list[str]]:
    rows = []
    for a in arms:
        tokens = f"{int(sum(a.tokens_trained) / len(a.tokens_trained)):,}" if a.tokens_trained else "0"
        rows.append([a.name, tokens, *(fmt_interval(a.intervals[m], m) for m, _ in COLUMNS),
                     _budget(a.equivalent_random_budget.get("domain"))])
    return rows


def _verdict_word(v: str) -> str:
    return {HOLDS: "**holds**", REFUTED: "**refuted**", INCONCLUSIVE: "inconclusive"}[v]


def _claims_section(doc: MarkdownDoc, res: StudyResults, group: str) -> None:
    claims = [c for c in res.claims if c.group == group]
    if not claims:
        return
    rows = [[c.claim, c.arm, c.reference, c.metric, fmt_difference(c.difference, c.metric),
             (f"ratio ≤ {math.exp(c.margin):.2f}" if c.kind == "at_least" else
              f"ratio < 1; refuted above {math.exp(-c.margin):.2f}") if c.metric in PPL else
             f"{'≥ −' if c.kind == 'at_least' else '> 0; refuted below +'}{c.margin:g}",
             _verdict_word(c.verdict)] for c in claims]
    doc.table(["claim", "arm", "vs", "metric", "difference: ppl ratio arm/vs, or macro-F1 arm − vs (mean [95% CI])",
               "rule", "verdict"], rows, align="lllllll")
    summary = {}
    for c in claims:
        summary.setdefault((c.claim, c.metric), []).append(c)
    doc.bullets([f"{claim} ({metric}): " + "; ".join(
        f"{v} for {', '.join(c.arm for c in cs if c.verdict == v)}" for v in (HOLDS, REFUTED, INCONCLUSIVE)
        if any(c.verdict == v for c in cs)) for (claim, metric), cs in summary.items()])


def _regime_text(res: StudyResults) -> str:
    r = res.regime
    if "difference_nll" not in r:
        return "Regime: no random-budget curve was run."
    d, f = r["difference_nll"], r["from_fraction"]
    # d = NLL(random f) − NLL(full): shown as the perplexity ratio full / random-f
    gain = "×" + f"{math.exp(-d['mean']):.3f}" + (f" [{math.exp(-d['hi']):.3f}, {math.exp(-d['lo']):.3f}]"
                                                 if math.isfinite(d["lo"]) else "")
    if r["status"] == "starved":
        return (f"**Not in the paper's regime.** Going from a random {100 * f:.0f}% to the whole crawl still multiplies "
                f"domain perplexity by {gain} (more than the {100 * (math.exp(r['margin']) - 1):.0f}% margin, for sure): "
                "the toy is token-starved, so fewer tokens lose to more tokens whatever their quality, unlike the "
                "paper's setting. The selection verdicts below are reported but answer a different question.")
    if r["status"] == "flat":
        return (f"In the paper's regime: from a random {100 * f:.0f}% to the whole crawl, domain perplexity changes "
                f"by a factor {gain}, within the {100 * (math.exp(r['margin']) - 1):.0f}% margin (the curve has flattened).")
    return (f"Regime unclear: from a random {100 * f:.0f}% to the whole crawl, domain perplexity changes by a factor {gain}; "
            "the interval straddles the margin.")


def _plots(res: StudyResults, out_dir: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        with atomic_path(pdir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append((title, f"plots/{name}"))

    bc = res.base_curve
    if bc.get("train") or bc.get("general"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for key, label in (("train", "train loss"), ("general", "held-out general"), ("domain", "held-out domain")):
            if bc.get(key):
                it, loss = zip(*bc[key])
                ax.plot(it, loss, label=label, marker="." if key != "train" else None)
        ax.set(xlabel="iteration", ylabel="loss (nats/token)", title="Base pre-training on general text")
        ax.legend()
        save(fig, "base_curve.png", "Base model: training and held-out loss (the plateau)")

    for group, title in (("main", "in-domain crawl"), ("ablation", "noisy crawl (ablation)")):
        arms = [a for a in res.arms if a.group == group]
        curve = sorted([a for a in arms if a.strategy in ("random", "full") and not a.matched], key=lambda a: a.fraction)
        if len(curve) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, metric, label in ((axes[0], "domain", "domain perplexity (lower is better)"),
                                  (axes[1], "probe", "probe macro-F1, mean of tasks (higher is better)")):
            conv = (lambda v: math.exp(v)) if metric in PPL else (lambda v: v)
            xs = [a.fraction for a in curve]
            ys = [conv(a.intervals[metric]["mean"]) for a in curve]
            lo = [conv(a.intervals[metric]["lo"]) if math.isfinite(a.intervals[metric]["lo"]) else y
                  for a, y in zip(curve, ys)]
            hi = [conv(a.intervals[metric]["hi"]) if math.isfinite(a.intervals[metric]["hi"]) else y
                  for a, y in zip(curve, ys)]
            ax.errorbar(xs, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]], color="k",
                        marker="o", capsize=3, label="random (100% = full)")
            others = [a for a in arms if a not in curve]
            for i, a in enumerate(others):
                iv = a.intervals[metric]
                y = conv(iv["mean"])
                e = [[y - conv(iv["lo"])], [conv(iv["hi"]) - y]] if math.isfinite(iv["lo"]) else None
                x = a.fraction * (1 + 0.04 * (i - len(others) / 2))
                ax.errorbar([x], [y], yerr=e, marker="s" if a.sampling == "hard" else "^" if a.sampling else "D",
                            capsize=2, linestyle="none", label=a.name)
            ax.set_xscale("log")
            ax.set(xlabel="share of the crawl's tokens", title=label)
            ax.tick_params(labelsize=8)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"Random-budget curve and the selection arms: {title} (mean, 95% CI)")
        save(fig, f"random_curve_{group}.png", f"Random-budget curve with every arm placed on it ({title})")
    return made


def _ran(stage: dict) -> str:
    """'this invocation', or 'cached: earlier run (WHEN)' for a stage whose stored numbers are shown."""
    if not stage.get("skipped"):
        return "this invocation"
    return f"cached: earlier run ({stage['finished_at']})" if stage.get("finished_at") else "cached: earlier run"


def write_report(res: StudyResults, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir``/report.md, report.html (+ plots/) and report.json; return md, html."""
    plots = dict((t, p) for t, p in _plots(res, out_dir))
    baselines = chance_and_majority(out_dir) if (out_dir / "corpora/tasks").exists() else {}
    doc = MarkdownDoc(res.title)
    doc.p(f"Date: {res.date}  ·  corpus: **{res.origin}**  ·  seeds: {', '.join(map(str, res.settings['seeds']))}"
          f"  ·  this invocation: wall {res.wall_s / 60:.1f} min, peak RSS {res.peak_rss_mb:.0f} MB (all processes)"
          f"  ·  stages when they ran: CPU {sum(s.get('cpu_s') or 0 for s in res.stages) / 60:.1f} min")
    if res.origin == "synthetic":
        doc.p("These numbers come from *synthetic* template text: they exercise the pipeline and say nothing "
              "about the paper's claim.")
    doc.p("The paper's claim: continual pre-training on ~10% of a domain corpus chosen by ETS-DACP or ETA-DACP "
          "matches or beats training on all of it on domain tasks, with no open-domain loss. Every arm is trained "
          "once per seed; intervals are 95% t intervals over seeds widened by the test-set bootstrap; verdicts "
          "are decided from the intervals of paired differences against margins fixed before the run "
          "(docs/method.md §4.3).")

    doc.h2("Verdicts (main experiment: in-domain crawl)")
    doc.p(_regime_text(res))
    _claims_section(doc, res, "main")

    doc.h2("Results (mean [95% CI] over seeds)")
    doc.p("Perplexities: exp of the token-weighted NLL; task scores: macro-F1 averaged over the tasks. "
          "*Equivalent random budget*: the share of random tokens whose interpolated domain perplexity equals "
          "the arm's.")
    header = ["arm", "tokens trained", *(c for _, c in COLUMNS), "equivalent random budget"]
    doc.table(header, _arm_rows([a for a in res.arms if a.group in ("base", "main")]))
    if "Random-budget curve with every arm placed on it (in-domain crawl)" in plots:
        doc.image(plots["Random-budget curve with every arm placed on it (in-domain crawl)"],
                  "Random-budget curve (in-domain crawl)")

    doc.h2("Tasks")
    rows = []
    for t, b in baselines.items():
        for name, sc in (("majority class", b["majority"]), ("chance", b["chance"])):
            rows.append([t, name, f"{sc['macro_f1']:.3f}", f"{sc['balanced_accuracy']:.3f}", "", ""])
    for a in res.arms:
        if a.group == "ablation":
            continue
        for t in a.tasks.get("probe", {}):
            p, c = a.tasks["probe"][t], a.tasks["calibrated"][t]
            rows.append([t, a.name, f"{p['macro_f1']:.3f}", f"{p['balanced_accuracy']:.3f}", f"{c['macro_f1']:.3f}",
                         f"{c['balanced_accuracy']:.3f}"])
    rows.sort(key=lambda r: r[0])
    doc.table(["task", "model", "probe macro-F1", "probe balanced acc.", "calibrated macro-F1",
               "calibrated balanced acc."], rows, align="llrrrr")
    if baselines:
        doc.p("Test labels: " + "; ".join(f"{t}: {b['label_counts']}" for t, b in baselines.items())
              + f". {res.corpora.get('weak_labels', '')}. Means over seeds; the intervals of the mean task score "
              "are in the results table.")

    matched = [a for a in res.arms if a.matched]
    if matched:
        doc.h2("Compute-matched arms")
        best = res.best_strategy.get("best")
        doc.p(f"The strategy with the lowest mean domain_val perplexity over seeds ({best}; the validation split, "
              "never a reported number) and a random subset of the same budget, each trained for as many steps "
              "as the full crawl (about 1/fraction epochs of the subset). Validation NLL by strategy: "
              + ", ".join(f"{k} {math.exp(v):.2f}" for k, v in (res.best_strategy.get("domain_val_nll") or {}).items())
              + ".")
        doc.table(header, _arm_rows(matched))

    if any(a.group == "ablation" for a in res.arms):
        doc.h2("Ablation: the noisy crawl")
        doc.p("The same crawl plus off-domain documents (general news and web boilerplate). It asks a different "
              "question: whether a strategy avoids noise. Reported separately from the main experiment.")
        doc.table(header, _arm_rows([a for a in res.arms if a.group == "ablation"]))
        if "Random-budget curve with every arm placed on it (noisy crawl (ablation))" in plots:
            doc.image(plots["Random-budget curve with every arm placed on it (noisy crawl (ablation))"],
                      "Random-budget curve (noisy crawl)")
        _claims_section(doc, res, "ablation")

    doc.h2("What each arm selected")
    kinds = sorted({k for a in res.arms for k in a.sources})
    doc.table(["arm", "documents", "tokens", *kinds],
              [[a.name, f"{a.selected_docs[0]:,}" if a.selected_docs else "–",
                f"{a.selected_tokens[0]:,}" if a.selected_tokens else "–", *(f"{a.sources.get(k, 0):,}" for k in kinds)]
               for a in res.arms if a.sources])
    doc.p("First seed's selection (hard selections are the same for every seed). Hard, soft and random overlap, "
          "and each one's share of the score's top decile: " + ", ".join(
              f"[{p}]({p})" for p in res.selection_reports) + " (`megacpt report selection`).")

    doc.h2("Base model")
    pl = (res.base_curve or {}).get("plateau")
    if pl:
        doc.p(f"Held-out general perplexity improved by {100 * pl['rel_ppl_gain_last_quarter']:.1f}% over the last "
              f"quarter of the base's training: " + ("**plateaued** (below the 2% threshold)." if pl["plateaued"]
                                                      else "**not plateaued** (2% threshold): the base is still "
                                                           "learning general text."))
    if "Base model: training and held-out loss (the plateau)" in plots:
        doc.image(plots["Base model: training and held-out loss (the plateau)"], "Base pre-training curve")

    doc.h2("Setup")
    doc.bullets([f"{k}: {v}" for k, v in res.settings.items()])
    doc.h2("Corpora")
    doc.table(["file", "docs", "words"], [[k, f"{v['docs']:,}", f"{v['words']:,}"]
                                         for k, v in res.corpora.get("files", {}).items()])
    doc.p("Sources:")
    doc.bullets(res.corpora.get("provenance", []))

    doc.h2("Cost of each stage")
    doc.p("Wall and CPU seconds (user + system of the commands and of the stage's own work) of each stage when it "
          "last ran; stages run up to `--jobs` at once, so wall times overlap. Peak RSS per stage is that of the "
          "process that ran it; the run's peak (all processes summed, sampled) is in the header. A stage cached "
          "from an earlier run did not run in this invocation: its numbers are that run's (column *ran*).")
    groups: dict[str, list[dict]] = {}
    for st in res.stages:
        kind = st["name"].split("-")[0]
        groups.setdefault(kind, []).append(st)
    doc.table(["stage kind", "stages", "cached", "wall (s)", "CPU (s)", "max peak RSS (MB)"],
              [[k, len(v), sum(bool(x["skipped"]) for x in v), f"{sum(x['wall_s'] or 0 for x in v):.1f}",
                f"{sum(x['cpu_s'] or 0 for x in v):.1f}", f"{max(x['peak_rss_mb'] or 0 for x in v):.0f}"]
               for k, v in groups.items()])
    doc.table(["stage", "wall (s)", "CPU (s)", "peak RSS (MB)", "ran"],
              [[x["name"], f"{x['wall_s'] or 0:.1f}", f"{x['cpu_s'] or 0:.1f}", f"{x['peak_rss_mb'] or 0:.0f}",
                _ran(x)] for x in res.stages])
    if res.notes:
        doc.h2("Notes")
        doc.bullets(res.notes)
    md, html = write_markdown_report(out_dir, doc.text(), res.title)
    write_json_atomic(out_dir / "report.json", _finite({**res.to_json(), "task_baselines": baselines}))
    return md, html
