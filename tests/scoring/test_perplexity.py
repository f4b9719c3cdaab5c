"""The scoring pass vs a straightforward HF GPTNeoXForCausalLM computation; DP, resume, bad inputs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, write_sidecar
from megacpt.errors import UserError
from megacpt.testing import run_distributed

L = 16
VOCAB = 96
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# documents: 0, 1, 2, L-1, L, L+1 and 3L tokens, one stored as 3 sequences, plus some odd lengths
DOC_SEQS = [[], [1], [2], [L - 1], [L], [L + 1], [3 * L], [5, 0, 9], [7], [2 * L + 3], [33], [4]]


def _make_model(dirpath):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, rotary_pct=0.25, max_position_embeddings=64,
                        use_parallel_residual=True, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the default init so NLLs differ visibly between tokens
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(dirpath, safe_serialization=True)
    return model


def _make_data(prefix, vocab=VOCAB):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for seqs in DOC_SEQS:
            w.add_document([rng.integers(0, vocab, n) for n in seqs])
    write_sidecar(prefix, {"tokenizer": {"type": "hf", "path": "none", "sha256": "0" * 64, "vocab_size": vocab,
                                         "eod": 0}, "dtype": "uint16", "num_documents": len(DOC_SEQS)})
    return prefix


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    hf = _make_model(d / "hf")
    prefix = _make_data(str(d / "data_text_document"))
    return d, hf, prefix


def _hf_reference(hf, prefix):
    """Each chunk of <= L tokens through HF on its own, full logits, F.cross_entropy."""
    ds = IndexedDataset(prefix)
    rows = []
    for d in range(ds.num_documents):
        toks = torch.from_numpy(ds.document(d).astype(np.int64))
        n, s = 0, 0.0
        for a in range(0, toks.numel(), L):
            c = toks[a:a + L]
            if c.numel() < 2:
                continue
            with torch.no_grad():
                logits = hf(c[None]).logits[0]
            s += torch.nn.functional.cross_entropy(logits[:-1], c[1:], reduction="sum").double().item()
            n += c.numel() - 1
        rows.append((n, s))
    return rows


def _read(path):
    from megacpt.score.files import read_scores

    return read_scores(path)


def _cli(*args):
    from megacpt.cli import main

    # --device cpu: exact fp32 comparisons with the HF reference also on a machine with a GPU
    args = [*map(str, args)] + ([] if "--device" in map(str, args) else ["--device", "cpu"])
    return main(["score", "perplexity", *args, "--no-progress"])


def test_cli_matches_hf_reference(setup, tmp_path):
    d, hf, prefix = setup
    out = tmp_path / "scores.parquet"
    assert _cli("--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", out,
                "--tokens-per-batch", 40, "--shard-docs", 5) == 0
    f = _read(out)
    ref = _hf_reference(hf, prefix)
    assert list(f.columns) == ["doc_id", "n_pred", "nll_sum", "nll_mean"]
    assert f.columns["doc_id"].dtype == np.int64 and f.columns["n_pred"].dtype == np.int64
    assert f.columns["nll_sum"].dtype == np.float64
    np.testing.assert_array_equal(f.columns["n_pred"], [r[0] for r in ref])
    # 0, 1, 2, L-1, L, L+1, 3L tokens -> 0, 0, 1, L-2, L-1, L-1, 3(L-1) predictions
    assert list(f.columns["n_pred"][:7]) == [0, 0, 1, L - 2, L - 1, L - 1, 3 * (L - 1)]
    np.testing.assert_allclose(f.columns["nll_sum"], [r[1] for r in ref], rtol=1e-5, atol=1e-4)
    assert np.isnan(f.columns["nll_mean"][:2]).all() and (f.columns["nll_sum"][:2] == 0).all()
    ok = f.columns["n_pred"] > 0
    np.testing.assert_allclose(f.columns["nll_mean"][ok], f.columns["nll_sum"][ok] / f.columns["n_pred"][ok])
    cfg = f.meta["config"]
    assert cfg["dtype"] == "fp32" and cfg["seq_length"] == L and cfg["model"]["config"]["vocab_size"] == VOCAB
    assert f.meta["dataset"]["num_documents"] == len(DOC_SEQS)
    assert not os.path.exists(str(out) + ".shards")


def test_progress_lines_with_rate_and_eta(setup, tmp_path, capsys):
    """Off a terminal (stderr captured): plain lines with tokens/s, docs/s and an ETA, no bar."""
    from megacpt.cli import main

    d, hf, prefix = setup
    assert main(["score", "perplexity", "--model", str(d / "hf"), "--data", prefix, "--seq-length", str(L),
                 "--out", str(tmp_path / "p.parquet"), "--shard-docs", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("score perplexity (rank 0/1): ")]
    assert len(lines) >= 2 and "\r" not in err, err
    assert all(k in lines[0] for k in (" tok (", "tok/s", "docs/s", "ETA")), lines
    assert "(100.0%)" in lines[-1] and "took" in lines[-1], lines


def test_cli_compile_matches_eager(setup, tmp_path):
    """--compile (each layer through torch.compile) scores like the eager pass, over batches of several
    padded lengths (static first, then dynamic shapes)."""
    d, hf, prefix = setup
    eager, compiled = tmp_path / "eager.parquet", tmp_path / "compiled.parquet"
    common = ["--model", d / "hf", "--data", prefix, "--seq-length", L, "--tokens-per-batch", 40]
    assert _cli(*common, "--out", eager) == 0
    assert _cli(*common, "--out", compiled, "--compile") == 0
    e, c = _read(eager), _read(compiled)
    np.testing.assert_array_equal(c.columns["n_pred"], e.columns["n_pred"])
    np.testing.assert_allclose(c.columns["nll_sum"], e.columns["nll_sum"], rtol=1e-5, atol=1e-4)


def test_cli_bf16_on_cpu_close_to_fp32_reference(setup, tmp_path, monkeypatch):
    """--dtype bf16 on CPU (bf16 trunk, the output layer's vocab-blocked 16-bit path with several blocks):
    same n_pred, NLL within bf16 rounding of the fp32 HF reference, metadata says bf16."""
    from megacpt.kernels import fused_linear_cross_entropy as K

    monkeypatch.setattr(K, "CPU16_VOCAB_BLOCK", 40)  # VOCAB 96 -> blocks of 40, 40, 16
    d, hf, prefix = setup
    out = tmp_path / "bf16.parquet"
    assert _cli("--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", out, "--dtype", "bf16",
                "--tokens-per-batch", 40) == 0
    f = _read(out)
    ref = _hf_reference(hf, prefix)
    np.testing.assert_array_equal(f.columns["n_pred"], [r[0] for r in ref])
    ok = f.columns["n_pred"] > 0
    np.testing.assert_allclose(f.columns["nll_mean"][ok], np.array([r[1] / max(r[0], 1) for r in ref])[ok],
                               rtol=3e-2, atol=3e-2)
    assert f.meta["config"]["dtype"] == "bf16"


def test_sequence_nll_batching_and_target_starts(setup):
    from megacpt.convert import load_model
    from megacpt.score.nll import ScoringConfig, sequence_nll

    d, hf, prefix = setup
    model, _ = load_model(d / "hf")
    seqs = [np.arange(n) % VOCAB for n in (0, 1, 5, 16, 40)]
    a = sequence_nll(model, seqs, L, ScoringConfig(seq_length=L, micro_batch_size=1))
    b = sequence_nll(model, seqs, L, ScoringConfig(seq_length=L, tokens_per_batch=L))
    c = sequence_nll(model, seqs, L, ScoringConfig(seq_length=L, tokens_per_batch=1000))
    for x, y, z in zip(a, b, c):
        assert x[0] == y[0] == z[0]
        assert math.isclose(x[1], y[1], rel_tol=1e-5, abs_tol=1e-5) and math.isclose(x[1], z[1], rel_tol=1e-5,
                                                                                      abs_tol=1e-5)
    # label log-likelihood: only tokens from index 3 on
    seq = np.array([5, 6, 7, 8, 9, 10])
    (n, s), = sequence_nll(model, [seq], L, target_starts=[3])
    with torch.no_grad():
        logits = hf(torch.from_numpy(seq)[None]).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[2:-1], torch.from_numpy(seq[3:]), reduction="sum").item()
    assert n == 3 and math.isclose(s, ref, rel_tol=1e-5)


def _dp_worker(rank, world, model_dir, prefix, out, tp=1):
    """Score with the library: a whole replica per rank, or (tp > 1) TP-sharded replicas."""
    from megacpt.convert import load_config, load_model
    from megacpt.score.job import score_dataset
    from megacpt.score.nll import ScoringConfig
    from megacpt.score.parallel import parallel_scoring_model

    if tp == 1:
        model, _ = load_model(model_dir)
    else:
        model = parallel_scoring_model(model_dir, load_config(model_dir), tp, 1, world, torch.device("cpu"))
        assert model.embed_out.weight.to_local().shape[0] == VOCAB // tp  # really vocab-parallel
    return score_dataset(model, prefix, L, out, ScoringConfig(seq_length=L, tokens_per_batch=40),
                         shard_docs=2, progress=False)


def _assert_summary_matches_file(summary, f):
    """The summary counts what the file holds: every document, tokens scored = the sum of n_pred."""
    assert summary["documents_scored"] == f.num_rows == len(DOC_SEQS)
    assert summary["tokens_scored"] == int(f.columns["n_pred"].sum())


def test_summary_tokens_scored_equals_parquet_n_pred(setup, tmp_path, capsys):
    """`score perplexity`'s JSON summary: tokens_scored = sum of the Parquet's n_pred (predicted positions,
    docs/method.md §2.1), not the chunks' tokens (which also count each chunk's unpredicted first token)."""
    d, hf, prefix = setup
    out = tmp_path / "scores.parquet"
    assert _cli("--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", out,
                "--tokens-per-batch", 40, "--shard-docs", 5) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    f = _read(out)
    _assert_summary_matches_file(summary, f)
    lengths = IndexedDataset(prefix).document_lengths()
    assert summary["tokens_scored"] == sum(n - math.ceil(n / L) for n in lengths)  # n - number of chunks
    assert 0 <= summary["padding_fraction"] < 1


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(setup, tmp_path):
    d, hf, prefix = setup
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    single = _dp_worker(0, 1, str(d / "hf"), prefix, str(one))  # no process group
    ranks = run_distributed(_dp_worker, 2, str(d / "hf"), prefix, str(two), timeout=120)
    a, b = _read(one), _read(two)
    for summary in (single, *ranks):  # every rank returns the global counts
        _assert_summary_matches_file(summary, a)
    for k in a.columns:
        np.testing.assert_array_equal(a.columns[k], b.columns[k])
    assert a.meta == b.meta


@pytest.mark.distributed
def test_tensor_parallel_two_ranks_equals_one_rank(setup, tmp_path):
    d, hf, prefix = setup
    one, two = tmp_path / "one.parquet", tmp_path / "tp2.parquet"
    _dp_worker(0, 1, str(d / "hf"), prefix, str(one))
    ranks = run_distributed(_dp_worker, 2, str(d / "hf"), prefix, str(two), 2, timeout=180)
    a, b = _read(one), _read(two)
    for summary in ranks:  # the two ranks of one tp group score the same documents: counted once
        _assert_summary_matches_file(summary, b)
    np.testing.assert_array_equal(a.columns["n_pred"], b.columns["n_pred"])
    # row-parallel all-reduces sum in another order: equal up to fp32 rounding
    np.testing.assert_allclose(a.columns["nll_sum"], b.columns["nll_sum"], rtol=1e-5, atol=1e-5)


def _pp_cli_worker(rank, world, model_dir, prefix, out):
    from megacpt.cli import main

    return main(["score", "perplexity", "--model", model_dir, "--data", prefix, "--seq-length", str(L),
                 "--out", out, "--tokens-per-batch", "40", "--shard-docs", "2", "--device", "cpu",
                 "--pipeline-model-parallel-size", "2", "--no-progress"])


@pytest.mark.distributed
def test_pipeline_two_stages_equal_one_rank(setup, tmp_path):
    """`score perplexity --pipeline-model-parallel-size 2`: layer 0 on rank 0, layer 1 + output layer on rank
    1, activations streamed stage to stage; the file equals a single-process run's."""
    d, hf, prefix = setup
    one, two = tmp_path / "one.parquet", tmp_path / "pp2.parquet"
    assert _cli("--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", one,
                "--tokens-per-batch", 40, "--shard-docs", 2) == 0
    assert run_distributed(_pp_cli_worker, 2, str(d / "hf"), prefix, str(two), timeout=180) == [0, 0]
    a, b = _read(one), _read(two)
    np.testing.assert_array_equal(a.columns["doc_id"], b.columns["doc_id"])
    np.testing.assert_array_equal(a.columns["n_pred"], b.columns["n_pred"])
    np.testing.assert_allclose(a.columns["nll_sum"], b.columns["nll_sum"], rtol=1e-6, atol=1e-6)
    # a pipeline larger than the world is refused before any work
    assert _cli("--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", tmp_path / "x.parquet",
                "--pipeline-model-parallel-size", 2) == 2


