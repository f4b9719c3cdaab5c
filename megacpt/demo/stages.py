"""Resumable stages with a manifest, run as a dependency graph on a few workers, with an overall ETA.

A stage declares its outputs (files or directories under the work dir), the parameters that
determine them, and the stages it reads from. After it succeeds the runner records, in
``WORKDIR/manifest.json``, the size and SHA-256 of every output file plus a fingerprint of
(params, upstream outputs). On the next run a stage is skipped only if its fingerprint matches
and every recorded file is still there with the same size and hash; otherwise its old outputs
are removed and it runs again (so are the stages downstream, whose fingerprints change).

Where commands run (``CommandRunner``), each writing to ``WORKDIR/logs/STAGE.log``:

- ``jobs == 1`` and in-process (the default for one job): the command's package ``cli`` in this process;
- ``jobs > 1``: ``jobs`` persistent worker processes (spawned once: one interpreter + torch start-up
  each), each running one command at a time in-process; stages whose dependencies are done run
  concurrently, up to ``jobs`` at once;
- ``child_processes`` or ``fresh=True`` for one command: ``python -m megacpt ...`` as a child process
  (memory freed when it exits; used for the scorers that load spaCy and a sentence-embedding model).

Cost accounting: a stage's CPU seconds are its commands' (user + system, from the worker or from
``wait4``) plus what its own thread spent; the peak memory of the whole process tree (this process, the
workers and their children; shared libraries counted once: RSSMonitor) is sampled every 0.5 s. The ETA divides the predicted CPU cost of
the remaining stages (``Stage.cost``) by the number of jobs, after rescaling it by the wall/predicted
ratio of the finished stages (so the ETA follows the machine's speed and load).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megacpt.errors import UserError
from megacpt.io import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
NOT_RUN = "not run yet"   # why_stale of a stage without a manifest entry (first run, or interrupted)


@dataclass
class Stage:
    name: str
    outputs: list[str]                       # relative to the work dir; a directory counts all files under it
    fn: Callable[["StageContext"], dict | None]  # does the work; returns info recorded in the manifest
    params: dict = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    # glob patterns (on the relative path) of outputs whose bytes differ between identical runs (timestamps,
    # timings): still checked for corruption, but left out of downstream fingerprints so an identical redo
    # does not cascade
    volatile: tuple[str, ...] = ()
    # the command resumes from its own partial output (a training run from its last checkpoint): after an
    # interruption (no manifest entry yet) the outputs are kept; a changed or corrupted stage still starts clean
    resumable: bool = False
    # predicted CPU seconds (called when an ETA is printed; may read the outputs of finished stages)
    cost: Callable[[], float] | float = 1.0

    def predicted_cost(self) -> float:
        try:
            return float(self.cost() if callable(self.cost) else self.cost)
        except (OSError, ValueError, KeyError, UserError):   # inputs not there yet: a nominal cost
            return 1.0


# ------------------------------------------------------------------------------------------- commands

def _run_here(workdir: str, args: list[str], log_path: str, threads: int | None = None) -> tuple[int, float, int]:
    """Run ``megacpt ARGS`` in this process with cwd = workdir and output to the log.

    Returns (exit code, CPU seconds of this process during the command, peak RSS in kB during it: the
    process's peak is reset first where Linux allows, so a persistent worker does not report an earlier
    command's peak as this one's). Only one command at a time per process (it changes the working directory).
    ``threads``: intra-op threads for this command only (None: the process's setting).
    """
    import signal

    import torch

    root, cwd = logging.getLogger(), os.getcwd()
    saved = root.handlers[:]
    # a command may install its own handlers (train: SIGTERM -> checkpoint and stop); they end with it
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    c0 = _self_cpu_s()
    _reset_peak_rss()
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, _STREAM.to(log), \
            contextlib.redirect_stdout(_STREAM), contextlib.redirect_stderr(_STREAM):
        print(f"$ megacpt {' '.join(args)}  (in-process, pid {os.getpid()})", flush=True)
        root.handlers.clear()  # let the command's logging.basicConfig bind to this log
        os.chdir(workdir)
        try:
            rc = _main(args)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - a command's crash becomes this stage's error, with the traceback logged
            traceback.print_exc()
            rc = 1
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads_before)
            for h in root.handlers[:]:
                root.removeHandler(h)
            root.handlers[:] = saved
            for s, h in handlers.items():
                if h is not None and threading.current_thread() is threading.main_thread():
                    signal.signal(s, h)
    return rc, _self_cpu_s() - c0, _peak_rss_kb()


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux >= 4.0: ``5`` > /proc/self/clear_refs); elsewhere a no-op."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss_kb() -> int:
    """This process's peak RSS in kB since the last ``_reset_peak_rss`` (VmHWM), else over its lifetime."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _command(name: str):
    """``(add_arguments, run)`` of a command the demo runs, from its package's ``cli.COMMANDS`` (packages
    below the demo: the demo never goes back up through ``megacpt.cli``)."""
    from megacpt.data import cli as data_cli
    from megacpt.eval import cli as eval_cli
    from megacpt.selection import cli as selection_cli
    from megacpt.train import cli as train_cli

    for module in (data_cli, selection_cli, train_cli, eval_cli):
        if name in module.COMMANDS:
            return module.COMMANDS[name]
    return None


def _main(args: list[str]) -> int:
    """``megacpt ARGS`` as `megacpt.cli.main` runs it: parse, run, a UserError as one line and exit code 2."""
    import argparse

    name, rest = (args[0], args[1:]) if args else ("", [])
    command = _command(name)
    if command is None:
        print(f"megacpt: error: invalid choice: {name!r} (not a command the demo runs)", file=sys.stderr)
        return 2
    add_arguments, run = command
    parser = argparse.ArgumentParser(prog=f"megacpt {name}")
    add_arguments(parser)
    ns = parser.parse_args(rest)
    try:
        return int(run(ns) or 0)
    except UserError as e:
        print(f"megacpt {name}: error: {e}", file=sys.stderr)
        return 2


def _worker_init(env: dict, threads: int) -> None:
    os.environ.update(env)
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)


