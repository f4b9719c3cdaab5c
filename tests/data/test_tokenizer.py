from __future__ import annotations

import pytest

from megacpt.data.tokenizer import EOD_TOKEN, load_tokenizer, train_bpe
from megacpt.errors import UserError
from tests.data.conftest import SP_VOCAB, make_texts


def test_trained_tokenizer_matches_transformers(tiny_tokenizer, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = make_texts(50, seed=7) + ["a<|endoftext|>b", " ", "", "\u00e9 e\u0301"]
    for t in texts:
        assert tiny_tokenizer.encode(t) == hf(t).input_ids
    assert tiny_tokenizer.encode_batch(texts) == [hf(t).input_ids for t in texts]
    assert tiny_tokenizer.vocab_size == len(hf)
    assert tiny_tokenizer.eod == hf.eos_token_id == hf.convert_tokens_to_ids(EOD_TOKEN) == 0


def test_special_token_parsed_and_roundtrip(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x<|endoftext|>y")
    assert tiny_tokenizer.eod in ids
    assert tiny_tokenizer.decode(ids) == "x<|endoftext|>y"
    assert tiny_tokenizer.encode("") == []


def test_identity(tiny_tokenizer, tiny_tokenizer_dir):
    ident = tiny_tokenizer.identity()
    assert ident["type"] == "HuggingFaceTokenizer" and ident["eod"] == 0
    assert ident["vocab_size"] == tiny_tokenizer.vocab_size
    assert set(ident["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    assert load_tokenizer(tiny_tokenizer_dir + "/tokenizer.json").identity()["files"].keys() == {"tokenizer.json"}


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(UserError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path, "GPT2Tokenizer")
    with pytest.raises(UserError, match="no vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path, "GPT2BPETokenizer")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid HF tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="too small"):
        train_bpe(["x"], 100, tmp_path / "t")


def test_sentencepiece(sp_model):
    import sentencepiece as spm

    tok = load_tokenizer(sp_model)
    assert tok.type == "SentencePieceTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    t = "the market rose"
    assert tok.encode(t) == sp.encode_as_ids(t) and tok.eod == sp.eos_id()
    assert tok.decode(tok.encode(t)) == t and tok.vocab_size == SP_VOCAB


def test_cli_train(tmp_path):
    from megacpt.cli import main

    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_texts(100)))
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    assert load_tokenizer(tmp_path / "t").vocab_size <= 300
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t2")]) == 2
