"""Training throughput: `megacpt.train` beside a plain loop over HF `GPTNeoXForCausalLM` + AdamW.

Same model shape, same data (the very samples megacpt trains on), same micro/global batch and gradient
accumulation, same AdamW hyper-parameters and clipping, in the same process, one after the other. Prints
tokens/s, model TFLOP/s and MFU of both, and the ratio (target: megacpt not slower).

MFU uses the model-FLOPs formula of `megacpt.train.metrics` (PaLM/Megatron convention, no recompute). On
CPU the peak is *measured* here (a large fp32/bf16 matmul, the best this machine's BLAS reaches), unless
--peak-flops is given; on GPU it comes from the datasheet table (A100/H100/H200).

  python benchmarks/train_throughput.py                          # CPU, toy-4m preset, fp32
  python benchmarks/train_throughput.py --device cuda --preset pythia-1b --seq-length 2048 \\
      --micro-batch 8 --global-batch 16 --iters 20 --warmup 5   # one GPU, bf16 autocast
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megacpt.train.job import load_job_config  # noqa: E402
from megacpt.data.indexed import IndexedDatasetWriter, optimal_dtype, write_sidecar  # noqa: E402
from megacpt.model.presets import PRESETS  # noqa: E402
from megacpt.train import trainer  # noqa: E402
from megacpt.train.metrics import flops_per_token, peak_flops  # noqa: E402


def make_corpus(prefix: Path, vocab: int, n_tokens: int, seed: int = 0) -> None:
    """Random documents of 200..2000 tokens (throughput does not depend on the text)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, optimal_dtype(vocab)) as w:
        left = n_tokens
        while left > 0:
            n = int(min(left, rng.integers(200, 2000)))
            w.add_document([rng.integers(0, vocab - 1, n).tolist() + [vocab - 1]])
            left -= n + 1
    write_sidecar(prefix, {"tokenizer": {"type": "bench", "sha256": "bench", "vocab_size": vocab, "eod": vocab - 1}})


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> tuple[float, float]:
    """(FLOP/s per wall-clock second, FLOP/s per CPU-second) of a large matmul: the CPU's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 5
    w0, c0 = _now()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    w1, c1 = _now()
    return 2 * n ** 3 * reps / (w1 - w0), 2 * n ** 3 * reps / (c1 - c0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared, overloaded machine wall time measures the
    neighbours; CPU seconds (all threads) measure the work this process did."""
    return time.perf_counter(), time.process_time()


def run_megacpt(overrides: list[str], warmup: int, device) -> tuple[float, float, float]:
    """(tokens/s and tokens per CPU-second over the steps after ``warmup``, peak memory GiB)."""
    job = load_job_config(None, overrides)
    stamps: dict[int, tuple[float, float]] = {}

    def on_step(it, loss):
        _sync(device)
        stamps[it] = _now()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train(job, on_step=on_step)
    last = max(stamps)
    tokens = (last - warmup) * job.train.global_batch_size * job.data.seq_length
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    (w0, c0), (w1, c1) = stamps[warmup], stamps[last]
    return tokens / (w1 - w0), tokens / (c1 - c0), mem


