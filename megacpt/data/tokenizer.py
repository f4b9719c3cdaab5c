"""Tokenizers behind one small interface, plus local byte-level BPE training (GPT-NeoX style).

`load_tokenizer(path)` accepts an HF tokenizer dir (with tokenizer.json), a tokenizer.json file, or a
sentencepiece ``.model``. Semantics follow what Megatron-LM's preprocessing calls:

- HuggingFaceTokenizer: ``encode(text)`` = HF ``tokenizer(text).input_ids`` for tokenizers whose
  post-processor adds nothing (GPT-NeoX/Pythia, and every tokenizer `train_bpe` writes): special tokens
  written in the text (``<|endoftext|>``) are parsed, no BOS/EOS is added. ``vocab_size`` counts added
  tokens (= ``len(AutoTokenizer)``); ``eod`` is the ``eos_token`` of tokenizer_config.json, else the id of
  ``<|endoftext|>``.
- SentencePieceTokenizer: Megatron's ``GPTSentencePieceTokenizer``: ``encode_as_ids``, eod = eos id.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from megacpt.errors import UserError
from megacpt.io import atomic_path, sha256_file, write_json_atomic

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
TOKENIZER_TYPES = ("auto", "HuggingFaceTokenizer", "SentencePieceTokenizer")


class Tokenizer:
    """Common interface; subclasses set ``type``, ``path``, ``files``, ``vocab_size``, ``eod``."""

    type: str
    path: str
    files: list[Path]
    vocab_size: int
    eod: int

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
        import sentencepiece as spm

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


def load_tokenizer(path: str | os.PathLike, tokenizer_type: str = "auto") -> Tokenizer:
    """HF dir / tokenizer.json -> HFTokenizer; ``.model`` -> SentencePieceTokenizer (or as ``tokenizer_type`` says)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer {p}: no such file or directory")
    if tokenizer_type == "auto":
        sp_model = p.suffix == ".model" or (p.is_dir() and not (p / "tokenizer.json").exists()
                                            and (p / "tokenizer.model").exists())
        tokenizer_type = "SentencePieceTokenizer" if sp_model else "HuggingFaceTokenizer"
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(p / "tokenizer.model" if p.is_dir() else p)
    return HFTokenizer(p)


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
    from megacpt.data.readers import iter_documents

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
