"""A small learnable token corpus (arithmetic progressions mod vocab, EOD-terminated) as indexed datasets."""
import numpy as np
import pytest

from megacpt.data.indexed import IndexedDatasetWriter, write_sidecar

VOCAB = 1000  # the `tiny` preset's vocab


def make_dataset(prefix, n_docs=80, seed=0, vocab=VOCAB, sha="test-tokenizer"):
    rng = np.random.RandomState(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            n, a, step = rng.randint(20, 120), rng.randint(0, vocab), rng.randint(1, 5)
            w.add_document([((a + step * np.arange(n)) % (vocab - 1)).tolist() + [vocab - 1]])
    write_sidecar(prefix, {"tokenizer": {"type": "test", "path": "none", "sha256": sha, "vocab_size": vocab,
                                         "eod": vocab - 1}, "dtype": "uint16", "num_documents": n_docs})
    return str(prefix)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_data")
    return {"train": make_dataset(d / "train"), "valid": make_dataset(d / "valid", n_docs=20, seed=1)}


def job_overrides(data, *extra):
    """The tiny CPU config of the tests: 2-layer/64-hidden model, 32-token samples, 2 micro-batches."""
    return ["model_preset=tiny", f"data.blend=[{data['train']}]", "data.seq_length=32", "data.split=100,0,0",
            f"data.eval_prefixes={{valid: {data['valid']}}}", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.train_iters=6", "optimizer.lr=3e-3",
            "scheduler.warmup_iters=2", "logging.log_interval=1", "logging.eval_iters=2",
            "train.fused_loss=false", *extra]