def run_hf(overrides: list[str], warmup: int, device, bf16: bool) -> tuple[float, float, float]:
    """The plain loop: HF GPTNeoXForCausalLM, its own loss (full logits), torch AdamW, grad accumulation."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megacpt.model.hf_config import hf_config_from_model_config
    from megacpt.train.optim import param_groups

    job = load_job_config(None, overrides).validate(1)
    t, o = job.train, job.optimizer
    torch.manual_seed(t.seed)
    hf_cfg = GPTNeoXConfig(**hf_config_from_model_config(job.model))
    model = GPTNeoXForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=device.type == "cuda")
    train_ds, _ = trainer.build_datasets(job)
    rt = trainer.Runtime(rank=0, world_size=1, device=device, autocast_dtype=None)
    n_micro = t.global_batch_size // t.micro_batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = None
    for it in range(t.train_iters):
        if it == warmup:
            _sync(device)
            t_start = _now()
        batches = trainer.local_batches(train_ds, it * t.global_batch_size, job, rt, device)
        for tokens, _ in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone()).loss  # HF shifts labels
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    tokens = (t.train_iters - warmup) * t.global_batch_size * job.data.seq_length
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    w1, c1 = _now()
    return tokens / (w1 - t_start[0]), tokens / (c1 - t_start[1]), mem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="model preset (default: toy-4m on CPU, pythia-1b on GPU)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--recompute", default=None, choices=[None, "selective", "full"])
    p.add_argument("--compile", action="store_true", help="megacpt: train.compile=true (HF loop stays eager)")
    p.add_argument("--no-fused-loss", action="store_true")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternate HF, megacpt, HF, megacpt, ... and keep each side's best (load noise)")
    args = p.parse_args()

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if gpu else "cpu")
    preset = args.preset or ("pythia-1b" if gpu else "toy-4m")
    seq = args.seq_length or (2048 if gpu else 128)
    mb = args.micro_batch or (8 if gpu else 8)
    gb = args.global_batch or (16 if gpu else 16)
    iters = args.iters or (20 if gpu else 12)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    vocab = PRESETS[preset].vocab_size
    cfg = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "bench"
        make_corpus(prefix, vocab, n_tokens=iters * gb * (seq + 1) * 2 + 10_000)
        overrides = [f"model_preset={preset}", f"data.blend=[{prefix}]", f"data.seq_length={seq}",
                     "data.split=100,0,0", f"data.cache_dir={tmp}/cache", f"train.train_iters={iters}",
                     f"train.micro_batch_size={mb}", f"train.global_batch_size={gb}",
                     f"train.device={args.device}", f"train.precision={'bf16' if gpu else 'fp32'}",
                     f"train.fused_loss={str(not args.no_fused_loss).lower()}", "optimizer.lr=1e-4",
                     "scheduler.warmup_iters=1", f"logging.log_interval={iters}", "train.exit_signal_save=false"]
        if args.recompute:
            overrides.append(f"model.recompute_granularity={args.recompute}")
        if args.compile:
            overrides.append("train.compile=true")
        hf_runs, mc_runs = [], []
        for _ in range(args.repeats):
            hf_runs.append(run_hf(overrides, warmup, device, bf16=gpu))
            mc_runs.append(run_megacpt(overrides, warmup, device))
        hf_tps, hf_cpu, hf_mem = max(hf_runs)
        mc_tps, mc_cpu, mc_mem = max(mc_runs)
        hf_cpu, mc_cpu = max(r[1] for r in hf_runs), max(r[1] for r in mc_runs)
        print("runs (tok/s | tok/CPU-s): HF " + ", ".join(f"{r[0]:,.0f} | {r[1]:,.0f}" for r in hf_runs)
              + " ; megacpt " + ", ".join(f"{r[0]:,.0f} | {r[1]:,.0f}" for r in mc_runs))
    dtype = "bf16" if gpu else "fp32"
    cpu_peak = None
    if args.peak_flops:
        peak, peak_src = args.peak_flops, "--peak-flops"
    elif gpu:
        peak, peak_src = peak_flops(torch.cuda.get_device_name(), dtype), "datasheet"
    else:
        peak, cpu_peak = measured_matmul_peak(device, torch.float32)
        peak_src = f"measured 2048^3 fp32 matmul; {cpu_peak / 1e9:.1f} GFLOP per CPU-second"
    fpt = flops_per_token(cfg, seq)
    name = torch.cuda.get_device_name() if gpu else f"CPU x{args.threads} threads"
    print(f"device: {name} | preset {preset} | seq {seq} | micro {mb} | global {gb} | {dtype} | "
          f"{iters} iters ({warmup} warm-up)")
    print(f"model FLOPs/token (train, no recompute): {fpt / 1e6:.1f} MFLOP; peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    for label, tps, mem in (("HF GPTNeoXForCausalLM + AdamW", hf_tps, hf_mem), ("megacpt train", mc_tps, mc_mem)):
        tflops = tps * fpt / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "n/a"
        memtxt = "" if math.isnan(mem) else f" | peak mem {mem:.1f} GiB"
        print(f"{label:32s} {tps:12,.0f} tok/s | {tflops:7.3f} TFLOP/s | MFU {mfu}{memtxt}")
    if gpu:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"memory headroom (megacpt): {total - mc_mem:.1f} of {total:.1f} GiB")
    if cpu_peak:  # load-independent: work per CPU-second against the matmul's FLOP per CPU-second
        print(f"MFU per CPU-second: HF {100 * hf_cpu * fpt / cpu_peak:.1f}% | megacpt {100 * mc_cpu * fpt / cpu_peak:.1f}%")
    print(f"ratio megacpt / HF: {mc_tps / hf_tps:.2f}x wall-clock tokens/s, "
          f"{mc_cpu / hf_cpu:.2f}x tokens per CPU-second ({mc_cpu:,.0f} vs {hf_cpu:,.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
