"""Merging (`megacpt merge`, flags in ``megacpt.data.cli``): join indexed datasets in order (Megatron's ``tools/merge_datasets.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megacpt.data.indexed import (IndexedDataset, IndexedDatasetWriter, dataset_files, read_sidecar, sidecar_path,
                                  write_sidecar)
from megacpt.errors import UserError
from megacpt.io import check_writable_dir, claim_output

_SUMMED = ("num_documents", "num_sequences", "num_tokens", "input_records", "input_bytes", "skipped_lines",
           "fast_path_fallbacks")


def find_prefixes(directory: str | Path) -> list[str]:
    """Every PREFIX with both .bin and .idx in ``directory``, sorted by name like Megatron's tool."""
    d = Path(directory)
    idx = {p.name[:-4] for p in d.glob("*.idx")}
    missing = sorted(n for n in {p.name[:-4] for p in d.glob("*.bin")} ^ idx)
    if missing:
        raise UserError(f"{d}: {missing[0]} has only one of .bin/.idx")
    if not idx:
        raise UserError(f"{d}: no .bin/.idx datasets found")
    return [str(d / n) for n in sorted(idx)]


def merge_datasets(prefixes: Sequence[str], out_prefix: str) -> dict[str, Any]:
    """Concatenate ``prefixes`` (documents in that order) into ``out_prefix``; returns its sidecar.
    All inputs must share dtype and (when sidecars record it) the tokenizer."""
    if not prefixes:
        raise UserError("merge: no input datasets")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing
    dtypes = {np.dtype(d.dtype).name for d in datasets}
    if len(dtypes) > 1:
        raise UserError(f"merge: inputs have different dtypes {sorted(dtypes)}")
    metas = [read_sidecar(p) for p in prefixes]
    tok_hashes = {m["tokenizer"]["sha256"] for m in metas if m and "tokenizer" in m}
    if len(tok_hashes) > 1:
        raise UserError("merge: inputs were tokenized with different tokenizers (sidecar sha256 differ)")
    check_writable_dir(out_prefix)
    with claim_output(out_prefix, dataset_files(out_prefix)):
        return _merge(datasets, prefixes, metas, out_prefix)


def _merge(datasets: list[IndexedDataset], prefixes: Sequence[str], metas: list, out_prefix: str) -> dict[str, Any]:
    sidecar_path(out_prefix).unlink(missing_ok=True)
    with IndexedDatasetWriter(out_prefix, datasets[0].dtype) as w:
        for p in prefixes:
            w.add_index(p)
    meta: dict[str, Any] = {k: v for k, v in (metas[0] or {}).items() if k not in _SUMMED}
    for k in _SUMMED:
        meta[k] = sum(int((m or {}).get(k, 0)) for m in metas)
    meta.update(num_documents=w.n_documents, num_sequences=w.n_sequences, num_tokens=w.n_tokens,
                dtype=np.dtype(datasets[0].dtype).name, partition=None, merged_from=list(map(str, prefixes)),
                created_by="megacpt merge")
    meta["skipped_examples"] = [e for m in metas for e in (m or {}).get("skipped_examples", [])][:100]
    write_sidecar(out_prefix, meta)
    return meta
