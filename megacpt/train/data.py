"""Training samples for the trainer: ``build_datasets(job) -> (train, {name: eval})``.

Each dataset maps a sample index k to ``{"tokens": int64[seq_length + 1]}`` (plus ``"doc_ids"`` of the
same length when ``data.reset_attention_mask``), deterministically from the seed, so that "sample k of the
run" is a fixed thing and resume only needs the number of consumed samples.

Megatron GPTDataset semantics (Shoeybi et al.; megatron/core/datasets/gpt_dataset.py): the documents of
a split are shuffled per epoch, concatenated, and cut into samples of seq_length + 1 tokens that overlap
by one token (the last input token of sample k is the first of k + 1); the sample order is shuffled.
A blend assigns global sample i to the dataset whose realised share lags its weight the most (Megatron's
``build_blending_indices``), so any prefix of the run has the blend's proportions.
"""
from __future__ import annotations

import numpy as np

from megacpt.data.indexed import IndexedDataset
from megacpt.errors import UserError


def split_ranges(split: str, n_docs: int) -> list[tuple[int, int]]:
    """Megatron's ``--split 969,30,1``: contiguous document ranges for train/valid/test."""
    w = [float(x) for x in split.replace("/", ",").split(",")]
    w = (w + [0.0, 0.0])[:3]
    total = sum(w)
    bounds = [0]
    for x in w:
        bounds.append(bounds[-1] + int(round(x / total * n_docs)))
    bounds[-1] = n_docs
    return [(bounds[i], min(bounds[i + 1], n_docs)) for i in range(3)]


class PackedDataset:
    """One indexed dataset's document range, packed into ``num_samples`` samples (epochs as needed)."""

    def __init__(self, prefix: str, seq_length: int, num_samples: int | None, seed: int,
                 doc_range: tuple[int, int] | None = None, shuffle: bool = True, with_doc_ids: bool = False):
        self.ds = IndexedDataset(prefix)
        self.seq_length, self.with_doc_ids = seq_length, with_doc_ids
        a, b = doc_range or (0, self.ds.num_documents)
        docs = np.arange(a, b, dtype=np.int64)
        lengths = self.ds.document_lengths()[a:b]
        docs, lengths = docs[lengths > 0], lengths[lengths > 0]
        tokens_per_epoch = int(lengths.sum())
        per_epoch = (tokens_per_epoch - 1) // seq_length
        if per_epoch < 1:
            raise UserError(f"{prefix}: documents {a}..{b} hold {tokens_per_epoch} tokens, fewer than one "
                            f"sample of data.seq_length+1 = {seq_length + 1}")
        if num_samples is None:  # held-out sets: one pass, in order
            num_samples, shuffle = per_epoch, False
        n_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
        rng = np.random.RandomState(seed % 2**32)
        order = np.concatenate([rng.permutation(docs.size) if shuffle else np.arange(docs.size)
                                for _ in range(n_epochs)])
        self.doc_order = docs[order]                                   # documents of the token stream
        self.doc_start = np.concatenate([[0], np.cumsum(lengths[order])])  # stream offset of each
        n_total = (int(self.doc_start[-1]) - 1) // seq_length
        self.sample_order = rng.permutation(n_total)[:num_samples] if shuffle else np.arange(num_samples)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample {k} out of range for {self.num_samples} samples")
        start = int(self.sample_order[k]) * self.seq_length
        end = start + self.seq_length + 1
        i = int(np.searchsorted(self.doc_start, start, side="right")) - 1
        parts, ids = [], []
        pos = start
        while pos < end:
            d0 = int(self.doc_start[i])
            doc = self.ds.document(int(self.doc_order[i]))
            take = doc[pos - d0: min(end, int(self.doc_start[i + 1])) - d0]
            parts.append(take)
            ids.append(np.full(take.size, i, dtype=np.int64))
            pos += take.size
            i += 1
        out = {"tokens": np.concatenate(parts).astype(np.int64)}
        if self.with_doc_ids:
            out["doc_ids"] = np.concatenate(ids)
        return out


class BlendedDataset:
    """Global sample i -> (dataset, its next sample): Megatron's greedy blending (least lagging share)."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.datasets = datasets
        self.which = np.empty(num_samples, dtype=np.int64)
        self.index = np.empty(num_samples, dtype=np.int64)
        counts = np.zeros(len(datasets), dtype=np.int64)
        for i in range(num_samples):
            d = int(np.argmax(w * (i + 1) - counts))
            self.which[i], self.index[i] = d, counts[d]
            counts[d] += 1
        self.counts = counts

    def __len__(self) -> int:
        return self.which.size

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.which[i])][int(self.index[i])]


def build_datasets(job) -> tuple:
    """(train dataset with train_iters * global_batch samples, {name: held-out dataset})."""
    d, t = job.data, job.train
    weights, prefixes = d.weights_and_prefixes()
    n = t.train_iters * t.global_batch_size
    ranges = [split_ranges(d.split, IndexedDataset(p).num_documents)[0] for p in prefixes]
    if weights is None:  # proportional to each prefix's train-split size (Megatron's default)
        weights = [float(r[1] - r[0]) or 1.0 for r in ranges]
    wsum = sum(weights)
    # each component gets its share of the run plus slack for the greedy assignment's rounding
    parts = [PackedDataset(p, d.seq_length, int(np.ceil(n * w / wsum)) + 1, t.seed + 7919 * j, r,
                           with_doc_ids=d.reset_attention_mask)
             for j, (p, w, r) in enumerate(zip(prefixes, weights, ranges))]
    train = parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, n)
    evals = {name: PackedDataset(p, d.seq_length, None, t.seed, with_doc_ids=d.reset_attention_mask)
             for name, p in d.eval_prefixes.items()}
    return train, evals
