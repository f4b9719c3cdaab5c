"""LR schedule values at given steps, weight-decay groups, FLOPs formula and MFU."""
import math

import pytest
import torch

from megacpt.config import ModelConfig, OptimizerConfig, SchedulerConfig
from megacpt.train.metrics import Throughput, flops_per_token, peak_flops
from megacpt.train.optim import LRSchedule, build_optimizer, param_groups


def sched(style="cosine", warmup=10, decay=110, init=0.0, min_lr=1e-5, lr=1e-4):
    return LRSchedule(OptimizerConfig(lr=lr), SchedulerConfig(warmup_iters=warmup, warmup_init_lr=init,
                                                              decay_style=style, decay_iters=decay, min_lr=min_lr), 999)


def test_warmup_then_cosine():
    s = sched()
    assert s(1) == pytest.approx(1e-5) and s(5) == pytest.approx(5e-5) and s(10) == pytest.approx(1e-4)
    assert s(60) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))      # half-way: cos(pi/2) = 0
    assert s(35) == pytest.approx(1e-5 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-5)
    assert s(110) == pytest.approx(1e-5) and s(500) == pytest.approx(1e-5)
    assert all(s(n) >= s(n + 1) for n in range(10, 200))           # monotone decay


def test_rewarm_from_init_linear_and_constant():
    s = sched(init=1e-6)
    assert s(1) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 10)
    lin = sched("linear", warmup=0, decay=100, min_lr=0.0)
    assert lin(1) == pytest.approx(1e-4 * 0.99) and lin(50) == pytest.approx(5e-5) and lin(100) == 0.0
    const = sched("constant", warmup=4)
    assert const(2) == pytest.approx(5e-5) and const(5) == const(10_000) == 1e-4
    assert sched().differences(sched().state_dict()) == []
    assert "warmup" in sched(warmup=3).differences(sched().state_dict())[0]


def test_weight_decay_groups():
    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.model.presets import PRESETS

    model = GPTNeoX(PRESETS["tiny"])
    g = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in g[0]["params"]}
    plain = {names[id(p)] for p in g[1]["params"]}
    assert g[0]["weight_decay"] == 0.1 and g[1]["weight_decay"] == 0.0
    assert "embed_in.weight" in decayed and "layers.0.attention.query_key_value.weight" in decayed
    assert "layers.0.input_layernorm.weight" in plain and "layers.0.attention.query_key_value.bias" in plain
    assert "final_layer_norm.bias" in plain and not decayed & plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] is False  # CPU: single-tensor
    assert build_optimizer(model, OptimizerConfig(impl="foreach")).defaults["foreach"]
    from megacpt.errors import UserError
    with pytest.raises(UserError, match="optimizer.impl"):
        build_optimizer(model, OptimizerConfig(impl="fused"))


def test_flops_formula_matches_narayanan():
    cfg = ModelConfig(vocab_size=50277, hidden_size=4096, num_layers=32, num_heads=32, padded_vocab_size=50432)
    s, h, l, v = 2048, 4096, 32, 50432
    narayanan = 72 * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))  # per token, no recompute
    assert flops_per_token(cfg, s) == pytest.approx(narayanan)
    assert flops_per_token(cfg, s) / flops_per_token(cfg, s, training=False) == 3
    assert 6 * 6.86e9 < flops_per_token(cfg, s) < 6 * 6.86e9 * 1.1  # ~6N plus attention
    # without attention: 6 x the matmul parameters (everything but the input embedding and the norms/biases)
    n_matmul = l * (4 * h * h + 2 * h * 4 * h) + v * h
    assert flops_per_token(cfg, s, attention=False) == pytest.approx(6 * n_matmul)
    assert flops_per_token(cfg, s) - flops_per_token(cfg, s, attention=False) == pytest.approx(12 * l * s * h)


def test_throughput_eta_from_the_pace_of_this_run(monkeypatch):
    import megacpt.train.metrics as metrics

    now = [50.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    meter = Throughput(1.0, 1, None)
    assert meter.eta_s(10) is None                       # no step yet
    for _ in range(4):
        now[0] += 2.5
        meter.add(100)
        meter.report()                                   # windows reset; the ETA's pace does not
    assert meter.eta_s(6) == pytest.approx(15.0) and meter.eta_s(0) == 0


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("cpu", "fp32") is None and peak_flops("cpu", "fp32", 1e11) == 1e11
    t = Throughput(flops_per_token=1e9, n_devices=2, peak=1e12)
    t.t0 -= 2.0  # pretend 2 s passed
    t.add(1000)
    r = t.report()
    assert r["tokens_per_s"] == pytest.approx(500, rel=0.01)
    assert r["tflops_per_device"] == pytest.approx(500 * 1e9 / 2 / 1e12, rel=0.01)
    assert r["mfu"] == pytest.approx(0.25, rel=0.01)
