"""`megacpt report selection`: compare selections over one corpus (Markdown + HTML + PNG plots).

Inputs are selection manifests (`megacpt select`), optionally extra score files. The report has:
budget asked/achieved per selection beside the full corpus; Jaccard overlap between selections;
per strategy, how its hard, soft and random samples overlap and what share of each comes from the
top decile of the strategy's score (docs/method.md §2.6); per metric, histograms of the corpus and of
each selection, and selected-vs-rest means; the metric correlation matrix (Spearman, document length
included); the document-length distribution; and the top/bottom documents of each metric as text
snippets. docs/method.md wants every comparison to hold a random baseline: when no manifest is a
random selection, one with the first selection's budget is computed (seeded, not written) and
reported as ``random (computed)``.

Reports are written as Markdown and rendered to HTML by one renderer (``render_html``, markdown-it-py),
which the demo's report uses too.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megacpt.data.identity import dataset_identity, same_dataset
from megacpt.data.indexed import IndexedDataset
from megacpt.errors import UserError
from megacpt.io import atomic_path
from megacpt.score.files import read_scores
from megacpt.selection.combine import Metric, combined_score, load_metrics, metric_of, percentile_rank
from megacpt.selection.documents import DocumentTexts
from megacpt.selection.sample import Budget
from megacpt.selection.select import SelectConfig, compute_selection, read_manifest

METRIC_TITLES = {"sim": "task similarity", "ppl": "novelty: mean NLL (ln perplexity)", "ent": "POS entropy",
                 "dsir": "DSIR log weight"}
TOP_DECILE = 0.9   # percentile rank above which a document is in its score's top decile


# -- Markdown, and the one HTML renderer of megacpt's reports ---------------------------------------
class MarkdownDoc:
    """Markdown built block by block (headings, paragraphs, tables, images, quoted snippets)."""

    def __init__(self, title: str):
        self.title = title
        self.lines: list[str] = [f"# {title}", ""]

    def h2(self, t: str) -> None:
        self.lines += [f"## {t}", ""]

    def h3(self, t: str) -> None:
        self.lines += [f"### {t}", ""]

    def p(self, t: str) -> None:
        self.lines += [t, ""]

    def bullets(self, items: Sequence[str]) -> None:
        self.lines += [f"- {x}" for x in items] + [""]

    def table(self, header: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> None:
        """``align``: one character per column, ``l`` or ``r`` (default: first left, the rest right)."""
        def cell(v: Any) -> str:
            return str(v).replace("|", "\\|").replace("\n", " ")

        align = align or "l" + "r" * (len(header) - 1)
        self.lines.append("| " + " | ".join(map(cell, header)) + " |")
        self.lines.append("|" + "".join("---:|" if a == "r" else "---|" for a in align))
        self.lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
        self.lines.append("")

    def image(self, path: str, alt: str) -> None:
        self.lines += [f"![{alt}]({path})", ""]

    def quotes(self, items: Sequence[tuple[str, str]]) -> None:
        self.bullets([f"`{lab}`: {txt.replace(chr(10), ' ')}" for lab, txt in items])

    def text(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
          "img{max-width:100%}li{margin-bottom:4px}code{background:#f4f4f4}")


def render_html(markdown: str, title: str) -> str:
    """One HTML page from Markdown (CommonMark + GFM tables, raw HTML in the source escaped)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}</body></html>\n")


