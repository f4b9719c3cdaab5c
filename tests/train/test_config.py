"""Job config: YAML + dotted overrides, types, and validation errors that name the field."""
import pytest

from megacpt.train.job import JobConfig, apply_overrides, load_job_config
from megacpt.errors import UserError

BASE = ["model_preset=tiny", "data.blend=[some/prefix]", "data.seq_length=32",
        "train.micro_batch_size=2", "train.global_batch_size=8"]


def job(*extra, world=1):
    return load_job_config(None, BASE + list(extra)).validate(world)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model_preset: tiny\nmodel: {hidden_size: 32}\ndata: {blend: [1.0, a, 2, b], seq_length: 16}\n"
                 "optimizer: {lr: 3e-4}\n")
    j = load_job_config(str(p), ["optimizer.lr=1e-3", "scheduler.decay_style=linear", "train.train_iters=7"])
    assert j.model.hidden_size == 32 and j.model.num_layers == 2  # preset + override
    assert j.optimizer.lr == 1e-3 and isinstance(j.optimizer.lr, float)
    assert j.scheduler.decay_style == "linear" and j.train.train_iters == 7
    assert j.data.weights_and_prefixes() == ([1.0, 2.0], ["a", "b"])
    j.validate(1)
    assert j.to_dict()["train"]["train_iters"] == 7


def test_dp_resolved_from_world_size():
    assert job(world=4).parallel.data_parallel_size == 4
    assert job("parallel.tensor_model_parallel_size=2", world=4).parallel.data_parallel_size == 2


@pytest.mark.parametrize("override,field", [
    ("train.global_batch_size=7", "train.global_batch_size"),
    ("parallel.tensor_model_parallel_size=3", "parallel"),            # world 6 below: heads 4 % 3
    ("optimizer.lr=-1", "optimizer.lr"),
    ("scheduler.decay_style=exp", "scheduler.decay_style"),
    ("scheduler.min_lr=1.0", "scheduler.min_lr"),
    ("scheduler.warmup_iters=500", "scheduler.decay_iters"),
    ("train.precision=fp16", "train.precision"),
    ("data.seq_length=4096", "data.seq_length"),
    ("data.blend=[]", "data.blend"),
    ("data.blend=[1, a, b]", "data.blend"),
    ("data.split=abc", "data.split"),
    ("train.train_iters=ten", "train.train_iters"),
    ("train.fused_loss=3", "train.fused_loss"),
    ("checkpoint.save_interval=5", "checkpoint.save"),
    ("logging.log_interval=0", "logging.log_interval"),
    ("model.num_heads=5", "model.hidden_size"),
    ("parallel.pipeline_model_parallel_size=2", "train.global_batch_size"),  # 1 micro-batch per pp=2
])
def test_validation_names_the_field(override, field):
    world = 6 if "tensor_model" in override else (2 if "pipeline" in override else 1)
    extra = [override]
    if "pipeline" in override:
        extra.append("train.global_batch_size=2")
    with pytest.raises(UserError) as e:
        job(*extra, world=world)
    assert str(e.value).startswith(field), str(e.value)


def test_unknown_keys_and_sections():
    with pytest.raises(UserError, match=r"train: unknown field\(s\) \['itres'\]"):
        load_job_config(None, BASE + ["train.itres=3"])
    with pytest.raises(UserError, match="unknown section"):
        load_job_config(None, BASE + ["trian.train_iters=3"])
    with pytest.raises(UserError, match="model_preset: unknown preset"):
        load_job_config(None, ["model_preset=pythia-7b"])
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["train.train_iters"])


def test_bad_yaml_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_job_config(str(tmp_path / "missing.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_job_config(str(p))
    p.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_job_config(str(p))


def test_cli_reports_config_errors_cleanly(capsys):
    from megacpt.cli import main

    assert main(["train", "model_preset=tiny", "data.blend=[x]", "train.global_batch_size=3",
                 "train.micro_batch_size=2", "data.seq_length=16"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("megacpt train: error: train.global_batch_size: 3 is not divisible")
