"""Preprocessing: Megatron equality, input kinds, partitions + merge, bad input, atomicity."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, read_sidecar
from megacpt.data.preprocess import PreprocessConfig, preprocess
from megacpt.errors import InputError, UserError
from tests.conftest import requires_megatron
from tests.data.conftest import make_texts, write_jsonl


def records(n=300, seed=0):
    texts = make_texts(n, seed=seed)
    texts[3] = ""            # empty: a document with no sequence
    texts[4] = "   "         # whitespace-only is not empty for a byte-level BPE
    texts[5] = "a<|endoftext|>b"
    return [{"text": t, "title": t[:12], "id": i} for i, t in enumerate(texts)]


def megatron_reference(recs, key, tok_dir, append_eod, prefix):
    """What Megatron-LM's Encoder + megatron-core's IndexedDatasetBuilder write, fed by HF's tokenizer."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(hf)))
    for r in recs:
        sentences = r[key] if isinstance(r[key], list) else [r[key]]
        doc, lens = [], []
        for s in sentences:
            ids = hf(s).input_ids
            if ids:
                doc.extend(ids)
                lens.append(len(ids))
        if doc and append_eod:
            doc.append(hf.eos_token_id)
            lens[-1] += 1
        builder.add_document(torch.tensor(doc, dtype=torch.int64), lens)
    builder.finalize(prefix + ".idx")
    return prefix


def _has_tiktoken() -> bool:
    import importlib.util

    return importlib.util.find_spec("tiktoken") is not None


def same_files(a, b):
    for ext in (".bin", ".idx"):
        assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes(), ext


def run_pp(tmp_path, tok_dir, inputs, out="out", **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    cfg = PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(tmp_path / out),
                           tokenizer_model=tok_dir, **kw)
    return preprocess(cfg)


@requires_megatron
@pytest.mark.parametrize("append_eod", [True, False])
def test_byte_identical_to_megatron(tmp_path, tiny_tokenizer_dir, append_eod):
    recs = records()
    recs[7]["text"] = ["First sentence.", "", "Second one"]  # list value: one sequence per non-empty item
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    metas = run_pp(tmp_path, tiny_tokenizer_dir, [src], json_keys=["text", "title"], append_eod=append_eod, workers=2)
    for key in ("text", "title"):
        ref = megatron_reference(recs, key, tiny_tokenizer_dir, append_eod, str(tmp_path / f"ref_{key}"))
        same_files(str(tmp_path / f"out_{key}_document"), ref)
        meta = metas[str(tmp_path / f"out_{key}_document")]
        assert meta["num_documents"] == len(recs) and meta["dtype"] == "uint16"
        if _has_tiktoken():
            assert meta["tokenizer_path"].startswith("tiktoken")  # the fast path made these bytes
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed

    m = MIndexed(str(tmp_path / "out_text_document"))
    ours = IndexedDataset(tmp_path / "out_text_document")
    assert len(m) == len(ours) and list(m.document_indices) == list(ours.document_indices)
    assert ours.document_length(3) == 0  # empty text: no sequence, no EOD
    assert ours.document_length(4) > 0
    for i in range(len(ours)):
        assert np.array_equal(m[i], ours[i])


def test_slow_path_identical(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", records(200, seed=8))
    fast = run_pp(tmp_path, tiny_tokenizer_dir, [src], "fast", append_eod=True)
    slow = run_pp(tmp_path, tiny_tokenizer_dir, [src], "slow", append_eod=True, fast=False)
    same_files(str(tmp_path / "fast_text_document"), str(tmp_path / "slow_text_document"))
    assert next(iter(slow.values()))["tokenizer_path"].startswith("disabled")


def test_special_token_and_eod(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a<|endoftext|>b"}, {"text": ""}])
    run_pp(tmp_path, tiny_tokenizer_dir, [src], append_eod=True)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.document(0).tolist() == tiny_tokenizer.encode("a<|endoftext|>b") + [tiny_tokenizer.eod]
    assert ds.document(0).tolist().count(tiny_tokenizer.eod) == 2
    assert ds.num_documents == 2 and ds.document_length(1) == 0


def test_input_kinds_give_same_output(tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    recs = records(120, seed=2)
    plain = write_jsonl(tmp_path / "a.jsonl", recs)
    raw = Path(plain).read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": [r["text"] for r in recs]}), tmp_path / "a.parquet", row_group_size=50)
    run_pp(tmp_path, tiny_tokenizer_dir, [plain], "ref")
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / name], name)
        same_files(str(tmp_path / f"{name}_text_document"), str(tmp_path / "ref_text_document"))
    # a directory (sorted) and a glob = the files concatenated in order
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "1.jsonl", recs[:60])
    write_jsonl(d / "2.jsonl", recs[60:])
    run_pp(tmp_path, tiny_tokenizer_dir, [d], "fromdir")
    run_pp(tmp_path, tiny_tokenizer_dir, [str(d / "*.jsonl")], "fromglob")
    same_files(str(tmp_path / "fromdir_text_document"), str(tmp_path / "ref_text_document"))
    same_files(str(tmp_path / "fromglob_text_document"), str(tmp_path / "ref_text_document"))


