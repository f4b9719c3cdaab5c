"""Documents of an indexed dataset as text: tokens decoded with the tokenizer named in its sidecar.

Scorers that look at text (POS tags, sentence embeddings, n-grams) read the corpus through this
module so their ``doc_id`` is the dataset's document index by construction. EOD tokens are dropped
before decoding (they are a packing artefact, not text).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megacpt.data.indexed import IndexedDataset
from megacpt.data.tokenizer import load_tokenizer
from megacpt.errors import UserError


def _load_tokenizer(path: str):
    return load_tokenizer(path, "auto")


class DocumentTexts:
    """``texts[d]`` is document d decoded (EOD removed). Cheap to construct in worker processes."""

    def __init__(self, prefix: str | os.PathLike, tokenizer: str | None = None):
        self.prefix = str(prefix)
        self.ds = IndexedDataset(prefix).require_documents()  # nothing to score: an error, not an empty file
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
