"""GPT training data: megatron-core's ``GPTDataset`` / ``BlendedDataset`` behind a small API.

Megatron's exact algorithms (document shuffle over ``num_epochs`` copies, sample index of
``seq_length + 1`` tokens over the concatenated documents, shuffle index; weighted blending; train/
valid/test split by documents; index files cached under ``cache_dir`` and built once on rank 0 when
torch.distributed is initialised) come from megatron-core, which runs on CPU. We only adapt:

    train, valid, test = build_gpt_datasets(blend, "969,30,1", seq_length, (n_train, n_valid, n_test),
                                            seed=1234, cache_dir="cache/")
    train[i] -> {"tokens": LongTensor[seq_length + 1]}    (+ "doc_ids" with return_doc_ids=True)

``doc_ids[j]`` numbers the stored sequences (= documents for Megatron-style preprocessing) inside the
sample 0, 1, 2, ... so a document-aware causal mask keeps attention within one document.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from megacpt.data.blend import Blend, blend_tokenizer_identity, parse_blend
from megacpt.data.indexed import IndexedDataset
from megacpt.errors import UserError
from megacpt.optional import import_quietly


@functools.lru_cache(maxsize=None)
def _megatron(name: str):
    """``megatron.core.datasets.NAME``, imported on first use (~4 s) and without megatron-core's import-time
    "Transformer Engine and Apex are not installed" notices (megacpt.optional.import_quietly)."""
    return import_quietly(f"megatron.core.datasets.{name}")


class _TokenizerInfo:
    """What megatron-core's dataset code reads from a tokenizer (eod, vocab size, a cache identity)."""

    def __init__(self, identity: dict[str, Any] | None, eod: int | None):
        self.eod = -1 if eod is None else int(eod)  # only used for masks we do not take from Megatron
        self.vocab_size = None if identity is None else identity.get("vocab_size")
        self.unique_identifiers = {"class": "megacpt", "sha256": (identity or {}).get("sha256")}

    @property
    def pad(self) -> int:  # megatron-core then uses its own pad id (-1); we never ask it to pad
        raise AttributeError("pad")


class GPTSamples(torch.utils.data.Dataset):
    """One split: ``len()`` samples, item ``{"tokens": LongTensor[seq_length+1]}`` (+ ``doc_ids``)."""

    def __init__(self, megatron_dataset, seq_length: int, return_doc_ids: bool = False):
        self.dataset = megatron_dataset
        self.seq_length = seq_length
        self.return_doc_ids = return_doc_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def _leaf(self, idx: int):
        """(GPTDataset, its sample index, dataset id) of global sample ``idx`` (resolving a blend)."""
        ds = self.dataset
        if isinstance(ds, _megatron("blended_dataset").BlendedDataset):
            if ds.dataset_index is None:
                ds[0]  # megatron-core loads its blend indices lazily on first access
            d = int(ds.dataset_index[idx])
            return ds.datasets[d], int(ds.dataset_sample_index[idx]), d
        return ds, idx, 0

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        gpt, j, d = self._leaf(int(idx))
        text, _ = gpt._query_document_sample_shuffle_indices(j)  # [seq_length + 1]
        item = {"tokens": torch.from_numpy(np.asarray(text, dtype=np.int64))}
        if self.return_doc_ids:
            item["doc_ids"] = torch.from_numpy(_segment_ids(gpt, j, self.seq_length + 1))
        item["dataset_id"] = torch.tensor(d)
        return item


def _segment_ids(gpt, j: int, n: int) -> np.ndarray:
    """Per token, which stored sequence of the sample it came from (0, 1, ...): [n] int64."""
    i = int(gpt.shuffle_index[j])
    b, bo = (int(x) for x in gpt.sample_index[i])
    e, eo = (int(x) for x in gpt.sample_index[i + 1])
    if b == e:
        lens = [n]
    else:
        seqlen = gpt.dataset.sequence_lengths
        docs = gpt.document_index
        lens = [int(seqlen[docs[b]]) - bo] + [int(seqlen[docs[k]]) for k in range(b + 1, e)] + [eo + 1]
    return np.repeat(np.arange(len(lens), dtype=np.int64), lens)[:n]


