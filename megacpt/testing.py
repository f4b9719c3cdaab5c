"""Helpers for running real multi-process jobs (gloo on CPU) from tests and benchmarks.

- ``run_distributed``: a function in N spawned ranks with a process group, with a timeout;
- ``TorchrunNode``: one ``torchrun`` agent (a simulated node) and its workers as subprocesses, which a
  test can wait for with a timeout or kill like a lost node (``nodes`` ends every agent it started).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report the child's traceback to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                    backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with a process group.

    ``fn`` must be importable (module level). Returns the per-rank results (picklable) in rank order.
    A hang fails after ``timeout`` seconds: every child is killed and TimeoutError is raised.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as _q

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed run of {fn.__name__} (world_size={world_size}) "
                                   f"timed out after {timeout}s; finished ranks: {sorted(results)}")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except _q.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # a child died without reporting (segfault, os._exit): give stragglers a moment
                    try:
                        rank, status, payload = queue.get(timeout=2.0)
                    except _q.Empty:
                        raise RuntimeError(f"rank(s) {dead} died with exit codes "
                                           f"{[procs[i].exitcode for i in dead]}") from None
                else:
                    continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the others may now hang in a collective; stop them
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


# ------------------------------------------------------------------------------------- torchrun agents

def torchrun_args(nnodes: int, nproc_per_node: int, endpoint: str | None, run_id: str = "megacpt-test",
                  rdzv_conf: dict[str, Any] | None = None) -> list[str]:
    """``python -m torch.distributed.run`` with a c10d rendezvous at ``endpoint`` (host:port), or
    ``--standalone`` (one node, a free port) when it is None."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc_per_node), "--monitor-interval", "0.2"]
    if endpoint is None:
        return cmd + ["--standalone"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    if rdzv_conf:
        cmd += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in rdzv_conf.items())]
    return cmd


class TorchrunNode:
    """One ``torchrun`` agent, i.e. one simulated node: a subprocess in its own session, output in ``log``.

    torchrun starts each worker in a session of its own, so losing the node means killing the agent's
    process group *and* every worker under it: ``kill`` does that (SIGKILL, no chance to clean up).
    """

    def __init__(self, cmd: Sequence[str], log: str | os.PathLike, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None):
        self.cmd, self.log = list(cmd), Path(log)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The agent's exit code; after ``timeout`` s the node is killed and TimeoutError names its output."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{' '.join(self.cmd[:12])} ... did not exit within {timeout:g} s; its output "
                               f"ends with:\n{self.output()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the agent's process group and every descendant's (the workers); SIGKILL: a lost node."""
        import psutil  # a dependency of megacpt; imported here only when a node is killed

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)  # before the agent dies
        except psutil.NoSuchProcess:
            family = []
        groups = {self.proc.pid}
        for p in family:
            with contextlib.suppress(psutil.Error, OSError):
                groups.add(os.getpgid(p.pid))
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def nodes() -> Iterator[list[TorchrunNode]]:
    """A list to append started ``TorchrunNode``s to; on exit, whatever still runs is killed (no leftovers,
    whether the test passed, failed or timed out)."""
    started: list[TorchrunNode] = []
    try:
        yield started
    finally:
        for n in started:
            n.kill()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             alive: Sequence[TorchrunNode] = ()) -> float:
    """Poll ``predicate`` until true (returns the seconds waited); TimeoutError after ``timeout`` s, or
    RuntimeError as soon as one of ``alive`` exits first (with its output)."""
    t0 = time.monotonic()
    while not predicate():
        for n in alive:
            if n.poll() is not None:
                raise RuntimeError(f"waiting for {what}: a node exited with {n.poll()} first; its output ends "
                                   f"with:\n{n.output()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waiting for {what}: not within {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic() - t0
