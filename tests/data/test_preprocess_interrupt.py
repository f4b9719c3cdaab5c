"""Interrupted preprocessing leaves nothing behind (issue 20, item 2) and an input without records is an error
(item 3).

Each fault test runs `megacpt preprocess` in a child, stops it at a named point (megacpt.io.pause_for_test),
signals it, checks what is left, re-runs the same command and compares the bytes with an uninterrupted run.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, read_sidecar
from tests.data.conftest import make_texts, write_jsonl
from tests.faults import Job, children, leftovers, pids_alive, run, wait_for

N_DOCS = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_jsonl(d / "in.jsonl", [{"text": t} for t in make_texts(N_DOCS, seed=5)])


def args(src, tok, prefix, workers=2):
    # small chunks: many work units, so a pause after the first one is mid-write
    return ["preprocess", "--input", src, "--tokenizer-model", tok, "--output-prefix", str(prefix),
            "--workers", str(workers), "--chunk-bytes", "2048", "--append-eod", "--quiet"]


@pytest.fixture(scope="module")
def reference(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """The bytes of an uninterrupted run."""
    d = tmp_path_factory.mktemp("ref")
    rc, err = run(args(corpus, tiny_tokenizer_dir, d / "ref"), d)
    assert rc == 0, err
    return {ext: Path(f"{d}/ref_text_document{ext}").read_bytes() for ext in (".bin", ".idx")}


def assert_same_as_reference(prefix, reference):
    for ext, data in reference.items():
        assert Path(f"{prefix}_text_document{ext}").read_bytes() == data, ext
    assert read_sidecar(f"{prefix}_text_document")["num_documents"] == N_DOCS


def assert_one_line(stderr: str, signame: str) -> None:
    """One line says what was interrupted and how to go on; no worker traceback."""
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"megacpt preprocess: interrupted by {signame} after [\d,]+ documents; nothing was "
                        r"written to \S+_text_document; re-run the same command", lines[0]), lines[0]


def interrupt_and_rerun(tmp_path, corpus, tok, reference, point, sig):
    """Stop a run at ``point`` with ``sig``; returns what the signal left, after checking the re-run."""
    out = tmp_path / "out"
    job = Job(args(corpus, tok, out / "ds"), tmp_path, pause=point)
    job.wait_paused()
    workers = children(job.proc.pid)
    rc = job.signal(sig)
    left = leftovers(out)
    stderr = job.stderr
    # the workers die with the job, whatever killed it (kill -9: the kernel's parent-death signal)
    wait_for(lambda: not pids_alive(workers), "workers gone")
    assert not [p for p in out.iterdir() if not p.name.startswith(".")], "no output of an interrupted run"
    rc2, err2 = run(args(corpus, tok, out / "ds"), tmp_path, name="rerun")
    assert rc2 == 0, err2
    assert leftovers(out) == []
    assert_same_as_reference(out / "ds", reference)
    return rc, left, stderr


@pytest.mark.fault(fault="SIGTERM early (outputs opened, nothing written)", stage="preprocess",
                   sees="one line: interrupted by SIGTERM after 0 documents; nothing was written; re-run; exit 143",
                   left="nothing")
def test_sigterm_early(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, stderr = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "preprocess-start",
                                           signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and left == []
    assert_one_line(stderr, "SIGTERM")
    assert "after 0 documents" in stderr


@pytest.mark.fault(fault="SIGTERM mid-write (2 workers)", stage="preprocess",
                   sees="one line: interrupted by SIGTERM after N documents; nothing was written to OUT; re-run the "
                        "same command; no worker traceback; exit 143",
                   left="nothing")
def test_sigterm_mid_write(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, stderr = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "preprocess-write",
                                           signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and left == []
    assert_one_line(stderr, "SIGTERM")


@pytest.mark.fault(fault="SIGINT (Ctrl-C) mid-write", stage="preprocess",
                   sees="one line: interrupted by SIGINT after N documents ...; exit 130", left="nothing")
def test_sigint_mid_write(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, stderr = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "preprocess-write",
                                           signal.SIGINT)
    assert rc == 128 + signal.SIGINT and left == []
    assert_one_line(stderr, "SIGINT")


@pytest.mark.fault(fault="kill -9 mid-write", stage="preprocess",
                   sees="nothing (killed); the re-run removes the temporaries and writes the same bytes",
                   left="the hidden .OUT.bin.HOST-PID-RAND.tmp and the lock until the next run of the same output")
def test_kill9_mid_write(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, stderr = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "preprocess-write",
                                           signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert any(n.startswith(".ds_text_document.bin.") and n.endswith(".tmp") for n in left), left
    assert "Traceback" not in stderr, stderr


@pytest.mark.fault(fault="kill -9 during finalize (.idx temporary written, nothing renamed)", stage="preprocess",
                   sees="nothing (killed); the re-run removes the temporaries and writes the same bytes",
                   left=".OUT.bin.*.tmp and .OUT.idx.*.tmp until the next run of the same output")
def test_kill9_during_finalize(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, _ = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "indexed-finalize",
                                      signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert {n.split("_document.")[1].split(".")[0] for n in left if n.endswith(".tmp")} == {"bin", "idx"}, left


@pytest.mark.fault(fault="SIGTERM during finalize", stage="preprocess",
                   sees="one line: interrupted by SIGTERM while writing OUT ...; re-run the same command; exit 143",
                   left="nothing")
def test_sigterm_during_finalize(tmp_path, corpus, tiny_tokenizer_dir, reference):
    rc, left, stderr = interrupt_and_rerun(tmp_path, corpus, tiny_tokenizer_dir, reference, "indexed-finalize",
                                           signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and left == []
    assert "Traceback" not in stderr and "interrupted by SIGTERM while writing" in stderr, stderr


@pytest.mark.fault(fault="a second job on the output of a live one", stage="preprocess",
                   sees="the second job: 'OUT is being written by another live job (pid, host)'; exit 2",
                   left="the live job's temporaries, untouched")
def test_live_job_temporaries_are_never_removed(tmp_path, corpus, tiny_tokenizer_dir, reference):
    out = tmp_path / "out"
    live = Job(args(corpus, tiny_tokenizer_dir, out / "ds"), tmp_path, pause="preprocess-write", name="live")
    try:
        live.wait_paused()
        before = leftovers(out)
        assert any(n.endswith(".tmp") for n in before), before
        # the same output: refused, nothing of the live job touched
        rc, err = run(args(corpus, tiny_tokenizer_dir, out / "ds"), tmp_path, name="second")
        assert rc == 2 and "being written by another live job" in err, err
        # another output in the same directory cleans only its own stale temporaries
        stale = out / ".other_text_document.bin.vm-999999999-0123abcd.tmp"
        stale.write_bytes(b"x")
        os.utime(stale, (1, 1))
        rc, err = run(args(corpus, tiny_tokenizer_dir, out / "other"), tmp_path, name="other")
        assert rc == 0, err
        assert leftovers(out) == before
        assert live.proc.poll() is None
    finally:
        rc = live.signal(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and leftovers(out) == []
    assert_same_as_reference(out / "other", reference)


def test_old_format_temporaries_removed_under_the_output_lock(tmp_path, corpus, tiny_tokenizer_dir, reference):
    """Temporaries of the older naming (tempfile.mkstemp's, no owner) go when the output's lock is taken."""
    out = tmp_path / "out"
    out.mkdir()
    old = [out / ".ds_text_document.bin.a1b2c3d4.tmp", out / ".ds_text_document.idx.zz_9abcd.tmp"]
    for p in old:
        p.write_bytes(b"partial")
    unrelated = out / ".notes.txt.a1b2c3d4.tmp"  # not a file of this output
    unrelated.write_bytes(b"keep")
    assert main(args(corpus, tiny_tokenizer_dir, out / "ds", workers=0)) == 0
    assert not any(p.exists() for p in old) and unrelated.exists()
    assert_same_as_reference(out / "ds", reference)


# -- item 3: empty means error ---------------------------------------------------------------------------

@pytest.mark.parametrize("content,extra", [("", []), ("\n\n   \n", ["--skip-bad-lines"]),
                                           ('{"text": 1}\n', ["--skip-bad-lines"])],
                         ids=["empty-file", "blank-lines-skipped", "bad-lines-skipped"])
def test_input_without_documents_is_an_error(tmp_path, tiny_tokenizer_dir, capsys, content, extra):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    argv = ["preprocess", "--input", str(src), "--tokenizer-model", tiny_tokenizer_dir,
            "--output-prefix", str(tmp_path / "out"), "--workers", "0", "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and "--allow-empty" in err, err
    assert leftovers(tmp_path) == [] and not list(tmp_path.glob("out*"))
    # opted in: the empty dataset of before
    assert main([*argv, "--allow-empty"]) == 0
    assert IndexedDataset(tmp_path / "out_text_document").num_documents == 0
