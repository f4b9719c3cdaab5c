"""Sweep the Triton fused linear + cross-entropy kernels' tile configurations on one GPU (bf16).

For each (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, programs per SM) it times the forward on
Pythia-1B and 6.9B output-layer shapes (N tokens x H -> V = 50,304) and checks the NLL against the
chunked torch path (fp32 logits). The best configuration is what `_triton_config` should return; any
configuration can be tried in a real run with MEGACPT_FLCE_TRITON_CONFIG="BN,BV,BH,warps,stages,per_sm".

    python benchmarks/kernel_tune.py                 # needs a CUDA GPU with Triton
    python benchmarks/kernel_tune.py --n 8192 --hidden 4096
    python benchmarks/kernel_tune.py --backward      # the dlogits kernel (MEGACPT_FLCE_TRITON_BWD_CONFIG
                                                     # "BN,BV,BH,warps,stages") x token chunk: fwd+bwd time,
                                                     # max |dh|, |dW| difference to the chunked torch backward
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [  # BN, BV, BH, warps, stages, programs per SM
    (128, 128, 64, 8, 3, 2),   # the default
    (128, 128, 64, 4, 3, 2),
    (128, 128, 64, 8, 4, 2),
    (128, 256, 64, 8, 3, 2),
    (128, 256, 64, 8, 4, 1),
    (128, 256, 32, 8, 4, 2),
    (64, 256, 64, 4, 4, 2),
    (64, 128, 64, 4, 4, 4),
    (256, 128, 64, 8, 3, 1),
    (256, 128, 64, 8, 4, 2),
    (128, 128, 128, 8, 2, 2),
    (128, 64, 64, 4, 4, 4),
]


BWD_CONFIGS = [  # BN, BV, BH, warps, stages
    (128, 256, 64, 8, 3),      # the default (the forward's best tile)
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (64, 256, 64, 4, 4),
]


def _problem(args, hid: int, dev):
    """bf16 hidden states [N, hid], output weights [V, hid], targets, and the forward's FLOPs."""
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(args.n, hid, device=dev, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(args.vocab, hid, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    t = torch.randint(0, args.vocab, (args.n,), device=dev, generator=g)
    return h, w, t, 2 * args.n * hid * args.vocab


def sweep_backward(args, dev) -> None:
    import triton.testing

    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    for hid in (int(x) for x in args.hidden.split(",")):
        h, w, t, flops = _problem(args, hid, dev)

        def grads(backward, chunk):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            fused_linear_cross_entropy(hh, ww, t, impl="triton", backward=backward, chunk_size=chunk).sum().backward()
            return hh.grad, ww.grad

        ref = grads("torch", 4096)
        ms_torch = triton.testing.do_bench(lambda: grads("torch", 4096))
        print(f"\nN={args.n} H={hid} V={args.vocab} bf16 | Triton fwd + chunked torch bwd: {ms_torch:.2f} ms fwd+bwd")
        print(f"{'BN,BV,BH,warps,stages':<24} {'chunk':>6} {'ms':>8} {'TFLOP/s':>8} {'|dh| diff':>10} {'|dW| diff':>10}")
        for cfg in BWD_CONFIGS:
            os.environ["MEGACPT_FLCE_TRITON_BWD_CONFIG"] = ",".join(map(str, cfg))
            for chunk in (4096, 8192):
                try:
                    dh, dw = grads("triton", chunk)
                    ms = triton.testing.do_bench(lambda: grads("triton", chunk))
                    d1 = float((dh.float() - ref[0].float()).abs().max())
                    d2 = float((dw.float() - ref[1].float()).abs().max())
                    print(f"{','.join(map(str, cfg)):<24} {chunk:>6} {ms:>8.2f} {4 * flops / ms / 1e9:>8.0f} "
                          f"{d1:>10.2e} {d2:>10.2e}")
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"{','.join(map(str, cfg)):<24} {chunk:>6} failed: {type(e).__name__}: {str(e)[:120]}")
            os.environ.pop("MEGACPT_FLCE_TRITON_BWD_CONFIG", None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--hidden", default="2048,4096")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--backward", action="store_true", help="sweep the backward's dlogits kernel instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernel_tune.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    if args.backward:
        sweep_backward(args, dev)
        return 0
    best = {}
    for hid in (int(x) for x in args.hidden.split(",")):
        h, w, t, flops = _problem(args, hid, dev)
        with torch.inference_mode():
            ref = fused_linear_cross_entropy(h, w, t, impl="torch", chunk_size=4096)
            ms_torch = triton.testing.do_bench(lambda: fused_linear_cross_entropy(h, w, t, impl="torch",
                                                                                  chunk_size=4096))
        print(f"\nN={args.n} H={hid} V={args.vocab} bf16 | chunked torch path: {ms_torch:.2f} ms "
              f"({flops / ms_torch / 1e9:.0f} TFLOP/s)")
        print(f"{'BN,BV,BH,warps,stages,per_sm':<30} {'ms':>8} {'TFLOP/s':>8} {'max|diff|':>10}")
        for cfg in CONFIGS:
            os.environ["MEGACPT_FLCE_TRITON_CONFIG"] = ",".join(map(str, cfg))
            try:
                with torch.inference_mode():
                    out = fused_linear_cross_entropy(h, w, t, impl="triton")
                    ms = triton.testing.do_bench(lambda: fused_linear_cross_entropy(h, w, t, impl="triton"))
                diff = float((out - ref).abs().max())
                print(f"{','.join(map(str, cfg)):<30} {ms:>8.2f} {flops / ms / 1e9:>8.0f} {diff:>10.2e}")
                if diff < 1e-2 and ms < best.get(hid, (float("inf"),))[0]:
                    best[hid] = (ms, cfg)
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
                print(f"{','.join(map(str, cfg)):<30} failed: {type(e).__name__}: {str(e)[:120]}")
            finally:
                os.environ.pop("MEGACPT_FLCE_TRITON_CONFIG", None)
    for hid, (ms, cfg) in best.items():
        print(f"best H={hid}: {cfg} {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
