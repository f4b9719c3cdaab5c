"""Selection fixtures: a tiny locally trained BPE and small mixed-domain indexed datasets."""
from __future__ import annotations

import random

import numpy as np
import pytest

from megacpt.data.indexed import IndexedDatasetWriter, optimal_dtype, write_sidecar

FIN_SUBJ = ["The company", "Quarterly revenue", "Net income", "The bank", "Operating margin", "The board",
            "Shareholders", "The central bank", "Earnings per share", "The fund"]
FIN_VERB = ["rose", "fell", "increased", "declined", "was reported", "beat expectations", "missed forecasts"]
FIN_OBJ = ["by 5 percent in the third quarter", "after the interest rate decision", "on strong loan growth",
           "as bond yields climbed", "despite weaker guidance", "following the dividend announcement",
           "amid rising credit losses", "ahead of the earnings call"]
OFF_SUBJ = ["The striker", "My grandmother", "The orchestra", "A small dog", "The hikers", "The chef",
            "The volcano", "Our garden"]
OFF_VERB = ["scored", "baked", "played", "chased", "climbed", "tasted", "erupted", "bloomed"]
OFF_OBJ = ["a wonderful goal in the final minute", "fresh bread with rosemary", "a symphony by Mahler",
           "the ball across the park", "the rocky mountain trail", "the spicy tomato soup",
           "ash over the quiet village", "with tulips and roses in spring"]


def _sentence(rng, subj, verb, obj):
    return f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}."


def finance_text(rng: random.Random, n: int = 4) -> str:
    return " ".join(_sentence(rng, FIN_SUBJ, FIN_VERB, FIN_OBJ) for _ in range(n))


def offdomain_text(rng: random.Random, n: int = 4) -> str:
    return " ".join(_sentence(rng, OFF_SUBJ, OFF_VERB, OFF_OBJ) for _ in range(n))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from megacpt.data.tokenizer import train_bpe

    rng = random.Random(0)
    texts = [finance_text(rng) for _ in range(200)] + [offdomain_text(rng) for _ in range(200)]
    texts.append("0123456789 %$.,;:!?-()[] \n\t")
    return train_bpe(texts, 600, tmp_path_factory.mktemp("tok") / "tok")


def write_text_dataset(prefix, texts, tokenizer_dir, append_eod=True):
    """Megatron-style: one document per text, EOD appended, empty text -> a document with no sequence."""
    from megacpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    dtype = optimal_dtype(tok.vocab_size)
    with IndexedDatasetWriter(prefix, dtype) as w:
        for t in texts:
            ids = tok.encode(t)
            w.add_document([ids + [tok.eod]] if ids and append_eod else ([ids] if ids else []))
        n_docs, n_tok = w.n_documents, w.n_tokens
    write_sidecar(prefix, {"tokenizer": tok.identity(), "dtype": np.dtype(dtype).name, "num_documents": n_docs,
                           "num_sequences": n_docs, "num_tokens": n_tok})
    return str(prefix)


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory, tokenizer_dir):
    """40 documents: ids 0..19 finance, 20..39 off-domain, lengths varying; returns (prefix, texts, labels)."""
    rng = random.Random(1)
    texts, labels = [], []
    for i in range(40):
        fin = i < 20
        texts.append((finance_text if fin else offdomain_text)(rng, rng.randint(2, 8)))
        labels.append(fin)
    prefix = write_text_dataset(tmp_path_factory.mktemp("mixed") / "corpus", texts, tokenizer_dir)
    return prefix, texts, np.array(labels)


@pytest.fixture(scope="session")
def spacy_nlp():
    pytest.importorskip("spacy", reason="needs spaCy: pip install 'megacpt[select]'")
    from megacpt.errors import UserError
    from megacpt.selection.pos_entropy import load_spacy

    try:
        return load_spacy("auto")
    except UserError as e:
        if "fails to import" in str(e):  # installed but broken: a failure, never a skip
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm():
    """The real offline embedding model, loaded once; skipped (with the install command) when absent."""
    from megacpt.errors import UserError
    from megacpt.selection.similarity import SentenceTransformerEmbedder

    try:
        return SentenceTransformerEmbedder("auto", "cpu")
    except UserError as e:
        if "fails to import" in str(e):  # installed but broken: a failure, never a skip
            raise
        pytest.skip(str(e))


TASK_EXAMPLES = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "The company's net sales decreased by 3 percent compared with the previous fiscal year.",
    "Shares of the lender slumped after it reported higher loan-loss provisions.",
    "Gold prices climbed as investors sought safety after the Fed minutes.",
    "The bank expects its capital ratio to remain above regulatory requirements.",
]


@pytest.fixture()
def task_jsonl(tmp_path):
    import json

    p = tmp_path / "tasks.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in TASK_EXAMPLES))
    return str(p)
