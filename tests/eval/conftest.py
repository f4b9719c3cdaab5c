"""Tiny model + tokenizer for the eval tests (random weights, tokenizer trained here on invented text)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Invented sentences (not from any real data set) used to train the test tokenizer.
CORPUS = [
    "Profits rose sharply at the company this quarter, and the outlook is positive.",
    "Shares fell after the bank cut its forecast; analysts were negative.",
    "Revenue was flat and the board kept the dividend unchanged, a neutral result.",
    "Gold prices climbed on Monday as the dollar weakened.",
    "The agreement between Acme Holdings and Jane Doe was signed in London.",
    "Does the news headline talk about price going up? Yes. No.",
    "Sentence: Entities: person organization location miscellaneous none",
]


def _train_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|padding|>")
    fast.save_pretrained(str(out))
    return out


def save_tiny_model(out: Path, tok_dir: Path, seed: int = 0, padded_vocab: int = 384, max_pos: int = 512) -> Path:
    """A 2-layer GPT-NeoX (HF layout) with the test tokenizer copied beside it."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=padded_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_pos, rotary_pct=0.25)
    GPTNeoXForCausalLM(cfg).save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), tok_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
