import numpy as np
import pytest

from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype, data_paths
from megacpt.errors import UserError
from tests.conftest import requires_megatron


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(doc)


DOCS = [[[1, 2, 3]], [], [[4], [5, 6]], [[7] * 1000], [[]]]


def test_round_trip(tmp_path):
    p = tmp_path / "ds"
    _write(p, DOCS)
    ds = IndexedDataset(p)
    assert ds.num_documents == 5 and len(ds) == 5
    assert ds.document(0).tolist() == [1, 2, 3]
    assert ds.document(1).tolist() == []
    assert ds.document(2).tolist() == [4, 5, 6]
    assert ds.document_lengths().tolist() == [3, 0, 3, 1000, 0]
    assert ds[2].tolist() == [5, 6] and ds.num_tokens == 1006


@pytest.mark.parametrize("vocab,dtype", [(50277, np.uint16), (65499, np.uint16), (65500, np.int32), (None, np.int32)])
def test_optimal_dtype(vocab, dtype):
    assert optimal_dtype(vocab) is dtype


@requires_megatron
def test_megatron_core_reads_our_files(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MDS

    for dtype in (np.uint16, np.int32):
        p = tmp_path / f"ds_{np.dtype(dtype).name}"
        _write(p, DOCS, dtype)
        m = MDS(str(p))
        assert m.document_indices.tolist() == [0, 1, 1, 3, 4, 5]
        assert [m[i].tolist() for i in range(len(m))] == [[1, 2, 3], [4], [5, 6], [7] * 1000, []]
        assert m.index.dtype == dtype


def test_failed_write_leaves_nothing(tmp_path):
    p = tmp_path / "ds"
    _write(p, DOCS)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(p, np.uint16) as w:
            w.add_document([[9, 9]])
            raise RuntimeError("boom")
    assert IndexedDataset(p).num_documents == 5  # old pair untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_token_out_of_dtype_range(tmp_path):
    with pytest.raises(UserError, match="does not fit"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([[70000]])


@pytest.mark.fault(fault="truncated .bin", stage="opening a dataset (train, score, select, inspect)",
                   sees="one line: PREFIX.bin: size N bytes does not match its index (M bytes)",
                   left="the dataset as it was (nothing is written)")
def test_truncated_bin_detected(tmp_path):
    p = tmp_path / "ds"
    _write(p, DOCS)
    b, _ = data_paths(p)
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(UserError, match="does not match"):
        IndexedDataset(p)
