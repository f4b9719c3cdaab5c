"""Fault injection for the interruption tests: run `megacpt ARGS` in a child process, stop it at a named point
(``megacpt.io.pause_for_test``: the child touches a flag file there and sleeps), signal it, look at what is left.

Every wait polls with a deadline (slow CI machines only make the tests slower, never flaky or hung).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 90.0  # seconds any single wait may take before the test fails


class Job:
    """``megacpt ARGS`` running in a child; stdout/stderr go to files beside ``flag``."""

    def __init__(self, args: list[str], workdir: Path, pause: str | None = None, name: str = "job"):
        workdir.mkdir(parents=True, exist_ok=True)
        self.flag = workdir / f"{name}.paused"
        self.err_path, self.out_path = workdir / f"{name}.err", workdir / f"{name}.out"
        env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MEGACPT_TEST_PAUSE", None)
        if pause:
            env["MEGACPT_TEST_PAUSE"] = f"{pause}:{self.flag}"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            # SIGINT at its default even when this test process ignores it (run in the background)
            self.proc = subprocess.Popen([sys.executable, "-m", "megacpt", *args], stdout=out, stderr=err,
                                         env=env, cwd=workdir,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_paused(self) -> None:
        """Until the child sits at its pause point (fails if it exits first)."""
        wait_for(self.flag.exists, f"pause point of {self.proc.args}", self)

    def signal(self, sig: int) -> int:
        """Send ``sig``; returns the exit code (negative: killed by that signal)."""
        self.proc.send_signal(sig)
        return self.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.proc.args} did not exit within {TIMEOUT} s; stderr:\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(cond, what: str, job: Job | None = None, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"{what}: the job exited ({job.proc.returncode}) first; stderr:\n{job.stderr[-3000:]}")
        if time.monotonic() > deadline:
            if job is not None:
                job.kill()
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.05)


def run(args: list[str], workdir: Path, name: str = "run") -> tuple[int, str]:
    """``megacpt ARGS`` to the end: (exit code, stderr)."""
    job = Job(args, workdir, name=name)
    return job.wait(), job.stderr


def leftovers(*dirs: Path) -> list[str]:
    """Temporaries and locks under ``dirs`` (hidden ``*.tmp`` files or dirs, ``.*.lock``), recursively."""
    found = []
    for d in dirs:
        for p in Path(d).rglob(".*"):
            if p.name.endswith((".tmp", ".lock")) or ".tmp-" in p.name:
                found.append(str(p.relative_to(d)))
    return sorted(found)


def pids_alive(pids) -> list[int]:
    """The processes of ``pids`` still running (a zombie nobody reaps yet counts as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "kill -9": signal.SIGKILL}
