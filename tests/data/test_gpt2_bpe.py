"""GPT2BPETokenizer (Megatron's ``--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file``).

References: an independent pure-Python copy of the original GPT-2 algorithm (``gpt2_reference`` below:
regex split, byte->unicode map, lowest-rank-pair BPE, ``encoder.get(token, 0)``), and, when a Megatron-LM
git mirror is on this machine, Megatron's own legacy ``gpt2_tokenization.py``. Preprocess output is
compared with megatron-core's ``IndexedDatasetBuilder`` fed with the reference ids.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, read_sidecar
from megacpt.data.preprocess import PreprocessConfig, preprocess
from megacpt.data.tokenizer import EOD_TOKEN, GPT2BPETokenizer, load_tokenizer, tokenizer_from_identity
from megacpt.errors import UserError
from tests import megatron_lm
from tests.conftest import requires_megatron
from tests.data.conftest import EXTRA, make_texts, write_jsonl

regex = pytest.importorskip("regex")

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

HARD = [
    "", " ", "  ", "\n", "\n\n\n", "\t \t", "   leading and trailing   ", "a  b   c    d",
    "don't can't I'm you're we've they'll he'd it's", "DON'T I'M YOU'RE 'S 'Ll", "''s 's's",
    "naïve café Zürich — “quoted” ‘single’ … 日本語のテキスト 한국어 ελληνικά русский 😀👍🏽",
    "e\u0301 vs \u00e9 (not normalised)", "x<|endoftext|>y <|endoftext|>", "1,234.56 $12.5% 3rd 2024-11-26",
    "\r\n\r\nline\r\n", "\u00a0nbsp\u2003em space\u3000ideographic", "tab\tsep\tvalues\t\t", "a" * 300,
    "mixed123abc456 ١٢٣ ٤٥", "\x00\x01\x1f control", "emoji🧑‍🚀 flags 🇩🇪 zwj",
]


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class gpt2_reference:
    """The original GPT-2 encoder (OpenAI encoder.py / Megatron gpt2_tokenization.py), rewritten here."""

    def __init__(self, vocab_file, merges_file):
        self.encoder = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(m.split()): r for r, m in enumerate(lines)}
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(GPT2_PAT)

    def bpe(self, token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pat.findall(text):
            s = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder.get(t, 0) for t in self.bpe(s))
        return ids


def write_gpt2_files(out: Path, texts, vocab_size: int, eod: bool = True) -> tuple[Path, Path]:
    """Train a byte-level BPE with HF tokenizers; save it in GPT-2's format (EOD last, as GPT-2's 50256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out), "gpt2")  # gpt2-vocab.json, gpt2-merges.txt: Megatron's file names
    vocab_path, merges_path = out / "gpt2-vocab.json", out / "gpt2-merges.txt"
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    if eod:
        vocab[EOD_TOKEN] = len(vocab)
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return vocab_path, merges_path


