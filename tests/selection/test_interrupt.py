"""Interrupted `score` and `select` leave nothing behind but resumable progress (issue 20, item 2), and a dataset
with 0 documents is an error for both (item 3)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from megacpt.cli import main
from megacpt.data.indexed import IndexedDatasetWriter, write_sidecar
from megacpt.score.files import read_scores
from tests.faults import Job, leftovers, run


def dsir_args(prefix, task_jsonl, out):
    return ["score", "dsir", "--data", prefix, "--task-data", task_jsonl, "--out", str(out), "--shard-docs", "8"]


@pytest.fixture(scope="module")
def dsir_reference(mixed_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("dsir_ref")
    tasks = d / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["Net income rose by 5 percent.", "The bank beat expectations."]))
    rc, err = run(dsir_args(mixed_corpus[0], str(tasks), d / "ref.parquet"), d)
    assert rc == 0, err
    return str(tasks), read_scores(d / "ref.parquet").columns


@pytest.mark.fault(fault="kill -9 while writing a temporary (OUT.shards/state.json)", stage="score",
                   sees="nothing (killed); the re-run removes the temporary and scores everything",
                   left="the temporary in OUT.shards/ until the next run of the same output")
def test_score_kill9_in_a_temporary(tmp_path, mixed_corpus, dsir_reference):
    tasks, ref = dsir_reference
    out = tmp_path / "out" / "s.parquet"
    job = Job(dsir_args(mixed_corpus[0], tasks, out), tmp_path, pause="atomic-write")
    job.wait_paused()
    assert job.signal(signal.SIGKILL) == -signal.SIGKILL
    assert any(n.endswith(".tmp") for n in leftovers(out.parent)), leftovers(out.parent)
    rc, err = run(dsir_args(mixed_corpus[0], tasks, out), tmp_path, name="rerun")
    assert rc == 0, err
    assert leftovers(out.parent) == [] and not Path(f"{out}.shards").exists()
    for k, v in ref.items():
        np.testing.assert_array_equal(read_scores(out).columns[k], v)


@pytest.mark.fault(fault="SIGTERM after a shard was committed", stage="score",
                   sees="one line: interrupted by SIGTERM after 8/40 documents; the committed shards are kept in "
                        "OUT.shards: re-run the same command to resume; exit 143",
                   left="OUT.shards/ with the committed shards (resumable progress), no temporary")
def test_score_sigterm_keeps_committed_shards(tmp_path, mixed_corpus, dsir_reference):
    tasks, ref = dsir_reference
    out = tmp_path / "out" / "s.parquet"
    job = Job(dsir_args(mixed_corpus[0], tasks, out), tmp_path, pause="score-shard")
    job.wait_paused()
    assert job.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    err = job.stderr
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(line) == 1 and "interrupted by SIGTERM after 8/40 documents" in line[0], err
    assert "re-run the same command to resume" in line[0]
    shards = Path(f"{out}.shards")
    assert (shards / "shard_000000.parquet").exists() and leftovers(out.parent) == []
    rc, err = run(dsir_args(mixed_corpus[0], tasks, out), tmp_path, name="rerun")
    assert rc == 0 and "resuming, 8/40 docs already scored" in err, err
    for k, v in ref.items():
        np.testing.assert_array_equal(read_scores(out).columns[k], v)


def select_args(prefix, out):
    return ["select", "--data", prefix, "--strategy", "random", "--budget-fraction", "0.5", "--output-prefix",
            str(out)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
@pytest.mark.fault(fault="kill -9 / SIGTERM while writing the selected subset", stage="select",
                   sees="SIGTERM: one line, interrupted ...; nothing was written to OUT: re-run the same command; "
                        "kill -9: nothing; the re-run writes the same selection",
                   left="SIGTERM: nothing; kill -9: .OUT.bin.*.tmp until the next run of the same output")
def test_select_interrupted_while_writing(tmp_path, mixed_corpus, sig):
    prefix = mixed_corpus[0]
    ref = tmp_path / "ref" / "sel"
    rc, err = run(select_args(prefix, ref), tmp_path, name="ref")
    assert rc == 0, err
    out = tmp_path / "out" / "sel"
    job = Job(select_args(prefix, out), tmp_path, pause="select-write")
    job.wait_paused()
    rc = job.signal(sig)
    left = leftovers(out.parent)
    if sig == signal.SIGKILL:
        assert rc == -sig and any(n.startswith(".sel.bin.") for n in left), left
    else:
        assert rc == 128 + sig and left == [], left
        assert "Traceback" not in job.stderr and "nothing was written to" in job.stderr, job.stderr
    assert not [p for p in out.parent.iterdir() if not p.name.startswith(".")]
    rc, err = run(select_args(prefix, out), tmp_path, name="rerun")
    assert rc == 0, err
    assert leftovers(out.parent) == []
    for ext in (".bin", ".idx"):
        assert Path(f"{out}{ext}").read_bytes() == Path(f"{ref}{ext}").read_bytes()


# -- item 3: a dataset without documents -----------------------------------------------------------------

@pytest.fixture
def empty_dataset(tmp_path, tokenizer_dir):
    from megacpt.data.tokenizer import load_tokenizer

    prefix = tmp_path / "empty"
    with IndexedDatasetWriter(prefix, np.uint16):
        pass
    write_sidecar(prefix, {"tokenizer": load_tokenizer(tokenizer_dir).identity(), "dtype": "uint16"})
    return str(prefix)


@pytest.mark.parametrize("command", ["dsir", "select"])
def test_zero_document_dataset_is_an_error(tmp_path, empty_dataset, task_jsonl, capsys, command):
    argv = (dsir_args(empty_dataset, task_jsonl, tmp_path / "s.parquet") if command == "dsir"
            else select_args(empty_dataset, tmp_path / "sel"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the dataset {empty_dataset} has 0 documents" in err, err
    assert not list(tmp_path.glob("s.parquet*")) and not list(tmp_path.glob("sel*"))
