"""Two nodes simulated on one machine: two ``torchrun`` agents on localhost joined by a c10d rendezvous
(``--nnodes 2 --nproc-per-node 1`` each, gloo on CPU, the tiny model and corpus of tests/train).

- ``train`` across 2 nodes gives the losses of the single-node DP=2 run (bitwise) and of one process;
  ``score perplexity`` across 2 nodes writes the file one process writes;
- a node lost mid-scoring ends the other with one line; ``--resume`` on both nodes finishes the file;
- a node lost mid-run (SIGKILL of its agent and workers) ends the other one with one clear line within
  seconds; a node that stops answering ends it after ``train.collective_timeout_s``;
- relaunching both agents resumes bitwise from the last complete checkpoint.

Node A hosts the rendezvous store (``is_host=1``, as the first node of a Slurm allocation does); node B is
the one that fails. The uninterrupted 2-node run and the killed run are module fixtures shared by the tests:
starting torch in every process dominates a launch's cost on 2 cores. Every launch has a timeout and every
agent still running at the end of a test is killed with its workers (``megacpt.testing.nodes``).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megacpt.checkpoint import checkpoint_tensors, latest_checkpoint, read_tensors
from megacpt.testing import TorchrunNode, free_port, nodes, torchrun_args, wait_for
from tests.train.conftest import job_overrides, make_dataset

ROOT = Path(__file__).resolve().parents[2]
ITERS, SAVE, PAUSE = 8, 4, 6  # checkpoints at 4 and 8; node B stops after step 6: a relaunch resumes from 4
LAUNCH_S = 150                # a launch slower than this has hung: fail instead of waiting
LOST_NODE_S = 60              # the surviving node must be gone this soon after losing its peer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode_data")
    return {"train": make_dataset(d / "train"), "valid": make_dataset(d / "valid", n_docs=20, seed=1)}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGACPT_TEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
               **extra)
    return env


def _train_overrides(data, tmp: Path, *extra: str) -> list[str]:
    return job_overrides(data, f"train.train_iters={ITERS}", f"checkpoint.save={tmp / 'ck'}",
                         f"checkpoint.save_interval={SAVE}", "checkpoint.keep_last=0",
                         f"logging.jsonl={tmp / 'metrics.jsonl'}", *extra)


def _two_nodes(started: list, entry: list[str], tmp: Path, name: str, env_b: dict | None = None):
    """Start agents A (hosts the store) and B of one 2-node job on a free port; returns (A, B)."""
    port = free_port()
    for node, is_host, env in (("a", 1, {}), ("b", 0, env_b or {})):
        cmd = torchrun_args(2, 1, f"127.0.0.1:{port}", run_id=name, rdzv_conf={"is_host": is_host}) + entry
        started.append(TorchrunNode(cmd, tmp / f"{name}.{node}.log", cwd=ROOT, env=_env(**env)))
    return started[-2], started[-1]


def _succeed(*agents: TorchrunNode) -> None:
    for n in agents:
        assert n.wait(LAUNCH_S) == 0, n.output()[-4000:]


def _losses(path: Path) -> dict[int, float]:
    """iteration -> loss; a relaunch's records replace the killed run's for the same iterations."""
    return {r["iteration"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    with nodes() as started:
        _succeed(*_two_nodes(started, ["-m", "megacpt", "train", *_train_overrides(data, tmp)], tmp, "full"))
    return {"tmp": tmp, "losses": _losses(tmp / "metrics.jsonl")}


def _pause_at(tmp: Path, extra: list[str], name: str, then):
    """A 2-node run whose node B stops after step PAUSE; ``then(A, B)`` once B's rank has stopped, inside
    the launch (every agent is killed on the way out)."""
    entry = ["-m", "tests.distributed.pausing_train", "train", *extra]
    with nodes() as started:
        a, b = _two_nodes(started, entry, tmp, name, env_b={"MEGACPT_TEST_PAUSE_AT": str(PAUSE),
                                                           "MEGACPT_TEST_PAUSED": str(tmp / "paused")})
        wait_for(lambda: any(tmp.glob("paused.*")), LAUNCH_S, f"node B to stop after step {PAUSE}", alive=(a, b))
        return then(a, b)


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """Node B is SIGKILLed (agent and worker) while node A waits for it in a collective after step PAUSE."""
    tmp = tmp_path_factory.mktemp("killed")
    overrides = _train_overrides(data, tmp)

    def kill_b(a, b):
        t0 = time.monotonic()
        b.kill()
        rc = a.wait(LOST_NODE_S + 30)
        return rc, time.monotonic() - t0, a.output()

    rc, elapsed, out = _pause_at(tmp, overrides, "killed", kill_b)
    return {"tmp": tmp, "overrides": overrides, "rc": rc, "elapsed": elapsed, "out": out}


@pytest.mark.distributed
def test_train_two_nodes_equals_one_node_and_one_process(uninterrupted, data, tmp_path):
    """2 nodes x 1 rank == 1 node x 2 ranks (torchrun --standalone), bitwise; == one process (the
    single-process reference of tests/train) up to the order of fp32 reductions."""
    from megacpt.train import trainer
    from megacpt.train.job import load_job_config

    with nodes() as started:
        started.append(TorchrunNode(torchrun_args(1, 2, None) + ["-m", "megacpt", "train",
                                                                 *_train_overrides(data, tmp_path)],
                                    tmp_path / "one-node.log", cwd=ROOT, env=_env()))
        _succeed(started[0])
    two_nodes, one_node = uninterrupted["losses"], _losses(tmp_path / "metrics.jsonl")
    assert sorted(two_nodes) == list(range(1, ITERS + 1))
    assert two_nodes == one_node
    single = trainer.train(load_job_config(None, job_overrides(data, f"train.train_iters={ITERS}")))
    assert sorted(single.losses) == sorted(two_nodes)
    for i, loss in single.losses.items():
        assert two_nodes[i] == pytest.approx(loss, rel=1e-5, abs=1e-6), i


@pytest.mark.distributed
def test_score_two_nodes_equals_one_process(uninterrupted, data, tmp_path):
    """`score perplexity` of the trained checkpoint, 2 nodes (shards dealt over 2 ranks) vs 1 process."""
    from megacpt.cli import main
    from megacpt.score.files import read_scores

    common = ["score", "perplexity", "--model", str(uninterrupted["tmp"] / "ck"), "--data", data["valid"],
              "--seq-length", "32", "--shard-docs", "3", "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one.parquet")]) == 0
    with nodes() as started:
        _succeed(*_two_nodes(started, ["-m", "megacpt", *common, "--out", str(tmp_path / "two.parquet")],
                             tmp_path, "score"))
    one, two = read_scores(tmp_path / "one.parquet"), read_scores(tmp_path / "two.parquet")
    assert one.num_rows == 20
    for k in one.columns:
        np.testing.assert_array_equal(one.columns[k], two.columns[k], err_msg=k)


@pytest.mark.distributed
@pytest.mark.fault(fault="kill -9 of one node (its torchrun agent and workers) mid-run, then a relaunch with --resume",
                   stage="score perplexity, 2 nodes (torchrun, c10d rendezvous)",
                   sees="the other node finishes its own shards, then exits non-zero within seconds: `megacpt score: "
                        "error: rank R: lost a peer while scoring (Connection closed by peer ...) ... The committed "
                        "shards are kept in OUT.shards: relaunch every node with the same command plus --resume`; "
                        "the relaunch says `resuming, K/N shards already committed`",
                   left="OUT.shards/ with every shard committed before the loss; after the relaunch, OUT equal to "
                        "one process's file and no OUT.shards")
def test_lost_node_while_scoring_ends_the_other_and_resume_finishes(uninterrupted, data, tmp_path):
    from megacpt.cli import main
    from megacpt.score.files import read_scores

    out = tmp_path / "two.parquet"
    common = ["score", "perplexity", "--model", str(uninterrupted["tmp"] / "ck"), "--data", data["valid"],
              "--seq-length", "32", "--shard-docs", "3", "--device", "cpu", "--no-progress"]
    with nodes() as started:  # node B stops after committing its first shard; node A scores its own, then waits
        a, b = _two_nodes(started, ["-m", "megacpt", *common, "--out", str(out)], tmp_path, "score-lost",
                          env_b={"MEGACPT_TEST_PAUSE": f"score-shard:{tmp_path / 'paused'}"})
        wait_for(lambda: (tmp_path / "paused").exists(), LAUNCH_S, "node B to commit a shard", alive=(a, b))
        t0 = time.monotonic()
        b.kill()
        rc = a.wait(LOST_NODE_S + 30)
        elapsed, log_a = time.monotonic() - t0, a.output()
    assert rc != 0, log_a[-4000:]
    assert elapsed < LOST_NODE_S, elapsed
    assert re.search(r"megacpt score: error: rank 0: lost a peer while scoring \(Connection (closed|reset) by peer",
                     log_a), log_a[-4000:]
    assert f"kept in {out}.shards: relaunch every node with the same command plus --resume" in log_a, log_a[-4000:]
    assert not out.exists() and len(list((tmp_path / "two.parquet.shards").glob("*.parquet"))) >= 2
    with nodes() as started:
        a, b = _two_nodes(started, ["-m", "megacpt", *common, "--out", str(out), "--resume"], tmp_path, "score-again")
        _succeed(a, b)
    assert re.search(r"resuming, [1-9]\d*/7 shards already committed", a.output()), a.output()[-4000:]
    assert main([*common, "--out", str(tmp_path / "one.parquet")]) == 0
    one, two = read_scores(tmp_path / "one.parquet"), read_scores(out)
    for k in one.columns:
        np.testing.assert_array_equal(one.columns[k], two.columns[k], err_msg=k)
    assert not (tmp_path / "two.parquet.shards").exists()


@pytest.mark.distributed
@pytest.mark.fault(fault="kill -9 of one node (its torchrun agent and workers) mid-run",
                   stage="train, 2 nodes (torchrun, c10d rendezvous)",
                   sees="the other node exits non-zero within seconds: `megacpt train: error: rank R: lost a peer "
                        "after iteration N (Connection closed by peer ...): another rank's process or node died or "
                        "stopped answering ... Relaunch every node with the same command to resume from the last "
                        "complete checkpoint, CKPT/iter_...`",
                   left="the complete checkpoints of the run so far; `latest` names the newest; no partial one")
def test_lost_node_ends_the_other_with_a_clear_error(killed):
    assert killed["rc"] != 0, killed["out"][-4000:]
    assert killed["elapsed"] < LOST_NODE_S, killed["elapsed"]
    out = killed["out"]
    assert re.search(rf"megacpt train: error: rank [01]: lost a peer after iteration {PAUSE} \(Connection "
                     r"(closed|reset) by peer", out), out[-4000:]
    ck = killed["tmp"] / "ck"
    assert f"resume from the last complete checkpoint, {ck / 'iter_0000004'}" in out, out[-4000:]
    assert latest_checkpoint(ck).name == "iter_0000004"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000004"]


@pytest.mark.distributed
@pytest.mark.fault(fault="relaunch of every node after one was lost mid-run",
                   stage="train, 2 nodes (torchrun, c10d rendezvous)",
                   sees="`resumed from CKPT/iter_... at iteration N`; the run finishes with the losses of an "
                        "uninterrupted run",
                   left="the final checkpoint, bit-identical (model and optimizer) to the uninterrupted run's")
def test_relaunch_resumes_bitwise_from_the_last_checkpoint(killed, uninterrupted):
    tmp = killed["tmp"]
    with nodes() as started:
        a, b = _two_nodes(started, ["-m", "megacpt", "train", *killed["overrides"]], tmp, "relaunch")
        _succeed(a, b)
    assert f"resumed from {tmp / 'ck' / 'iter_0000004'} at iteration {SAVE}" in a.output() + b.output()
    ref, got = uninterrupted["losses"], _losses(tmp / "metrics.jsonl")
    assert [got[i] for i in range(SAVE + 1, ITERS + 1)] == [ref[i] for i in range(SAVE + 1, ITERS + 1)]
    ca, cb = uninterrupted["tmp"] / "ck" / "iter_0000008", tmp / "ck" / "iter_0000008"
    names = sorted(checkpoint_tensors(ca, prefix=""))
    assert names == sorted(checkpoint_tensors(cb, prefix="")) and any(n.startswith("optim.") for n in names)
    ta, tb = read_tensors(ca, names, prefix=""), read_tensors(cb, names, prefix="")
    for n in names:
        assert torch.equal(ta[n], tb[n]), n


@pytest.mark.distributed
@pytest.mark.fault(fault="one node stops answering mid-run (hung, not dead)",
                   stage="train, 2 nodes (torchrun, c10d rendezvous)",
                   sees="after train.collective_timeout_s the other node exits non-zero with the same line: `lost "
                        "a peer after iteration N (Timed out waiting ... ms for recv operation to complete) ... "
                        "Relaunch every node ...`",
                   left="the complete checkpoints of the run so far; `latest` names the newest")
def test_hung_node_ends_the_other_after_the_collective_timeout(data, tmp_path):
    timeout = 8

    def wait_a(a, b):
        t0 = time.monotonic()
        rc = a.wait(timeout + LOST_NODE_S)
        return rc, time.monotonic() - t0, a.output()

    rc, elapsed, out = _pause_at(tmp_path, _train_overrides(data, tmp_path, f"train.collective_timeout_s={timeout}"),
                                 "hung", wait_a)
    assert rc != 0, out[-4000:]
    assert elapsed < timeout + 30, elapsed
    assert f"lost a peer after iteration {PAUSE} (Timed out" in out and "collective_timeout_s=8 s" in out, out[-4000:]
    assert latest_checkpoint(tmp_path / "ck").name == "iter_0000004"


def test_what_counts_as_a_lost_peer(tmp_path):
    """The backends' words for a dead or silent peer become the one-line PeerLost; other errors keep their
    traceback. Without a checkpoint the line says a relaunch starts over."""
    from megacpt.train import trainer
    from megacpt.train.job import load_job_config

    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:42681. This is typically caused by a remote worker crashing.")
    assert trainer.is_peer_failure(RuntimeError(gloo))
    assert trainer.is_peer_failure(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 8000ms for recv"))
    assert trainer.is_peer_failure(torch.distributed.DistNetworkError("store gone"))
    assert not trainer.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    job = load_job_config(None, ["model_preset=tiny", f"checkpoint.save={tmp_path / 'ck'}"])
    msg = str(trainer.peer_lost(RuntimeError(gloo), job, trainer.Runtime(3, 4, torch.device("cpu"), None), 7))
    assert msg.startswith("rank 3: lost a peer after iteration 7 (Connection closed by peer [127.0.0.1]:42681): ")
    assert msg.endswith("No checkpoint yet: relaunching every node starts from the beginning"), msg
