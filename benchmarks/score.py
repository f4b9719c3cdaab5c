"""Scoring-pass benchmark: megacpt's pass vs HF forward + F.cross_entropy, same run, same weights.

CPU (default): a Pythia-70M-shaped GPT-NeoX (6L/512/8h, vocab 50,304, random weights) saved once as an HF
dir; each path runs in its own fresh process (so peak RSS is its own) on the same random token batches:

  baseline  HF GPTNeoXForCausalLM(ids).logits -> F.cross_entropy(reduction="none")   (full [b,s,V] logits)
  megacpt   megacpt.score.nll.chunk_nll: our trunk + fused_linear_cross_entropy (no logits)

Reported: tokens/s (input tokens), peak RSS, and the pass's working memory = peak RSS - RSS after the model
is loaded (weights are identical in both; the working memory is what the fused output layer shrinks),
plus the max |per-sequence mean NLL difference| between the two paths. Targets (issue 5): >= 1.5x
tokens/s, <= 1/4 working memory. Also printed: the ceiling any implementation has here, the pass's matmul
FLOPs at this machine's best square-GEMM rate (measured in the same run) with every other cost zero.

    python benchmarks/score.py                       # CPU, 70M shape, 8 x 512 tokens per batch
    python benchmarks/score.py --dtype bf16          # bf16 trunk + output layer (fp32 accumulation)
    python benchmarks/score.py --device cuda         # GPU: output-layer kernels + whole pass (see below)

GPU (``--device cuda``, for a session with one): output layer + CE alone at Pythia-1B and 6.9B shapes in
bf16 (N = 16,384 tokens, V = 50,304): our Triton kernel vs the chunked torch path vs Liger-Kernel's fused
linear cross-entropy vs Apple's cut-cross-entropy (each if installed), forward (scoring) and forward +
backward; then the whole scoring pass (random-weight Pythia-1B / 6.9B) tokens/s/GPU and MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

H100_BF16_DENSE_FLOPS = 989e12


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _batches(args) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, args.vocab, (args.batch, args.seq_length)) for _ in range(args.warmup + args.iters)]


def _make_hf_dir(path: str, args) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.25,
                        max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)
    GPTNeoXForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def _pass_flops_per_token(args) -> float:
    """Matmul FLOPs per input token of the scoring pass: 12 H^2 per layer (QKV 3, dense 1, MLP 8), the
    output layer V*H, causal attention QK^T + PV over (s+1)/2 keys on average; x2 for multiply-add."""
    h, s = args.hidden, args.seq_length
    return 2 * (args.layers * (12 * h * h + 2 * h * (s + 1) / 2) + args.vocab * h)


def _gemm_peak(args) -> dict:
    """This machine's best dense GEMM rate at the pass's dtype and thread count (square, no allocation)."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    best = 0.0
    for n in (1024, 2048):
        a, b, o = (torch.randn(n, n).to(dtype) for _ in range(3))
        torch.mm(a, b, out=o)
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b, out=o)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return {"path": "peak", "gemm_flops": best}


def _worker(args) -> dict:
    """One path in this process: load, warm up, time, report tokens/s, memory and per-row mean NLL."""
    import torch

    if args.path == "peak":
        return _gemm_peak(args)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batches = _batches(args)
    if args.path == "baseline":
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()

        def step(ids):
            t = torch.from_numpy(ids)
            logits = model(t).logits                                           # [b, s, V]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                    t[:, 1:].reshape(-1), reduction="none")
            return nll.view(t.shape[0], -1).double().mean(1).numpy()
    else:
        from megacpt.convert import load_model
        from megacpt.score.nll import ScoringConfig, chunk_nll

        model, _ = load_model(args.model_dir, dtype=dtype)
        if args.compile:
            model.compile_layers()
        cfg = ScoringConfig(seq_length=args.seq_length, tokens_per_batch=args.batch * args.seq_length,
                            loss_chunk=args.loss_chunk, compile_loss=args.compile_loss or args.compile)

        def step(ids):
            n, s = chunk_nll(model, list(ids), cfg)
            return s / n
    rss0 = _rss_gb()
    means = []
    with torch.inference_mode():
        for i, ids in enumerate(batches):
            if i == args.warmup:
                t0 = time.perf_counter()
            means.append(step(ids))
    dt = time.perf_counter() - t0
    tokens = args.iters * args.batch * args.seq_length
    return {"path": args.path, "tokens_per_s": tokens / dt, "peak_rss_gb": _peak_rss_gb(),
            "rss_after_load_gb": rss0, "working_gb": _peak_rss_gb() - rss0,
            "row_mean_nll": np.concatenate(means).tolist()}


