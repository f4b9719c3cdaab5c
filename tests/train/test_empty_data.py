"""train on a dataset with 0 documents names the dataset, and the split message never suggests the split it
already has (issue 20, item 3)."""
from __future__ import annotations

import numpy as np
import pytest

from megacpt.data.indexed import IndexedDatasetWriter, write_sidecar
from megacpt.errors import UserError
from megacpt.train import trainer
from megacpt.train.job import load_job_config
from tests.train.conftest import VOCAB, job_overrides, make_dataset


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
