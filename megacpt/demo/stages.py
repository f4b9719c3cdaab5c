"""Resumable stages with a manifest: a re-run skips what is done, redoes what is stale or corrupted.

A stage declares its outputs (files or directories under the work dir), the parameters that
determine them, and the stages it reads from. After it succeeds the runner records, in
``WORKDIR/manifest.json``, the size and SHA-256 of every output file plus a fingerprint of
(params, upstream outputs). On the next run a stage is skipped only if its fingerprint matches
and every recorded file is still there with the same size and hash; otherwise its old outputs
are removed and it runs again (so are the stages downstream, whose fingerprints change).

A stage's commands run either in this process (``megacpt.cli.main``, output redirected to the log) or
as ``python -m megacpt ...`` child processes (memory isolated per command, ``os.wait4`` gives each
child's peak RSS); either way the log goes to ``WORKDIR/logs/STAGE.log``.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megacpt.errors import UserError
from megacpt.io import sha256_file, write_json_atomic

MANIFEST = "manifest.json"


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


@dataclass
class StageContext:
    workdir: Path
    stage: Stage
    log: Path
    peak_rss_kb: int = 0
    env: dict = field(default_factory=dict)
    in_process: bool = False     # call megacpt.cli.main here: no interpreter/torch start-up per command

    def path(self, rel: str) -> Path:
        return self.workdir / rel

    def megacpt(self, *args: str) -> None:
        """Run one `megacpt` command (child process, or in-process), appending to this stage's log."""
        if self.in_process:
            return self._megacpt_here([str(a) for a in args])
        cmd = [sys.executable, "-m", "megacpt", *map(str, args)]
        env = {**os.environ, **self.env}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd[1:])}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_kb = max(self.peak_rss_kb, usage.ru_maxrss)
        self._check(proc.returncode, args)

    def _check(self, rc: int, args) -> None:
        if rc != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-6:]
            raise UserError(f"stage {self.stage.name}: `megacpt {' '.join(map(str, args[:2]))} ...` exited "
                            f"{rc}; log {self.log}:\n    " + "\n    ".join(tail))

    def _megacpt_here(self, args: list[str]) -> None:
        import contextlib
        import logging
        import traceback

        from megacpt.cli import main

        self.log.parent.mkdir(parents=True, exist_ok=True)
        root, cwd = logging.getLogger(), os.getcwd()
        saved = root.handlers[:]
        with open(self.log, "a", encoding="utf-8") as log, _STREAM.to(log), \
                contextlib.redirect_stdout(_STREAM), contextlib.redirect_stderr(_STREAM):
            print(f"$ megacpt {' '.join(args)}  (in-process)", flush=True)
            root.handlers.clear()  # let the command's logging.basicConfig bind to this log
            os.chdir(self.workdir)
            try:
                rc = main(args)
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 - a command's crash becomes this stage's error, with the traceback logged
                traceback.print_exc()
                rc = 1
            finally:
                os.chdir(cwd)
                for h in root.handlers[:]:
                    root.removeHandler(h)
                root.handlers[:] = saved
        self._check(rc, args)


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
        import contextlib

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


def _files(workdir: Path, rel: str) -> list[Path]:
    p = workdir / rel
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return [p] if p.exists() else []


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its waited-for children: load-independent cost."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def hash_outputs(workdir: Path, outputs: list[str]) -> dict[str, dict]:
    return {str(f.relative_to(workdir)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for rel in outputs for f in _files(workdir, rel)}


class StageRunner:
    def __init__(self, workdir: Path, force: bool = False, env: dict | None = None,
                 echo: Callable[[str], None] = print, in_process: bool = False):
        self.workdir, self.force, self.env, self.echo = workdir, force, env or {}, echo
        self.in_process = in_process
        self.manifest_path = workdir / MANIFEST
        self.manifest = self._load()
        self.summary: list[dict] = []

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
            return "not run yet"
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
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        for i, stage in enumerate(stages, 1):
            head = f"[{i:>2}/{len(stages)}] {stage.name:<24}"
            reason = "--force" if self.force else self.why_stale(stage)
            if reason is None:
                entry = self.manifest["stages"][stage.name]
                self.echo(f"{head} skipped (up to date, {entry['wall_s']:.1f}s when run)")
                self.summary.append({**entry, "name": stage.name, "skipped": True})
                continue
            resume = stage.resumable and reason == "not run yet" and any(
                (self.workdir / rel).exists() for rel in stage.outputs)
            self.echo(f"{head} running ({reason}{'; resuming its partial output' if resume else ''}) ...")
            for rel in stage.outputs if not resume else []:  # never mix a stale partial output with a new one
                p = self.workdir / rel
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            self.manifest["stages"].pop(stage.name, None)
            self._save()
            log = self.workdir / "logs" / f"{stage.name}.log"
            log.unlink(missing_ok=True)
            ctx = StageContext(self.workdir, stage, log, env=self.env, in_process=self.in_process)
            t0, c0 = time.perf_counter(), _cpu_s()
            info = stage.fn(ctx) or {}
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            outputs = hash_outputs(self.workdir, stage.outputs)
            if not outputs:
                raise UserError(f"stage {stage.name} produced none of its outputs {stage.outputs} (log: {log})")
            peak = max(ctx.peak_rss_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            entry = {"fingerprint": self.fingerprint(stage), "outputs": outputs, "volatile": list(stage.volatile),
                     "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                     "peak_rss_mb": round(peak / 1024, 1), "info": info,
                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.manifest["stages"][stage.name] = entry
            self._save()
            self.echo(f"{head} done in {wall:.1f}s, CPU {cpu:.1f}s (peak RSS {entry['peak_rss_mb']:.0f} MB)")
            self.summary.append({**entry, "name": stage.name, "skipped": False})
        return self.summary

    def _save(self) -> None:
        write_json_atomic(self.manifest_path, self.manifest)
