"""``--tokenizer-type NullTokenizer``: text that is already token ids, byte-identical to Megatron's tool.

Default convention = megatron-core 0.16 (the pinned release): ``--vocab-size N`` -> ids 0..N-1, EOD N, a
vocabulary of N + 1. ``--null-tokenizer-eod-id E`` -> Megatron-LM main's: a vocabulary of N, EOD E.
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, read_sidecar
from megacpt.data.tokenizer import NullTokenizer, load_tokenizer, tokenizer_from_identity
from megacpt.errors import InputError, UserError
from tests import megatron_lm
from tests.conftest import requires_megatron
from tests.data.conftest import write_jsonl


def id_records(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(str(rng.randrange(vocab)) for _ in range(rng.randint(1, 40))), "n": str(i)}
            for i in range(n)]


def builder_reference(prefix: str, docs: list[list[int]], eod: int | None, vocab_size: int) -> None:
    """What Megatron's preprocess_data.py writes: megatron-core's builder, one sequence per document."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for ids in docs:
        ids = list(ids) + ([eod] if eod is not None and ids else [])
        b.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)] if ids else [])
    b.finalize(prefix + ".idx")


def same_files(a: str, b: str) -> bool:
    return all(Path(a + e).read_bytes() == Path(b + e).read_bytes() for e in (".bin", ".idx"))


@requires_megatron
@pytest.mark.parametrize("vocab", [50000, 65499, 70000])  # uint16 / int32 at Megatron's 65,500 boundary
def test_byte_identical_to_megatron_core_null_tokenizer(tmp_path, vocab):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MegatronNull

    ref_tok = MegatronNull(vocab)
    recs = id_records(120, vocab, seed=vocab)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = str(tmp_path / "o")
    assert main(["preprocess", "--input", src, "--output-prefix", out, "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", str(vocab), "--append-eod", "--json-keys", "text", "n", "--workers", "2",
                 "--quiet"]) == 0
    for key in ("text", "n"):
        ref = str(tmp_path / f"ref_{key}")
        builder_reference(ref, [ref_tok.text_to_ids(r[key]) for r in recs], ref_tok.eod, ref_tok.vocab_size)
        assert same_files(f"{out}_{key}_document", ref), key
    meta = read_sidecar(out + "_text_document")
    assert meta["tokenizer"]["vocab_size"] == vocab + 1 == ref_tok.vocab_size
    assert meta["tokenizer"]["eod"] == vocab == ref_tok.eod
    assert meta["dtype"] == ("uint16" if vocab + 1 < 65500 else "int32")


@requires_megatron
def test_megatron_lm_main_convention(tmp_path):
    """Megatron-LM main (#4057): vocabulary N, EOD N-1 by default -> ``--null-tokenizer-eod-id N-1``."""
    vocab = 65500  # main counts N ids: int32 at 65,500, uint16 at 65,499 (the 0.16 convention: int32 for both)
    for n in (vocab, vocab - 1):
        recs = id_records(50, n, seed=n)
        src = write_jsonl(tmp_path / f"in{n}.jsonl", recs)
        out = str(tmp_path / f"o{n}")
        assert main(["preprocess", "--input", src, "--output-prefix", out, "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", str(n), "--null-tokenizer-eod-id", str(n - 1), "--append-eod",
                     "--workers", "0", "--quiet"]) == 0
        ref = str(tmp_path / f"ref{n}")
        builder_reference(ref, [[int(x) for x in r["text"].split(" ")] for r in recs], n - 1, n)
        assert same_files(out + "_text_document", ref)
    assert IndexedDataset(str(tmp_path / f"o{vocab - 1}") + "_text_document").dtype == np.uint16  # 65,499 ids