def corpus_texts(n: int, seed: int) -> list[str]:
    return make_texts(n, seed=seed) + EXTRA + HARD


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    return write_gpt2_files(tmp_path_factory.mktemp("gpt2"), corpus_texts(400, 1), 900)


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_files):
    return load_tokenizer(None, "GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])


def random_unicode(n: int, seed: int) -> list[str]:
    """Strings over letters, marks, digits, punctuation and spaces from every plane's assigned blocks."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF), (0x1100, 0x11FF),
              (0x1E00, 0x1FFF), (0x2000, 0x206F), (0x2190, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x4E80),
              (0xAC00, 0xAC80), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x10000, 0x1007F), (0x1D400, 0x1D7FF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() > 0.25 else rng.choice(" \t\n'’-.,0"))
        out.append("".join(chars))
    return out


def test_ids_equal_original_gpt2_algorithm(gpt2_files, gpt2_tok):
    from megacpt.data.encoder import build_encoder

    ref = gpt2_reference(*gpt2_files)
    texts = corpus_texts(150, 7) + random_unicode(150, 3)
    expected = [ref.encode(t) for t in texts]
    assert [gpt2_tok.encode(t) for t in texts] == expected
    assert gpt2_tok.encode_batch(texts) == expected
    fast = build_encoder(None, vocab_file=str(gpt2_files[0]), merge_file=str(gpt2_files[1]))
    assert fast.fast is not None, fast.fast_status  # the tiktoken path applies to GPT-2 files
    assert [a.tolist() for a in fast.encode_texts(texts)] == expected
    # no special-token parsing: the literal EOD text is ordinary text, as in Megatron's _GPT2BPETokenizer
    assert gpt2_tok.eod not in gpt2_tok.encode("a<|endoftext|>b")
    assert gpt2_tok.vocab_size == len(ref.encoder) and gpt2_tok.eod == ref.encoder[EOD_TOKEN]


def test_decode_and_identity(gpt2_files, gpt2_tok):
    for t in HARD:
        assert gpt2_tok.decode(gpt2_tok.encode(t)) == t
    # GPT-2 decodes invalid UTF-8 with errors='replace'
    byte_e9 = gpt2_tok.token_to_id(bytes_to_unicode()[0xE9])
    assert gpt2_tok.decode([byte_e9]) == "\ufffd"
    ident = gpt2_tok.identity()
    assert ident["type"] == "GPT2BPETokenizer" and set(ident["files"]) == {"gpt2-vocab.json", "gpt2-merges.txt"}
    assert ident["vocab_file"] == str(gpt2_files[0].resolve()) and ident["merge_file"] == str(gpt2_files[1].resolve())
    again = tokenizer_from_identity(ident)
    assert again.identity() == ident
    # the single path other commands store/take: the vocab file, merges found beside it; or the folder
    assert load_tokenizer(ident["path"]).identity() == ident
    assert load_tokenizer(gpt2_files[0].parent, "GPT2BPETokenizer").identity() == ident
    assert load_tokenizer(gpt2_files[0].parent).identity() == ident  # Megatron's gpt2-*.{json,txt} names


def test_parse_special_matches_transformers_gpt2_tokenizer(gpt2_files, gpt2_tok):
    """Megatron-LM's tokenizer system since Sept 2025 builds GPT2BPETokenizer as HF's GPT-2 tokenizer, which
    splits <|endoftext|> out of the text: ``--gpt2-parse-special-tokens`` gives its ids (fast path included)."""
    from transformers import GPT2Tokenizer

    from megacpt.data.encoder import build_encoder

    hf = GPT2Tokenizer(vocab=str(gpt2_files[0]), merges=str(gpt2_files[1]))
    texts = corpus_texts(60, 11) + ["<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> <|endoftext|><|endoftext|>x"]
    expected = [hf(t).input_ids for t in texts]
    enc = build_encoder(None, vocab_file=str(gpt2_files[0]), merge_file=str(gpt2_files[1]), gpt2_parse_special=True)
    assert enc.fast is not None, enc.fast_status
    assert [a.tolist() for a in enc.encode_texts(texts)] == expected
    assert enc.tokenizer.encode_batch(texts) == expected
    assert enc.tokenizer.vocab_size == gpt2_tok.vocab_size and enc.tokenizer.identity()["parse_special_tokens"]
    assert tokenizer_from_identity(enc.tokenizer.identity()).encode("a<|endoftext|>") == hf("a<|endoftext|>").input_ids
    # texts without the literal token: both modes agree
    plain = [t for t in texts if EOD_TOKEN not in t]
    assert [gpt2_tok.encode(t) for t in plain] == [hf(t).input_ids for t in plain]


# Megatron-LM's last commit with the legacy tokenizers (the parent of #2946 "fully remove legacy tokenizer
# system"); its preprocess_data.py takes --legacy-tokenizer. Read from $MEGATRON_LM_DIR (tests/megatron_lm.py).
MEGATRON_COMMIT = "4ff7686c144fcd3f6ac130e5a97f86a0b8aa4dd5"


def megatron_show(path: str) -> bytes:
    return megatron_lm.show(MEGATRON_COMMIT, path)


def megatron_gpt2_module(tmp_path):
    """Megatron-LM's legacy gpt2_tokenization.py (removed upstream in #2946)."""
    path = tmp_path / "megatron_gpt2_tokenization.py"
    path.write_bytes(megatron_show("megatron/training/tokenizer/gpt2_tokenization.py"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("megatron_gpt2_tokenization", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ids_equal_megatron_legacy_tokenizer(tmp_path, gpt2_files, gpt2_tok):
    mod = megatron_gpt2_module(tmp_path)
    meg = mod.GPT2Tokenizer(str(gpt2_files[0]), str(gpt2_files[1]), errors="replace", special_tokens=[], max_len=None)
    texts = corpus_texts(100, 5) + random_unicode(100, 9)
    assert [gpt2_tok.encode(t) for t in texts] == [meg.encode(t) for t in texts]
    assert gpt2_tok.eod == meg.encoder[EOD_TOKEN] and gpt2_tok.vocab_size == len(meg.encoder)


def megatron_builder_reference(recs, ref, eod, append_eod, prefix, vocab_size):
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for r in recs:
        ids = ref.encode(r["text"])
        lens = [len(ids)] if ids else []
        if ids and append_eod:
            ids.append(eod)
            lens[-1] += 1
        builder.add_document(torch.tensor(ids, dtype=torch.int64), lens)
    builder.finalize(prefix + ".idx")


@requires_megatron
def test_preprocess_megatron_flags_byte_identical(tmp_path, gpt2_files, gpt2_tok):
    texts = corpus_texts(200, 13)
    texts[2] = ""  # an empty document: kept with zero sequences
    recs = [{"text": t} for t in texts]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = str(tmp_path / "out")
    assert main(["preprocess", "--input", src, "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", str(gpt2_files[0]), "--merge-file", str(gpt2_files[1]), "--append-eod",
                 "--workers", "2", "--quiet"]) == 0
    ref_prefix = str(tmp_path / "ref")
    megatron_builder_reference(recs, gpt2_reference(*gpt2_files), gpt2_tok.eod, True, ref_prefix, gpt2_tok.vocab_size)
    for ext in (".bin", ".idx"):
        assert Path(out + "_text_document" + ext).read_bytes() == Path(ref_prefix + ext).read_bytes(), ext
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    ds = MegatronIndexed(out + "_text_document")
    assert len(ds.document_indices) == len(recs) + 1 and ds[0].tolist()[-1] == gpt2_tok.eod
    meta = read_sidecar(out + "_text_document")
    assert meta["tokenizer"] == gpt2_tok.identity() and meta["dtype"] == "uint16"
    # the slow path (no tiktoken) writes the same bytes
    preprocess(PreprocessConfig(inputs=[src], output_prefix=str(tmp_path / "slow"), vocab_file=str(gpt2_files[0]),
                                merge_file=str(gpt2_files[1]), append_eod=True, fast=False, workers=0,
                                progress=False))
    assert Path(str(tmp_path / "slow_text_document.bin")).read_bytes() == Path(ref_prefix + ".bin").read_bytes()


def test_inspect_decodes_with_the_sidecar_tokenizer(tmp_path, gpt2_files, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "naïve café rose 12%"}, {"text": "don't"}])
    out = str(tmp_path / "o")
    assert main(["preprocess", "--input", src, "--output-prefix", out, "--vocab-file", str(gpt2_files[0]),
                 "--merge-file", str(gpt2_files[1]), "--workers", "0", "--quiet"]) == 0
    assert IndexedDataset(out + "_text_document").num_documents == 2
    assert main(["inspect", out + "_text_document", "--num-docs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "naïve café rose 12%" in printed and "don't" in printed


def run_cli(tmp_path, *flags) -> int:
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    rc = main(["preprocess", "--input", src, "--output-prefix", str(tmp_path / "o"), "--workers", "0",
               "--quiet", *flags])
    return rc


@pytest.mark.parametrize("flags, msg", [
    (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file and --merge-file"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{v}"], "missing: --merge-file"),
    (["--merge-file", "{m}"], "missing: --vocab-file"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--vocab-file", "{v}", "--merge-file", "{m}"],
     "belong to --tokenizer-type GPT2BPETokenizer"),
    (["--tokenizer-model", "{v}", "--vocab-file", "{v}", "--merge-file", "{m}"], "not both"),
    ([], "no tokenizer given"),
    (["--vocab-file", "{v}", "--merge-file", "{m}", "--split-sentences"], "punkt"),
    (["--vocab-file", "{v}", "--merge-file", "{m}", "--keep-newlines"], "only apply to --split-sentences"),
    (["--tokenizer-model", "{d}", "--gpt2-parse-special-tokens"], "applies to GPT2BPETokenizer only"),
])
def test_inconsistent_flags(tmp_path, gpt2_files, tiny_tokenizer_dir, capsys, flags, msg):
    flags = [f.format(v=gpt2_files[0], m=gpt2_files[1], d=tiny_tokenizer_dir) for f in flags]
    assert run_cli(tmp_path, *flags) == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("o_*"))


def test_vocab_without_eod(tmp_path):
    v, m = write_gpt2_files(tmp_path / "t", make_texts(50, seed=2), 300, eod=False)
    tok = GPT2BPETokenizer(v, m)
    assert tok.eod is None and tok.encode("the market") == gpt2_reference(v, m).encode("the market")
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": "the market"}])
    base = ["preprocess", "--input", src, "--vocab-file", str(v), "--merge-file", str(m), "--workers", "0", "--quiet"]
    with pytest.raises(UserError, match=f"--append-eod needs an end-of-document token.*no {EOD_TOKEN}"):
        preprocess(PreprocessConfig(inputs=[src], output_prefix=str(tmp_path / "e"), vocab_file=str(v),
                                    merge_file=str(m), append_eod=True, workers=0, progress=False))
    assert main(base + ["--output-prefix", str(tmp_path / "ok")]) == 0
    with pytest.raises(UserError, match="--gpt2-parse-special-tokens needs an end-of-document token"):
        GPT2BPETokenizer(v, m, parse_special=True)


def _bad_vocab(tmp_path, gpt2_files, text: str) -> Path:
    p = tmp_path / "bad-vocab.json"
    p.write_text(text, encoding="utf-8")
    return p


def _bad_merges(tmp_path, text: str) -> Path:
    p = tmp_path / "bad-merges.txt"
    p.write_bytes(text.encode("utf-8"))
    return p


def test_bad_vocab_files(tmp_path, gpt2_files):
    v, m = gpt2_files
    vocab = json.loads(v.read_text(encoding="utf-8"))

    def err(text):
        with pytest.raises(UserError) as e:
            GPT2BPETokenizer(_bad_vocab(tmp_path, gpt2_files, text), m)
        return str(e.value)

    assert "no such file" in str(pytest.raises(UserError, GPT2BPETokenizer, tmp_path / "nope.json", m).value)
    assert "bad-vocab.json:2:" in err('{"a": 0,\n  "b" 1}') and "invalid JSON" in err("{")
    assert "expected a non-empty JSON object" in err("[1, 2]")
    assert "HF tokenizer.json" in err('{"version": "1.0", "model": {"type": "BPE"}}')
    assert "has id -1" in err(json.dumps({**vocab, "zz": -1}))
    assert "expected an integer in" in err(json.dumps({**vocab, "zz": len(vocab) + 5}))
    dup = dict(vocab)
    dup["zz"] = dup.pop(EOD_TOKEN)
    dup["yy"] = dup["zz"]
    assert "share id" in err(json.dumps(dup))
    nobyte = {t: i for t, i in vocab.items() if t != "Ġ"}
    nobyte["zzz"] = vocab["Ġ"]
    assert "byte-level tokens are missing" in err(json.dumps(nobyte))
    (tmp_path / "latin1-vocab.json").write_bytes(b'{"\xe9": 0}')
    assert "not UTF-8" in str(pytest.raises(UserError, GPT2BPETokenizer, tmp_path / "latin1-vocab.json", m).value)


def test_bad_merges_files(tmp_path, gpt2_files):
    v, m = gpt2_files
    lines = m.read_text(encoding="utf-8").split("\n")  # ["#version..", merges..., ""]

    def err(text):
        with pytest.raises(UserError) as e:
            GPT2BPETokenizer(v, _bad_merges(tmp_path, text))
        return str(e.value)

    assert "no such file" in str(pytest.raises(UserError, GPT2BPETokenizer, v, tmp_path / "nope.txt").value)
    assert "bad-merges.txt:1: expected a '#version" in err("\n".join(lines[1:]))
    assert f"bad-merges.txt:{len(lines) - 1}: no newline at the end" in err("\n".join(lines[:-1]))
    assert "bad-merges.txt:3: expected two space-separated tokens" in err("\n".join(lines[:2] + ["a b c"] + lines[2:]))
    assert "bad-merges.txt:3: merge" in err("\n".join(lines[:2] + [lines[1]] + lines[2:])) and "repeats line 2" in \
        err("\n".join(lines[:2] + [lines[1]] + lines[2:]))
    last = lines[-2].split()
    made_late = last[0] + last[1]
    assert "neither a byte-level character nor made by an earlier merge" in \
        err("\n".join([lines[0], f"{made_late} Ġ"] + lines[1:]))
    assert made_late + made_late not in json.loads(v.read_text(encoding="utf-8"))
    assert "is not in --vocab-file" in err("\n".join(lines[:-1] + [f"{made_late} {made_late}", ""]))
    assert "not UTF-8" in str(pytest.raises(UserError, GPT2BPETokenizer, v, _bad_merges_bytes(tmp_path)).value)
    # blank lines are harmless in Megatron's reader (an empty tuple never matches): accepted
    ok = GPT2BPETokenizer(v, _bad_merges(tmp_path, "\n".join(lines[:3] + [""] + lines[3:])))
    assert ok.encode("the market") == load_tokenizer(v).encode("the market")


def _bad_merges_bytes(tmp_path) -> Path:
    p = tmp_path / "latin1-merges.txt"
    p.write_bytes(b"#version: 0.2\n\xe9 a\n")
    return p


def test_tools_script_megatron_invocation(tmp_path, gpt2_files):
    """The classic Megatron command line, verbatim, through tools/preprocess_data.py."""
    src = write_jsonl(tmp_path / "X.jsonl", [{"text": t} for t in make_texts(20, seed=4)])
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "tools" / "preprocess_data.py"), "--input", src,
                        "--output-prefix", str(tmp_path / "P"), "--tokenizer-type", "GPT2BPETokenizer",
                        "--vocab-file", str(gpt2_files[0]), "--merge-file", str(gpt2_files[1]), "--append-eod",
                        "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "P_text_document"))
    assert ds.num_documents == 20
    ref = gpt2_reference(*gpt2_files)
    eod = json.loads(gpt2_files[0].read_text(encoding="utf-8"))[EOD_TOKEN]
    for d, t in enumerate(make_texts(20, seed=4)):
        ids = ref.encode(t)
        assert ds.document(d).tolist() == (ids + [eod] if ids else [])
    assert np.dtype(ds.dtype) == np.uint16


@pytest.fixture(scope="module")
def megatron_tree(tmp_path_factory):
    """Megatron-LM's tools/preprocess_data.py + megatron/ at MEGATRON_COMMIT (skipped without $MEGATRON_LM_DIR)."""
    return megatron_lm.extract(MEGATRON_COMMIT, ["tools/preprocess_data.py", "megatron"],
                               tmp_path_factory.mktemp("megatron-lm"))


def fake_gpt2_hub_cache(root: Path, vocab: Path, merges: Path) -> Path:
    """An offline HF cache whose "gpt2" repo is the tokenizer of these files (the hub's is GPT-2's own)."""
    from transformers import GPT2Tokenizer

    rev = "0" * 40
    snap = root / "models--gpt2" / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "models--gpt2" / "refs").mkdir()
    (root / "models--gpt2" / "refs" / "main").write_text(rev)
    GPT2Tokenizer(vocab=str(vocab), merges=str(merges)).save_pretrained(str(snap))
    (snap / "config.json").write_text('{"model_type": "gpt2"}')
    return root