def test_hf_datasets_inputs(tmp_path, tiny_tokenizer_dir):
    datasets = pytest.importorskip("datasets")
    recs = records(80, seed=4)
    plain = write_jsonl(tmp_path / "a.jsonl", recs)
    run_pp(tmp_path, tiny_tokenizer_dir, [plain], "ref")
    ds = datasets.Dataset.from_dict({"text": [r["text"] for r in recs]})
    ds.save_to_disk(str(tmp_path / "saved"))
    run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "saved"], "saved")
    same_files(str(tmp_path / "saved_text_document"), str(tmp_path / "ref_text_document"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="--split"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "dd"], "dd")
    # --hf-dataset: anything datasets.load_dataset reads locally (here a folder of jsonl)
    (tmp_path / "only").mkdir()
    os.replace(plain, tmp_path / "only" / "train.jsonl")
    preprocess(PreprocessConfig(inputs=[], hf_dataset=str(tmp_path / "only"), split="train",
                                output_prefix=str(tmp_path / "ld"), tokenizer_model=tiny_tokenizer_dir,
                                workers=0, progress=False))
    same_files(str(tmp_path / "ld_text_document"), str(tmp_path / "ref_text_document"))


@pytest.mark.parametrize("sequential", [False, True])
def test_partitions_megatron_order_and_merge(tmp_path, tiny_tokenizer_dir, sequential):
    recs = records(101, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    K = 3
    run_pp(tmp_path, tiny_tokenizer_dir, [src], "part", partitions=K, keep_sequential_samples=sequential,
           append_eod=True, workers=2)
    if sequential:
        size = -(-len(recs) // K)
        order = list(range(len(recs)))
    else:
        order = [i for p in range(K) for i in range(p, len(recs), K)]
    write_jsonl(tmp_path / "reordered.jsonl", [recs[i] for i in order])
    run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "reordered.jsonl"], "single", append_eod=True)
    same_files(str(tmp_path / "part_text_document"), str(tmp_path / "single_text_document"))
    assert Path(str(tmp_path / "part_0_text_document.bin")).exists()  # partition files stay, like Megatron
    # separate jobs per partition + `megacpt merge` = the same dataset
    for p in range(K):
        run_pp(tmp_path, tiny_tokenizer_dir, [src], "job", partitions=K, partition_index=p,
               keep_sequential_samples=sequential, append_eod=True)
    args = ["merge", "--input"] + [str(tmp_path / f"job_{p}_text_document") for p in range(K)]
    assert main(args + ["--output-prefix", str(tmp_path / "merged")]) == 0
    same_files(str(tmp_path / "merged"), str(tmp_path / "single_text_document"))
    meta = read_sidecar(tmp_path / "merged")
    assert meta["num_documents"] == len(recs) and len(meta["merged_from"]) == K
    if sequential:
        assert IndexedDataset(tmp_path / "job_0_text_document").num_documents == size


BAD_LINES = [
    (b'{"text": "ok"\n', "malformed JSON"),
    (b"\n", "blank line"),
    (b'{"title": "no text"}\n', "missing key 'text'"),
    (b'{"text": null}\n', "expected a string, got null"),
    (b'{"text": 42}\n', "expected a string, got number"),
    (b'{"text": "\\ud800 lone"}\n', "lone surrogate"),
    (b'{"text": "bad \xff utf8"}\n', "invalid UTF-8"),
    (b'["text"]\n', "expected a JSON object"),
]


@pytest.mark.parametrize("bad,why", BAD_LINES, ids=[w.split()[0] for _, w in BAD_LINES])
def test_bad_line_stops_with_location_and_leaves_nothing(tmp_path, tiny_tokenizer_dir, bad, why):
    good = [json.dumps({"text": t}).encode() + b"\n" for t in make_texts(20)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(good[:9]) + bad + b"".join(good[9:]))
    with pytest.raises(InputError) as e:
        run_pp(tmp_path, tiny_tokenizer_dir, [path], workers=2)
    assert str(e.value).startswith(f"{path}:10: ") and why in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no partial or temp output
    metas = run_pp(tmp_path, tiny_tokenizer_dir, [path], skip_bad_lines=True)
    meta = next(iter(metas.values()))
    assert meta["skipped_lines"] == 1 and meta["num_documents"] == 20
    assert meta["skipped_examples"][0].startswith(f"{path}:10: ")


