"""An interrupted `convert megacpt-to-hf` leaves nothing behind (issue 20, item 2): the HF dir is written in a
locked temp dir beside OUT; SIGTERM removes it, a kill -9 leaves it to the next run, which removes it."""
from __future__ import annotations

import signal

import pytest

from megacpt.convert.hf_gpt_neox import hf_to_megacpt
from tests.convert.helpers import assert_bit_exact, make_hf_dir, read_safetensors_dir
from tests.faults import Job, leftovers, run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    hf = make_hf_dir(d / "hf", **{"num_hidden_layers": 2})
    return hf, hf_to_megacpt(hf, d / "ck")


def to_hf(ck, out):
    # small shards: the pause after the first one is mid-write
    return ["convert", "megacpt-to-hf", "--ckpt", str(ck), "--out", str(out), "--max-shard-size", "0.0002"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
@pytest.mark.fault(fault="kill -9 / SIGTERM mid-write", stage="convert",
                   sees="SIGTERM: one line, interrupted by SIGTERM; nothing was written to OUT: re-run the same "
                        "command (exit 143); kill -9: nothing; the re-run writes the same files",
                   left="SIGTERM: nothing; kill -9: the hidden temp dir .OUT.HOST-PID-RAND.tmp until the next run")
def test_megacpt_to_hf_interrupted_mid_write(tmp_path, checkpoint, sig):
    hf, ck = checkpoint
    out = tmp_path / "out" / "hf"
    job = Job(to_hf(ck, out), tmp_path, pause="convert-write")
    job.wait_paused()
    rc = job.signal(sig)
    left = leftovers(out.parent)
    if sig == signal.SIGKILL:
        assert rc == -sig and any(n.startswith(".hf.") and n.endswith(".tmp") for n in left), left
    else:
        assert rc == 128 + sig and left == [], left
        lines = [ln for ln in job.stderr.splitlines() if ln.strip()]
        assert lines[-1] == f"megacpt convert: interrupted by SIGTERM; nothing was written to {out}: re-run the " \
                            "same command", job.stderr
        assert "Traceback" not in job.stderr
    assert not out.exists()
    rc, err = run(to_hf(ck, out), tmp_path, name="rerun")
    assert rc == 0, err
    assert leftovers(out.parent) == []
    assert_bit_exact(read_safetensors_dir(out), read_safetensors_dir(hf))