@requires_megatron
@pytest.mark.parametrize("system", ["legacy", "new"])
def test_side_by_side_with_megatron_preprocess_data(tmp_path, gpt2_files, megatron_tree, system):
    """Megatron-LM's own tools/preprocess_data.py and ours write identical bytes. ``legacy``:
    ``--legacy-tokenizer`` (the classic _GPT2BPETokenizer) vs our default; ``new``: its default tokenizer
    system (HF AutoTokenizer("gpt2", ...), served from an offline cache) vs ``--gpt2-parse-special-tokens``."""
    texts = corpus_texts(300, 17) + random_unicode(100, 19)
    texts[1] = ""
    assert any(EOD_TOKEN in t for t in texts)  # the one place the two systems differ is exercised
    src = write_jsonl(tmp_path / "X.jsonl", [{"text": t} for t in texts])
    flags = ["--input", src, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_files[0]),
             "--merge-file", str(gpt2_files[1]), "--append-eod", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(megatron_tree), "HF_HUB_OFFLINE": "1"}
    if system == "new":
        env["HF_HUB_CACHE"] = str(fake_gpt2_hub_cache(tmp_path / "hf", *gpt2_files))
    r = subprocess.run([sys.executable, str(megatron_tree / "tools" / "preprocess_data.py"), *flags,
                        "--output-prefix", str(tmp_path / "meg")] + (["--legacy-tokenizer"] if system == "legacy" else []),
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "ModuleNotFoundError" in r.stderr:
        pytest.skip(f"Megatron-LM's tools need a module not installed here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = flags + (["--gpt2-parse-special-tokens"] if system == "new" else [])
    assert main(["preprocess", *ours, "--output-prefix", str(tmp_path / "ours"), "--quiet"]) == 0
    for ext in (".bin", ".idx"):
        meg = (tmp_path / f"meg_text_document{ext}").read_bytes()
        assert (tmp_path / f"ours_text_document{ext}").read_bytes() == meg, ext
