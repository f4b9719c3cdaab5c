"""An exact fast path for GPT-2/GPT-NeoX-style byte-level BPE: tiktoken with ranks from tokenizer.json.

HF ``tokenizers`` and tiktoken run different BPE loops: HF merges the adjacent *pair* listed earliest in
``merges``; tiktoken merges the adjacent pair whose *concatenation* has the lowest rank. We give each
merged token the rank of the merge that creates it, so both pick the same pair whenever the only way
two adjacent tokens can concatenate to a vocab token is that token's own merge. `FastBPE.maybe_build`
only enables the path for tokenizers where the rest of the pipeline is reproducible:

- model BPE (no dropout / unk / subword prefix / byte fallback), pre-tokenizer ByteLevel with the GPT-2
  regex and no prefix space, normaliser none or NFC, a post-processor that adds no tokens;
- added tokens without lstrip/rstrip/single_word (they are split out first, exactly as HF does:
  non-normalised ones on the raw text, then normalised ones, leftmost-longest);
- every vocab token's bytes encode to that token with both libraries (checked at build time), and a
  built-in differential sample encodes identically.

Per document, text that the NFC normaliser would change is sent to HF instead (counted as a fallback).
Any remaining doubt is settled by tests comparing against HF on real text and by ``--no-fast-tokenizer``.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Sequence

import numpy as np

from megacpt.data.tokenizer import HFTokenizer, byte_decoder
from megacpt.optional import optional

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SELF_TEST = [
    "Hello world! The quick brown fox's 3 jumps, don't it?  Two  spaces\tand\ttabs\n\nnew lines   ",
    "Revenue rose 12.5% to $1,234,567 in Q3'21; EPS: 0.98 (vs. 0.87).",
    "naïve café Zürich — “quoted” ‘single’ … 日本語のテキスト 한국어 ελληνικά русский 😀👍🏽",
    "x<|endoftext|>y<|endoftext|><|endoftext|> z",
    "   leading and trailing   ", "\r\n\r\n", "a" * 300, " " * 50, "'S 'LL 're's",
]


class FastBPE:
    def __init__(self, hf_tokenizer, encoding, rank_to_id: np.ndarray | None, added: list[Any], nfc: bool):
        self.hf = hf_tokenizer          # megacpt HFTokenizer: the reference and the fallback
        self.enc = encoding             # tiktoken.Encoding with our ranks
        self.rank_to_id = rank_to_id    # None when ranks are the HF ids
        self.nfc = nfc
        raw = [a for a in added if not a.normalized]
        norm = [a for a in added if a.normalized]
        self._raw_re = _alternation([a.content for a in raw])
        self._norm_re = _alternation([a.content for a in norm])
        self._added_id = {a.content: hf_tokenizer.token_to_id(a.content) for a in added}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def maybe_build(cls, tokenizer) -> "FastBPE | None":
        """A FastBPE equivalent to ``tokenizer``, or None when equivalence cannot be established."""
        return cls.build(tokenizer)[0]

    @classmethod
    def build(cls, tokenizer) -> tuple["FastBPE | None", str]:
        """(FastBPE or None, why not)."""
        tiktoken = optional("tiktoken", "the fast BPE path")
        if tiktoken is None:
            return None, "tiktoken is not installed (a core dependency: reinstall megacpt)"
        if not isinstance(tokenizer, HFTokenizer):
            return None, f"{tokenizer.type} is not a byte-level BPE"
        import json

        spec = json.loads(tokenizer.backend.to_str())
        nfc = _check_pipeline(spec)
        if nfc is None:
            return None, "tokenizer pipeline is not plain byte-level BPE (model/normalizer/pre-tokenizer/post-processor)"
        added = list(tokenizer.backend.get_added_tokens_decoder().values())
        if any(a.lstrip or a.rstrip or a.single_word for a in added):
            return None, "added tokens with lstrip/rstrip/single_word"
        model = spec["model"]
        added_contents = {a.content for a in added}
        vocab: dict[str, int] = {s: i for s, i in model["vocab"].items() if s not in added_contents}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        dec = byte_decoder()
        to_bytes = lambda s: bytes(dec[c] for c in s)  # noqa: E731
        text_of: dict[bytes, str] = {}  # token bytes -> its byte-level string in tokenizer.json
        try:
            ranks: dict[bytes, int] = {}
            for s, i in vocab.items():
                if len(s) == 1:
                    ranks[to_bytes(s)] = i
                    text_of[to_bytes(s)] = s
            merge_rank: dict[bytes, int] = {}
            for r, (a, b) in enumerate(merges):
                t = to_bytes(a + b)
                if t in merge_rank or (a + b) not in vocab:
                    return None, f"merge {r} ({a!r}, {b!r}) repeats a token or makes none"
                merge_rank[t] = r
                text_of[t] = a + b
        except KeyError:
            return None, "a vocab entry that is not byte-level text"
        if len(ranks) != 256:
            return None, f"vocab has {len(ranks)} single-byte tokens, not 256"
        # other multi-character vocab entries (GPT-2's <|endoftext|> when it is not an added token) are no
        # merge's result, so neither BPE can produce them: they stay out of tiktoken's ranks
        ids = np.array([vocab[text_of[t]] for t in merge_rank], dtype=np.int64)
        order = np.array(list(merge_rank.values()))
        if np.all(np.diff(ids[np.argsort(order)]) > 0) and min(ids) > max(ranks.values()):
            ranks.update({t: vocab[text_of[t]] for t in merge_rank})  # ids already in merge order
            rank_to_id = None
        else:
            base = 256
            ranks = {t: k for k, t in enumerate(sorted(ranks, key=ranks.get))}
            ranks.update({t: base + r for t, r in merge_rank.items()})
            rank_to_id = np.zeros(base + len(merges), dtype=np.int64)
            for t, r in ranks.items():
                rank_to_id[r] = vocab[text_of[t]]
        enc = tiktoken.Encoding("megacpt-hf", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        fast = cls(tokenizer, enc, rank_to_id, added, nfc)
        if not fast._self_consistent(ranks, text_of):
            return None, "some vocab token does not encode to itself"
        if not fast.verify(SELF_TEST):
            return None, "differs from HF on the built-in self-test"
        return fast, ""

    def _self_consistent(self, ranks: dict[bytes, int], text_of: dict[bytes, str]) -> bool:
        """Every token's bytes encode to exactly that token with tiktoken and with HF's BPE model."""
        model = self.hf.backend.model
        for t, r in ranks.items():
            if len(t) < 2:
                continue
            if self.enc._encode_single_piece(t) != [r]:
                return False
        return all(len(model.tokenize(text_of[t])) == 1 for t in ranks if len(t) >= 2)

    def verify(self, texts: Sequence[str]) -> bool:
        return all(self.encode(t) == self.hf.encode(t) for t in texts)

    # -- encoding ---------------------------------------------------------------------------------
    def _ordinary(self, text: str) -> np.ndarray:
        ids = self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ids.astype(np.int64) if self.rank_to_id is None else self.rank_to_id[ids]

    def encode_array(self, text: str) -> np.ndarray | None:
        """int64 ids, or None when this text must go to HF (the normaliser would change it)."""
        if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            return None
        if self._raw_re is None and self._norm_re is None:
            return self._ordinary(text) if text else np.zeros(0, np.int64)
        parts: list[np.ndarray] = []
        for seg, is_added in _split(text, self._raw_re):
            if is_added:
                parts.append(np.array([self._added_id[seg]], np.int64))
                continue
            for sub, sub_added in _split(seg, self._norm_re):
                parts.append(np.array([self._added_id[sub]], np.int64) if sub_added else self._ordinary(sub))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def encode(self, text: str) -> list[int]:
        arr = self.encode_array(text)
        return self.hf.encode(text) if arr is None else arr.tolist()

    def encode_batch_arrays(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """(int64 ids per text, number of texts that fell back to HF)."""
        out: list[Any] = [self.encode_array(t) for t in texts]
        fallback = [k for k, a in enumerate(out) if a is None]
        if fallback:
            for k, ids in zip(fallback, self.hf.encode_batch([texts[k] for k in fallback])):
                out[k] = np.asarray(ids, dtype=np.int64)
        return out, len(fallback)


def _alternation(words: list[str]):
    if not words:
        return None
    # longest first: at the leftmost match position the first alternative that matches is the longest
    return re.compile("|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)))


def _split(text: str, pattern) -> list[tuple[str, bool]]:
    if pattern is None:
        return [(text, False)] if text else []
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        out.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def _check_pipeline(spec: dict[str, Any]) -> bool | None:
    """True/False = NFC normaliser or none; None = a pipeline the fast path does not reproduce."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0.0) or model.get("unk_token") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return None
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") == "Sequence" and len(norm.get("normalizers", [])) == 1:
        norm = norm["normalizers"][0]
    if norm is not None and norm.get("type") != "NFC":
        return None
    post = spec.get("post_processor")
    if post is not None and post.get("type") not in ("ByteLevel",):
        return None
    return norm is not None