@contextlib.contextmanager
def _rank0_when_not_distributed():
    """megatron-core 0.16's BlendedDataset calls ``torch.distributed.get_rank()`` on a cache miss even
    when no process group exists (its GPTDataset checks first). Without a process group we are rank 0:
    answer that for the duration of the build, and touch nothing when a group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def normalize_split(split: str | Sequence[float]) -> str:
    parts = split.replace("/", ",").split(",") if isinstance(split, str) else list(split)
    try:
        vals = [float(x) for x in parts]
    except ValueError as e:
        raise UserError(f"split {split!r}: expected e.g. '969,30,1'") from e
    if len(vals) > 3 or not vals or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise UserError(f"split {split!r}: expected up to 3 non-negative weights with a positive sum")
    return ",".join(f"{v:g}" for v in vals + [0.0] * (3 - len(vals)))


def _empty_splits(weights: Sequence[float], n: int) -> list[int]:
    """The splits with a weight that get no document of a dataset of ``n`` (Megatron's rounding in
    ``get_split_indices``)."""
    w = [x / sum(weights) for x in weights]
    bounds = [0]
    for x in w:
        bounds.append(bounds[-1] + int(round(x * n)))
    bounds[-1] = n
    return [i for i in range(3) if w[i] > 0 and bounds[i + 1] <= bounds[i]]


def check_split(split: str | Sequence[float], prefixes: Sequence[str]) -> None:
    """Every split with a weight must get at least one document of every prefix; an empty one would make
    megatron-core's epoch count loop forever. A dataset without documents is named as such."""
    w = [float(x) for x in normalize_split(split).split(",")]
    for p in prefixes:
        n = IndexedDataset(p).require_documents().num_documents
        empty = _empty_splits(w, n)
        if empty:
            # the same weights with 0 for the parts this dataset is too small for (never the split given)
            fit = [0.0 if i in empty else x for i, x in enumerate(w)]
            if not sum(fit) or _empty_splits(fit, n):
                fit = [1.0, 0.0, 0.0]
            names = " and ".join(("train", "valid", "test")[i] for i in empty)
            raise UserError(f"data.split: {split!r} leaves the {names} split of {p} empty ({n} documents); "
                            f"give 0 to the parts it is too small for, e.g. '{','.join(f'{x:g}' for x in fit)}'")


def build_gpt_datasets(
    blend: Any,
    split: str | Sequence[float],
    seq_length: int,
    num_samples: Sequence[int | None],
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    *,
    return_doc_ids: bool = False,
    eod: int | None = None,
) -> tuple[GPTSamples | None, GPTSamples | None, GPTSamples | None]:
    """Train/valid/test datasets over one prefix or a weighted blend (see `megacpt.data.blend`).

    ``num_samples[i]`` samples are drawn for split i (Megatron repeats epochs as needed); a split whose
    weight is 0 or whose count is 0 is None. Index files go to ``cache_dir`` (default: ``cache/`` beside
    the first dataset) and are reused when blend, split, seed, length and counts are unchanged.
    """
    BlendedMegatronDatasetBuilder = _megatron("blended_megatron_dataset_builder").BlendedMegatronDatasetBuilder
    GPTDataset, GPTDatasetConfig = _megatron("gpt_dataset").GPTDataset, _megatron("gpt_dataset").GPTDatasetConfig

    b: Blend = parse_blend(blend)
    if seq_length < 1:
        raise UserError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3:
        raise UserError(f"num_samples must be (train, valid, test), got {num_samples}")
    split_s = normalize_split(split)
    check_split(split_s, b.prefixes)
    identity = blend_tokenizer_identity(b)
    if cache_dir is None:
        cache_dir = Path(b.prefixes[0]).parent / "cache"
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    weights = [float(x) for x in split_s.split(",")]
    # megatron-core wants a count for every split of a weighted blend; 0 = not wanted
    sizes = [int(n) if (n and w > 0) else 0 for n, w in zip(num_samples, weights)]
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=b.to_megatron(),
        split=split_s,
        path_to_cache=str(cache_dir),
        tokenizer=_TokenizerInfo(identity, eod if eod is not None else (identity or {}).get("eod")),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    with _rank0_when_not_distributed():
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    out = []
    for ds, n in zip(built, sizes):
        if ds is None or not n:
            out.append(None)
            continue
        if len(ds) < n:
            raise UserError(f"only {len(ds)} samples could be built, {n} were asked for")
        out.append(GPTSamples(ds, seq_length, return_doc_ids))
    return tuple(out)
