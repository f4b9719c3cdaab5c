"""The sizing arithmetic (megacpt.train.sizing): layer counts against the real model, the peak-memory model
(megacpt.train.plan's estimate + peak terms) against measured GPU peaks, the ring collective formulas, the
per-layer fit, the plan's days and the CLI."""
import dataclasses

import pytest
import torch

from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.model.presets import get_preset
from megacpt.train import sizing
from megacpt.train.sizing import GiB, Interconnect, Layout, Measurement


def test_layer_and_root_counts_match_the_model():
    cfg = get_preset("pythia-1b")
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    assert sizing.layer_params(cfg) == sum(p.numel() for p in model.layers["0"].parameters())
    assert sizing.root_params(cfg) + cfg.num_layers * sizing.layer_params(cfg) == model.num_params()


def test_memory_model_against_measured_h100_peaks():
    """docs/benchmarks.md, GPU runs 2026-11-26: Pythia-1B, micro 8 x 2048, bf16 autocast, one H100:
    peak allocated 38.5 GiB with the fused loss, 46.8 GiB with logits + cross-entropy."""
    cfg = get_preset("pythia-1b")
    fused = sizing.memory_per_gpu(cfg, 2048, Layout(n_gpus=1, micro_batch=8))
    plain = sizing.memory_per_gpu(cfg, 2048, Layout(n_gpus=1, micro_batch=8, fused_loss=False))
    assert fused["total"] / GiB == pytest.approx(38.5, rel=0.05)
    assert plain["total"] / GiB == pytest.approx(46.8, rel=0.05)
    assert fused["total"] == pytest.approx(sum(v for k, v in fused.items() if k != "total"))
    # the dry-run estimate (megacpt.train.plan) is its base: what is held for backward
    from megacpt.train.plan import estimate_memory

    base = estimate_memory(sizing.job_for(cfg, 2048, Layout(n_gpus=1, micro_batch=8)), 1)
    assert all(fused[k] == base[k] for k in base if k != "total")


def test_memory_sharding_and_options():
    cfg = get_preset("pythia-6.9b")
    base = Layout(n_gpus=32, tp=2, micro_batch=4, recompute="selective", sequence_parallel=True)
    m32 = sizing.memory_per_gpu(cfg, 2048, base)
    m8 = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, n_gpus=8))
    assert m8["model_state"] == pytest.approx(4 * m32["model_state"])            # FSDP over dp 4 vs 16
    ddp = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, fsdp=False))
    assert ddp["model_state"] > 15 * sizing.total_params(cfg) / 2 and "fsdp_root" not in ddp
    bf16 = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, param_dtype_bytes=2))
    assert "output_layer_copy" not in bf16 and bf16["total"] < m32["total"]
    keep = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, reshard_after_forward=False))
    assert keep["fsdp_all_layers"] > 0 and keep["total"] > m32["total"]
    full = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, recompute="full"))
    assert full["activations"] < m32["activations"]
    no_sp = sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, sequence_parallel=False))
    assert no_sp["activations"] > m32["activations"]
    with pytest.raises(UserError, match="tp=3"):
        sizing.memory_per_gpu(cfg, 2048, dataclasses.replace(base, n_gpus=9, tp=3))


def test_ring_collectives_and_bandwidth_choice():
    net = Interconnect(intra_node_busbw=100e9, inter_node_busbw=10e9, gpus_per_node=8)
    assert net.busbw(2, 1) == 100e9 and net.busbw(4, 2) == 100e9      # dp 4 strided by tp 2: one node
    assert net.busbw(16, 2) == 10e9                                    # dp 16 x tp 2 spans 4 nodes
    cfg = get_preset("pythia-1b")
    lay = Layout(n_gpus=8, tp=2, micro_batch=2)
    c = sizing.comm_seconds(cfg, 2048, lay, net)
    act = 2 * 2048 * 2 * cfg.hidden_size
    assert c["tp"] == pytest.approx(cfg.num_layers * 4 * act * 2 * (1 / 2) / 100e9)
    n = sizing.total_params(cfg) / 2
    assert c["dp_gather"] == pytest.approx(2 * 4 * n * 3 / 4 / 100e9)
    assert c["dp_reduce"] == pytest.approx(4 * n * 3 / 4 / 100e9)
    single = sizing.comm_seconds(cfg, 2048, Layout(n_gpus=1), net)
    assert single == {"tp": 0.0, "dp_gather": 0.0, "dp_reduce": 0.0}


