"""GPT datasets (megatron-core's algorithms), blends and data-parallel samplers."""
from __future__ import annotations

import numpy as np
import pytest

from megacpt.data.blend import parse_blend
from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, write_sidecar
from megacpt.data.sampler import PretrainingSampler, RandomPretrainingSampler
from megacpt.errors import UserError
from tests.conftest import requires_megatron

EOD = 0


def make_dataset(prefix, n_docs, base, seed, tokenizer_sha="tok-a"):
    """Docs of tokens ``base + k`` (so a token tells which dataset it came from), EOD-terminated."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(n_docs):
            n = int(rng.integers(1, 40))
            w.add_document([np.append(base + rng.integers(1, 100, n), EOD)])
    write_sidecar(prefix, {"tokenizer": {"sha256": tokenizer_sha, "vocab_size": 1000, "eod": EOD}})
    return str(prefix)


@pytest.fixture
def two_datasets(tmp_path):
    return make_dataset(tmp_path / "a", 400, 0, 1), make_dataset(tmp_path / "b", 300, 500, 2)


@requires_megatron
def test_single_dataset_samples_cover_the_corpus(tmp_path, two_datasets):
    from megacpt.data.gpt_dataset import build_gpt_datasets

    a, _ = two_datasets
    seq = 16
    train, valid, test = build_gpt_datasets(a, "90,10,0", seq, (50, 10, None), seed=3, cache_dir=tmp_path / "c")
    assert test is None and len(train) >= 50 and len(valid) >= 10
    item = train[0]
    assert item["tokens"].shape == (seq + 1,) and item["tokens"].dtype.is_floating_point is False
    # one epoch: the samples are the train documents' tokens, each used once (only the tail is dropped)
    ds = IndexedDataset(a)
    n_train_docs = int(round(0.9 * ds.num_documents))  # Megatron splits by documents
    corpus = np.concatenate([ds.document(d) for d in range(n_train_docs)]).astype(np.int64)
    assert len(train) == (corpus.size - 1) // seq  # one epoch suffices for 50 samples
    seen = np.concatenate([train[i]["tokens"][:-1].numpy() for i in range(len(train))])
    have, used = np.bincount(corpus, minlength=1000), np.bincount(seen, minlength=1000)
    assert np.all(used <= have) and 0 < (have - used).sum() <= seq
    assert len({tuple(train[i]["tokens"].tolist()) for i in range(len(train))}) == len(train)
    # cached: a second build reads the same indices and gives the same samples
    again, _, _ = build_gpt_datasets(a, "90,10,0", seq, (50, 10, None), seed=3, cache_dir=tmp_path / "c")
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(len(train)))
    other, _, _ = build_gpt_datasets(a, "90,10,0", seq, (50, 10, None), seed=4, cache_dir=tmp_path / "c")
    assert not all(np.array_equal(train[i]["tokens"], other[i]["tokens"]) for i in range(len(train)))


@requires_megatron
def test_doc_ids_follow_document_boundaries(tmp_path, two_datasets):
    from megacpt.data.gpt_dataset import build_gpt_datasets

    a, _ = two_datasets
    train, _, _ = build_gpt_datasets(a, "1", 32, (40, None, None), seed=0, cache_dir=tmp_path / "c",
                                     return_doc_ids=True)
    for i in range(len(train)):
        t, d = train[i]["tokens"].numpy(), train[i]["doc_ids"].numpy()
        assert d.shape == t.shape and d[0] == 0 and np.all(np.diff(d) >= 0)
        # every document ends with EOD, so the segment changes right after each EOD
        changes = np.flatnonzero(np.diff(d)) 
        assert np.all(t[changes] == EOD)


@requires_megatron
def test_blend_proportions(tmp_path, two_datasets):
    from megacpt.data.gpt_dataset import build_gpt_datasets

    a, b = two_datasets
    n = 2000
    train, _, _ = build_gpt_datasets([(0.7, a), (0.3, b)], "1", 8, (n, None, None), seed=1, cache_dir=tmp_path / "c")
    ids = np.array([int(train[i]["dataset_id"]) for i in range(n)])
    assert abs((ids == 0).mean() - 0.7) < 0.02
    # the token values say where a sample came from: never mixed within a sample
    for i in range(0, n, 50):
        t = train[i]["tokens"].numpy()
        t = t[t != EOD]
        assert np.all(t < 500) if ids[i] == 0 else np.all(t > 500)
    flat, _, _ = build_gpt_datasets(["0.7", a, "0.3", b], "1", 8, (n, None, None), seed=1, cache_dir=tmp_path / "c")
    assert np.array_equal(flat[5]["tokens"], train[5]["tokens"])


def test_blend_validation(tmp_path, two_datasets):
    a, b = two_datasets
    assert parse_blend({a: 2, b: 1}).weights == (2.0, 1.0)
    assert parse_blend([a, b]).weights is None
    with pytest.raises(UserError, match="no .*\\.bin"):
        parse_blend([a, str(tmp_path / "missing")])
    with pytest.raises(UserError, match="> 0"):
        parse_blend([(0, a), (1, b)])
    c = make_dataset(tmp_path / "c", 10, 0, 3, tokenizer_sha="tok-b")
    with pytest.raises(UserError, match="different tokenizers"):
        parse_blend([a, c])


@requires_megatron
def test_split_leaving_a_weighted_part_empty_is_an_error_not_a_hang(tmp_path):
    from megacpt.data.gpt_dataset import build_gpt_datasets

    small = make_dataset(tmp_path / "small", 20, 0, 5)  # 969,30,1 rounds the test part of 20 docs to 0
    with pytest.raises(UserError, match="leaves the test split of .* empty"):
        build_gpt_datasets(small, "969,30,1", 8, (10, 2, 1), seed=1, cache_dir=tmp_path / "c")


def batches(sampler, n=None):
    import itertools

    return list(itertools.islice(iter(sampler), n))  # islice takes exactly n: no batch fetched ahead


@pytest.mark.parametrize("world", [1, 3])
def test_pretraining_sampler_resume_equals_uninterrupted(world):
    total, mbs = 101, 4
    full = [batches(PretrainingSampler(total, 0, mbs, r, world)) for r in range(world)]
    seen = sorted(i for rank in full for b in rank for i in b)
    assert seen == list(range(len(full[0]) * mbs * world))  # no sample twice, none skipped
    for stop in (1, 3):
        for r in range(world):
            s = PretrainingSampler(total, 0, mbs, r, world)
            first = batches(s, stop)
            resumed = PretrainingSampler(total, 0, mbs, r, world)
            resumed.load_state_dict(s.state_dict())
            assert first + batches(resumed) == full[r]


@pytest.mark.parametrize("world", [1, 2])
def test_random_sampler_resume_and_epochs(world):
    total, mbs, seed = 50, 3, 7
    steps_per_epoch = (total // (mbs * world))
    runs = [batches(RandomPretrainingSampler(total, 0, mbs, r, world, seed), 3 * steps_per_epoch) for r in range(world)]
    for e in range(3):
        epoch = [i for r in range(world) for b in runs[r][e * steps_per_epoch:(e + 1) * steps_per_epoch] for i in b]
        assert len(epoch) == len(set(epoch))  # no sample twice within an epoch
    assert runs[0][:steps_per_epoch] != runs[0][steps_per_epoch:2 * steps_per_epoch]
    for r in range(world):
        s = RandomPretrainingSampler(total, 0, mbs, r, world, seed)
        head = batches(s, steps_per_epoch + 2)
        resumed = RandomPretrainingSampler(total, s.consumed_samples, mbs, r, world, seed)
        assert head + batches(resumed, 2 * steps_per_epoch - 2) == runs[r]


def test_sampler_errors():
    with pytest.raises(UserError, match="rank"):
        PretrainingSampler(10, 0, 2, 2, 2)
    with pytest.raises(UserError, match="already saw"):
        PretrainingSampler(10, 10, 2, 0, 1)


def _dp_rank_job(rank, world, prefix, cache):
    """Every rank builds the datasets (rank 0 writes the cache, the others read it after a barrier)
    and reads its own micro-batches."""
    from megacpt.data.gpt_dataset import build_gpt_datasets

    train, _, _ = build_gpt_datasets(prefix, "1", 8, (24, None, None), seed=5, cache_dir=cache)
    sampler = PretrainingSampler(len(train), 0, 2, rank, world)
    return {i: train[i]["tokens"].tolist() for batch in sampler for i in batch}


@requires_megatron
@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks import torch + megatron-core; the sampler split and the cached
# indices are covered by the default tests above, this checks them together under a real process group
def test_data_parallel_ranks_share_cache_and_split_samples(tmp_path, two_datasets):
    from megacpt.data.gpt_dataset import build_gpt_datasets
    from megacpt.testing import run_distributed

    a, _ = two_datasets
    per_rank = run_distributed(_dp_rank_job, 2, a, str(tmp_path / "c"), timeout=240)
    assert not set(per_rank[0]) & set(per_rank[1])
    ref, _, _ = build_gpt_datasets(a, "1", 8, (24, None, None), seed=5, cache_dir=tmp_path / "c")
    for got in per_rank:
        assert all(ref[i]["tokens"].tolist() == t for i, t in got.items())
    assert len(per_rank[0]) + len(per_rank[1]) == (len(ref) // 4) * 4
