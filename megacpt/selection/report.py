"""`megacpt report selection`: compare selections over one corpus (Markdown + HTML + PNG plots).

Inputs are selection manifests (`megacpt select`), optionally extra score files. The report has:
budget asked/achieved per selection beside the full corpus; Jaccard overlap between selections;
per metric, histograms of the corpus and of each selection, and selected-vs-rest means; the metric
correlation matrix (Spearman, document length included); the document-length distribution; and
the top/bottom documents of each metric as text snippets. docs/method.md wants every comparison to hold a
random baseline: when no manifest is a random selection, one with the first selection's budget is
computed (seeded, not written) and reported as ``random (computed)``.
"""
from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megacpt.errors import UserError
from megacpt.io import atomic_path

METRIC_TITLES = {"sim": "task similarity", "ppl": "novelty: mean NLL (ln perplexity)", "ent": "POS entropy",
                 "dsir": "DSIR log weight"}


@dataclass
class Sel:
    name: str
    manifest: dict[str, Any]
    ids: np.ndarray
    mask: np.ndarray  # bool [num_documents]


# -- a tiny document model rendered to both Markdown and HTML ---------------------------------------
class Doc:
    def __init__(self, title: str):
        self.blocks: list[tuple[str, Any]] = [("h1", title)]

    def h2(self, t): self.blocks.append(("h2", t))
    def p(self, t): self.blocks.append(("p", t))
    def table(self, header, rows): self.blocks.append(("table", (header, rows)))
    def image(self, path, alt): self.blocks.append(("img", (path, alt)))
    def quotes(self, items): self.blocks.append(("quotes", items))

    def markdown(self) -> str:
        out = []
        for kind, x in self.blocks:
            if kind == "h1":
                out.append(f"# {x}\n")
            elif kind == "h2":
                out.append(f"## {x}\n")
            elif kind == "p":
                out.append(f"{x}\n")
            elif kind == "table":
                header, rows = x
                cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
                out.append("| " + " | ".join(map(cell, header)) + " |")
                out.append("|" + "---|" * len(header))
                out.extend("| " + " | ".join(map(cell, r)) + " |" for r in rows)
                out.append("")
            elif kind == "img":
                out.append(f"![{x[1]}]({x[0]})\n")
            elif kind == "quotes":
                out.extend(f"- `{lab}`: {txt.replace(chr(10), ' ')}" for lab, txt in x)
                out.append("")
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = ["<!doctype html><html><head><meta charset='utf-8'><title>%s</title><style>"
               "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
               "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%%}"
               "li{margin-bottom:4px}</style></head><body>" % e(self.blocks[0][1])]
        for kind, x in self.blocks:
            if kind in ("h1", "h2", "p"):
                out.append(f"<{kind}>{e(str(x))}</{kind}>")
            elif kind == "table":
                header, rows = x
                out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in rows)
                out.append("</table>")
            elif kind == "img":
                out.append(f"<p><img src='{e(x[0])}' alt='{e(x[1])}'></p>")
            elif kind == "quotes":
                out.append("<ul>" + "".join(f"<li><code>{e(lab)}</code> {e(txt)}</li>" for lab, txt in x) + "</ul>")
        out.append("</body></html>")
        return "\n".join(out)


def _fmt(v: float, digits: int = 4) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _load_selections(manifests: list[str]):
    from megacpt.selection.documents import same_dataset
    from megacpt.selection.select import read_manifest

    sels, data = [], None
    for path in manifests:
        m = read_manifest(path)
        if data is None:
            data = m["data"]
        elif not same_dataset(m["data"], data):
            raise UserError(f"{path}: selects from {m['data']['prefix']}, not {data['prefix']} like "
                            f"{manifests[0]}; a report compares selections of one corpus")
        ids = np.asarray(m["selected_doc_ids"], dtype=np.int64)
        mask = np.zeros(data["num_documents"], dtype=bool)
        mask[ids] = True
        name = Path(m["output"]["prefix"]).name
        if any(s.name == name for s in sels):
            name = f"{name} ({len(sels)})"
        sels.append(Sel(name, m, ids, mask))
    return sels, data