def _die_with_parent() -> None:
    """End this worker (whatever it is running) once the demo process is gone (killed, crashed): a
    watchdog thread polls the parent pid, so no worker is left behind holding memory."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _self_cpu_s() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime


class CommandRunner:
    """Runs `megacpt` commands: here, on a pool of persistent workers, or as child processes."""

    def __init__(self, jobs: int = 1, env: dict | None = None, in_process: bool = True, threads: int = 1):
        self.jobs, self.env, self.in_process, self.threads = max(1, jobs), env or {}, in_process, threads
        self.pool: ProcessPoolExecutor | None = None
        if in_process and self.jobs > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(self.env, threads))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def run(self, workdir: Path, args: list[str], log: Path, fresh: bool = False,
            threads: int | None = None) -> tuple[int, float, int]:
        """(exit code, CPU seconds, peak RSS kB of the process that ran it); ``threads``: intra-op threads of
        this command (None: the runner's)."""
        if fresh or not self.in_process:
            return self._child(workdir, args, log, threads)
        if self.pool is not None:
            return self.pool.submit(_run_here, str(workdir), args, str(log), threads).result()
        return _run_here(str(workdir), args, str(log), threads)

    def _child(self, workdir: Path, args: list[str], log: Path, threads: int | None = None) -> tuple[int, float, int]:
        cmd = [sys.executable, "-m", "megacpt", *args]
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads or self.threads)}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd[1:])}  (child process)\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=workdir)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss


@dataclass
class StageContext:
    workdir: Path
    stage: Stage
    log: Path
    runner: CommandRunner
    peak_rss_kb: int = 0
    command_cpu_s: float = 0.0
    in_thread_commands: bool = False   # commands ran in this thread's process (their CPU is in thread time)

    def path(self, rel: str) -> Path:
        return self.workdir / rel

    def megacpt(self, *args, fresh: bool = False, threads: int | None = None) -> None:
        """Run one `megacpt` command (see CommandRunner), appending to this stage's log; ``threads``: its
        intra-op threads (None: the runner's)."""
        argv = [str(a) for a in args]
        here = self.runner.pool is None and self.runner.in_process and not fresh
        rc, cpu, rss = self.runner.run(self.workdir, argv, self.log, fresh=fresh, threads=threads)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        if not here:
            self.command_cpu_s += cpu
        if rc != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-6:]
            raise UserError(f"stage {self.stage.name}: `megacpt {' '.join(argv[:2])} ...` exited "
                            f"{rc}; log {self.log}:\n    " + "\n    ".join(tail))