def test_fit_and_plan_arithmetic():
    cfg = get_preset("pythia-6.9b")
    # synthetic inputs for the arithmetic (not a measurement): t(L) = 0.05 + 0.02 L seconds
    meas = Measurement(micro_batch=4, seq=2048, recompute="selective", step_seconds={2: 0.09, 4: 0.13, 8: 0.21})
    alpha, beta = meas.fit()
    assert alpha == pytest.approx(0.05) and beta == pytest.approx(0.02)
    net = Interconnect()
    lay = Layout(n_gpus=8, tp=2, micro_batch=4, recompute="selective", sequence_parallel=True)
    p = sizing.plan(cfg, 2048, 1024, lay, meas, net, {"2.4B": 2.4e9, "24B": 24e9})
    compute = (0.05 + 32 * 0.02) / 2
    n_micro = 1024 // (4 * 4)
    c = sizing.comm_seconds(cfg, 2048, lay, net)
    opt = sizing.OPT_BYTES_PER_PARAM * sizing.total_params(cfg) / 8 / net.hbm_bandwidth
    hi = n_micro * (compute + c["tp"] + c["dp_gather"] + c["dp_reduce"]) + opt
    assert p.step_seconds[1] == pytest.approx(hi)
    assert p.step_seconds[0] <= p.step_seconds[1]
    assert p.days["24B"][1] == pytest.approx(24e9 / (1024 * 2048 / hi) / 86400)
    assert p.days["24B"][0] == pytest.approx(10 * p.days["2.4B"][0])
    # full recompute costs one more forward per layer: 4/3 of the no-recompute layer time
    full = sizing.micro_step_compute(cfg, dataclasses.replace(lay, recompute="full"), meas)
    none = sizing.micro_step_compute(cfg, dataclasses.replace(lay, recompute="none"), meas)
    assert none < compute < full
    with pytest.raises(UserError, match="two or more"):
        Measurement(4, 2048, "none", {4: 0.1}).fit()
    with pytest.raises(UserError, match="seq"):
        sizing.plan(cfg, 4096, 1024, lay, meas, net, {})
    with pytest.raises(UserError, match="divisible"):
        sizing.plan(cfg, 2048, 1000, lay, meas, net, {})


def test_candidates_and_recommendation():
    cfg = get_preset("pythia-6.9b")
    meas = Measurement(micro_batch=4, seq=2048, recompute="selective", step_seconds={2: 0.09, 4: 0.13})
    cands = sizing.candidate_layouts(cfg, 32, 1024)
    assert {c.tp for c in cands} == {1, 2, 4, 8} and all(1024 % (c.micro_batch * c.dp) == 0 for c in cands)
    plans = [sizing.plan(cfg, 2048, 1024, c, meas, Interconnect(), {"24B": 24e9}) for c in cands]
    best = sizing.recommend(plans)
    assert best is not None and best.fits
    assert all(best.step_seconds[1] <= p.step_seconds[1] + 1e-9 for p in plans if p.fits)
    tiny_gpu = Interconnect(gpu_memory=1 * GiB)
    assert sizing.recommend([sizing.plan(cfg, 2048, 1024, c, meas, tiny_gpu, {}) for c in cands[:4]]) is None


def test_sizing_cli_reads_a_measurement(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"kind": "sizing-measurement", "preset": "pythia-6.9b", "seq": 2048, "micro_batch": 4,
                             "recompute": "selective", "step_seconds": {"2": 0.09, "4": 0.13},
                             "device": "synthetic", "date": "test", "command": "test"}))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "sizing.py"), str(m), "--json-out",
                          str(tmp_path / "plans.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "690 ms for 32 layers" in out.stdout and out.stdout.count("**recommended**") == 2
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert {p["n_gpus"] for p in plans} == {8, 32} and all("days" in p for p in plans)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "sizing.py"), str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not a sizing measurement" in out.stderr