_KILL_AFTER_2 = """
import os, signal, sys
from megacpt.score import files as scores
orig = scores.ShardedScoreWriter.commit
n = [0]
def commit(self, k, cols):
    orig(self, k, cols)
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after the 2nd shard is committed
scores.ShardedScoreWriter.commit = commit
from megacpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.fault(fault="kill -9 after two committed shards", stage="score perplexity",
                   sees="a re-run without --resume: a one-line error asking for --resume; with it, only the "
                        "missing shards are scored and the Parquet equals an uninterrupted run's byte for byte",
                   left="OUT.shards/ with the committed shards; no OUT.parquet")
def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
    d, hf, prefix = setup
    full, killed = tmp_path / "full.parquet", tmp_path / "killed.parquet"
    common = ["--model", d / "hf", "--data", prefix, "--seq-length", L, "--tokens-per-batch", 40,
              "--shard-docs", 3, "--device", "cpu"]
    assert _cli(*common, "--out", full) == 0
    args = [sys.executable, "-c", _KILL_AFTER_2, "score", "perplexity", *map(str, common), "--out", str(killed),
            "--no-progress"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not killed.exists()
    shards = sorted(p.name for p in (tmp_path / "killed.parquet.shards").glob("shard_*.parquet"))
    assert shards == ["shard_000000.parquet", "shard_000001.parquet"]
    with pytest.raises(UserError, match="--resume"):  # leftovers without --resume: refuse
        from megacpt.cli import build_command_parser

        a = build_command_parser("score").parse_args(["perplexity", *map(str, common), "--out", str(killed)])
        a._run(a)
    # the resumed run must not recompute committed shards
    from megacpt.score import job

    seen = []
    orig = job.score_documents
    job.score_documents = lambda m, ds, a, b, *r, **k: (seen.append(a), orig(m, ds, a, b, *r, **k))[1]
    try:
        assert _cli(*common, "--out", killed, "--resume") == 0
    finally:
        job.score_documents = orig
    assert seen == [6, 9]
    assert killed.read_bytes() == full.read_bytes()


def test_bad_inputs(setup, tmp_path):
    d, hf, prefix = setup
    base = ["--model", d / "hf", "--data", prefix, "--out", tmp_path / "x.parquet"]
    with pytest.raises(SystemExit):  # --seq-length is required
        _cli(*base)
    assert _cli(*base, "--seq-length", 1) == 2
    # existing output without --resume
    (tmp_path / "exists.parquet").write_bytes(b"x")
    assert _cli("--model", d / "hf", "--data", prefix, "--out", tmp_path / "exists.parquet",
                "--seq-length", L) == 2
    # empty dataset
    empty = str(tmp_path / "empty")
    with IndexedDatasetWriter(empty, np.uint16):
        pass
    assert _cli("--model", d / "hf", "--data", empty, "--out", tmp_path / "e.parquet", "--seq-length", L) == 2
    # dataset tokenized with a bigger vocabulary than the model's
    big = _make_data(str(tmp_path / "big"), vocab=VOCAB + 1000)
    assert _cli("--model", d / "hf", "--data", big, "--out", tmp_path / "b.parquet", "--seq-length", L) == 2
    assert not (tmp_path / "b.parquet.shards").exists()
    # tokens outside the model vocab without a sidecar check still fail cleanly, not with an index error
    from megacpt.convert import load_model
    from megacpt.score.nll import sequence_nll

    model, _ = load_model(d / "hf")
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sequence_nll(model, [[1, 2, VOCAB + 3]], L)


def test_bad_inputs_messages(setup, tmp_path, capsys):
    d, hf, prefix = setup
    big = _make_data(str(tmp_path / "big"), vocab=VOCAB + 1000)
    _cli("--model", d / "hf", "--data", big, "--out", tmp_path / "b.parquet", "--seq-length", L)
    err = capsys.readouterr().err
    assert "vocab_size 1096" in err and "big.meta.json" in err
    _cli("--model", d / "hf", "--data", prefix, "--out", tmp_path / "c.parquet", "--seq-length", 1)
    assert "--seq-length must be >= 2" in capsys.readouterr().err


def test_resume_of_complete_output_is_a_no_op(setup, tmp_path):
    d, hf, prefix = setup
    out = tmp_path / "s.parquet"
    common = ["--model", d / "hf", "--data", prefix, "--seq-length", L, "--out", out, "--device", "cpu"]
    assert _cli(*common) == 0
    before = out.read_bytes()
    assert _cli(*common, "--resume") == 0
    assert out.read_bytes() == before


def test_cli_flags_are_frozen():
    from megacpt.cli import build_command_parser

    parser = build_command_parser("score")
    sub = next(a for a in parser._actions if a.dest == "scorer")
    a = parser.parse_args(["perplexity", "--model", "m", "--data", "p", "--seq-length", "8", "--out", "o"])
    flags = {o for act in sub.choices["perplexity"]._actions for o in act.option_strings}
    assert {"--model", "--data", "--seq-length", "--out", "--micro-batch-size", "--tokens-per-batch",
            "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--dtype", "--resume", "--shard-docs",
            "--device", "--compile"} <= flags
    assert a.dtype == "auto" and a.micro_batch_size is None and not a.resume
    with pytest.raises(SystemExit):  # one batch-size flag at a time
        parser.parse_args(["perplexity", "--model", "m", "--data", "p", "--seq-length", "8", "--out", "o",
                           "--micro-batch-size", "2", "--tokens-per-batch", "64"])