def _run_path(path: str, args, model_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--model-dir", model_dir]
    for k in ("batch", "seq_length", "iters", "warmup", "threads", "dtype", "layers", "hidden", "heads", "vocab",
              "loss_chunk"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--compile-loss"] if args.compile_loss else []
    cmd += ["--compile"] if args.compile else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{path} worker failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_main(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        _make_hf_dir(d, args)
        runs: dict[str, list[dict]] = {"baseline": [], "megacpt": []}
        for _ in range(args.repeats):  # alternate fresh processes: load swings hit both paths alike
            for p in runs:
                runs[p].append(_run_path(p, args, d))
        peak = _run_path("peak", args, d)["gemm_flops"]
    for p, rs in runs.items():
        print(f"{p}: tokens/s per repeat " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs))
    b, m = (max(runs[p], key=lambda r: r["tokens_per_s"]) for p in ("baseline", "megacpt"))
    diff = float(np.max(np.abs(np.array(b["row_mean_nll"]) - np.array(m["row_mean_nll"]))))
    print(f"shape {args.layers}L/{args.hidden}H/{args.heads}h vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq_length}, {args.dtype}, {args.threads} threads, {args.iters} timed batches")
    print(f"best of {args.repeats} alternating runs per path; ours with compile_loss={args.compile_loss or args.compile}, "
          f"compile={args.compile}")
    print(f"{'path':<10} {'tokens/s':>10} {'peak RSS GB':>12} {'working GB':>11}")
    for r in (b, m):
        print(f"{r['path']:<10} {r['tokens_per_s']:>10,.0f} {r['peak_rss_gb']:>12.2f} {r['working_gb']:>11.2f}")
    paired = sorted(rm["tokens_per_s"] / rb["tokens_per_s"] for rb, rm in zip(runs["baseline"], runs["megacpt"]))
    print("paired speed-ups (each repeat: the two paths back to back, so machine drift hits both): "
          + ", ".join(f"{x:.2f}x" for x in paired) + f"; median {float(np.median(paired)):.2f}x, "
          f"min {paired[0]:.2f}x")
    ideal = peak / _pass_flops_per_token(args)
    print(f"ceiling: {_pass_flops_per_token(args) / 1e6:.1f} MFLOP of matmuls per token at this machine's best "
          f"{args.dtype} GEMM rate ({peak / 1e9:.0f} GFLOP/s, square GEMMs) and zero other cost = {ideal:,.0f} "
          f"tokens/s = {ideal / b['tokens_per_s']:.2f}x the best baseline run; ours reaches "
          f"{m['tokens_per_s'] / ideal:.0%} of it")
    print(f"speed-up {m['tokens_per_s'] / b['tokens_per_s']:.2f}x (target >= 1.5x); working memory ratio "
          f"{m['working_gb'] / max(b['working_gb'], 1e-9):.3f} (target <= 0.25); peak RSS ratio "
          f"{m['peak_rss_gb'] / b['peak_rss_gb']:.3f}; max |row mean NLL diff| {diff:.2e}")


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
def _cuda_time(fn, iters: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def _output_layer_impls():
    import torch

    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    impls = {
        "megacpt-triton": lambda h, w, t: fused_linear_cross_entropy(h, w, t, impl="triton", backward="triton"),
        # the Triton forward with the chunked torch backward (the default until the line above is measured)
        "megacpt-tri/torchbwd": lambda h, w, t: fused_linear_cross_entropy(h, w, t, impl="triton", backward="torch"),
        "megacpt-torch": lambda h, w, t: fused_linear_cross_entropy(h, w, t, impl="torch", chunk_size=4096),
        "full-logits": lambda h, w, t: torch.nn.functional.cross_entropy((h @ w.t()).float(), t,
                                                                          reduction="none"),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        impls["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    except ImportError as e:
        print(f"liger-kernel not available: {e}")
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cut-cross-entropy"] = lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none")
    except ImportError as e:
        print(f"cut-cross-entropy not available: {e}")
    return impls


def cuda_main(args) -> None:
    import torch

    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    impls = _output_layer_impls()
    n, vocab = 16384, 50304
    for name, hid in (("pythia-1b", 2048), ("pythia-6.9b", 4096)):
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(n, hid, device=dev, generator=g, dtype=torch.bfloat16)
        w = (torch.randn(vocab, hid, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        t = torch.randint(0, vocab, (n,), device=dev, generator=g)
        ref = impls["megacpt-torch"](h, w, t)
        flops = 2 * n * hid * vocab
        print(f"\n{name} output layer: N={n}, H={hid}, V={vocab}, bf16")
        print(f"{'impl':<20} {'fwd ms':>8} {'fwd TFLOP/s':>12} {'fwd+bwd ms':>11} {'bwd TFLOP/s':>12} {'peak GB':>8} "
              f"{'max|diff|':>10}")
        for iname, fn in impls.items():
            try:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                with torch.inference_mode():
                    out = fn(h, w, t)
                    fwd = _cuda_time(lambda: fn(h, w, t))
                diff = float((out.float() - ref.float()).abs().max())
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

                def fb():
                    fn(hh, ww, t).float().sum().backward()
                try:
                    both = _cuda_time(fb, iters=5)
                except Exception as e:  # some impls are forward-only for reduction="none"
                    both = float("nan")
                    print(f"  {iname} backward failed: {type(e).__name__}: {e}")
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
                # backward work: dh and dW GEMMs (2 x flops) + the logits recompute (1 x) where it recomputes
                print(f"{iname:<20} {fwd * 1e3:>8.2f} {flops / fwd / 1e12:>12.1f} {both * 1e3:>11.2f} "
                      f"{3 * flops / max(both - fwd, 1e-9) / 1e12:>12.1f} {peak:>8.2f} {diff:>10.2e}")
            except Exception as e:
                print(f"{iname:<20} failed: {type(e).__name__}: {e}")
    if args.output_layer_only:
        return
    # the whole pass: random-weight Pythia models, 8 x 2048 tokens per forward
    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.model.presets import get_preset
    from megacpt.score.nll import ScoringConfig, chunk_nll

    for name in args.gpu_models.split(","):
        cfg = get_preset(name)
        with torch.device(dev):
            model = GPTNeoX(cfg).to(torch.bfloat16).eval()
        if args.compile:
            model.compile_layers()
        rng = np.random.default_rng(0)
        chunks = list(rng.integers(0, cfg.vocab_size, (8 * args.gpu_batches, 2048)))
        sc = ScoringConfig(seq_length=2048, tokens_per_batch=8 * 2048)
        chunk_nll(model, chunks[:8], sc)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        chunk_nll(model, chunks, sc)
        torch.cuda.synchronize()
        tps = len(chunks) * 2048 / (time.perf_counter() - t0)
        params = sum(p.numel() for n_, p in model.named_parameters() if n_ != "embed_in.weight")
        attn = 2 * cfg.num_layers * 2048 * cfg.hidden_size  # causal QK^T + AV per token (half of 4*L*s*H)
        mfu = tps * (2 * params + attn) / H100_BF16_DENSE_FLOPS
        print(f"\nwhole pass {name} bf16{' compiled' if args.compile else ''}: {tps:,.0f} tokens/s/GPU, MFU {mfu:.1%} (vs H100 dense bf16 989 TFLOP/s)")
        del model
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each path; best is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per fp32 [chunk, V] buffer (ours)")
    p.add_argument("--compile-loss", action="store_true", help="ours: torch.compile the log-sum-exp")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each transformer layer and the log-sum-exp (as the CLI's --compile)")
    p.add_argument("--gpu-models", default="pythia-1b,pythia-6.9b")
    p.add_argument("--gpu-batches", type=int, default=8)
    p.add_argument("--output-layer-only", action="store_true", help="cuda: the output layer + loss table only")
    p.add_argument("--worker", choices=["baseline", "megacpt", "peak"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.path = args.worker
        print(json.dumps(_worker(args)))
    elif args.device == "cuda":
        cuda_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
