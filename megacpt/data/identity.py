"""Identity of an indexed dataset: what makes two score files or selections "of the same dataset"."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from megacpt.data.indexed import IndexedDataset
from megacpt.io import sha256_file


def dataset_identity(prefix: str | os.PathLike, ds: IndexedDataset | None = None) -> dict[str, Any]:
    """What makes two score files "of the same dataset": the index bytes, the token count, and a
    sample of the token bytes.

    Hashing the `.idx` (12 bytes per sequence) is cheap even at corpus scale; hashing the `.bin`
    (tens of GB) is not, so the `.bin` enters through its size and 16 evenly spaced 64 KiB blocks.
    """
    ds = ds or IndexedDataset(prefix)
    meta = ds.meta or {}
    tok = meta.get("tokenizer") or {}
    return {
        "prefix": str(Path(str(prefix)).resolve()),
        "idx_sha256": sha256_file(str(prefix) + ".idx"),
        "bin_bytes": Path(str(prefix) + ".bin").stat().st_size,
        "bin_sample_sha256": _sample_sha256(str(prefix) + ".bin"),
        "num_documents": ds.num_documents,
        "num_tokens": ds.num_tokens,
        "tokenizer_sha256": tok.get("sha256"),
    }


def _sample_sha256(path: str, blocks: int = 16, block: int = 1 << 16) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for off in sorted({int(x) for x in np.linspace(0, max(size - block, 0), blocks)}):
            f.seek(off)
            h.update(f.read(block))
    return h.hexdigest()


def same_dataset(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("idx_sha256", "bin_bytes", "num_documents", "num_tokens")
    same = all(a.get(k) == b.get(k) for k in keys)
    if "bin_sample_sha256" in a and "bin_sample_sha256" in b:
        same = same and a["bin_sample_sha256"] == b["bin_sample_sha256"]
    return same
