"""Document encoder used by preprocessing: Megatron's per-document rule on top of a `Tokenizer`.

A document is a str or a list of str (Megatron: one sequence per list item). Each item is tokenized;
items with no tokens are dropped; with ``append_eod`` the EOD goes at the end of the last sequence of a
document that has tokens. ``encode_documents`` returns, per document, its list of sequences.
"""
from __future__ import annotations

from typing import Any, Sequence

from megacpt.data.tokenizer import Tokenizer, load_tokenizer


class DocumentEncoder:
    def __init__(self, tokenizer: Tokenizer, fast=None):
        self.tokenizer = tokenizer
        self.fast = fast  # an exact fast BPE (megacpt.data.fast_bpe) or None
        self._fallbacks = 0

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self.fast is None:
            return self.tokenizer.encode_batch(texts)
        ids, fallbacks = self.fast.encode_batch(texts)
        self._fallbacks += fallbacks
        return ids

    def pop_fallbacks(self) -> int:
        n, self._fallbacks = self._fallbacks, 0
        return n

    def encode_documents(self, docs: Sequence[Any], append_eod: bool) -> list[list[list[int]]]:
        flat: list[str] = []
        owner: list[int] = []
        for d, v in enumerate(docs):
            items = [v] if isinstance(v, str) else v
            flat.extend(items)
            owner.extend([d] * len(items))
        out: list[list[list[int]]] = [[] for _ in docs]
        for d, ids in zip(owner, self.encode_texts(flat)):
            if ids:
                out[d].append(ids)
        if append_eod:
            eod = self.tokenizer.eod
            for seqs in out:
                if seqs:
                    seqs[-1].append(eod)
        return out


def build_encoder(path: str, tokenizer_type: str = "auto", fast: bool = True) -> DocumentEncoder:
    tok = load_tokenizer(path, tokenizer_type)
    fast_bpe = None
    if fast:
        try:
            from megacpt.data.fast_bpe import FastBPE
        except ImportError:
            FastBPE = None
        if FastBPE is not None:
            fast_bpe = FastBPE.maybe_build(tok)
    return DocumentEncoder(tok, fast_bpe)
