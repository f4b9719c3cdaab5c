"""train under signals (issue 20, item 2). SIGTERM -> checkpoint and stop is train's own (test_trainer.py); here:
a second SIGTERM chains to the entry point's handler (stop now, remove temporaries, one line)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from megacpt.io import Interrupted, handle_signals
from megacpt.train import trainer


def _signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the Python-level handler runs at the next bytecode boundary; give it some
        time.sleep(0.01)


@pytest.mark.fault(fault="SIGTERM twice during training", stage="train",
                   sees="first: 'will save a checkpoint after this step and exit'; second: one line, interrupted by "
                        "SIGTERM at iteration N; re-run the same command: it resumes from the last checkpoint; "
                        "exit 143",
                   left="the checkpoints saved so far (a partial iter_*.tmp is removed by the next save)")
def test_second_sigterm_chains_to_the_entry_point_handler():
    with handle_signals():
        stop = trainer._StopFlag(True)
        try:
            _signal_self(signal.SIGTERM)
            assert stop.set  # the first one: checkpoint after this step and exit
            with pytest.raises(Interrupted) as e:
                _signal_self(signal.SIGTERM)
            assert e.value.signum == signal.SIGTERM
        finally:
            stop.restore()


# `megacpt train` that sleeps after step 2 (before that step's checkpoint): the test signals it there
_PAUSING_TRAIN = """
import os, sys, time
from pathlib import Path
from megacpt.cli import main
from megacpt.train import cli, trainer

def _train(job, on_step=None):
    def step(iteration, loss):
        on_step(iteration, loss)
        if iteration == 2:
            Path(os.environ["PAUSED"]).touch()
            time.sleep(120)
    return trainer.train(job, on_step=step)

cli.train = _train
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("exit_signal_save", [False, True], ids=["sigterm-no-exit-save", "sigterm-twice"])
@pytest.mark.fault(fault="SIGTERM without train.exit_signal_save / SIGTERM twice", stage="train",
                   sees="one line: interrupted by SIGTERM at iteration N; re-run the same command: it resumes from "
                        "the last checkpoint in SAVE; exit 143",
                   left="the complete checkpoints saved before the signal, nothing else")
def test_train_interrupted_says_where_to_resume(tiny_data, tmp_path, exit_signal_save):
    import subprocess
    import sys

    from tests.faults import REPO, leftovers, wait_for
    from tests.train.conftest import job_overrides

    ck, flag = tmp_path / "ck", tmp_path / "paused"
    overrides = job_overrides(tiny_data, f"checkpoint.save={ck}", "checkpoint.save_interval=1",
                              f"train.exit_signal_save={str(exit_signal_save).lower()}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAUSED": str(flag)}
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-c", _PAUSING_TRAIN, "train", *overrides], env=env, stderr=err,
                             stdout=subprocess.DEVNULL)
    try:
        wait_for(flag.exists, "step 2")
        p.send_signal(signal.SIGTERM)
        if exit_signal_save:  # the first asks for a checkpoint after this step; the second: stop now
            time.sleep(0.5)
            p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        p.kill()
        p.wait()
    stderr = (tmp_path / "err").read_text()
    assert rc == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("megacpt train: interrupted by SIGTERM at iteration 2; re-run the same "
                                               f"command: it resumes from the last checkpoint in {ck}")
    assert sorted(os.listdir(ck)) == ["iter_0000001", "latest", "metrics.jsonl"] and leftovers(ck) == []
