"""megacpt.io's temporaries, output claims and signal handling (issue 20, item 2): the pieces each command uses."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megacpt import io
from megacpt.errors import UserError
from tests.faults import REPO

OWNED = re.compile(r"\.x\.bin\.[A-Za-z0-9_]+-(\d+)-[0-9a-f]{8}\.tmp")


def _child(code: str) -> subprocess.Popen:
    """A Python child with megacpt importable; its first stdout line is read by the caller."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_temporary_names_owner_and_is_locked_until_committed(tmp_path):
    out = tmp_path / "x.bin"
    tmp = io.tmp_path_for(out)
    m = OWNED.fullmatch(tmp.name)
    assert m and int(m[1]) == os.getpid()
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~umask
    assert io.remove_stale_temps([out], old_format=True) == []  # ours, live
    tmp.write_text("data")
    io.commit_tmp(tmp, out)
    assert out.read_text() == "data" and str(tmp) not in io._LIVE
    t2 = io.tmp_path_for(out)
    io.discard_tmp(t2)
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]


def test_stale_temporaries_go_live_ones_stay(tmp_path):
    out = tmp_path / "x.bin"
    live = _child(f"""
        import time
        from megacpt import io
        print(io.tmp_path_for({str(out)!r}), flush=True)
        time.sleep(60)
    """)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        dead = _child(f"""
            import os
            from megacpt import io
            print(io.tmp_path_for({str(out)!r}), flush=True)
            os._exit(0)   # no cleanup: as if killed
        """)
        dead_tmp = Path(dead.stdout.readline().strip())
        dead.wait(timeout=60)
        old = tmp_path / ".x.bin.ab12cd_e.tmp"          # tempfile.mkstemp's naming: no owner
        old.write_text("old")
        other = tmp_path / ".x.binary.ab12cd_e.tmp"     # another file's temporary
        other.write_text("other")
        assert io.remove_stale_temps([out]) == [dead_tmp]  # old format only under the output's lock
        assert io.remove_stale_temps([out], old_format=True) == [old]
        assert live_tmp.exists() and other.exists()
        # an unlocked temporary of a live process is kept while young (its writer may not have locked it yet)
        young = tmp_path / f".x.bin.{io._HOST}-{live.pid}-0123abcd.tmp"
        young.write_text("")
        assert io.remove_stale_temps([out]) == [] and young.exists()
        os.utime(young, (time.time() - 3600,) * 2)
        assert io.remove_stale_temps([out]) == [young]
    finally:
        live.kill()
        live.wait()
    assert io.remove_stale_temps([out]) == [live_tmp]  # killed -9: its lock went with it


def test_claim_refuses_a_second_live_job_and_is_reentrant(tmp_path):
    out = tmp_path / "x.bin"
    holder = _child(f"""
        import time
        from megacpt import io
        with io.claim_output({str(out)!r}):
            print("claimed", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(UserError, match=rf"x.bin is being written by another live job \(pid {holder.pid} on"):
            with io.claim_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with io.claim_output(out):
        with io.claim_output(out):  # re-entrant: preprocess claims the merged output, so does its merge
            assert (tmp_path / ".x.bin.lock").exists()
        assert (tmp_path / ".x.bin.lock").exists()
    assert os.listdir(tmp_path) == []  # the lock file goes with the claim


@pytest.mark.fault(fault="kill -9 of a job whose forked worker lives on", stage="any command with workers",
                   sees="nothing (killed)", left="temporaries until the next run, which removes them: an orphaned "
                                                 "worker never keeps them locked")
def test_forked_worker_never_holds_the_parents_temporaries(tmp_path):
    out = tmp_path / "x.bin"
    job = _child(f"""
        import os, time
        from megacpt import io
        tmp = io.tmp_path_for({str(out)!r})
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the at-fork hook has run by now: tell the parent, then live on
            os.write(ready_w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready_r, 1)  # without this the test could kill the job before the worker dropped its fd copy
        print(tmp, pid, flush=True)
        time.sleep(60)
    """)
    tmp, worker = job.stdout.readline().split()
    try:
        job.kill()
        job.wait()
        assert io.remove_stale_temps([out]) == [Path(tmp)]
    finally:
        os.kill(int(worker), signal.SIGKILL)


def test_signal_unwinds_removes_temporaries_and_reports_one_line(tmp_path, capsys):
    out = tmp_path / "x.bin"
    with handle_term() as raised:
        with io.describe_interrupt(lambda: "after 3 documents; re-run the same command"):
            tmp = io.tmp_path_for(out)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    e = raised[0]
    assert isinstance(e, KeyboardInterrupt) and e.signum == signal.SIGTERM and tmp.exists()
    assert io.report_interrupt("megacpt x", e) == 143
    assert not tmp.exists()
    assert capsys.readouterr().err == "megacpt x: interrupted by SIGTERM after 3 documents; re-run the same command\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class handle_term:
    """`io.handle_signals` around a block; the `Interrupted` it raised is kept in the list yielded."""

    def __enter__(self):
        self.raised = []
        self.ctx = io.handle_signals()
        self.ctx.__enter__()
        return self.raised

    def __exit__(self, et, e, tb):
        self.ctx.__exit__(None, None, None)
        if isinstance(e, io.Interrupted):
            self.raised.append(e)
            return True
        return False


def test_ignored_signals_stay_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with io.handle_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is io._on_signal
    finally:
        signal.signal(signal.SIGHUP, old)


def test_pause_hook_is_inert_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("MEGACPT_TEST_PAUSE", raising=False)
    t0 = time.monotonic()
    io.pause_for_test("preprocess-write")
    assert time.monotonic() - t0 < 1
    flag = tmp_path / "flag"
    monkeypatch.setenv("MEGACPT_TEST_PAUSE", f"other-point:{flag}")
    io.pause_for_test("preprocess-write")
    assert not flag.exists()
