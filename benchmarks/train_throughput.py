"""Training throughput of `megacpt train` variants beside a plain HF loop, the 6.9B sizing measurement, and
the fp8 loss-curve comparison.

**Throughput** (default mode). Each variant trains the same model shape on the same samples, micro/global
batch, AdamW hyper-parameters and clipping, in one process, one after the other (``--repeats`` alternates
them and keeps each one's best):

  hf / hf-compile   plain loop: HF ``GPTNeoXForCausalLM`` (SDPA attention, its own full-logits loss) +
                    torch AdamW (fused on CUDA), gradient accumulation; ``hf-compile``: ``torch.compile``d
  torch             ``megacpt train`` (``trainer.train``), model.impl=torch, fused linear+CE loss
  torch-tritonbwd   the same with the fused loss's Triton backward (its default once measured faster)
  torch-compile     the same with train.compile=true (per-block torch.compile)
  te / te-fp8       model.impl=te (transformer-engine fused layers), bf16 / fp8 delayed scaling

A variant that cannot run here (transformer-engine not installed, no CUDA) prints why and is not measured.
Per variant: tokens/s, model TFLOP/s, MFU with and without attention FLOPs (``megacpt.train.metrics``:
PaLM/Megatron model FLOPs, 6N + 12·L·s·h per token, the attention term over the full s x s square;
"without" drops it), peak memory (and the sizing model's prediction for the torch path), the ratio to
the baseline (hf-compile on GPU, hf on CPU) and, for megacpt variants, the **data-loader share**: time in
``trainer.local_batches`` (sampler, dataset reads, host-to-device copy; synchronised) over the step time.
MFU is against the dense bf16 peak of the device (datasheet table in metrics.py; fp8 rows too, so bf16 and
fp8 rows compare as speed) or ``--peak-flops``; on CPU the peak is a matmul measured in the same run.

**Sizing** (``--sizing``): micro-step time (forward + backward of one micro-batch through the trainer's
``loss_sum`` under bf16 autocast, fused loss, gradients accumulated, no optimizer) of a layer-reduced model
of ``--preset``'s shape (same hidden size, heads, vocab) at each ``--layers`` count, plus one fused AdamW
step's time per parameter; written as JSON for ``benchmarks/sizing.py`` (days, layouts).

**Loss curve** (``--loss-curve N``): N steps of te (bf16), te-fp8 and torch (bf16) from the same initial
weights on the same structured synthetic tokens (a sparse Zipfian bigram chain, so the loss falls); prints
the mean and last-50-step |fp8 - bf16| loss difference against the implementation noise |te - torch|.

  python benchmarks/train_throughput.py                                   # CPU: toy-4m, fp32, hf vs torch
  python benchmarks/train_throughput.py --device cuda --presets pythia-1b pythia-1.4b --json-out t.json
  python benchmarks/train_throughput.py --device cuda --sizing --preset pythia-6.9b --layers 2 4 8 --json-out s.json
  python benchmarks/train_throughput.py --device cuda --loss-curve 200 --preset pythia-1b --json-out c.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megacpt.train.job import load_job_config  # noqa: E402
from megacpt.data.indexed import IndexedDatasetWriter, optimal_dtype, write_sidecar  # noqa: E402
from megacpt.errors import UserError  # noqa: E402
from megacpt.model.presets import get_preset  # noqa: E402
from megacpt.train import sizing, trainer  # noqa: E402
from megacpt.train.metrics import flops_per_token, peak_flops  # noqa: E402

MEGACPT_VARIANTS = {  # variant -> overrides
    "torch": [],
    "torch-tritonbwd": [],  # the fused loss's Triton backward (flce.DEFAULT_BACKWARD = "triton" for the run)
    "torch-compile": ["train.compile=true"],
    "te": ["model.impl=te"],
    "te-fp8": ["model.impl=te", "model.fp8=true"],
}
HF_VARIANTS = ("hf", "hf-compile")


# ------------------------------------------------------------------------------------------------ data

def make_corpus(prefix: Path, vocab: int, n_tokens: int, seed: int = 0, structured: bool = False) -> None:
    """Documents of 200..2000 tokens: uniform random tokens (throughput does not depend on the text), or
    with ``structured`` a sparse Zipfian bigram chain (each token has 8 possible successors), which a model
    learns, so loss curves move."""
    rng = np.random.default_rng(seed)
    lengths = []
    left = n_tokens
    while left > 0:
        n = int(min(left, rng.integers(200, 2000)))
        lengths.append(n)
        left -= n + 1
    if structured:
        succ = rng.integers(0, vocab - 1, (vocab, 8))
        p = 1.0 / np.arange(1, 9) ** 1.2
        p /= p.sum()
        stream = np.empty(sum(lengths), dtype=np.int64)
        n_chains = 512
        per = -(-len(stream) // n_chains)
        cur = rng.integers(0, vocab - 1, n_chains)
        block = np.empty((per, n_chains), dtype=np.int64)
        for i in range(per):
            block[i] = cur
            cur = succ[cur, rng.choice(8, n_chains, p=p)]
        stream[:] = block.T.reshape(-1)[: len(stream)]
    else:
        stream = rng.integers(0, vocab - 1, sum(lengths))
    with IndexedDatasetWriter(prefix, optimal_dtype(vocab)) as w:
        at = 0
        for n in lengths:
            w.add_document([stream[at:at + n].tolist() + [vocab - 1]])
            at += n
    write_sidecar(prefix, {"tokenizer": {"type": "bench", "sha256": "bench", "vocab_size": vocab, "eod": vocab - 1}})


# ------------------------------------------------------------------------------------------------ timing

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared, overloaded machine wall time measures the
    neighbours; CPU seconds (all threads) measure the work this process did."""
    return time.perf_counter(), time.process_time()


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
    _sync(device)
    w1, c1 = _now()
    return 2 * n ** 3 * reps / (w1 - w0), 2 * n ** 3 * reps / (c1 - c0)