class _SwitchStream:
    """A never-closed stdout/stderr stand-in whose target is the current stage's log.

    Modules imported during one in-process command may keep a reference to ``sys.stderr`` (a
    default argument, a logging handler); through this proxy those references stay valid and write
    to whichever log is current, instead of to a closed file.
    """

    def __init__(self):
        self.target = None

    def write(self, s: str) -> int:
        return (self.target or sys.__stderr__).write(s)

    def flush(self) -> None:
        (self.target or sys.__stderr__).flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return (self.target or sys.__stderr__).fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def to(self, target):
        @contextlib.contextmanager
        def cm():
            old, self.target = self.target, target
            try:
                yield self
            finally:
                self.flush()
                self.target = old

        return cm()


_STREAM = _SwitchStream()


class RSSMonitor:
    """Peak memory of this process and all its descendants together, sampled in a thread.

    Footprint = the sum of each process's unique pages (USS) + the largest shared part (RSS − USS) of any
    one of them: the libraries every worker maps (torch, numpy) are counted once, as they occupy memory
    once, whatever else runs on the machine. Where USS is not available (not Linux): the sum of RSS,
    which counts shared pages once per process (an upper bound).
    """

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak_bytes = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RSSMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        unique, shared, rss_sum = 0, 0, 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                rss_sum += rss
                try:
                    uss = p.memory_full_info().uss
                except (psutil.AccessDenied, AttributeError):
                    uss = None
                if uss is None:
                    unique = None
                elif unique is not None:
                    unique += uss
                    shared = max(shared, rss - uss)
        total = rss_sum if unique is None else unique + shared
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)


# ------------------------------------------------------------------------------------------- runner

def _files(workdir: Path, rel: str) -> list[Path]:
    p = workdir / rel
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return [p] if p.exists() else []


