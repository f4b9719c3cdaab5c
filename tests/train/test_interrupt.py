"""train under signals and on empty data (issue 20, items 2 and 3).

SIGTERM -> checkpoint and stop is train's own (test_trainer.py); here: a second SIGTERM chains to the entry
point's handler (stop now), and a dataset with 0 documents is named as such, not as a split problem."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from megacpt.data.indexed import IndexedDatasetWriter, write_sidecar
from megacpt.errors import UserError
from megacpt.io import Interrupted, handle_signals
from megacpt.train import trainer
from megacpt.train.job import load_job_config
from tests.train.conftest import VOCAB, job_overrides, make_dataset


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


def test_train_names_a_dataset_with_zero_documents(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    with IndexedDatasetWriter(empty, np.uint16):
        pass
    write_sidecar(empty, {"tokenizer": {"type": "test", "path": "none", "sha256": "test-tokenizer",
                                        "vocab_size": VOCAB, "eod": VOCAB - 1}, "dtype": "uint16"})
    for override in (f"data.blend=[{empty}]", f"data.eval_prefixes={{valid: {empty}}}"):
        with pytest.raises(UserError, match=rf"the dataset {empty} has 0 documents") as e:
            trainer.train(load_job_config(None, job_overrides(tiny_data, "data.split=98,2,0", override)))
        assert "split" not in str(e.value)


@pytest.mark.parametrize("split,n,suggested", [("98,2,0", 5, "'98,0,0'"), ("1,1,0", 1, "'1,0,0'"),
                                               ("969,30,1", 20, "'969,30,0'")])
def test_split_message_never_suggests_the_split_given(tmp_path, split, n, suggested):
    from megacpt.data.gpt_dataset import check_split

    small = make_dataset(tmp_path / "small", n_docs=n)
    with pytest.raises(UserError, match="leaves the .* split of .* empty") as e:
        check_split(split, [small])
    assert suggested in str(e.value) and f"'{split}'" not in str(e.value).split("e.g.")[1]
