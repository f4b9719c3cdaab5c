"""Data-test fixtures: one tiny byte-level BPE per session, small generated corpora."""
from __future__ import annotations

import json
import random

import pytest

WORDS = ("revenue profit loss quarter guidance dividend equity bond yield market stock shares growth "
         "inflation rate bank central policy the of and to in a is for on that with company reported "
         "analysts expected billion million percent year fiscal earnings per share net income").split()
EXTRA = ["café", "naïve", "Zürich", "€", "日本", "—", "“quoted”", "e\u0301", "  ", "\t", "\n\n", "1,234.56",
         "<|endoftext|>", "don't", "I'm", "😀"]


def make_texts(n: int, seed: int = 0, max_words: int = 80) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(0, max_words)
        parts = [rng.choice(WORDS) if rng.random() > 0.08 else rng.choice(EXTRA) for _ in range(k)]
        out.append(" ".join(parts).capitalize() + ("." if k else ""))
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=bool(hash(str(r)) % 2)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from megacpt.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    train_bpe(make_texts(400, seed=1) + EXTRA, 600, out, min_frequency=1)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from megacpt.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


SP_VOCAB = 120


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """One tiny SentencePiece BPE model (vocab SP_VOCAB) per session: its .model path."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "c.txt"
    corpus.write_text("\n".join(make_texts(300, seed=3)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=SP_VOCAB,
                                   model_type="bpe", minloglevel=2)
    return d / "sp.model"