def write_markdown_report(out_dir: Path, markdown: str, title: str, stem: str = "report") -> tuple[Path, Path]:
    """``out_dir``/STEM.md and STEM.html (rendered), each written atomically; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(markdown, title), encoding="utf-8")
    return md_path, html_path


def _fmt(v: float, digits: int = 4) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- inputs ---------------------------------------------------------------------------------------------
@dataclass
class Sel:
    name: str
    manifest: dict[str, Any]
    ids: np.ndarray
    mask: np.ndarray  # bool [num_documents]

    @property
    def strategy(self) -> str:
        return self.manifest["strategy"]


@dataclass
class ReportInputs:
    prefix: str
    ds: IndexedDataset
    sels: list[Sel]
    lengths: np.ndarray                      # tokens per document
    metrics: dict[str, Metric] = field(default_factory=dict)

    @property
    def nonempty(self) -> np.ndarray:
        return self.lengths > 0


def selection_names(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """What the report (tables and plot legends) calls each selection: its output's basename; where several
    share one (every demo selection is ``.../selected``), strategy + sampling; where those collide too, the
    shortest trailing part of the output directory that tells them apart."""
    def label(m: dict[str, Any]) -> str:
        if m.get("strategy") in ("random", "full") or not m.get("sampling"):
            return str(m.get("strategy"))
        return f"{m['strategy']}-{m['sampling']}"

    def dirs(m: dict[str, Any], k: int) -> str:
        parent = Path(m["output"]["prefix"]).parent.parts
        return "/".join(parent[-k:]) if parent else ""

    names = [Path(m["output"]["prefix"]).name for m in manifests]
    for rule in (label, *[lambda m, k=k: dirs(m, k) for k in range(1, 64)]):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            return names
        groups = [i for i, n in enumerate(names) if n in dup]
        new = {i: rule(manifests[i]) for i in groups}
        for i in groups:
            names[i] = new[i] or names[i]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]  # identical outputs


def _load_selections(manifests: list[str]) -> tuple[list[Sel], dict]:
    loaded = [read_manifest(path) for path in manifests]
    sels, data = [], None
    for path, m, name in zip(manifests, loaded, selection_names(loaded)):
        if data is None:
            data = m["data"]
        elif not same_dataset(m["data"], data):
            raise UserError(f"{path}: selects from {m['data']['prefix']}, not {data['prefix']} like "
                            f"{manifests[0]}; a report compares selections of one corpus")
        ids = np.asarray(m["selected_doc_ids"], dtype=np.int64)
        mask = np.zeros(data["num_documents"], dtype=bool)
        mask[ids] = True
        sels.append(Sel(name, m, ids, mask))
    return sels, data


def _add_random_baseline(inp: ReportInputs, seed: int) -> None:
    """A seeded random selection with the first selection's budget, when none of the manifests is random."""
    if any(s.strategy == "random" for s in inp.sels):
        return
    resolved = inp.sels[0].manifest["budget"]["resolved"]
    cfg = SelectConfig(inp.prefix, "unused", "random", budget=Budget(resolved["kind"], resolved["n"]), seed=seed)
    ids, info = compute_selection(cfg, inp.ds)
    mask = np.zeros(inp.ds.num_documents, bool)
    mask[ids] = True
    inp.sels.append(Sel("random (computed)", {**info, "selected_doc_ids": ids.tolist()}, ids, mask))


def _load_metrics(sels: list[Sel], extra_scores: Sequence[str], ident: dict) -> dict[str, Metric]:
    """Every score file the selections used, plus extra ones (the first file per metric wins)."""
    paths = list(dict.fromkeys([s["path"] for sel in sels for s in sel.manifest.get("scores", [])]
                               + list(extra_scores)))
    files, seen = [], set()
    for p in paths:
        sf = read_scores(p)
        if metric_of(sf) not in seen:
            seen.add(metric_of(sf))
            files.append(sf)
    return load_metrics(files, ident)


def load_inputs(manifests: list[str], extra_scores: Sequence[str] = (), data: str | None = None,
                random_seed: int = 0) -> ReportInputs:
    if not manifests:
        raise UserError("give at least one selection manifest (--manifests)")
    sels, ident = _load_selections(manifests)
    prefix = data or ident["prefix"]
    ds = IndexedDataset(prefix)
    if not same_dataset(dataset_identity(prefix, ds), ident):
        raise UserError(f"{prefix}: not the corpus the selections were made from (index hash differs)")
    inp = ReportInputs(prefix, ds, sels, ds.document_lengths())
    _add_random_baseline(inp, random_seed)
    inp.metrics = _load_metrics(inp.sels, extra_scores, ident)
    return inp


# -- sections -------------------------------------------------------------------------------------------
def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def section_budget(doc: MarkdownDoc, inp: ReportInputs) -> None:
    n_tok, n_docs = int(inp.lengths.sum()), inp.ds.num_documents
    doc.h2("Budget")
    rows = [["full corpus", "full", "–", "–", "100%", f"{n_tok:,}", f"{n_docs:,}", "100.00%", "100.00%", "–"]]
    for s in inp.sels:
        m, b = s.manifest, s.manifest["budget"]
        asked = b["asked"]
        asked_s = "–" if asked is None else (f"{asked['value']:g} of tokens" if asked["kind"] == "fraction"
                                             else f"{int(asked['value']):,} {asked['kind']}")
        rows.append([s.name, m["strategy"], m["sampling"], m["seed"], asked_s, f"{b['achieved_tokens']:,}",
                     f"{b['achieved_documents']:,}", f"{100 * b['fraction_of_tokens']:.2f}%",
                     f"{100 * b['fraction_of_documents']:.2f}%", f"{b.get('overshoot_tokens', 0):,}"])
    doc.table(["selection", "strategy", "sampling", "seed", "asked", "tokens", "documents", "% tokens",
               "% documents", "overshoot (tokens)"], rows, align="lllrrrrrrr")


