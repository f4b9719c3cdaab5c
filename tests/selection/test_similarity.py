import hashlib
import re

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.errors import InputError, UserError
from megacpt.score.files import read_scores
from megacpt.selection.similarity import (SimilarityConfig, chunk_texts, embed_texts, read_task_texts,
                                          score_dataset, similarity)


class WordEmbedder:
    """Test double for the pipeline mechanics: hashed bag of lower-cased words, unit norm."""

    name, max_tokens, dim = "words", 4, 64

    def offsets(self, texts):
        return [[m.span() for m in re.finditer(r"\S+", t)] for t in texts]

    def encode(self, texts, batch_size):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def test_chunks_cover_document_and_are_capped():
    text = " ".join(f"w{i}" for i in range(10))
    chunks, owner = chunk_texts([text, "", "a b"], WordEmbedder(), SimilarityConfig(max_chunks=32))
    assert chunks == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9", "a b"] and owner.tolist() == [0, 0, 0, 2]
    chunks, owner = chunk_texts([text], WordEmbedder(), SimilarityConfig(max_chunks=2))
    assert chunks == ["w0 w1 w2 w3", "w8 w9"]  # first and last, spread evenly


def test_document_embedding_is_mean_of_chunks():
    e = WordEmbedder()
    emb, n = embed_texts(["a b c d e f g h", ""], e, SimilarityConfig())
    parts = e.encode(["a b c d", "e f g h"], 8)
    want = parts.mean(0) / np.linalg.norm(parts.mean(0))
    np.testing.assert_allclose(emb[0], want, atol=1e-6)
    assert n.tolist() == [2, 0] and not emb[1].any()


def test_reduce_centroid_and_max():
    tasks = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    docs = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    n = np.array([1, 1, 1, 0])
    cen = similarity(docs, n, tasks, "mean-centroid")
    np.testing.assert_allclose(cen, [1 / np.sqrt(2), 1.4 / np.sqrt(2), 0, -1.0], atol=1e-6)
    np.testing.assert_allclose(similarity(docs, n, tasks, "max"), [1, 0.8, 0, -1.0], atol=1e-6)


def test_task_data_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(InputError, match=r"t.jsonl:2: key 'text' must be a string"):
        read_task_texts(str(p), ["text"])
    p.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(InputError, match=r"t.jsonl:2: not valid JSON"):
        read_task_texts(str(p), ["text"])
    p.write_text('{"q": "a", "a": "b"}\n')
    assert read_task_texts(str(p), ["q", "a"]) == ["a\nb"]
    with pytest.raises(InputError, match="missing key 'text'"):
        read_task_texts(str(p), ["text"])
    p.write_text("")
    with pytest.raises(UserError, match="no task examples"):
        read_task_texts(str(p), ["text"])


def test_double_ranks_in_domain_first(tmp_path, mixed_corpus, task_jsonl):
    prefix, texts, labels = mixed_corpus
    out = tmp_path / "sim.parquet"
    score_dataset(prefix, task_jsonl, str(out), SimilarityConfig(shard_docs=7), embedder=WordEmbedder())
    s = read_scores(out)
    assert s.meta["scorer"] == "similarity" and s.meta["config"]["model"] == "words"
    assert s.columns["similarity"][labels].mean() > s.columns["similarity"][~labels].mean()


class Memo:
    """The real embedder, each chunk embedded once across the two reduce modes (keeps the test short)."""

    def __init__(self, inner):
        self.inner, self.cache = inner, {}
        self.name, self.max_tokens = inner.name, inner.max_tokens

    def offsets(self, texts):
        return self.inner.offsets(texts)

    def encode(self, texts, batch_size):
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        self.cache.update(zip(new, self.inner.encode(new, batch_size)))
        return np.stack([self.cache[t] for t in texts]) if texts else self.inner.encode([], 1)


def test_real_model_precision_top10(tmp_path, mixed_corpus, task_jsonl, minilm):
    prefix, texts, labels = mixed_corpus
    memo = Memo(minilm)
    for reduce in ("mean-centroid", "max"):
        out = tmp_path / f"sim_{reduce}.parquet"
        score_dataset(prefix, task_jsonl, str(out), SimilarityConfig(reduce=reduce, chunk_tokens=16),
                      embedder=memo)
        sim = read_scores(out).columns["similarity"]
        top = np.argsort(-sim)[: max(1, len(sim) // 10)]
        assert labels[top].mean() >= 0.9, (reduce, top)
        assert (read_scores(out).columns["n_chunks"] > 1).any()  # chunking exercised


def test_cli_missing_model_is_clear(tmp_path, mixed_corpus, task_jsonl, capsys):
    prefix, _, _ = mixed_corpus
    rc = main(["score", "similarity", "--data", prefix, "--task-data", task_jsonl, "--out",
               str(tmp_path / "s.parquet"), "--embedding-model", str(tmp_path / "nope")])
    assert rc == 2 and "not a sentence-transformers model directory" in capsys.readouterr().err
    assert not (tmp_path / "s.parquet").exists()


def test_bf16_embeddings_match_fp32(minilm):
    import copy

    import torch

    bf16 = copy.copy(minilm)
    bf16.model = copy.deepcopy(minilm.model).to(torch.bfloat16)
    texts = ["Net income rose 5 percent in the third quarter.", "The chef baked fresh bread with rosemary."]
    a, b = minilm.encode(texts, 2), bf16.encode(texts, 2)
    assert b.dtype == np.float32 and ((a * b).sum(1) > 0.99).all()
