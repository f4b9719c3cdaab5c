"""Training-step throughput of the plain model: forward + backward tokens/s and MFU, megacpt vs HF
``GPTNeoXForCausalLM`` on the same config, weights and batches, in the same process (alternating step by
step, so load changes on a shared machine hit both alike).

FLOPs per trained token (PaLM appendix B / Megatron convention; what MFU divides by):

    6 * N  +  12 * L * H * s
    N = parameters that take part in matmuls (all layers' weights + the output layer; the input embedding
        is a lookup and is excluded), L layers, H hidden size, s sequence length.
    6N: 2 FLOPs per multiply-add, x3 for forward + backward (input and weight gradients).
    12*L*H*s: attention scores QK^T and the weighted sum AV, 2 * 2 * s * H per token per layer forward, x3;
        counted over the full s x s matrix although causal attention needs half (the usual convention).

MFU = achieved FLOP/s / peak FLOP/s. On CPU the peak is measured in the same run: the best fp32 (or bf16)
throughput of a large square matmul (torch.mm), i.e. what this machine can do, not a datasheet number.
On GPU it is the datasheet dense bf16 peak (H100/H200 SXM: 989 TFLOP/s) unless --peak-flops is given.

    python benchmarks/model_step.py                          # CPU: tiny presets, fp32, vs HF
    python benchmarks/model_step.py --presets toy-4m --seq-length 512 --batch-size 4
    python benchmarks/model_step.py --device cuda            # Pythia-1B and 1.4B, bf16, seq 2048
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(model, seq_length: int) -> float:
    cfg = model.cfg
    n = sum(p.numel() for n_, p in model.named_parameters() if n_ != "embed_in.weight")
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length


def measured_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_pair(preset: str, device: str, dtype: torch.dtype, with_hf: bool):
    """megacpt model and (optionally) the HF model with the same weights."""
    from megacpt.model import GPTNeoX, get_preset
    from megacpt.model.hf_config import hf_config_from_model_config

    cfg = get_preset(preset)
    torch.manual_seed(0)
    ours = GPTNeoX(cfg).to(device=device, dtype=dtype)
    hf = None
    if with_hf:
        import transformers

        hf_cfg = transformers.GPTNeoXConfig(**hf_config_from_model_config(cfg))
        hf_cfg._attn_implementation = "sdpa"  # HF's default, the fastest it offers without extra packages
        hf = transformers.GPTNeoXForCausalLM(hf_cfg).to(device=device, dtype=dtype)
        sd = {("gpt_neox." + k if k != "embed_out.weight" else "lm_head.weight"): v
              for k, v in ours.state_dict().items()}
        res = hf.load_state_dict(sd, strict=False)
        if res.missing_keys or res.unexpected_keys:  # same weights or the comparison means nothing
            raise SystemExit(f"HF name map mismatch: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    return ours, hf


def step_fn(model, is_hf: bool):
    def step(ids):
        inp, tgt = ids[:, :-1], ids[:, 1:]
        logits = model(input_ids=inp, use_cache=False).logits if is_hf else model(inp)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
        loss.backward()
        return loss

    return step


def time_steps(step, batches, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    for ids in batches:
        step(ids)
    _sync(device)
    return time.perf_counter() - t


def run(args) -> list[dict]:
    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device == "cpu":
        torch.set_num_threads(args.threads)
        peak = args.peak_flops or measured_peak("cpu", dtype)
    else:
        name = torch.cuda.get_device_name()
        peak = args.peak_flops or next((v for k, v in GPU_PEAK.items() if k in name), None)
        if peak is None:
            raise SystemExit(f"unknown GPU {name!r}: pass --peak-flops")
    rows = []
    for preset in args.presets:
        ours, hf = build_pair(preset, device, dtype, with_hf=not args.no_hf)
        ours.set_recompute(args.recompute)
        if hf is not None and args.recompute == "full":
            hf.gradient_checkpointing_enable()
        v = ours.cfg.vocab_size
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, v, (args.batch_size, args.seq_length + 1), generator=g).to(device)
                   for _ in range(args.iters)]
        fpt = flops_per_token(ours, args.seq_length)
        paths = {"megacpt": step_fn(torch.compile(ours) if args.compile else ours, False)}
        if hf is not None:
            paths["hf"] = step_fn(hf, True)
        for step in paths.values():  # warm-up (allocator, oneDNN/cuBLAS plans, compile)
            for ids in batches[: args.warmup]:
                step(ids)
        # alternate the paths step by step (order flipped every step) so load changes on a shared machine
        # hit both alike; report total times and the median of the per-step time ratios
        times = {k: 0.0 for k in paths}
        ratios = []
        names = list(paths)
        for r in range(args.rounds):
            for i, ids in enumerate(batches):
                t = {}
                for k in (names if (r + i) % 2 == 0 else names[::-1]):
                    t[k] = time_steps(paths[k], [ids], device)
                    times[k] += t[k]
                if "hf" in t:
                    ratios.append(t["hf"] / t["megacpt"])
        tokens = args.rounds * args.iters * args.batch_size * args.seq_length
        row = {"preset": preset, "device": device, "dtype": args.dtype, "batch": args.batch_size,
               "seq": args.seq_length, "flops_per_token": fpt, "peak_flops": peak}
        for k, t in times.items():
            row[f"{k}_tokens_per_s"] = tokens / t
            row[f"{k}_mfu"] = tokens / t * fpt / peak
        if "hf" in times:
            row["speedup_vs_hf"] = times["hf"] / times["megacpt"]
            row["median_step_speedup_vs_hf"] = sorted(ratios)[len(ratios) // 2]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ours, hf, paths
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: tiny toy-4m (cpu); pythia-1b pythia-1.4b (cuda)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 cpu, bf16 cuda")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 (cpu and cuda)")
    ap.add_argument("--seq-length", type=int, default=None, help="default: 256 (cpu), 2048 (cuda)")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per round (distinct batches)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    ap.add_argument("--compile", action="store_true", help="torch.compile the megacpt model")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    ap.add_argument("--peak-flops", type=float, default=None)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.presets = args.presets or (["pythia-1b", "pythia-1.4b"] if cuda else ["tiny", "toy-4m"])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or 4
    args.seq_length = args.seq_length or (2048 if cuda else 256)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
