"""One training micro-step (forward + backward, bf16 autocast on GPU) with the fused linear + cross-entropy
loss vs the model's logits + cross-entropy, same model, same tokens, alternating; then a profiler table of
one step of each (top GPU/CPU ops). Shows what the fused loss costs or saves inside the trainer's
`loss_sum`, where `train_throughput.py` shows only the total.

    python benchmarks/fused_loss_step.py                       # GPU: pythia-1b, 8 x 2048 tokens
    python benchmarks/fused_loss_step.py --preset toy-4m --batch 4 --seq-length 256   # CPU, fp32
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megacpt.model.gpt_neox import GPTNeoX  # noqa: E402
from megacpt.model.presets import get_preset  # noqa: E402
from megacpt.train.trainer import loss_sum  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="default: pythia-1b (GPU), toy-4m (CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=None, help="default: 2048 (GPU), 256 (CPU)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    cfg = get_preset(args.preset or ("pythia-1b" if gpu else "toy-4m"))
    seq = args.seq_length or (2048 if gpu else 256)
    with torch.device(dev):
        model = GPTNeoX(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), device=dev)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def step(fused: bool):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            loss = loss_sum(model, ids, cfg, fused)
        loss.backward()

    best = {}
    for fused in (False, True, False, True):
        for _ in range(2):
            step(fused)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(fused)
        sync()
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        best[fused] = min(best.get(fused, float("inf")), ms)
        print(f"fused={fused}: {ms:.1f} ms per micro-step", flush=True)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{name} | {cfg.name if hasattr(cfg, 'name') else args.preset} | {args.batch} x {seq} tokens | "
          f"best: logits+CE {best[False]:.1f} ms, fused {best[True]:.1f} ms, "
          f"ratio {best[False] / best[True]:.2f}x")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        for fused in (False, True):
            with profile(activities=acts) as prof:
                step(fused)
                sync()
            print(f"--- fused={fused}")
            key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
