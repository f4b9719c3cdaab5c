"""The Slurm script's requeue logic: examples/slurm/*.sbatch run with bash, stub `srun`/`scontrol` on PATH.

The stub `srun` records its command line and plays one attempt of the job: it leaves `CKPT/latest` at
some iteration and exits with some status (torchrun exits non-zero after a pre-emption signal even when the
workers saved cleanly; a lost node fails the step). The script reads the run's length from
`python -m megacpt train --print-config` (the recipe's train_iters, 11,444, or TRAIN_ITERS): the real one in
the first case, a stub that answers the same instantly in the others (starting megacpt costs ~5 s here).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))

SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
if [ -n "${STUB_LATEST:-}" ]; then echo "$STUB_LATEST" > "$CKPT/latest"; fi
exit "${STUB_STATUS:-0}"
"""
SCONTROL = """#!/bin/bash
case "$1" in
    show) [ "$2" = hostnames ] && printf 'node-a\\nnode-b\\n' ;;
    requeue) echo "requeue $2" >> "$STUB_DIR/requeued" ;;
    *) echo "stub scontrol: unexpected arguments: $*" >&2; exit 64 ;;
esac
"""


PYTHON = """#!/bin/bash
if [ "$1 $2 $3" = "-m megacpt train" ]; then  # --print-config: the recipe's train_iters unless overridden
    n=11444
    for a in "$@"; do case "$a" in train.train_iters=*) n=${a#*=} ;; esac; done
    echo "{\\"train\\": {\\"train_iters\\": $n}}"
    exit 0
fi
exec "%s" "$@"
"""


def _stubs(d: Path, real_python: bool) -> Path:
    d.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", None if real_python else PYTHON)):
        if text is None:  # the interpreter that runs the tests (megacpt importable)
            (d / name).symlink_to(sys.executable)
            continue
        (d / name).write_text(text % sys.executable if name == "python" else text)
        (d / name).chmod(0o755)
    return d


# TRAIN_ITERS, `latest` before the attempt, `latest` after it, torchrun's exit status -> requeued?, script's status
CASES = {
    "finished": ("", "", "iter_0011444", 0, False, 0),
    "finished (TRAIN_ITERS)": ("1000", "iter_0000500", "iter_0001000", 1, False, 1),
    "preempted (torchrun exits 1 after SIGUSR1)": ("", "", "iter_0000500", 1, True, 0),
    "stopped cleanly mid-run": ("", "iter_0000500", "iter_0001000", 0, True, 0),
    "node lost after a new checkpoint": ("1000", "iter_0000500", "iter_0000600", 1, True, 0),
    "failed without a new checkpoint": ("", "iter_0000500", "iter_0000500", 1, False, 1),
    "failed before the first checkpoint": ("", "", "", 3, False, 3),
}


@pytest.mark.fault(fault="Slurm pre-emption (SIGUSR1 before the time limit) or a lost node",
                   stage="train under sbatch (examples/slurm)",
                   sees="`stopped at iteration N of M (torchrun exit status S): requeueing job J`; or, when the "
                        "attempt wrote no new checkpoint, `no new checkpoint in this attempt ...: not requeueing` "
                        "and the step's exit status",
                   left="the checkpoints; the requeued job resumes from `latest`")
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
@pytest.mark.parametrize("case", list(CASES))
def test_sbatch_requeues_only_an_unfinished_run_that_progressed(script, case, tmp_path):
    train_iters, before, after, status, requeue, script_status = CASES[case]
    stubs, ckpt = _stubs(tmp_path / "bin", real_python=case == "finished"), tmp_path / "ckpt"
    ckpt.mkdir()
    if before:
        (ckpt / "latest").write_text(before + "\n")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(stubs),
           "STUB_LATEST": after, "STUB_STATUS": str(status), "CKPT": str(ckpt), "TRAIN_ITERS": train_iters,
           "CONFIG": str(ROOT / "examples" / "configs" / "finpythia-6.9b-dacp.yaml"),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "node-[a-b]",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run(["bash", str(script), "logging.log_interval=5"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == script_status, r.stdout + r.stderr
    requeued = (stubs / "requeued").read_text() if (stubs / "requeued").exists() else ""
    assert requeued == ("requeue 4242\n" if requeue else ""), r.stdout + r.stderr
    args = (stubs / "srun.args").read_text().splitlines()
    assert args[args.index("--rdzv-endpoint") + 1] == "node-a:29500" and args[args.index("--rdzv-id") + 1] == "4242"
    assert f"checkpoint.save={ckpt}" in args and args[-1] == "logging.log_interval=5"
    assert ("train.train_iters=1000" in args) == bool(train_iters)
