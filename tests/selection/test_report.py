import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDatasetWriter
from megacpt.errors import UserError
from megacpt.selection.report import build_report
from megacpt.selection.sample import Budget
from megacpt.selection.select import SelectConfig, select
from tests.selection.test_select import _score_file


def test_report_over_selections(tmp_path, mixed_corpus):
    prefix, texts, labels = mixed_corpus
    sim = _score_file(tmp_path / "sim.parquet", prefix, "similarity", "similarity", labels + np.linspace(0, 0.5, 40))
    ent = _score_file(tmp_path / "ent.parquet", prefix, "pos-entropy", "pos_entropy", np.linspace(2, 1, 40))
    b = Budget("fraction", 0.2)
    select(SelectConfig(prefix, str(tmp_path / "ets"), "ets", [sim], budget=b))
    select(SelectConfig(prefix, str(tmp_path / "comb"), "combined", [sim, ent], sampling="soft", budget=b))
    out = tmp_path / "rep"
    rc = main(["report", "selection", "--manifests", str(tmp_path / "ets.manifest.json"),
               str(tmp_path / "comb.manifest.json"), "--out", str(out), "--snippets", "2"])
    assert rc == 0
    md = (out / "report.md").read_text()
    for section in ("## Budget", "## Overlap between selections (Jaccard)", "## Document length",
                    "## Metrics: selected vs rest", "## Metric correlations", "## Examples"):
        assert section in md
    assert "random (computed)" in md and "| full corpus |" in md
    for png in ("overlap.png", "lengths.png", "hist_sim.png", "hist_ent.png", "correlation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and '<img src="overlap.png"' in html
    # the top-similarity snippet is a finance document, shown as decoded text
    top = md.split("task similarity — top 2:")[1].split("\n\n")[1]
    assert any(t[:40] in top for t, fin in zip(texts, labels) if fin)
    # Jaccard of a selection with itself is 1
    assert "| ets | 1.000 |" in md


def test_report_refuses_mixed_corpora(tmp_path, mixed_corpus):
    prefix, _, _ = mixed_corpus
    other = str(tmp_path / "other")
    with IndexedDatasetWriter(other, np.uint16) as w:
        for d in range(10):
            w.add_document([[d + 1] * 5])
    select(SelectConfig(prefix, str(tmp_path / "a"), "random", budget=Budget("docs", 3)))
    select(SelectConfig(other, str(tmp_path / "b"), "random", budget=Budget("docs", 3)))
    with pytest.raises(UserError, match="a report compares selections of one corpus"):
        build_report([str(tmp_path / "a.manifest.json"), str(tmp_path / "b.manifest.json")], str(tmp_path / "r"))


def test_sampling_section_top_decile_and_overlaps(tmp_path, mixed_corpus):
    prefix, _, labels = mixed_corpus
    sim = _score_file(tmp_path / "sim.parquet", prefix, "similarity", "similarity", np.linspace(0, 1, 40))
    b = Budget("docs", 4)   # 10% of the 40 documents: hard takes exactly the top decile
    select(SelectConfig(prefix, str(tmp_path / "hard"), "ets", [sim], budget=b))
    select(SelectConfig(prefix, str(tmp_path / "rnd"), "random", budget=b, seed=3))
    md = build_report([str(tmp_path / "hard.manifest.json"), str(tmp_path / "rnd.manifest.json")],
                      str(tmp_path / "r"), snippets=0).read_text()
    sec = md.split("## Hard, soft and random sampling per strategy")[1].split("\n## ")[0]
    assert "| ets | hard | hard | 100.0% | 1.000 |" in sec
    assert "| ets | rnd | uniform |" in sec


def test_top_decile_share_and_renderer():
    from megacpt.selection.report import render_html, top_decile_share

    score = np.arange(100, dtype=float)
    eligible = np.ones(100, bool)
    top = np.zeros(100, bool)
    top[90:] = True
    assert top_decile_share(score, eligible, top) == 1.0
    assert top_decile_share(score, eligible, ~top) == 0.0
    every_other = np.arange(100) % 2 == 0
    assert abs(top_decile_share(score, eligible, every_other) - 0.1) < 1e-9
    page = render_html("# T\n\n| a | b |\n|---|---:|\n| 1 | <script> |\n\n![x](p.png)\n", "T")
    assert "<table>" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert '<img src="p.png" alt="x"' in page and "<h1>T</h1>" in page


def test_selection_names():
    from megacpt.selection.report import selection_names

    def m(prefix, strategy, sampling="hard"):
        return {"output": {"prefix": prefix}, "strategy": strategy, "sampling": sampling}

    assert selection_names([m("s/a/ets", "ets"), m("s/b/rnd", "random")]) == ["ets", "rnd"]   # basenames
    assert selection_names([m("s/ets-hard/s1/selected", "ets"), m("s/ets-soft/s1/selected", "ets", "soft"),
                            m("s/random-10/s1/selected", "random")]) == ["ets-hard", "ets-soft", "random"]
    assert selection_names([m("x/r10/s1/selected", "random"), m("x/r50/s1/selected", "random"),
                            m("x/e/selected", "ets")]) == ["r10/s1", "r50/s1", "ets-hard"]
    assert selection_names([m("a/selected", "ets"), m("a/selected", "ets")]) == ["a (1)", "a (2)"]


def test_plots_name_selections_that_share_a_basename(tmp_path, mixed_corpus, monkeypatch):
    """Every demo selection is written to .../selected: the plots say ets-hard, ets-soft, random."""
    import megacpt.selection.report as report

    prefix, _, labels = mixed_corpus
    sim = _score_file(tmp_path / "sim.parquet", prefix, "similarity", "similarity", labels + np.linspace(0, 0.5, 40))
    b = Budget("docs", 8)
    select(SelectConfig(prefix, str(tmp_path / "ets-hard" / "selected"), "ets", [sim], budget=b))
    select(SelectConfig(prefix, str(tmp_path / "ets-soft" / "selected"), "ets", [sim], sampling="soft", budget=b))
    select(SelectConfig(prefix, str(tmp_path / "random-10" / "selected"), "random", budget=b))
    texts: dict[str, list[str]] = {}
    save = report._save

    def spy(fig, path):
        legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        texts[path.name] = legends + [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
        save(fig, path)

    monkeypatch.setattr(report, "_save", spy)
    md = build_report([str(tmp_path / d / "selected.manifest.json") for d in ("ets-hard", "ets-soft", "random-10")],
                      str(tmp_path / "r"), snippets=0).read_text()
    for png in ("overlap.png", "lengths.png", "hist_sim.png"):
        assert {"ets-hard", "ets-soft", "random"} <= set(texts[png]), (png, texts[png])
        assert not any(t.startswith("selected") for t in texts[png]), (png, texts[png])
    assert "| ets-hard |" in md and "selected (" not in md
