"""The tiktoken fast path must give exactly HF tokenizers' ids: checked on real text (Python's own
sources and docs: English prose, code, numbers, some non-ASCII) and on adversarial strings."""
from __future__ import annotations

import glob
import random
import sysconfig

import pytest

pytest.importorskip("tiktoken")

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
