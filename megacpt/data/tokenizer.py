"""Tokenizers behind one small interface, plus local byte-level BPE training (GPT-NeoX style).

`load_tokenizer(path)` accepts an HF tokenizer dir (with tokenizer.json), a tokenizer.json file, or a
sentencepiece ``.model``. Semantics follow what Megatron-LM's preprocessing calls:

- HuggingFaceTokenizer: ``encode(text)`` = HF ``tokenizer(text).input_ids`` for tokenizers whose
  post-processor adds nothing (GPT-NeoX/Pythia, and every tokenizer `train_bpe` writes): special tokens
  written in the text (``<|endoftext|>``) are parsed, no BOS/EOS is added. ``vocab_size`` counts added
  tokens (= ``len(AutoTokenizer)``); ``eod`` is the ``eos_token`` of tokenizer_config.json, else the id of
  ``<|endoftext|>``.
- SentencePieceTokenizer: Megatron's ``GPTSentencePieceTokenizer``: ``encode_as_ids``, eod = eos id.
- GPT2BPETokenizer: Megatron's classic ``_GPT2BPETokenizer`` (``--vocab-file V --merge-file M``): the
  original GPT-2 algorithm (GPT-2 regex, byte-level BPE by merge rank, no normaliser). Text is never parsed
  for special tokens: a literal ``<|endoftext|>`` in a document is encoded as ordinary text, as
  ``gpt2_tokenization.GPT2Tokenizer.encode`` does. ``vocab_size`` = entries of vocab.json (no padding),
  ``eod`` = the id of ``<|endoftext|>`` (None when the vocab has none; preprocessing then refuses
  ``--append-eod``). Megatron-LM's default tokenizer system since Sept 2025 (``--legacy-tokenizer`` until
  #2946 removed it, Feb 2026) builds this type as HF ``AutoTokenizer("gpt2", vocab_file=..., merges_file=...)``,
  which parses ``<|endoftext|>`` in text as the EOD id (``parse_special=True``,
  ``--gpt2-parse-special-tokens``). With transformers 5 that call takes the vocabulary from the hub's
  gpt2 tokenizer.json and ignores the two files; for GPT-2's own files the ids are ours with
  ``parse_special=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from megacpt.data.readers import iter_documents
from megacpt.errors import UserError
from megacpt.io import atomic_path, sha256_file, write_json_atomic
from megacpt.optional import require

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
TOKENIZER_TYPES = ("auto", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer")


class Tokenizer:
    """Common interface; subclasses set ``type``, ``path``, ``files``, ``vocab_size``, ``eod``.

    ``path`` reloads the tokenizer with ``load_tokenizer(path)`` (auto type); ``eod`` is None only for a
    GPT-2 vocab without ``<|endoftext|>``.
    """

    type: str
    path: str
    files: list[Path]
    vocab_size: int
    eod: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a dataset records about the tokenizer that made it (compared before mixing datasets)."""
        hashes = {p.name: sha256_file(p) for p in self.files}
        combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(hashes.items())).encode())
        return {
            "type": self.type,
            "path": self.path,
            "sha256": combined.hexdigest(),
            "files": hashes,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    def require_eod(self, why: str = "--append-eod") -> int:
        if self.eod is None:
            raise UserError(f"{why} needs an end-of-document token, but tokenizer {self.path} has no {EOD_TOKEN}")
        return self.eod

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer(Tokenizer):
    type = "HuggingFaceTokenizer"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _RustTokenizer

        p = Path(path)
        tok_json = p / "tokenizer.json" if p.is_dir() else p
        self.path = str(p.resolve())
        config: dict[str, Any] = {}
        cfg_path = tok_json.parent / "tokenizer_config.json"
        self.files = [tok_json]
        if p.is_dir() and cfg_path.exists():
            self.files.append(cfg_path)
            config = _read_json(cfg_path)
        if tok_json.exists():
            try:
                self._tok = _RustTokenizer.from_file(str(tok_json))
            except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
                raise UserError(f"{tok_json}: not a valid HF tokenizer.json: {e}") from e
        elif p.is_dir():  # slow-only dirs (vocab.json + merges.txt): let transformers convert them once
            self._tok = _convert_with_transformers(p)
            self.files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in {".json", ".txt", ".model"})
        else:
            raise UserError(f"tokenizer {p}: no such file or directory")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod(config)
        self._tok.no_truncation()
        self._tok.no_padding()

    def _find_eod(self, config: dict[str, Any]) -> int:
        eos = config.get("eos_token")
        if isinstance(eos, dict):  # older configs store AddedToken dicts
            eos = eos.get("content")
        for name in (eos, EOD_TOKEN):
            if name is not None and (i := self._tok.token_to_id(name)) is not None:
                return int(i)
        raise UserError(f"tokenizer {self.path}: no eos_token in tokenizer_config.json and no {EOD_TOKEN} token")

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` (used by the fast preprocessing path)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    type = "SentencePieceTokenizer"

    def __init__(self, path: str | os.PathLike):
        spm = require("sentencepiece", "--tokenizer-model *.model", 'pip install "megacpt[sentencepiece]"')
        p = Path(path)
        if not p.is_file():
            raise UserError(f"sentencepiece model {p}: no such file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(p))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{p}: not a sentencepiece model: {e}") from e
        self.path, self.files = str(p.resolve()), [p]
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise UserError(f"sentencepiece model {p} has no EOS piece (needed as EOD)")
        self.eod = eos

    def encode(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# deleting these from an ASCII text leaves nothing iff it is ASCII digits separated by what str.split() splits on
_NOT_ID_TEXT = str.maketrans("", "", "0123456789 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")


class NullTokenizer(Tokenizer):
    """Megatron-LM's ``NullTokenizer`` for text that is already token ids: ``"12 7 3"`` -> [12, 7, 3].

    Megatron has two conventions; the token dtype follows from the vocabulary size in both:
    - megatron-core 0.16 / 0.17 (the releases; ours is pinned to 0.16): ``--vocab-size N`` means ids 0..N-1
      plus the EOD id N, a vocabulary of N + 1. This is the default here.
    - Megatron-LM main since April 2026 (#4057): a vocabulary of N, EOD N - 1 or ``--null-tokenizer-eod-id``.
      Giving ``--null-tokenizer-eod-id E`` selects it (main's default output: ``--null-tokenizer-eod-id N-1``).
    Megatron splits on single spaces and calls ``int``, so an empty text, a double or trailing space or
    anything that is not an integer crashes it. Here ids are separated by any whitespace, an empty text is
    an empty document, and a token that is not a plain decimal integer inside the vocabulary is a bad record
    (``check_text``: an error naming file and line, or a counted skip with ``--skip-bad-lines``).
    """

    type = "NullTokenizer"

    def __init__(self, vocab_size: int, eod_id: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise UserError(f"NullTokenizer needs --vocab-size N >= 1, got {vocab_size!r}")
        self.path = ""
        self.files = []
        self.arg_vocab_size, self.arg_eod_id = vocab_size, eod_id  # the flags, to rebuild it
        if eod_id is None:  # megatron-core 0.16/0.17
            self.vocab_size, self.eod = vocab_size + 1, vocab_size
        else:               # Megatron-LM main (#4057)
            if not 0 <= eod_id < vocab_size:
                raise UserError(f"--null-tokenizer-eod-id {eod_id} is outside the vocabulary [0, {vocab_size})")
            self.vocab_size, self.eod = vocab_size, eod_id

    def _parse(self, text: str):
        """-> (ids int64 array, None) or (None, why). One pass in C for the usual text (ASCII digits and
        whitespace, ids in range); anything else is walked token by token for the exact message."""
        import numpy as np

        if text.isascii() and not text.translate(_NOT_ID_TEXT):
            try:
                ids = np.array(text.split(), dtype=np.int64)
                if not ids.size or ids.max() < self.vocab_size:
                    return ids, None
            except OverflowError:  # more than 19 digits: outside the vocabulary, reported below
                pass
        ids = []
        for tok in text.split():  # str.split's whitespace, non-ASCII separators included
            if not (tok.isascii() and tok.isdigit()):
                return None, f"NullTokenizer: {tok[:40]!r} is not a token id (a non-negative decimal integer)"
            if int(tok) >= self.vocab_size:
                return None, f"NullTokenizer: token id {tok} is outside the vocabulary [0, {self.vocab_size})"
            ids.append(int(tok))
        return np.array(ids, dtype=np.int64), None

    def check_text(self, text: str) -> str | None:
        return self._parse(text)[1]

    def encode(self, text: str) -> list[int]:
        return self._encode(text).tolist()

    def encode_batch(self, texts: Sequence[str]):
        return [self._encode(t) for t in texts]  # int64 arrays: what DocumentEncoder turns lists into

    def _encode(self, text: str):
        ids, why = self._parse(text)
        if why is not None:
            raise UserError(why)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def identity(self) -> dict[str, Any]:
        # no files: the hash is of the definition, so datasets compare equal exactly when (vocab, EOD) do
        digest = hashlib.sha256(f"NullTokenizer vocab_size={self.vocab_size} eod={self.eod}".encode()).hexdigest()
        return {"type": self.type, "path": "", "sha256": digest, "files": {}, "vocab_size": self.vocab_size,
                "eod": self.eod, "args": {"vocab_size": self.arg_vocab_size, "eod_id": self.arg_eod_id}}


class GPT2BPETokenizer(HFTokenizer):
    """Megatron's ``GPT2BPETokenizer`` from a GPT-2-format ``vocab.json`` + ``merges.txt``.

    Runs on HF ``tokenizers`` (a BPE model with exactly these merges, the GPT-2 byte-level pre-tokenizer,
    no normaliser, no added tokens) so the tiktoken fast path applies. This equals the original
    pure-Python algorithm because `read_gpt2_merges` only accepts merges whose parts are bytes or
    results of earlier merges: then every pair a merge creates ranks after it, and "lowest rank first,
    leftmost first" (HF) and "lowest rank, all occurrences left to right" (GPT-2) make the same merges.
    """

    type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | os.PathLike, merge_file: str | os.PathLike, parse_special: bool = False):
        from tokenizers import AddedToken, Tokenizer as _RustTokenizer, decoders, models, pre_tokenizers

        vf, mf = Path(vocab_file), Path(merge_file)
        vocab = read_gpt2_vocab(vf)
        merges = read_gpt2_merges(mf, vocab, vf)
        tok = _RustTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self._inv = {i: t for t, i in vocab.items()}
        self.vocab_file, self.merge_file = str(vf.resolve()), str(mf.resolve())
        self.path, self.files = self.vocab_file, [vf, mf]
        self.vocab_size = len(vocab)          # Megatron: len(encoder), padding happens in the model
        self.eod = vocab.get(EOD_TOKEN)
        self.parse_special = parse_special
        if parse_special:  # as HF's GPT-2 tokenizer: <|endoftext|> (its bos/eos/unk) is split out of the text
            self.require_eod("--gpt2-parse-special-tokens")
            tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "vocab_file": self.vocab_file, "merge_file": self.merge_file,
                "parse_special_tokens": self.parse_special}

    def decode(self, ids: Iterable[int]) -> str:
        """GPT-2's decode: token strings -> bytes -> UTF-8 with errors='replace'."""
        dec = byte_decoder()
        try:
            text = "".join(self._inv[int(i)] for i in ids)
        except KeyError as e:
            raise UserError(f"token id {e.args[0]} is not in {self.vocab_file} (vocab size {self.vocab_size})") from None
        # vocab entries outside the byte alphabet (none in GPT-2's) decode as their UTF-8 text
        return b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in text).decode("utf-8", "replace")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the byte <-> printable char map of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def read_gpt2_vocab(path: Path) -> dict[str, int]:
    """A GPT-2 ``vocab.json``: a JSON object token -> id, ids 0..N-1, all 256 byte-level tokens present."""
    if not path.is_file():
        raise UserError(f"--vocab-file {path}: no such file")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"--vocab-file {path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--vocab-file {path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); expected a GPT-2 "
                        "vocab.json object {token: id}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"--vocab-file {path}: expected a non-empty JSON object {{token: id}}, got "
                        f"{type(vocab).__name__}")
    if isinstance(vocab.get("model"), dict):
        raise UserError(f"--vocab-file {path}: this is an HF tokenizer.json, not a GPT-2 vocab.json; use "
                        "--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH")
    seen: dict[int, str] = {}
    for t, i in vocab.items():
        if type(i) is not int or not 0 <= i < len(vocab):
            raise UserError(f"--vocab-file {path}: token {t!r} has id {i!r}; expected an integer in "
                            f"[0, {len(vocab)}) (ids must be 0..N-1: Megatron's vocab_size is the entry count)")
        if i in seen:
            raise UserError(f"--vocab-file {path}: tokens {seen[i]!r} and {t!r} share id {i}")
        seen[i] = t
    missing = [c for c in byte_decoder() if c not in vocab]
    if missing:
        raise UserError(f"--vocab-file {path}: {len(missing)} of the 256 byte-level tokens are missing (first: "
                        f"{missing[0]!r} = byte 0x{byte_decoder()[missing[0]]:02x}); not a byte-level BPE vocab")
    return vocab


def read_gpt2_merges(path: Path, vocab: dict[str, int], vocab_path: Path | str = "vocab") -> list[tuple[str, str]]:
    """A GPT-2 ``merges.txt``: a ``#version`` line, then one ``A B`` merge per line, newline-terminated.

    Megatron's reader keeps ``text.split("\n")[1:-1]``: line 1 and whatever follows the last newline are
    dropped unread, so a file without the header or the final newline would silently lose a merge; we
    refuse both. Blank lines are skipped (Megatron's empty tuple never matches); lines with 1 or 3+ fields,
    repeated merges, parts not yet made and results missing from the vocab are errors.
    """
    if not path.is_file():
        raise UserError(f"--merge-file {path}: no such file")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"--merge-file {path}: not UTF-8 text ({e})") from None
    if not lines[0].startswith("#version"):
        raise UserError(f"--merge-file {path}:1: expected a '#version: 0.2' header, got {lines[0][:40]!r} "
                        "(Megatron skips line 1 unread, so a merge there would be lost)")
    if lines[-1].strip():
        raise UserError(f"--merge-file {path}:{len(lines)}: no newline at the end of the file (Megatron drops the "
                        "last line unread, so this merge would be lost); add a final newline")
    made = set(byte_decoder())
    seen: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines[1:-1], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"--merge-file {path}:{n}: expected two space-separated tokens, got {line[:80]!r}")
        pair = (parts[0], parts[1])
        if pair in seen:
            raise UserError(f"--merge-file {path}:{n}: merge {line.strip()!r} repeats line {seen[pair]}")
        for part in pair:
            if part not in made:
                raise UserError(f"--merge-file {path}:{n}: {part!r} is neither a byte-level character nor made by "
                                "an earlier merge")
        if pair[0] + pair[1] not in vocab:
            raise UserError(f"--merge-file {path}:{n}: the merged token {pair[0] + pair[1]!r} is not in "
                            f"--vocab-file {vocab_path}")
        seen[pair] = n
        made.add(pair[0] + pair[1])
        merges.append(pair)
    return merges


GPT2_FILE_PAIRS = (("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt"))


def _merges_beside(vocab_file: Path) -> Path | None:
    """``X-vocab.json`` -> ``X-merges.txt`` (Megatron's names), else ``merges.txt`` in the same folder."""
    name = vocab_file.name.replace("vocab", "merges")
    for cand in (vocab_file.with_name(Path(name).stem + ".txt"), vocab_file.with_name("merges.txt")):
        if cand != vocab_file and cand.is_file():
            return cand
    return None


def _gpt2_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        for v, m in GPT2_FILE_PAIRS:
            if (path / v).is_file() and (path / m).is_file():
                return path / v, path / m
        raise UserError(f"tokenizer {path}: no {' or '.join(f'{v} + {m}' for v, m in GPT2_FILE_PAIRS)} in this "
                        "folder; pass --vocab-file and --merge-file")
    merges = _merges_beside(path)
    if merges is None:
        raise UserError(f"GPT-2 vocab {path}: no merges file beside it (looked for "
                        f"{Path(path.name.replace('vocab', 'merges')).stem}.txt and merges.txt); put it there "
                        "or pass --vocab-file and --merge-file")
    return path, merges


def _is_gpt2_vocab_json(p: Path) -> bool:
    """A .json file that is a flat {token: id} map rather than an HF tokenizer.json."""
    if p.suffix != ".json" or p.name == "tokenizer.json" or not p.is_file():
        return False
    try:
        with open(p, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    # a vocab.json's first value is an id; a tokenizer.json opens with "version": "1.0" or similar
    return re.match(r'\s*\{\s*"(?:[^"\\]|\\.)*"\s*:\s*-?\d', head) is not None


def load_tokenizer(path: str | os.PathLike | None, tokenizer_type: str = "auto", *,
                   vocab_file: str | os.PathLike | None = None,
                   merge_file: str | os.PathLike | None = None, gpt2_parse_special: bool = False,
                   vocab_size: int | None = None, null_eod_id: int | None = None) -> Tokenizer:
    """Megatron's tokenizer flags -> a `Tokenizer`; every inconsistent combination is a `UserError`.

    ``path`` (``--tokenizer-model``): HF dir / tokenizer.json -> HFTokenizer; ``.model`` ->
    SentencePieceTokenizer; a GPT-2 ``*vocab.json`` with its merges file beside it (or a folder holding
    vocab.json + merges.txt with type GPT2BPETokenizer) -> GPT2BPETokenizer. ``vocab_file`` + ``merge_file``
    (``--vocab-file``/``--merge-file``) -> GPT2BPETokenizer, as Megatron's ``--tokenizer-type GPT2BPETokenizer``.
    ``NullTokenizer`` takes ``vocab_size`` (``--vocab-size``), optionally ``null_eod_id``, and no files.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "NullTokenizer":
        if path is not None or vocab_file is not None or merge_file is not None:
            raise UserError("--tokenizer-type NullTokenizer reads token ids from the text: it takes --vocab-size, "
                            "not --tokenizer-model/--vocab-file/--merge-file")
        if vocab_size is None:
            raise UserError("--tokenizer-type NullTokenizer needs --vocab-size N (token ids 0..N-1, EOD N)")
        if gpt2_parse_special:
            raise UserError("--gpt2-parse-special-tokens applies to GPT2BPETokenizer only")
        return NullTokenizer(vocab_size, null_eod_id)
    if vocab_size is not None or null_eod_id is not None:
        raise UserError("--vocab-size and --null-tokenizer-eod-id apply to --tokenizer-type NullTokenizer only "
                        "(other tokenizers define their vocabulary)")
    tok = _load(path, tokenizer_type, vocab_file, merge_file, gpt2_parse_special)
    if gpt2_parse_special and not isinstance(tok, GPT2BPETokenizer):
        raise UserError(f"--gpt2-parse-special-tokens applies to GPT2BPETokenizer only ({tok.type} always parses "
                        "its special tokens)")
    return tok


def _load(path, tokenizer_type: str, vocab_file, merge_file, parse_special: bool) -> Tokenizer:
    if vocab_file is not None or merge_file is not None:
        if tokenizer_type not in ("auto", "GPT2BPETokenizer"):
            raise UserError(f"--vocab-file/--merge-file belong to --tokenizer-type GPT2BPETokenizer; "
                            f"{tokenizer_type} reads --tokenizer-model only")
        if path is not None:
            raise UserError("give either --tokenizer-model or --vocab-file + --merge-file, not both")
        if vocab_file is None or merge_file is None:
            raise UserError("GPT2BPETokenizer needs both --vocab-file and --merge-file (missing: "
                            f"{'--vocab-file' if vocab_file is None else '--merge-file'})")
        return GPT2BPETokenizer(vocab_file, merge_file, parse_special)
    if path is None:
        if tokenizer_type == "GPT2BPETokenizer":
            raise UserError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        raise UserError("no tokenizer given: pass --tokenizer-model PATH (or --tokenizer-type GPT2BPETokenizer "
                        "--vocab-file F --merge-file F)")
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer {p}: no such file or directory")
    if tokenizer_type == "auto":
        sp_model = p.suffix == ".model" or (p.is_dir() and not (p / "tokenizer.json").exists()
                                            and (p / "tokenizer.model").exists())
        megatron_gpt2_dir = p.is_dir() and not (p / "tokenizer.json").exists() and \
            (p / "gpt2-vocab.json").is_file() and (p / "gpt2-merges.txt").is_file()
        tokenizer_type = "SentencePieceTokenizer" if sp_model else \
            "GPT2BPETokenizer" if megatron_gpt2_dir or _is_gpt2_vocab_json(p) else "HuggingFaceTokenizer"
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(p / "tokenizer.model" if p.is_dir() else p)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(*_gpt2_files(p), parse_special)
    return HFTokenizer(p)


def tokenizer_from_identity(ident: dict[str, Any]) -> Tokenizer:
    """Reload the tokenizer a dataset sidecar's ``tokenizer`` entry describes."""
    if ident.get("type") == "NullTokenizer":
        args = ident.get("args") or {"vocab_size": int(ident["vocab_size"]), "eod_id": int(ident["eod"])}
        return NullTokenizer(int(args["vocab_size"]), args.get("eod_id"))
    if ident.get("type") == "GPT2BPETokenizer" and ident.get("merge_file"):
        return load_tokenizer(None, "GPT2BPETokenizer", vocab_file=ident.get("vocab_file") or ident.get("path"),
                              merge_file=ident["merge_file"],
                              gpt2_parse_special=bool(ident.get("parse_special_tokens")))
    if not ident.get("path"):
        raise UserError("the sidecar's tokenizer entry has no path")
    return load_tokenizer(ident["path"], ident.get("type", "auto"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON: {e}") from e


def _convert_with_transformers(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), use_fast=True).backend_tokenizer
    except Exception as e:  # noqa: BLE001
        raise UserError(f"tokenizer {path}: no tokenizer.json and transformers could not load it: {e}") from e


# --- training ------------------------------------------------------------------------------------

def _iter_training_texts(files_or_texts: Iterable[str | os.PathLike], json_keys: Sequence[str]) -> Iterable[str]:
    """Paths (any input kind `preprocess` reads, or .txt: one text per line) or raw strings."""
    for item in files_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096 and "\n" not in item
                                             and os.path.exists(item)):
            p = Path(item)
            if p.suffix == ".txt":
                with open(p, encoding="utf-8", errors="strict") as f:
                    yield from (line.rstrip("\n") for line in f)
            else:
                for doc in iter_documents([str(p)], json_keys):
                    yield from doc.texts.values()
        else:
            yield str(item)


def train_bpe(
    files_or_texts: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    json_keys: Sequence[str] = ("text",),
    model_max_length: int = 2048,
) -> Path:
    """Train a GPT-NeoX-style byte-level BPE; write ``out_dir/{tokenizer.json,tokenizer_config.json}``.

    Like GPT-NeoX's tokenizer: NFC normaliser, byte-level pre-tokenizer (GPT-2 regex, no prefix space),
    ``<|endoftext|>`` = id 0 (BOS/EOS/UNK, the EOD), ``<|padding|>`` = id 1.
    """
    from tokenizers import Tokenizer as _RustTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    n_special = 2
    if vocab_size < 256 + n_special:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs >= {256 + n_special}")
    tok = _RustTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_training_texts(files_or_texts, json_keys), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    })
    return out
