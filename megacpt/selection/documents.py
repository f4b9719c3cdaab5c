"""Documents of an indexed dataset as text: tokens decoded with the tokenizer named in its sidecar.

Scorers that look at text (POS tags, sentence embeddings, n-grams) read the corpus through this
module so their ``doc_id`` is the dataset's document index by construction. EOD tokens are dropped
before decoding (they are a packing artefact, not text).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from megacpt.data.indexed import IndexedDataset
from megacpt.data.tokenizer import load_tokenizer
from megacpt.errors import UserError
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
    import hashlib

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


def _load_tokenizer(path: str):
    return load_tokenizer(path, "auto")


class DocumentTexts:
    """``texts[d]`` is document d decoded (EOD removed). Cheap to construct in worker processes."""

    def __init__(self, prefix: str | os.PathLike, tokenizer: str | None = None):
        self.prefix = str(prefix)
        self.ds = IndexedDataset(prefix)
        meta = self.ds.meta
        if not meta or "tokenizer" not in meta:
            if tokenizer is None:
                raise UserError(
                    f"{self.prefix}.meta.json: missing or without a 'tokenizer' entry; pass --tokenizer PATH"
                )
            meta = {"tokenizer": {}}
        ident = meta["tokenizer"] or {}
        path = tokenizer or ident.get("path")
        if not path and ident.get("type") == "NullTokenizer":
            raise UserError(f"{self.prefix}: made with NullTokenizer (token ids, no text); this scorer reads text: "
                            "pass --tokenizer PATH of the tokenizer those ids come from")
        if not path:
            raise UserError(f"{self.prefix}.meta.json: tokenizer entry has no 'path'; pass --tokenizer PATH")
        if not Path(path).exists():
            raise UserError(
                f"{self.prefix}.meta.json: tokenizer {path} does not exist (moved?); pass --tokenizer PATH"
            )
        self.tokenizer = _load_tokenizer(path)
        if tokenizer is not None and ident.get("sha256"):
            got = self.tokenizer.identity().get("sha256")
            if got and got != ident["sha256"]:
                raise UserError(
                    f"--tokenizer {tokenizer}: sha256 {got[:12]}… differs from the dataset's tokenizer "
                    f"({ident['sha256'][:12]}…) named in {self.prefix}.meta.json"
                )
        eod = ident.get("eod", getattr(self.tokenizer, "eod", None))
        self.eod = None if eod is None else int(eod)

    def __len__(self) -> int:
        return self.ds.num_documents

    def tokens(self, d: int) -> np.ndarray:
        toks = self.ds.document(d)
        return toks[toks != self.eod] if self.eod is not None else toks

    def __getitem__(self, d: int) -> str:
        toks = self.tokens(d)
        return self.tokenizer.decode(toks.tolist()) if toks.size else ""

    def range(self, start: int, end: int) -> list[str]:
        return [self[d] for d in range(start, end)]
