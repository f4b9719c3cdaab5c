"""DSIR importance weights (Xie et al. 2023, "Data Selection for LMs via Importance Resampling").

An optional baseline beyond the FinPythia paper. Features are hashed word unigrams and bigrams
(lower-cased ``\\w+`` words, ``num_buckets`` buckets, MurmurHash3 via scikit-learn's
HashingVectorizer, so buckets are stable across runs and machines). Two bag-of-n-gram distributions
with add-``smoothing`` counts are fitted: target ``p_T`` on the task examples and raw ``p_R`` on the
corpus (all documents, or a seeded sample of ``raw_sample_docs``). A document's log importance
weight is ``sum_f c_f(d) (ln p_T(f) - ln p_R(f))``. DSIR resamples fixed-length chunks, where that sum
is comparable across examples; whole documents vary in length by orders of magnitude and the sum
then mostly measures length, so by default (``normalize="mean"``, ours) the score is the weight per
n-gram (the sum divided by the document's n-gram count); ``normalize="sum"`` keeps DSIR's raw sum.
A document with no n-gram scores 0 (weight 1: no evidence either way). Higher = more target-like.
The raw counts of pass 1 are kept beside the shards, so a resumed run goes straight to pass 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megacpt.data.identity import dataset_identity
from megacpt.errors import UserError
from megacpt.io import atomic_path, sha256_file
from megacpt.progress import Progress
from megacpt.score.files import ShardedScoreWriter, run_sharded, score_metadata
from megacpt.selection.documents import DocumentTexts
from megacpt.selection.similarity import read_task_texts


@dataclass
class DsirConfig:
    num_buckets: int = 10_000
    ngram: int = 2                # unigrams .. n-grams
    smoothing: float = 1.0        # add-k pseudo-count per bucket
    normalize: str = "mean"       # mean: log weight per n-gram; sum: DSIR's sum over the document
    raw_sample_docs: int = 0      # documents used to fit p_R (0: all)
    seed: int = 0                 # of the raw sample
    shard_docs: int = 5_000

    def validate(self) -> "DsirConfig":
        for name in ("num_buckets", "ngram", "shard_docs"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.smoothing > 0:
            raise UserError(f"--smoothing must be > 0, got {self.smoothing}")
        if self.normalize not in ("mean", "sum"):
            raise UserError(f"--normalize must be mean or sum, got {self.normalize!r}")
        if self.raw_sample_docs < 0:
            raise UserError(f"--raw-sample-docs must be >= 0, got {self.raw_sample_docs}")
        return self


def vectorizer(cfg: DsirConfig):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=cfg.num_buckets, ngram_range=(1, cfg.ngram), alternate_sign=False,
                             norm=None, lowercase=True, token_pattern=r"(?u)\b\w+\b", dtype=np.float64)


def bucket_counts(texts: Sequence[str], vec) -> "scipy.sparse.csr_matrix":  # noqa: F821
    return vec.transform(list(texts))  # [n_texts, num_buckets]


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float) -> np.ndarray:
    pt = target_counts + smoothing
    pr = raw_counts + smoothing
    return np.log(pt / pt.sum()) - np.log(pr / pr.sum())


def score_counts(x, lr: np.ndarray, normalize: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """(log importance weight, n-gram count) per row of a bucket-count matrix."""
    w = np.asarray(x @ lr).ravel()
    n = np.asarray(x.sum(axis=1)).ravel().astype(np.int64)
    if normalize == "mean":
        w = np.divide(w, n, out=np.zeros_like(w), where=n > 0)
    return w, n


def score_dataset(prefix: str, task_data: str, out: str, cfg: DsirConfig, json_keys: Sequence[str] = ("text",),
                  tokenizer: str | None = None, overwrite: bool = False) -> str:

    cfg.validate()
    docs = DocumentTexts(prefix, tokenizer)
    tasks = read_task_texts(task_data, json_keys)
    vec = vectorizer(cfg)
    target = np.asarray(bucket_counts(tasks, vec).sum(axis=0)).ravel()
    config = {**asdict(cfg), "task_data": str(Path(task_data).resolve()), "task_sha256": sha256_file(task_data),
              "json_keys": list(json_keys), "num_task_examples": len(tasks), "features": "hashed word n-grams"}
    config.pop("shard_docs")
    meta = score_metadata("dsir", "dsir_log_weight", dataset_identity(prefix, docs.ds), config)
    n = docs.ds.num_documents
    with ShardedScoreWriter(out, meta, n, cfg.shard_docs, overwrite) as writer:
        raw_path = writer.dir / "raw_counts.npy"
        if raw_path.exists():
            raw = np.load(raw_path)
        else:  # pass 1: the raw n-gram distribution
            fit = np.arange(n)
            if cfg.raw_sample_docs and cfg.raw_sample_docs < n:
                fit = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.raw_sample_docs, replace=False))
            raw = np.zeros(cfg.num_buckets)
            prog = Progress("dsir fit", fit.size)
            for a in range(0, fit.size, cfg.shard_docs):
                ids = fit[a : a + cfg.shard_docs]
                raw += np.asarray(bucket_counts([docs[int(d)] for d in ids], vec).sum(axis=0)).ravel()
                prog.update(ids.size)
            prog.close()
            with atomic_path(raw_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, raw)
        lr = log_ratio(target, raw, cfg.smoothing)

        def compute(a: int, b: int) -> dict[str, np.ndarray]:
            w, n_ngrams = score_counts(bucket_counts(docs.range(a, b), vec), lr, cfg.normalize)
            return {"doc_id": np.arange(a, b, dtype=np.int64), "dsir_log_weight": w, "n_ngrams": n_ngrams}

        run_sharded(writer, "dsir", compute)
    return out
