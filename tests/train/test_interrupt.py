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
