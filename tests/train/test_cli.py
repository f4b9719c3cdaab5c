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
    assert {"--config", "--print-config", "--log-level"} <= flags
    args = p.parse_args(["--config", "x.yaml", "train.train_iters=3", "data.seq_length=16"])
    assert args.config == "x.yaml" and args.overrides == ["train.train_iters=3", "data.seq_length=16"]


def test_finpythia_recipe_validates_for_32_gpus(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert main(["train", "--config", str(REPO / "examples/configs/finpythia-6.9b.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["parallel"]["data_parallel_size"] == 16 and cfg["model"]["hidden_size"] == 4096
    assert cfg["train"]["global_batch_size"] % (cfg["train"]["micro_batch_size"] * 16) == 0
    monkeypatch.setenv("WORLD_SIZE", "12")  # 12 GPUs: dp=6 does not divide 1024 / 4
    assert main(["train", "--config", str(REPO / "examples/configs/finpythia-6.9b.yaml"), "--print-config"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err


def test_tiny_cpu_config_trains_single_process(tiny_data, tmp_path, capsys):
    """The demo's entry: the example config + overrides (data, steps, output dir), no torchrun."""
    over = [o for o in job_overrides(tiny_data, "train.train_iters=2", "model.vocab_size=1000",
                                     "model.max_position_embeddings=256", f"checkpoint.save={tmp_path / 'run'}")
            if not o.startswith(("train.micro", "train.global"))]
    assert main(["train", "--config", str(REPO / "examples/configs/tiny-cpu.yaml"), *over]) == 0
    out = capsys.readouterr().out
    assert "iter 2/2" in out and "eval valid @ 2" in out
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000002"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-2]["kind"] == "train" and recs[-2]["iteration"] == 2