def build_report(manifests: list[str], out_dir: str, extra_scores: list[str] = (), data: str | None = None,
                 snippets: int = 3, snippet_chars: int = 300, random_seed: int = 0,
                 tokenizer: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megacpt.data.indexed import IndexedDataset
    from megacpt.selection.combine import load_metrics, metric_of, percentile_rank
    from megacpt.selection.documents import DocumentTexts, dataset_identity, same_dataset
    from megacpt.selection.sample import Budget
    from megacpt.selection.scores import read_scores
    from megacpt.selection.select import SelectConfig, compute_selection

    if not manifests:
        raise UserError("give at least one selection manifest (--manifests)")
    sels, ident = _load_selections(manifests)
    prefix = data or ident["prefix"]
    ds = IndexedDataset(prefix)
    if not same_dataset(dataset_identity(prefix, ds), ident):
        raise UserError(f"{prefix}: not the corpus the selections were made from (index hash differs)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = ds.document_lengths()
    n_docs, n_tok = ds.num_documents, int(lengths.sum())

    if not any(s.manifest["strategy"] == "random" for s in sels):
        first = sels[0].manifest
        kind, n = first["budget"]["resolved"]["kind"], first["budget"]["resolved"]["n"]
        cfg = SelectConfig(prefix, "unused", "random", budget=Budget(kind, n), seed=random_seed)
        ids, info = compute_selection(cfg, ds)
        mask = np.zeros(n_docs, bool)
        mask[ids] = True
        sels.append(Sel("random (computed)", {**info, "selected_doc_ids": ids.tolist()}, ids, mask))

    # metrics: every score file the selections used, plus extra ones (first file per metric wins)
    paths = list(dict.fromkeys([s["path"] for sel in sels for s in sel.manifest.get("scores", [])] + list(extra_scores)))
    files, seen = [], set()
    for p in paths:
        sf = read_scores(p)
        if metric_of(sf) not in seen:
            seen.add(metric_of(sf))
            files.append(sf)
    metrics = load_metrics(files, ident)

    doc = Doc("Data selection report")
    doc.p(f"Corpus `{prefix}`: {n_docs:,} documents, {n_tok:,} tokens "
          f"({int((lengths == 0).sum())} empty documents, never selected).")

    doc.h2("Budget")
    rows = [["full corpus", "full", "–", "–", "100%", f"{n_tok:,}", f"{n_docs:,}", "100.00%", "100.00%", "–"]]
    for s in sels:
        m, b = s.manifest, s.manifest["budget"]
        asked = b["asked"]
        asked_s = "–" if asked is None else (f"{asked['value']:g} of tokens" if asked["kind"] == "fraction"
                                             else f"{int(asked['value']):,} {asked['kind']}")
        rows.append([s.name, m["strategy"], m["sampling"], m["seed"], asked_s, f"{b['achieved_tokens']:,}",
                     f"{b['achieved_documents']:,}", f"{100 * b['fraction_of_tokens']:.2f}%",
                     f"{100 * b['fraction_of_documents']:.2f}%", f"{b.get('overshoot_tokens', 0):,}"])
    doc.table(["selection", "strategy", "sampling", "seed", "asked", "tokens", "documents", "% tokens",
               "% documents", "overshoot (tokens)"], rows)

    doc.h2("Overlap between selections (Jaccard)")
    names = [s.name for s in sels]
    jac = np.array([[(a.mask & b.mask).sum() / max((a.mask | b.mask).sum(), 1) for b in sels] for a in sels])
    doc.table(["", *names], [[a, *(f"{v:.3f}" for v in row)] for a, row in zip(names, jac)])
    if len(sels) > 1:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sels), 1 + 0.8 * len(sels)))
        im = ax.imshow(jac, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", color="w" if jac[i, j] < 0.6 else "k")
        fig.colorbar(im, ax=ax)
        _save(fig, out / "overlap.png")
        doc.image("overlap.png", "Jaccard overlap")

    doc.h2("Document length")
    rows = [["full corpus", f"{lengths[lengths > 0].mean():.1f}", f"{np.median(lengths[lengths > 0]):.0f}"]]
    rows += [[s.name, f"{lengths[s.ids].mean():.1f}", f"{np.median(lengths[s.ids]):.0f}"] for s in sels if s.ids.size]
    doc.table(["set", "mean tokens", "median tokens"], rows)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    pos = lengths[lengths > 0]
    bins = np.logspace(0, np.log10(max(pos.max(), 2)), 40) if pos.size else 10
    ax.hist(pos, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="gray", label="corpus")
    for s in sels:
        if s.ids.size:
            ax.hist(lengths[s.ids], bins=bins, density=True, histtype="step", label=s.name)
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    _save(fig, out / "lengths.png")
    doc.image("lengths.png", "document lengths")

    if metrics:
        doc.h2("Metrics: selected vs rest")
        rows = []
        for name, met in metrics.items():
            v = np.where(met.undefined, np.nan, met.values)
            for s in sels:
                rest = ~s.mask & (lengths > 0)
                rows.append([METRIC_TITLES[name], s.name, _fmt(np.nanmean(v[s.mask]) if s.mask.any() else np.nan),
                             _fmt(np.nanmean(v[rest]) if rest.any() else np.nan), _fmt(np.nanmean(v[lengths > 0]))])
            fig, ax = plt.subplots(figsize=(7, 3.5))
            finite = v[np.isfinite(v)]
            bins = np.histogram_bin_edges(finite, bins=40) if finite.size else 10
            ax.hist(finite, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color="gray", label="corpus")
            for s in sels:
                sv = v[s.mask]
                sv = sv[np.isfinite(sv)]
                if sv.size:
                    ax.hist(sv, bins=bins, density=True, histtype="step", label=s.name)
            ax.set_xlabel(METRIC_TITLES[name])
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
            _save(fig, out / f"hist_{name}.png")
        doc.table(["metric", "selection", "mean selected", "mean rest", "mean corpus"], rows)
        for name in metrics:
            doc.image(f"hist_{name}.png", f"{METRIC_TITLES[name]} histogram")

        doc.h2("Metric correlations (Spearman, non-empty documents)")
        keep = lengths > 0
        cols = {n: percentile_rank(m.values[keep], m.undefined[keep]) for n, m in metrics.items()}
        cols["length"] = percentile_rank(lengths[keep].astype(float))
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

        if snippets > 0:
            doc.h2("Examples: top and bottom documents per metric")
            try:
                texts = DocumentTexts(prefix, tokenizer)
            except UserError as e:
                texts = None
                doc.p(f"(no snippets: {e})")
            if texts is not None:
                for name, met in metrics.items():
                    ok = np.flatnonzero(keep & ~met.undefined)
                    order = ok[np.argsort(-met.values[ok], kind="stable")]
                    for label, pick in (("top", order[:snippets]), ("bottom", order[::-1][:snippets])):
                        doc.p(f"{METRIC_TITLES[name]} — {label} {len(pick)}:")
                        doc.quotes([(f"doc {d} ({_fmt(met.values[d])})", _snippet(texts[int(d)], snippet_chars))
                                    for d in pick])
    else:
        doc.p("No score files: metric histograms, correlations and examples need --scores or scored selections.")

    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(doc.markdown())
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(doc.html())
    return out / "report.md"


def _snippet(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n].rstrip() + " …"


# -- `megacpt report selection` --------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    subs = p.add_subparsers(dest="report", metavar="REPORT", required=True)
    s = subs.add_parser("selection", help="compare selections over one corpus (Markdown + HTML + PNG)")
    s.add_argument("--manifests", nargs="+", required=True, metavar="M", help="OUT.manifest.json of megacpt select")
    s.add_argument("--out", required=True, metavar="DIR", help="writes DIR/report.md, report.html, *.png")
    s.add_argument("--scores", nargs="*", default=[], help="extra score files to show (beside the selections')")
    s.add_argument("--data", default=None, help="corpus prefix, if it moved since the selections were made")
    s.add_argument("--snippets", type=int, default=3, help="top/bottom documents shown per metric")
    s.add_argument("--snippet-chars", type=int, default=300, help="characters per snippet")
    s.add_argument("--random-seed", type=int, default=0, help="seed of the computed random baseline")
    s.add_argument("--tokenizer", default=None, help="override the tokenizer path named in the corpus sidecar")


def run(args: argparse.Namespace) -> int:
    path = build_report(args.manifests, args.out, args.scores, args.data, args.snippets, args.snippet_chars,
                        args.random_seed, args.tokenizer)
    print(f"report: {path} (+ report.html, plots) in {os.path.dirname(path)}")
    return 0