def section_overlap(doc: MarkdownDoc, inp: ReportInputs, out: Path) -> None:
    doc.h2("Overlap between selections (Jaccard)")
    names = [s.name for s in inp.sels]
    jac = np.array([[_jaccard(a.mask, b.mask) for b in inp.sels] for a in inp.sels])
    doc.table(["", *names], [[a, *(f"{v:.3f}" for v in row)] for a, row in zip(names, jac)])
    if len(inp.sels) < 2:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1 + 0.8 * len(names)))
    im = ax.imshow(jac, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", color="w" if jac[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=ax)
    _save(fig, out / "overlap.png")
    doc.image("overlap.png", "Jaccard overlap")


def top_decile_share(score: np.ndarray, eligible: np.ndarray, mask: np.ndarray) -> float:
    """Share of the selected documents whose score is in the top decile of the eligible documents'."""
    rank = np.zeros(score.size)
    rank[eligible] = percentile_rank(score[eligible])
    sel = mask & eligible
    return float((rank[sel] > TOP_DECILE).mean()) if sel.any() else float("nan")


def section_sampling(doc: MarkdownDoc, inp: ReportInputs) -> None:
    """Per scored strategy: its hard/soft samples and the random baseline, on that strategy's score."""
    scored = [s for s in inp.sels if s.manifest.get("weights") and set(s.manifest["weights"]) <= set(inp.metrics)]
    if not scored:
        return
    groups: dict[tuple, list[Sel]] = {}
    for s in scored:
        groups.setdefault((s.strategy, tuple(sorted(s.manifest["weights"].items()))), []).append(s)
    randoms = [s for s in inp.sels if s.strategy == "random"]
    doc.h2("Hard, soft and random sampling per strategy")
    doc.p(f"Top-decile share: the share of a selection's documents whose score (the strategy's own, as a "
          f"percentile rank) is in the top {100 * (1 - TOP_DECILE):.0f}% of the corpus; a random sample has "
          f"about {100 * (1 - TOP_DECILE):.0f}%. Jaccard overlaps are with the strategy's hard selection and "
          "with the random selection of the same budget.")
    eligible = inp.nonempty
    rows = []
    for (strategy, weights), members in groups.items():
        score = combined_score(inp.metrics, dict(weights))
        budget = members[0].manifest["budget"]["resolved"]
        rnd = next((r for r in randoms if r.manifest["budget"]["resolved"] == budget), randoms[0] if randoms else None)
        hard = next((m for m in members if m.manifest["sampling"] == "hard"), None)
        for s in members + ([rnd] if rnd is not None else []):
            t = s.manifest.get("temperature")
            rows.append([strategy, s.name, s.manifest["sampling"] + (f" (T={t:g})" if t is not None else ""),
                         f"{100 * top_decile_share(score, eligible, s.mask):.1f}%",
                         "–" if hard is None else f"{_jaccard(s.mask, hard.mask):.3f}",
                         "–" if rnd is None else f"{_jaccard(s.mask, rnd.mask):.3f}"])
    doc.table(["strategy", "selection", "sampling", "top-decile share", "Jaccard with hard", "Jaccard with random"],
              rows, align="lllrrr")


def section_lengths(doc: MarkdownDoc, inp: ReportInputs, out: Path) -> None:
    lengths = inp.lengths
    pos = lengths[lengths > 0]
    doc.h2("Document length")
    rows = [["full corpus", f"{pos.mean():.1f}" if pos.size else "–", f"{np.median(pos):.0f}" if pos.size else "–"]]
    rows += [[s.name, f"{lengths[s.ids].mean():.1f}", f"{np.median(lengths[s.ids]):.0f}"] for s in inp.sels if s.ids.size]
    doc.table(["set", "mean tokens", "median tokens"], rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.logspace(0, np.log10(max(pos.max(), 2)), 40) if pos.size else 10
    ax.hist(pos, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="gray", label="corpus")
    for s in inp.sels:
        if s.ids.size:
            ax.hist(lengths[s.ids], bins=bins, density=True, histtype="step", label=s.name)
    ax.set_xscale("log")
    ax.set(xlabel="document length (tokens)", ylabel="density")
    ax.legend(fontsize=7)
    _save(fig, out / "lengths.png")
    doc.image("lengths.png", "document lengths")


def section_metrics(doc: MarkdownDoc, inp: ReportInputs, out: Path) -> None:
    """Selected-vs-rest means and one histogram per metric."""
    plt = _pyplot()
    doc.h2("Metrics: selected vs rest")
    rows = []
    for name, met in inp.metrics.items():
        v = np.where(met.undefined, np.nan, met.values)
        for s in inp.sels:
            rest = ~s.mask & inp.nonempty
            rows.append([METRIC_TITLES[name], s.name, _fmt(np.nanmean(v[s.mask]) if s.mask.any() else np.nan),
                         _fmt(np.nanmean(v[rest]) if rest.any() else np.nan), _fmt(np.nanmean(v[inp.nonempty]))])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        finite = v[np.isfinite(v)]
        bins = np.histogram_bin_edges(finite, bins=40) if finite.size else 10
        ax.hist(finite, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="gray", label="corpus")
        for s in inp.sels:
            sv = v[s.mask]
            sv = sv[np.isfinite(sv)]
            if sv.size:
                ax.hist(sv, bins=bins, density=True, histtype="step", label=s.name)
        ax.set(xlabel=METRIC_TITLES[name], ylabel="density")
        ax.legend(fontsize=7)
        _save(fig, out / f"hist_{name}.png")
    doc.table(["metric", "selection", "mean selected", "mean rest", "mean corpus"], rows, align="llrrr")
    for name in inp.metrics:
        doc.image(f"hist_{name}.png", f"{METRIC_TITLES[name]} histogram")


def section_correlations(doc: MarkdownDoc, inp: ReportInputs, out: Path) -> None:
    plt = _pyplot()
    doc.h2("Metric correlations (Spearman, non-empty documents)")
    keep = inp.nonempty
    cols = {n: percentile_rank(m.values[keep], m.undefined[keep]) for n, m in inp.metrics.items()}
    cols["length"] = percentile_rank(inp.lengths[keep].astype(float))
    labels = list(cols)
    mat = np.corrcoef(np.vstack([cols[k] for k in labels])) if keep.sum() > 1 else np.eye(len(labels))
    doc.table(["", *labels], [[a, *(_fmt(x, 3) for x in row)] for a, row in zip(labels, mat)])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(labels), 1 + 0.7 * len(labels)))
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center")
    fig.colorbar(im, ax=ax)
    _save(fig, out / "correlation.png")
    doc.image("correlation.png", "metric correlation")


