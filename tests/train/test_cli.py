"""`megacpt train`: frozen flags, the example configs parse and validate, the tiny CPU config runs."""
import json
from pathlib import Path

import pytest

from megacpt.cli import build_command_parser, main
from tests.train.conftest import job_overrides

REPO = Path(__file__).resolve().parents[2]


def test_flags_are_frozen():
    p = build_command_parser("train")
    flags = {s for a in p._actions for s in a.option_strings}
    assert {"--config", "--print-config", "--log-level", "--dry-run", "--world-size", "--dataset-tokens"} <= flags
    args = p.parse_args(["--config", "x.yaml", "train.train_iters=3", "data.seq_length=16"])
    assert args.config == "x.yaml" and args.overrides == ["train.train_iters=3", "data.seq_length=16"]


def test_finpythia_recipe_validates_for_32_gpus(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert main(["train", "--config", str(REPO / "examples/configs/finpythia-6.9b-dacp.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["parallel"]["data_parallel_size"] == 16 and cfg["model"]["hidden_size"] == 4096
    assert cfg["train"]["global_batch_size"] % (cfg["train"]["micro_batch_size"] * 16) == 0
    monkeypatch.setenv("WORLD_SIZE", "12")  # 12 GPUs: dp=6 does not divide 1024 / 4
    assert main(["train", "--config", str(REPO / "examples/configs/finpythia-6.9b-dacp.yaml"), "--print-config"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err


def test_tiny_cpu_config_trains_single_process(tiny_data, tmp_path, capsys):
    """The demo's entry: the example config + overrides (data, steps, output dir), no torchrun."""
    over = [o for o in job_overrides(tiny_data, "train.train_iters=2", "model.vocab_size=1000",
                                     "model.max_position_embeddings=256", f"checkpoint.save={tmp_path / 'run'}")
            if not o.startswith(("train.micro", "train.global"))]
    assert main(["train", "--config", str(REPO / "examples/configs/tiny-cpu.yaml"), *over]) == 0
    out = capsys.readouterr().out
    assert "iter 2/2" in out and "eval valid @ 2" in out
    assert next(x for x in out.splitlines() if "iter 1/2" in x).endswith(tuple(f"| ETA {s}s" for s in range(60)))
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000002"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-2]["kind"] == "train" and recs[-2]["iteration"] == 2 and recs[-2]["eta_s"] == 0


@pytest.mark.distributed
@pytest.mark.integration
def test_torchrun_launch_matches_single_process(tiny_data, tmp_path):
    """`torchrun -m megacpt train` (the trainer creates the gloo process group itself) at tp=2."""
    import os
    import subprocess
    import sys

    from megacpt.train.job import load_job_config
    from megacpt.train import trainer

    over = job_overrides(tiny_data, "train.train_iters=3")
    single = trainer.train(load_job_config(None, over))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megacpt", "train", *over, "parallel.tensor_model_parallel_size=2",
           f"checkpoint.save={tmp_path / 'ck'}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iteration"]: r["loss"] for r in recs if r["kind"] == "train"}
    assert losses.keys() == single.losses.keys()
    for i, v in single.losses.items():
        assert losses[i] == pytest.approx(v, rel=1e-5, abs=1e-6)
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"
