"""Days per token budget and the recommended layout for a multi-GPU run, from one-GPU measurements.

Reads the JSON that `benchmarks/train_throughput.py --sizing` writes (micro-step times of a layer-reduced
model with the target's hidden size, heads and vocab, at two or more layer counts), fits the per-layer
cost, and applies `megacpt.train.sizing` (memory, communication and time models; assumptions stated
there and printed here) to the full model: the FinPythia layout (TP=2, FSDP over the rest, micro-batch 4,
selective recompute, sequence parallel) on 8 and 32 GPUs, and the fastest layout that fits.

  python benchmarks/sizing.py docs/gpu-logs/sizing_6.9b.json                 # tables for docs/benchmarks.md
  python benchmarks/sizing.py M.json --gpus 8 32 64 --interconnect h200 --global-batch 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megacpt.errors import UserError  # noqa: E402
from megacpt.model.presets import get_preset  # noqa: E402
from megacpt.train import sizing  # noqa: E402


def read_measurement(path: str) -> tuple[str, sizing.Measurement]:
    d = json.loads(Path(path).read_text())
    if d.get("kind") != "sizing-measurement":
        raise UserError(f"{path}: not a sizing measurement (write one with train_throughput.py --sizing)")
    meas = sizing.Measurement(micro_batch=int(d["micro_batch"]), seq=int(d["seq"]), recompute=d["recompute"],
                              step_seconds={int(k): float(v) for k, v in d["step_seconds"].items()},
                              source=f"{path} ({d.get('date', '?')}, {d.get('command', '?')})",
                              device=d.get("device", "?"), opt_seconds_per_param=d.get("opt_seconds_per_param"))
    return d["preset"], meas


def table(plans: list[tuple[str, sizing.Plan]], budgets: dict[str, float]) -> str:
    head = ("| layout | GPUs | tp × dp | micro | recompute | FSDP params | reshard | mem/GPU GiB | step s "
            "| tok/s/GPU | MFU | " + " | ".join(f"days per {k} tokens" for k in budgets) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, p in plans:
        r = p.row()
        lo, hi = r["step_s"]
        tl, th = r["tokens_per_s_per_gpu"]
        ml, mh = r["mfu"]
        fits = "" if p.fits else " (does not fit)"
        lines.append(
            f"| {label} | {r['n_gpus']} | {r['tp']} × {r['dp']} | {r['micro_batch']} | {r['recompute']} | "
            f"{r['fsdp_param_dtype']} | {'yes' if r['fsdp_reshard_after_forward'] else 'no'} | "
            f"{r['mem_gib']:.1f}{fits} | {lo:.2f}–{hi:.2f} | {th:,.0f}–{tl:,.0f} | {100 * mh:.1f}–{100 * ml:.1f}% | "
            + " | ".join(f"{sizing.format_days(p.days[k])}" for k in budgets) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurement", help="JSON written by benchmarks/train_throughput.py --sizing")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--interconnect", choices=sorted(sizing.INTERCONNECTS), default="h100")
    ap.add_argument("--global-batch", type=int, default=1024, help="sequences per step (FinPythia: 1024)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.4e9, 24e9],
                    help="token budgets (default: the 10%% selection run and vanilla DACP)")
    ap.add_argument("--json-out", default=None, help="also write every plan as JSON here")
    args = ap.parse_args(argv)
    preset, meas = read_measurement(args.measurement)
    cfg = get_preset(preset)
    net = sizing.INTERCONNECTS[args.interconnect]
    budgets = {f"{b / 1e9:g}B": b for b in args.budgets}
    alpha, beta = meas.fit()
    print(f"measurement: {meas.source} on {meas.device}")
    print(f"fit per micro-batch of {meas.micro_batch} x {meas.seq} tokens ({meas.recompute} recompute): "
          f"{1e3 * alpha:.1f} ms fixed + {1e3 * beta:.2f} ms per layer -> {1e3 * (alpha + cfg.num_layers * beta):.0f} ms "
          f"for {cfg.num_layers} layers on one GPU")
    print(f"interconnect (assumed): {net.name}; NVLink busbw {net.intra_node_busbw / 1e9:.0f} GB/s, "
          f"inter-node busbw {net.inter_node_busbw / 1e9:.0f} GB/s per GPU, HBM {net.hbm_bandwidth / 1e12:.1f} TB/s, "
          f"peak {net.peak_flops / 1e12:.0f} TFLOP/s, {net.gpu_memory / sizing.GiB:.1f} GiB")
    rows, dump = [], []
    for n in args.gpus:
        finpythia = sizing.Layout(n_gpus=n, tp=2, micro_batch=4, recompute="selective", sequence_parallel=True)
        plans = [sizing.plan(cfg, meas.seq, args.global_batch, c, meas, net, budgets)
                 for c in sizing.candidate_layouts(cfg, n, args.global_batch)]
        rows.append(("FinPythia config (TP=2, FSDP)", sizing.plan(cfg, meas.seq, args.global_batch, finpythia,
                                                                  meas, net, budgets)))
        bf16 = dataclasses.replace(finpythia, param_dtype_bytes=sizing.BF16)
        rows.append(("same, bf16 FSDP params", sizing.plan(cfg, meas.seq, args.global_batch, bf16, meas, net, budgets)))
        best = sizing.recommend(plans)
        if best is not None:
            rows.append(("**recommended**", best))
        dump += [dict(p.row(), label=lbl) for lbl, p in rows[-3:]]
    print(table(rows, budgets))
    print("step s / tok/s / MFU / days: from perfect overlap of FSDP traffic with compute to none; TP assumed "
          "to scale ideally (a lower bound on time); see megacpt/train/sizing.py")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