def test_whitespace_empty_documents_and_bad_records(tmp_path):
    recs = [{"text": "5 6\t7\n 8 "}, {"text": ""}, {"text": "1 x 2"}, {"text": "3 100"}, {"text": "-1"},
            {"text": "٣"}, {"text": "4"}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    base = ["preprocess", "--input", src, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
            "--workers", "1", "--quiet", "--append-eod"]
    with pytest.raises(InputError, match=r"in\.jsonl:3.*'x' is not a token id"):
        from megacpt.data.preprocess import PreprocessConfig, preprocess

        preprocess(PreprocessConfig(inputs=[src], output_prefix=str(tmp_path / "e"), tokenizer_type="NullTokenizer",
                                    vocab_size=100, workers=0, progress=False))
    assert main(base + ["--output-prefix", str(tmp_path / "bad")]) == 2  # the CLI: one clean line, exit 2
    assert not (tmp_path / "bad_text_document.bin").exists()
    assert main(base + ["--output-prefix", str(tmp_path / "o"), "--skip-bad-lines"]) == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    # kept: line 1 (any whitespace separates ids), line 2 (an empty document: no sequence, no EOD), line 4
    # (100 is the EOD id, inside the vocabulary of 101), line 7; skipped: 'x', '-1', '٣'
    docs = [ds.document(i).tolist() for i in range(ds.num_documents)]
    assert docs == [[5, 6, 7, 8, 100], [], [3, 100, 100], [4, 100]]
    meta = read_sidecar(str(tmp_path / "o_text_document"))
    assert meta["skipped_lines"] == 3
    assert any(":5:" in e and "'-1'" in e for e in meta["skipped_examples"])
    assert any(":6:" in e for e in meta["skipped_examples"])
    assert main(base + ["--output-prefix", str(tmp_path / "r"), "--skip-bad-lines", "--vocab-size", "50"]) == 0
    assert read_sidecar(str(tmp_path / "r_text_document"))["skipped_lines"] == 4  # + "3 100": 100 >= 51


def test_flags_identity_and_inspect(tmp_path, capsys):
    with pytest.raises(UserError, match="needs --vocab-size"):
        load_tokenizer(None, "NullTokenizer")
    with pytest.raises(UserError, match="not --tokenizer-model"):
        load_tokenizer(str(tmp_path), "NullTokenizer", vocab_size=5)
    with pytest.raises(UserError, match="apply to --tokenizer-type NullTokenizer only"):
        load_tokenizer(str(tmp_path), "auto", vocab_size=5)
    with pytest.raises(UserError, match="outside the vocabulary"):
        NullTokenizer(10, 10)
    with pytest.raises(UserError, match=">= 1"):
        NullTokenizer(0)
    old, new = NullTokenizer(10), NullTokenizer(11, 10)  # the same ids and EOD in the two conventions
    assert (old.vocab_size, old.eod) == (new.vocab_size, new.eod) == (11, 10)
    assert old.identity()["sha256"] == new.identity()["sha256"] != NullTokenizer(12, 10).identity()["sha256"]
    for tok in (old, new):
        assert tokenizer_from_identity(tok.identity()).identity() == tok.identity()
    assert old.encode("3  4\n5") == [3, 4, 5] and old.decode([3, 4, 5]) == "3 4 5" and old.encode("") == []
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "7 8 9"}])
    out = str(tmp_path / "o")
    assert main(["preprocess", "--input", src, "--output-prefix", out, "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", "10", "--workers", "0", "--quiet"]) == 0
    assert read_sidecar(out + "_text_document")["tokenizer_path"] == "NullTokenizer"
    capsys.readouterr()
    assert main(["inspect", out + "_text_document", "--num-docs", "1"]) == 0
    assert "7 8 9" in capsys.readouterr().out


# Megatron-LM's own tools/preprocess_data.py at the release that matches the pinned megatron-core, read from
# $MEGATRON_LM_DIR (tests/megatron_lm.py; skipped without it: the tests above compare with megatron-core's
# NullTokenizer + IndexedDatasetBuilder, which is what that script runs)


@requires_megatron
def test_megatron_lm_tool_side_by_side(tmp_path):
    tree = megatron_lm.extract("core_v0.16.1", ["megatron", "tools"], tmp_path / "mlm")
    recs = id_records(80, 1000, seed=3) + [{"text": "999 0 1", "n": "x"}]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(tree / "tools" / "preprocess_data.py"), "--input", src, "--output-prefix",
                    str(tmp_path / "m"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
                    "--append-eod", "--workers", "1"], check=True, capture_output=True, timeout=300, env=env)
    assert main(["preprocess", "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                 "NullTokenizer", "--vocab-size", "1000", "--append-eod", "--workers", "2", "--quiet"]) == 0
    assert same_files(str(tmp_path / "o_text_document"), str(tmp_path / "m_text_document"))


def test_legacy_tokenizer_flag(tmp_path):
    """Megatron's --legacy-tokenizer is accepted (drop-in scripts): same ids as our defaults; it refuses the
    flags of the newer system."""
    src = write_jsonl(tmp_path / "in.jsonl", id_records(20, 50))
    common = ["preprocess", "--input", src, "--tokenizer-type", "NullTokenizer", "--vocab-size", "50",
              "--append-eod", "--workers", "0", "--quiet"]
    assert main(common + ["--output-prefix", str(tmp_path / "a")]) == 0
    assert main(common + ["--output-prefix", str(tmp_path / "b"), "--legacy-tokenizer"]) == 0
    assert same_files(str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"))
    assert main(common + ["--output-prefix", str(tmp_path / "c"), "--legacy-tokenizer",
                          "--null-tokenizer-eod-id", "3"]) == 2