def test_bom_and_cli_error_line(tmp_path, tiny_tokenizer_dir, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "x"}\n')
    rc = main(["preprocess", "--input", str(path), "--tokenizer-model", tiny_tokenizer_dir,
               "--output-prefix", str(tmp_path / "o"), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:1: UTF-8 byte order mark" in err and "Traceback" not in err
    assert not list(tmp_path.glob("o*"))


def test_corrupt_compressed_inputs(tmp_path, tiny_tokenizer_dir):
    import zstandard

    raw = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in make_texts(300))
    gz = gzip.compress(raw)
    (tmp_path / "t.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(InputError, match=r"t.jsonl.gz:\d+: cannot read"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "t.jsonl.gz"])
    zs = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "t.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    with pytest.raises(InputError, match=r"t.jsonl.zst:\d+: cannot read"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "t.jsonl.zst"])
    assert not list(tmp_path.glob("out*"))


def test_parquet_null_row(tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n.parquet:2: key 'text': expected a string, got null"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "n.parquet"])
    with pytest.raises(InputError, match="missing column"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "n.parquet"], json_keys=["body"])


def test_errors_before_any_work(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", records(10))
    with pytest.raises(UserError, match="no such file"):
        run_pp(tmp_path, str(tmp_path / "nope"), [src])
    with pytest.raises(UserError, match="no such file"):
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "missing.jsonl"])
    with pytest.raises(UserError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a\n")
        run_pp(tmp_path, tiny_tokenizer_dir, [tmp_path / "x.csv"])
    (tmp_path / "afile").write_text("x")  # a path under a regular file can't be created, even by root
    with pytest.raises(UserError, match="not writable"):
        run_pp(tmp_path / "afile", tiny_tokenizer_dir, [src])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            with pytest.raises(UserError, match="not writable"):
                run_pp(ro, tiny_tokenizer_dir, [src])
    finally:
        ro.chmod(0o700)


def test_vocab_too_large_for_dtype(tmp_path):
    from megacpt.data.preprocess import choose_dtype

    assert choose_dtype(50277, "auto") is np.uint16 and choose_dtype(65500, "auto") is np.int32
    with pytest.raises(UserError, match="cannot hold"):
        choose_dtype(70000, "uint16")


def test_rerun_replaces_atomically_and_failure_keeps_old(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", records(30))
    run_pp(tmp_path, tiny_tokenizer_dir, [src])
    before = (tmp_path / "out_text_document.bin").read_bytes()
    with open(src, "ab") as f:
        f.write(b"{broken\n")
    with pytest.raises(InputError):
        run_pp(tmp_path, tiny_tokenizer_dir, [src])
    assert (tmp_path / "out_text_document.bin").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    for ext in (".bin", ".idx", ".meta.json"):  # not the 0600 of a temp file
        assert (tmp_path / f"out_text_document{ext}").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_flags_frozen_and_inspect(tmp_path, tiny_tokenizer_dir, capsys):
    from megacpt.cli import build_command_parser

    flags = {a for act in build_command_parser("preprocess")._actions for a in act.option_strings}
    assert {"--input", "--json-keys", "--tokenizer-type", "--tokenizer-model", "--output-prefix", "--workers",
            "--append-eod", "--partitions", "--keep-sequential-samples", "--log-interval", "--skip-bad-lines",
            "--hf-dataset", "--split", "--vocab-file", "--merge-file", "--split-sentences", "--keep-newlines",
            "--lang", "--gpt2-parse-special-tokens", "--allow-empty"} <= flags
    src = write_jsonl(tmp_path / "in.jsonl", records(10))
    assert main(["preprocess", "--input", src, "--tokenizer-model", tiny_tokenizer_dir, "--output-prefix",
                 str(tmp_path / "o"), "--workers", "1", "--append-eod"]) == 0
    assert main(["inspect", str(tmp_path / "o_text_document"), "--num-docs", "1"]) == 0
    out = capsys.readouterr().out
    assert "10 documents (1 empty)" in out and "--- document 0 ---" in out


def test_tools_scripts_and_merge_directory(tmp_path, tiny_tokenizer_dir):
    """tools/preprocess_data.py and tools/merge_datasets.py: Megatron's entry points, same code."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    recs = records(40, seed=11)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "shards"
    out.mkdir()
    for p in range(2):
        subprocess.run([sys.executable, str(root / "tools" / "preprocess_data.py"), "--input", src,
                        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tiny_tokenizer_dir,
                        "--output-prefix", str(out / "s"), "--workers", "1", "--partitions", "2",
                        "--partition-index", str(p), "--append-eod", "--quiet"], check=True, capture_output=True)
    for f in out.glob("*.meta.json"):
        f.unlink()  # merge must not need sidecars
    subprocess.run([sys.executable, str(root / "tools" / "merge_datasets.py"), "--input", str(out),
                    "--output-prefix", str(tmp_path / "merged")], check=True, capture_output=True)
    run_pp(tmp_path, tiny_tokenizer_dir, [src], "whole", partitions=2, append_eod=True)
    same_files(str(tmp_path / "merged"), str(tmp_path / "whole_text_document"))
    (out / "s_1_text_document.idx").unlink()
    assert main(["merge", "--input", str(out), "--output-prefix", str(tmp_path / "m2")]) == 2


def test_sentencepiece_tokenizer(tmp_path, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    recs = records(30, seed=12)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    metas = run_pp(tmp_path, str(sp_model), [src], append_eod=True, workers=1)
    assert next(iter(metas.values()))["tokenizer"]["type"] == "SentencePieceTokenizer"
    ds = IndexedDataset(tmp_path / "out_text_document")
    for d, r in enumerate(recs):
        ids = sp.encode_as_ids(r["text"])
        assert ds.document(d).tolist() == (ids + [sp.eos_id()] if ids else [])
