"""An interrupted `score perplexity` keeps its committed shards and removes its temporaries (issue 20, item 2)."""
from __future__ import annotations

import signal

import pytest

from tests.faults import Job, leftovers
from tests.scoring.test_perplexity import L, _cli, setup  # noqa: F401 - setup is the module's fixture


def _args(d, prefix, out):
    return ["score", "perplexity", "--model", str(d / "hf"), "--data", prefix, "--seq-length", str(L),
            "--tokens-per-batch", "40", "--shard-docs", "3", "--device", "cpu", "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("point,sig", [("score-shard", signal.SIGTERM), ("atomic-write", signal.SIGKILL)],
                         ids=["sigterm-after-a-shard", "kill9-in-a-temporary"])
@pytest.mark.fault(fault="SIGTERM after a shard / kill -9 inside a temporary", stage="score perplexity",
                   sees="SIGTERM: one line, interrupted by SIGTERM; the committed shards are kept in OUT.shards: "
                        "re-run the same command with --resume (exit 143); kill -9: nothing",
                   left="OUT.shards/ (committed shards: progress); after kill -9 also a temporary in it, removed by "
                        "the --resume run")
def test_interrupted_perplexity_resumes_to_the_same_file(setup, tmp_path, point, sig):  # noqa: F811
    d, _, prefix = setup
    full, out = tmp_path / "full.parquet", tmp_path / "out" / "s.parquet"
    assert _cli(*_args(d, prefix, full)[2:]) == 0
    job = Job(_args(d, prefix, out), tmp_path, pause=point)
    job.wait_paused()
    rc = job.signal(sig)
    shards = out.parent / "s.parquet.shards"
    if sig == signal.SIGTERM:
        assert rc == 128 + sig and leftovers(out.parent) == []
        lines = [ln for ln in job.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in job.stderr and lines[-1] == (
            f"megacpt score: interrupted by SIGTERM; the committed shards are kept in {out}.shards: re-run the "
            "same command with --resume"), job.stderr
        assert (shards / "shard_000000.parquet").exists()
    else:
        assert rc == -sig and any(n.endswith(".tmp") for n in leftovers(out.parent))
    assert not out.exists()
    assert _cli(*_args(d, prefix, out)[2:], "--resume") == 0
    assert leftovers(out.parent) == [] and not shards.exists()
    assert out.read_bytes() == full.read_bytes()