@contextlib.contextmanager
def data_timer(device):
    """Wrap ``trainer.local_batches`` to add up the (synchronised) time spent producing batches."""
    spent = [0.0, 0]
    orig = trainer.local_batches

    def timed(*a, **kw):
        _sync(device)
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        _sync(device)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return out

    trainer.local_batches = timed
    try:
        yield spent
    finally:
        trainer.local_batches = orig


def run_megacpt(overrides: list[str], warmup: int, device) -> dict:
    """One ``trainer.train`` run: tokens/s over the steps after ``warmup``, peak memory, data-loader time,
    per-step losses."""
    job = load_job_config(None, overrides)
    stamps: dict[int, tuple[float, float]] = {}
    losses: dict[int, float] = {}
    data_at: dict[int, float] = {}

    with data_timer(device) as spent:
        def on_step(it, loss):
            _sync(device)
            stamps[it] = _now()
            losses[it] = float(loss)
            data_at[it] = spent[0]

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer.train(job, on_step=on_step)
    first = min(stamps)
    start = first + warmup - 1 if first + warmup - 1 in stamps else first  # timed window: after warm-up
    last = max(stamps)
    tokens = (last - start) * job.train.global_batch_size * job.data.seq_length
    (w0, c0), (w1, c1) = stamps[start], stamps[last]
    return {"tokens_per_s": tokens / (w1 - w0), "tokens_per_cpu_s": tokens / (c1 - c0),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            "data_share": (data_at[last] - data_at[start]) / (w1 - w0),
            "data_ms_per_step": 1e3 * (data_at[last] - data_at[start]) / (last - start),
            "losses": [losses[k] for k in sorted(losses)]}


