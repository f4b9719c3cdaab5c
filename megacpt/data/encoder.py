"""Document encoder used by preprocessing: Megatron's per-document rule on top of a `Tokenizer`.

A document is a str or a list of str (Megatron: one sequence per list item). Each item is tokenized;
items with no tokens are dropped; with ``append_eod`` the EOD goes at the end of the last sequence of a
document that has tokens. ``encode_documents`` returns, per document, its list of sequences (int64
arrays).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from megacpt.data.fast_bpe import FastBPE
from megacpt.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


class DocumentEncoder:
    def __init__(self, tokenizer: Tokenizer, fast=None, fast_status: str = "disabled", fast_reason: str = ""):
        self.tokenizer = tokenizer
        self.fast = fast  # an exact fast BPE (megacpt.data.fast_bpe) or None
        self.fast_status = "tiktoken (exact, verified)" if fast is not None else fast_status
        self.fast_reason = fast_reason  # why there is no fast path
        self._fallbacks = 0

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        if self.fast is None:
            return [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer.encode_batch(texts)]
        ids, fallbacks = self.fast.encode_batch_arrays(texts)
        self._fallbacks += fallbacks
        return ids

    def pop_fallbacks(self) -> int:
        n, self._fallbacks = self._fallbacks, 0
        return n

    def encode_documents(self, docs: Sequence[Any], append_eod: bool) -> list[list[np.ndarray]]:
        flat: list[str] = []
        owner: list[int] = []
        for d, v in enumerate(docs):
            items = [v] if isinstance(v, str) else v
            flat.extend(items)
            owner.extend([d] * len(items))
        out: list[list[np.ndarray]] = [[] for _ in docs]
        for d, ids in zip(owner, self.encode_texts(flat)):
            if ids.size:
                out[d].append(ids)
        if append_eod:
            eod = np.array([self.tokenizer.eod], np.int64)
            for seqs in out:
                if seqs:
                    seqs[-1] = np.concatenate([seqs[-1], eod])
        return out


def build_encoder(path: str | None, tokenizer_type: str = "auto", fast: bool = True, *,
                  vocab_file: str | None = None, merge_file: str | None = None,
                  gpt2_parse_special: bool = False, vocab_size: int | None = None,
                  null_eod_id: int | None = None) -> DocumentEncoder:
    """The document encoder; with ``fast`` the exact tiktoken path when it can be established."""
    tok = load_tokenizer(path, tokenizer_type, vocab_file=vocab_file, merge_file=merge_file,
                         gpt2_parse_special=gpt2_parse_special, vocab_size=vocab_size, null_eod_id=null_eod_id)
    if not fast:
        return DocumentEncoder(tok, None, "disabled (--no-fast-tokenizer)")
    fast_bpe, why = FastBPE.build(tok)
    return DocumentEncoder(tok, fast_bpe, f"HF tokenizers ({why})" if isinstance(tok, HFTokenizer) else tok.type,
                           why)
