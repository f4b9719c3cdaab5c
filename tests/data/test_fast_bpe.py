"""The tiktoken fast path must give exactly HF tokenizers' ids: checked on real text (Python's own
sources and docs: English prose, code, numbers, some non-ASCII) and on adversarial strings."""
from __future__ import annotations

import glob
import random
import sysconfig

import pytest


from megacpt.data.fast_bpe import FastBPE  # noqa: E402
from megacpt.data.tokenizer import load_tokenizer, train_bpe  # noqa: E402
from tests.data.conftest import EXTRA, make_texts  # noqa: E402


def real_texts(max_chars: int, seed: int = 0) -> list[str]:
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))
    random.Random(seed).shuffle(files)
    out, n = [], 0
    for f in files:
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        # documents of realistic size: split files into ~2k-char pieces
        out += [t[i : i + 2000] for i in range(0, len(t), 2000)]
        n += len(t)
        if n >= max_chars:
            break
    return out


@pytest.fixture(scope="module")
def real_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("realtok")
    train_bpe(real_texts(1_500_000, seed=1), 3000, d)
    return load_tokenizer(d)


ADVERSARIAL = EXTRA + [
    "", " ", "  ", "\n", "a" * 1000, "'s'S'll'LL 're", "x<|endoftext|><|padding|>y<|endoftext", "<|endoftext|>",
    "\u00e9\u0065\u0301", "ﬁ ligature ①②", "\u200b zero\u200dwidth", "مرحبا بالعالم", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "1234567890" * 20,
    "tab\t\tsep\t", "\r\n\r\nCRLF", "🏳️‍🌈 emoji ZWJ", "mixed  \t \n  whitespace   ",
]


def test_fast_path_equals_hf_on_real_text(real_tok):
    fast, why = FastBPE.build(real_tok)
    assert fast is not None, why
    texts = real_texts(600_000, seed=2) + ADVERSARIAL + make_texts(200, seed=3)
    ids, fallbacks = fast.encode_batch_arrays(texts)
    ref = real_tok.encode_batch(texts)
    bad = [k for k, (a, b) in enumerate(zip(ids, ref)) if a.tolist() != b]
    assert not bad, f"{len(bad)} texts differ, first: {texts[bad[0]][:200]!r}"
    assert fallbacks >= 1  # the non-NFC strings went to HF


def test_added_whitespace_tokens_like_gpt_neox(real_tok, tmp_path):
    """GPT-NeoX's tokenizer has normalised added tokens for runs of spaces and tabs."""
    from tokenizers import AddedToken

    tok = load_tokenizer(real_tok.path)
    tok.backend.add_tokens([AddedToken(" " * k, normalized=True) for k in (2, 3, 4, 8, 16)]
                           + [AddedToken("\t" * k, normalized=True) for k in (2, 4)])
    fast, why = FastBPE.build(tok)
    assert fast is not None, why
    texts = real_texts(200_000, seed=4) + ADVERSARIAL
    ids, _ = fast.encode_batch_arrays(texts)
    assert [a.tolist() for a in ids] == tok.encode_batch(texts)


def test_unsupported_pipelines_fall_back(real_tok):
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    tok = load_tokenizer(real_tok.path)
    tok.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert FastBPE.build(tok)[0] is None
    tok = load_tokenizer(real_tok.path)
    tok.backend.normalizer = normalizers.Lowercase()
    assert FastBPE.build(tok)[0] is None
    tok = load_tokenizer(real_tok.path)
    tok.backend.add_tokens([AddedToken("xyz", lstrip=True)])
    assert "lstrip" in FastBPE.build(tok)[1]


def test_preprocess_says_once_why_the_fast_path_is_not_used(tmp_path, tiny_tokenizer_dir, capfd):
    """A tokenizer the exact fast path cannot reproduce (here: a lowercasing normaliser) is tokenized by HF
    tokenizers, and preprocess says so once, with the reason, instead of silently running ~3x slower."""
    import json
    import shutil

    from megacpt.data.preprocess import PreprocessConfig, preprocess
    from tests.data.conftest import make_texts, write_jsonl

    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(30, seed=4)])
    for name, tok_dir in (("slow", tok), ("fast", tiny_tokenizer_dir)):
        metas = preprocess(PreprocessConfig(inputs=[src], output_prefix=str(tmp_path / name),
                                            tokenizer_model=str(tok_dir), workers=2, progress=False))
        err = capfd.readouterr().err
        notices = [ln for ln in err.splitlines() if "fast BPE path is not used" in ln]
        if name == "slow":
            assert len(notices) == 1 and "not plain byte-level BPE" in notices[0], err
            assert next(iter(metas.values()))["tokenizer_path"].startswith("HF tokenizers (")
        else:
            assert notices == [] and next(iter(metas.values()))["tokenizer_path"].startswith("tiktoken")