def run_hf(overrides: list[str], warmup: int, device, bf16: bool, compile_model: bool) -> dict:
    """The plain loop: HF GPTNeoXForCausalLM, its own loss (full logits), torch AdamW, grad accumulation."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megacpt.model.hf_config import hf_config_from_model_config
    from megacpt.train.optim import param_groups

    job = load_job_config(None, overrides).validate(1)
    t, o = job.train, job.optimizer
    torch.manual_seed(t.seed)
    hf_cfg = GPTNeoXConfig(**hf_config_from_model_config(job.model))
    hf_cfg._attn_implementation = "sdpa"
    model = GPTNeoXForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    train_ds, _ = trainer.build_datasets(job)
    rt = trainer.Runtime(rank=0, world_size=1, device=device, autocast_dtype=None)
    n_micro = t.global_batch_size // t.micro_batch_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_start = None
    for it in range(t.train_iters):
        if it == warmup:
            _sync(device)
            t_start = _now()
        for tokens, _ in trainer.local_batches(train_ds, it * t.global_batch_size, job, rt, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone()).loss  # HF shifts labels
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    tokens = (t.train_iters - warmup) * t.global_batch_size * job.data.seq_length
    w1, c1 = _now()
    return {"tokens_per_s": tokens / (w1 - t_start[0]), "tokens_per_cpu_s": tokens / (c1 - t_start[1]),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def run_variant(variant: str, base: list[str], warmup: int, device, gpu: bool) -> dict:
    try:
        if variant in HF_VARIANTS:
            return run_hf(base, warmup, device, bf16=gpu, compile_model=variant == "hf-compile")
        if variant == "torch-tritonbwd":
            from megacpt.kernels import fused_linear_cross_entropy as flce

            old, flce.DEFAULT_BACKWARD = flce.DEFAULT_BACKWARD, "triton"
            try:
                return run_megacpt(base, warmup, device)
            finally:
                flce.DEFAULT_BACKWARD = old
        return run_megacpt(base + MEGACPT_VARIANTS[variant], warmup, device)
    except UserError as e:  # e.g. transformer-engine not installed: say so, measure the rest
        return {"error": str(e)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ modes

def _base_overrides(preset, prefix, tmp, seq, iters, mb, gb, device, gpu, fused, recompute, extra=()):
    ov = [f"model_preset={preset}", f"data.blend=[{prefix}]", f"data.seq_length={seq}", "data.split=100,0,0",
          f"data.cache_dir={tmp}/cache", f"train.train_iters={iters}", f"train.micro_batch_size={mb}",
          f"train.global_batch_size={gb}", f"train.device={device}", f"train.precision={'bf16' if gpu else 'fp32'}",
          f"train.fused_loss={str(fused).lower()}", "optimizer.lr=1e-4", "scheduler.warmup_iters=1",
          f"logging.log_interval={iters}", "train.exit_signal_save=false"]
    if recompute:
        ov.append(f"model.recompute_granularity={recompute}")
    return ov + list(extra)


def throughput(args, device, gpu) -> list[dict]:
    """The variants of each preset; each variant's row is printed (and ``--json-out`` rewritten) as soon as
    it is measured, so a run cut short by its time limit keeps what it finished."""
    rows: list[dict] = []
    peak, peak_src = _peak(args, device, gpu)
    name = torch.cuda.get_device_name() if gpu else f"CPU x{args.threads} threads"
    for preset in args.presets:
        cfg = get_preset(preset)
        seq, mb, gb, iters, warmup = args.seq, args.micro_batch, args.global_batch, args.iters, args.warmup
        fpt, fpt_noattn = flops_per_token(cfg, seq), flops_per_token(cfg, seq, attention=False)
        mem_pred = sizing.memory_per_gpu(cfg, seq, sizing.Layout(n_gpus=1, micro_batch=mb, fused_loss=not args.no_fused_loss,
                                                                 recompute=args.recompute or "none"))["total"] / 2**30
        print(f"\ndevice: {name} | preset {preset} | seq {seq} | micro {mb} | global {gb} | "
              f"{'bf16' if gpu else 'fp32'} | {iters} iters ({warmup} warm-up) | best of {args.repeats}")
        print(f"model FLOPs/token: {fpt / 1e6:.1f} MFLOP with attention, {fpt_noattn / 1e6:.1f} without; "
              f"peak {peak / 1e12:.3f} TFLOP/s ({peak_src})"
              + (f"; megacpt.train.sizing predicts {mem_pred:.1f} GiB peak for the torch variant" if gpu else ""))
        header = (f"{'variant':<14} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU-noattn':>10} {'peak GiB':>9} "
                  f"{'vs baseline':>12} {'data share':>10}")
        print(header, flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        with tempfile.TemporaryDirectory() as tmp:
            prefix = Path(tmp) / "bench"
            make_corpus(prefix, cfg.vocab_size, n_tokens=iters * gb * (seq + 1) * 2 + 10_000)
            base = _base_overrides(preset, prefix, tmp, seq, iters, mb, gb, args.device, gpu, not args.no_fused_loss,
                                   args.recompute)
            for _ in range(args.repeats):
                for v in args.variants:
                    runs[v].append(run_variant(v, base, warmup, device, gpu))
                    row = _row(preset, v, runs, name, args, peak, fpt, fpt_noattn, mem_pred)
                    print(_format_row(row), flush=True)
                    rows = [r for r in rows if (r["preset"], r["variant"]) != (preset, v)] + [row]
                    if args.json_out:
                        Path(args.json_out).write_text(json.dumps(rows, indent=1, default=str))
        print(f"\n{preset}, best of {args.repeats}, ratios against {_baseline(runs) or 'no baseline'}:")
        print(header)
        for v in args.variants:
            row = _row(preset, v, runs, name, args, peak, fpt, fpt_noattn, mem_pred)
            rows = [r for r in rows if (r["preset"], r["variant"]) != (preset, v)] + [row]
            print(_format_row(row))
        if not gpu:
            cpu = {v: max(r["tokens_per_cpu_s"] for r in rs if "error" not in r) for v, rs in runs.items()
                   if any("error" not in r for r in rs)}
            print("tokens per CPU-second (load-independent): " + ", ".join(f"{v} {x:,.0f}" for v, x in cpu.items()))
    return rows


def _baseline(runs: dict) -> str | None:
    for v in ("hf-compile", "hf"):
        if any("error" not in r for r in runs.get(v, [])):
            return v
    return None


def _row(preset, v, runs, name, args, peak, fpt, fpt_noattn, mem_pred) -> dict:
    row = {"preset": preset, "variant": v, "device": name, "seq": args.seq, "micro_batch": args.micro_batch,
           "global_batch": args.global_batch, "iters": args.iters, "warmup": args.warmup, "peak_flops": peak,
           "flops_per_token": fpt, "flops_per_token_no_attention": fpt_noattn, "mem_predicted_gib": mem_pred}
    ok = [r for r in runs[v] if "error" not in r]
    if not ok:
        row["error"] = runs[v][0]["error"] if runs[v] else "not run"
        return row
    best = max(ok, key=lambda r: r["tokens_per_s"])
    tps = best["tokens_per_s"]
    base_v = _baseline(runs)
    base_tps = max(r["tokens_per_s"] for r in runs[base_v] if "error" not in r) if base_v else None
    row.update({k: best[k] for k in best if k != "losses"}, all_tokens_per_s=[r["tokens_per_s"] for r in ok],
               tflops=tps * fpt / 1e12, mfu=tps * fpt / peak, mfu_no_attention=tps * fpt_noattn / peak,
               baseline=base_v, ratio_vs_baseline=tps / base_tps if base_tps else None)
    return row


def _format_row(row: dict) -> str:
    v = row["variant"]
    if "error" in row:
        return f"{v:<14} not measured: {row['error']}"
    mem = "" if math.isnan(row["peak_mem_gib"]) else f"{row['peak_mem_gib']:.1f}"
    ratio = f"{row['ratio_vs_baseline']:.2f}x" if row["ratio_vs_baseline"] else "-"
    share = f"{100 * row['data_share']:.2f}%" if "data_share" in row else "-"
    return (f"{v:<14} {row['tokens_per_s']:>10,.0f} {row['tflops']:>8.1f} {100 * row['mfu']:>5.1f}% "
            f"{100 * row['mfu_no_attention']:>9.1f}% {mem:>9} {ratio:>12} {share:>10}")


def _peak(args, device, gpu) -> tuple[float, str]:
    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    if gpu:
        p = peak_flops(torch.cuda.get_device_name(), "bf16")
        if p is None:
            raise SystemExit(f"unknown GPU {torch.cuda.get_device_name()!r}: pass --peak-flops")
        return p, "datasheet dense bf16"
    return measured_matmul_peak(device, torch.float32)[0], "measured 2048^3 fp32 matmul"


def sizing_measurement(args, device, gpu) -> dict:
    """Micro-step seconds of the layer-reduced ``--preset`` at each ``--layers``, and AdamW s/param."""
    from megacpt.model.gpt_neox import GPTNeoX

    full = get_preset(args.preset)
    recompute = args.recompute or "selective"
    times, peaks = {}, {}
    opt_s_per_param = None
    for n_layers in args.layers:
        cfg = dataclasses.replace(full, num_layers=n_layers, recompute_granularity=recompute)
        torch.manual_seed(0)
        with torch.device(device):
            model = GPTNeoX(cfg).train()
        ids = [torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device) for _ in range(3)]

        def micro(i):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = trainer.loss_sum(model, ids[i % 3], cfg, fused=not args.no_fused_loss)
            loss.backward()

        for i in range(args.warmup):
            micro(i)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        for i in range(args.iters):
            micro(i)
        _sync(device)
        times[n_layers] = (time.perf_counter() - t0) / args.iters
        peaks[n_layers] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
        if n_layers == max(args.layers):  # one fused AdamW step over this model's parameters
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
            opt.step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                opt.step()
            _sync(device)
            opt_s_per_param = (time.perf_counter() - t0) / 3 / sum(p.numel() for p in model.parameters())
        print(f"  {args.preset} with {n_layers} layers: {1e3 * times[n_layers]:.1f} ms per micro-step "
              f"({args.micro_batch} x {args.seq}, {recompute} recompute)", flush=True)
        del model
        if gpu:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if gpu else "CPU"
    out = {"kind": "sizing-measurement", "preset": args.preset, "seq": args.seq, "micro_batch": args.micro_batch,
           "recompute": recompute, "step_seconds": {str(k): v for k, v in times.items()},
           "peak_mem_gib": {str(k): v for k, v in peaks.items()}, "opt_seconds_per_param": opt_s_per_param,
           "device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]])}
    meas = sizing.Measurement(args.micro_batch, args.seq, recompute, times)
    alpha, beta = meas.fit()
    print(f"fit: {1e3 * alpha:.1f} ms + {1e3 * beta:.2f} ms/layer -> {full.num_layers} layers "
          f"{1e3 * (alpha + full.num_layers * beta):.0f} ms per micro-step on one {name}")
    return out


def loss_curve(args, device, gpu) -> dict:
    """te (bf16), te-fp8 and torch (bf16) for ``--loss-curve`` steps from the same initial weights."""
    import transformers

    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.model.hf_config import hf_config_from_model_config

    cfg = get_preset(args.preset)
    steps, seq, mb, gb = args.loss_curve, args.seq, args.micro_batch, args.global_batch
    out = {"preset": args.preset, "steps": steps, "seq": seq, "micro_batch": mb, "global_batch": gb, "curves": {},
           "errors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "curve"
        make_corpus(prefix, cfg.vocab_size, n_tokens=steps * gb * (seq + 1) + 10_000, structured=True)
        init = Path(tmp) / "init"  # the same initial weights for every run, as an HF dir (checkpoint.init_from)
        torch.manual_seed(0)
        model = GPTNeoX(cfg)
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf_config_from_model_config(cfg)))
        out_name = next(k for k in hf.state_dict() if not k.startswith("gpt_neox."))  # lm_head / embed_out
        sd = {("gpt_neox." + k if k != "embed_out.weight" else out_name): v for k, v in model.state_dict().items()}
        res = hf.load_state_dict(sd, strict=False)
        if res.missing_keys or res.unexpected_keys:  # the same weights for every run, or nothing compares
            raise SystemExit(f"HF name map mismatch: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
        hf.save_pretrained(init)
        del model, hf
        base = _base_overrides(args.preset, prefix, tmp, seq, steps, mb, gb, args.device, gpu, True, args.recompute,
                               [f"checkpoint.init_from={init}", f"scheduler.warmup_iters={min(10, steps // 2)}", "optimizer.lr=3e-4"])
        for v in ("te", "te-fp8", "torch"):
            r = run_variant(v, base, 0, device, gpu)
            if "error" in r:
                out["errors"][v] = r["error"]
                print(f"  {v}: not measured: {r['error']}")
            else:
                out["curves"][v] = r["losses"]
                out.setdefault("tokens_per_s", {})[v] = r["tokens_per_s"]
                print(f"  {v}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, {r['tokens_per_s']:,.0f} tok/s",
                      flush=True)
    c = out["curves"]

    def diff(a, b, last=None):
        x, y = np.array(c[a]), np.array(c[b])
        if last:
            x, y = x[-last:], y[-last:]
        return float(np.abs(x - y).mean())

    if "te" in c and "te-fp8" in c:
        out["fp8_vs_bf16"] = {"mean_abs": diff("te-fp8", "te"), "mean_abs_last50": diff("te-fp8", "te", 50),
                              "final10_delta": float(np.mean(c["te-fp8"][-10:]) - np.mean(c["te"][-10:])),
                              "speedup": out["tokens_per_s"]["te-fp8"] / out["tokens_per_s"]["te"]}
        print(f"fp8 vs bf16 (TE): mean |dloss| {out['fp8_vs_bf16']['mean_abs']:.4f}, last 50 steps "
              f"{out['fp8_vs_bf16']['mean_abs_last50']:.4f}, final-10 mean delta {out['fp8_vs_bf16']['final10_delta']:+.4f}, "
              f"speed-up {out['fp8_vs_bf16']['speedup']:.2f}x")
    if "te" in c and "torch" in c:
        out["te_vs_torch_bf16"] = {"mean_abs": diff("te", "torch"), "mean_abs_last50": diff("te", "torch", 50)}
        print(f"implementation noise, TE bf16 vs torch bf16: mean |dloss| {out['te_vs_torch_bf16']['mean_abs']:.4f}, "
              f"last 50 steps {out['te_vs_torch_bf16']['mean_abs_last50']:.4f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="one preset (default: toy-4m on CPU, pythia-1b on GPU; "
                                                  "pythia-6.9b with --sizing)")
    p.add_argument("--presets", nargs="+", default=None, help="several presets, one table each")
    p.add_argument("--variants", nargs="+", default=None, choices=list(HF_VARIANTS) + list(MEGACPT_VARIANTS),
                   help="default: hf torch (CPU); torch hf-compile torch-tritonbwd torch-compile te te-fp8 (GPU)")
    p.add_argument("--seq-length", dest="seq", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s for MFU")
    p.add_argument("--recompute", default=None, choices=[None, "selective", "full"])
    p.add_argument("--compile", action="store_true", help="(old flag) the torch variant with train.compile=true")
    p.add_argument("--no-fused-loss", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="alternate the variants this many times; best is kept")
    p.add_argument("--sizing", action="store_true", help="measure a layer-reduced model for benchmarks/sizing.py")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="--sizing: layer counts")
    p.add_argument("--loss-curve", type=int, default=0, metavar="STEPS", help="fp8 vs bf16 loss curves")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if gpu else "cpu")
    default_preset = "pythia-6.9b" if args.sizing else ("pythia-1b" if gpu else "toy-4m")
    args.preset = args.preset or default_preset
    args.presets = args.presets or [args.preset]
    args.seq = args.seq or (2048 if gpu else 128)
    args.micro_batch = args.micro_batch or (4 if (gpu and (args.sizing or args.loss_curve)) else 8)
    args.global_batch = args.global_batch or (args.micro_batch if args.loss_curve else 16)
    args.iters = args.iters or (5 if args.sizing else (12 if gpu else 12))
    args.warmup = args.warmup if args.warmup is not None else (2 if args.sizing else (4 if gpu else 2))
    if args.variants is None:
        # the trainer first (the figure that matters most if a time limit cuts the run), then the baseline
        args.variants = (["torch", "hf-compile", "torch-tritonbwd", "torch-compile", "te", "te-fp8"] if gpu
                         else ["hf", "torch"])
    if args.compile:
        args.variants = ["torch-compile" if v == "torch" else v for v in args.variants]
    if args.sizing:
        result = sizing_measurement(args, device, gpu)
    elif args.loss_curve:
        result = loss_curve(args, device, gpu)
    else:
        result = throughput(args, device, gpu)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