def section_examples(doc: MarkdownDoc, inp: ReportInputs, snippets: int, snippet_chars: int,
                     tokenizer: str | None) -> None:
    doc.h2("Examples: top and bottom documents per metric")
    try:
        texts = DocumentTexts(inp.prefix, tokenizer)
    except UserError as e:
        doc.p(f"(no snippets: {e})")
        return
    for name, met in inp.metrics.items():
        ok = np.flatnonzero(inp.nonempty & ~met.undefined)
        order = ok[np.argsort(-met.values[ok], kind="stable")]
        for label, pick in (("top", order[:snippets]), ("bottom", order[::-1][:snippets])):
            doc.p(f"{METRIC_TITLES[name]} — {label} {len(pick)}:")
            doc.quotes([(f"doc {d} ({_fmt(met.values[d])})", _snippet(texts[int(d)], snippet_chars)) for d in pick])


def build_report(manifests: list[str], out_dir: str, extra_scores: Sequence[str] = (), data: str | None = None,
                 snippets: int = 3, snippet_chars: int = 300, random_seed: int = 0,
                 tokenizer: str | None = None) -> Path:
    """Load the selections and scores, write every section, render; returns OUT/report.md."""
    inp = load_inputs(manifests, extra_scores, data, random_seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = MarkdownDoc("Data selection report")
    doc.p(f"Corpus `{inp.prefix}`: {inp.ds.num_documents:,} documents, {int(inp.lengths.sum()):,} tokens "
          f"({int((inp.lengths == 0).sum())} empty documents, never selected).")
    section_budget(doc, inp)
    section_overlap(doc, inp, out)
    section_sampling(doc, inp)
    section_lengths(doc, inp, out)
    if inp.metrics:
        section_metrics(doc, inp, out)
        section_correlations(doc, inp, out)
        if snippets > 0:
            section_examples(doc, inp, snippets, snippet_chars, tokenizer)
    else:
        doc.p("No score files: metric histograms, correlations and examples need --scores or scored selections.")
    md, _ = write_markdown_report(out, doc.text(), doc.title)
    return md


def _snippet(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n].rstrip() + " …"