def hash_outputs(workdir: Path, outputs: list[str]) -> dict[str, dict]:
    return {str(f.relative_to(workdir)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for rel in outputs for f in _files(workdir, rel)}


def _hms(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s"


def last_log_line(log: Path, max_chars: int = 200) -> str:
    """The last non-empty line of a stage's log (a progress bar's carriage returns count as line ends)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [x.strip() for x in tail.replace("\r", "\n").split("\n") if x.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


class StageRunner:
    """Runs the stale stages (see the module doc). Console lines go to ``echo``: the log location once, a
    line per stage as it starts (``running ...``, ``running again: REASON``) and ends, ``cached`` for a
    stage kept from an earlier run (its stored numbers are labelled as that run's), and, whenever nothing
    was printed for ``heartbeat_s``, a heartbeat per running stage with the last line of its log."""

    def __init__(self, workdir: Path, force: bool = False, env: dict | None = None,
                 echo: Callable[[str], None] = print, in_process: bool = True, jobs: int = 1, threads: int = 1,
                 heartbeat_s: float = 30.0):
        self.workdir, self.force, self.env, self._echo = workdir, force, env or {}, echo
        self.in_process, self.jobs, self.threads = in_process, max(1, jobs), threads
        self.heartbeat_s = heartbeat_s
        self.manifest_path = workdir / MANIFEST
        self.manifest = self._load()
        self.summary: list[dict] = []
        self.peak_rss_mb = 0.0
        self._lock = threading.Lock()
        self._echo_lock = threading.Lock()
        self._last_echo = time.perf_counter()
        self._running: dict[str, tuple[float, Path]] = {}   # stage -> (start, its log), for the heartbeat

    def echo(self, line: str) -> None:
        with self._echo_lock:
            self._last_echo = time.perf_counter()
            self._echo(line)

    def log_path(self, stage: Stage) -> Path:
        return self.workdir / "logs" / f"{stage.name}.log"

    def _heartbeat(self, stop: threading.Event) -> None:
        """While stages run: after ``heartbeat_s`` of console silence, one line per running stage."""
        while not stop.wait(min(1.0, self.heartbeat_s / 4)):
            now = time.perf_counter()
            if now - self._last_echo < self.heartbeat_s:
                continue
            for name, (t0, log) in sorted(self._running.copy().items()):
                last = last_log_line(log)
                self.echo(f"      ... {name} running for {_hms(now - t0)}" + (f": {last}" if last else ""))

    def _load(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text())
            return m if isinstance(m.get("stages"), dict) else {"stages": {}}
        except (OSError, ValueError):
            return {"stages": {}}

    def fingerprint(self, stage: Stage) -> str:
        import fnmatch

        up = {}
        for d in stage.deps:
            entry = self.manifest["stages"].get(d, {})
            vol = entry.get("volatile", [])
            up[d] = {rel: h["sha256"] for rel, h in (entry.get("outputs") or {}).items()
                     if not any(fnmatch.fnmatch(rel, pat) for pat in vol)} if entry else None
        blob = json.dumps({"params": stage.params, "outputs": stage.outputs, "upstream": up},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def why_stale(self, stage: Stage) -> str | None:
        """None if the stage is done and intact, else the reason it must (re)run."""
        entry = self.manifest["stages"].get(stage.name)
        if entry is None:
            return NOT_RUN
        if entry.get("fingerprint") != self.fingerprint(stage):
            return "inputs or parameters changed"
        recorded = entry.get("outputs", {})
        present = {str(f.relative_to(self.workdir)) for rel in stage.outputs for f in _files(self.workdir, rel)}
        if missing := sorted(set(recorded) - present):
            return f"output {missing[0]} missing"
        if extra := sorted(present - set(recorded)):
            return f"unexpected file {extra[0]} in outputs"
        for rel, rec in recorded.items():
            f = self.workdir / rel
            if f.stat().st_size != rec["size"]:
                return f"output {rel} corrupted (size {f.stat().st_size} != {rec['size']})"
            if sha256_file(f) != rec["sha256"]:
                return f"output {rel} corrupted (sha256 mismatch)"
        return None

    def run(self, stages: list[Stage]) -> list[dict]:
        """Run every stale stage (dependencies first, up to ``jobs`` at once); returns one summary row each."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        known = set(names)
        for s in stages:
            if missing := [d for d in s.deps if d not in known]:
                raise ValueError(f"stage {s.name} depends on unknown stages {missing}")
        index = {s.name: i for i, s in enumerate(stages, 1)}
        rows: dict[str, dict] = {}
        self._t0, self._done_cost, self._done_wall = time.perf_counter(), 0.0, 0.0
        runner = CommandRunner(self.jobs, self.env, self.in_process, self.threads)

        def skip_or_reason(s: Stage) -> tuple[str, str | None]:
            head = f"[{index[s.name]:>3}/{len(stages)}] {s.name:<28}"
            reason = "--force" if self.force else self.why_stale(s)
            if reason is None:
                entry = self.manifest["stages"][s.name]
                rss = f", peak RSS {entry['peak_rss_mb']:.0f} MB" if entry.get("peak_rss_mb") else ""
                when = f" at {entry['finished_at']}" if entry.get("finished_at") else ""
                self.echo(f"{head} cached (up to date; the earlier run{when}: {entry['wall_s']:.1f}s{rss})")
                rows[s.name] = {**entry, "name": s.name, "skipped": True}
            return head, reason

        def finished(s: Stage, row: dict, remaining: list[Stage]) -> None:
            rows[s.name] = row
            self._done_cost += s.predicted_cost()
            self._done_wall += row.get("wall_s") or 0.0
            self.echo(self._eta_line(remaining))

        self.echo(f"per-stage logs: {self.workdir / 'logs'}/STAGE.log")
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(stop_heartbeat,), daemon=True,
                                     name="demo-heartbeat")
        heartbeat.start()
        try:
            with RSSMonitor() as mon:
                if self.jobs == 1:   # in this thread, in order: commands may install signal handlers
                    for i, s in enumerate(stages):
                        if missing := [d for d in s.deps if d not in rows]:
                            raise ValueError(f"stage {s.name} runs before its dependencies {missing}")
                        head, reason = skip_or_reason(s)
                        if reason is not None:
                            finished(s, self._run_one(s, reason, head, runner), stages[i + 1:])
                else:
                    self._run_graph(stages, rows, skip_or_reason, finished, runner)
                self.peak_rss_mb = mon.peak_bytes / 2**20
        finally:
            stop_heartbeat.set()
            heartbeat.join()
            runner.close()
        self.summary = [rows[n] for n in names]
        return self.summary

    def _run_graph(self, stages, rows, skip_or_reason, finished, runner) -> None:
        """Stages whose dependencies are done run in threads, ``jobs`` at once; their commands go to the
        worker processes. The first failure stops new stages, lets the running ones finish, and is raised."""
        pending, running, error = list(stages), {}, None
        with ThreadPoolExecutor(self.jobs) as threads:
            while (pending and error is None) or running:
                progressed = True
                while progressed and error is None:
                    progressed = False
                    for s in [s for s in pending if all(d in rows for d in s.deps)]:
                        if len(running) >= self.jobs:
                            break
                        pending.remove(s)
                        head, reason = skip_or_reason(s)
                        progressed = True
                        if reason is not None:
                            running[threads.submit(self._run_one, s, reason, head, runner)] = s
                if not running:
                    if pending and error is None:
                        raise ValueError(f"stages {[s.name for s in pending]} wait on each other")
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    s = running.pop(fut)
                    try:
                        finished(s, fut.result(), pending + list(running.values()))
                    except BaseException as e:  # noqa: BLE001 - raised once the running stages are done
                        error = error or e
        if error is not None:
            raise error

    def _eta_line(self, remaining: list[Stage]) -> str:
        elapsed = time.perf_counter() - self._t0
        # predicted CPU seconds -> this machine's wall seconds now (its speed and load), from the finished stages
        scale = self._done_wall / self._done_cost if self._done_cost > 0 and self._done_wall > 0 else 1.0
        left = sum(s.predicted_cost() for s in remaining) * scale / self.jobs
        return f"      elapsed {_hms(elapsed)}, {len(remaining)} stages left, ETA ~{_hms(left)}"

    def _run_one(self, stage: Stage, reason: str, head: str, runner: CommandRunner) -> dict:
        resume = stage.resumable and reason == NOT_RUN and any(
            (self.workdir / rel).exists() for rel in stage.outputs)
        if stage.name not in self.manifest["stages"]:   # first run (or interrupted before it finished)
            self.echo(f"{head} running{', resuming its partial output' if resume else ''} ...")
        else:
            self.echo(f"{head} running again: {reason} ...")
        for rel in stage.outputs if not resume else []:  # never mix a stale partial output with a new one
            p = self.workdir / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        with self._lock:
            self.manifest["stages"].pop(stage.name, None)
            self._save()
        log = self.log_path(stage)
        log.unlink(missing_ok=True)
        ctx = StageContext(self.workdir, stage, log, runner)
        t0, c0 = time.perf_counter(), time.thread_time()
        self._running[stage.name] = (t0, log)
        try:
            info = stage.fn(ctx) or {}
        finally:
            self._running.pop(stage.name, None)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0 + ctx.command_cpu_s
        outputs = hash_outputs(self.workdir, stage.outputs)
        if not outputs:
            raise UserError(f"stage {stage.name} produced none of its outputs {stage.outputs} (log: {log})")
        # the commands' own peak (each measured from its start); a stage without commands: this process's
        peak = ctx.peak_rss_kb or _peak_rss_kb()
        with self._lock:
            entry = {"fingerprint": self.fingerprint(stage), "outputs": outputs, "volatile": list(stage.volatile),
                     "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                     "peak_rss_mb": round(peak / 1024, 1), "info": info,
                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.manifest["stages"][stage.name] = entry
            self._save()
        self.echo(f"{head} done in {wall:.1f}s, CPU {cpu:.1f}s (peak RSS {entry['peak_rss_mb']:.0f} MB)")
        return {**entry, "name": stage.name, "skipped": False}

    def _save(self) -> None:
        write_json_atomic(self.manifest_path, self.manifest)
