"""Throughput accounting: tokens/s, model FLOPs per token, TFLOP/s per device and MFU.

FLOPs formula (model FLOPs, as in PaLM's MFU and Megatron's Narayanan et al. 2021, §5.1): a matmul of
[m, k] x [k, n] costs 2mkn. Per token, per layer, forward:
    QKV 2*h*3h + attention scores/values 2*2*s*h + output projection 2*h*h + MLP 2*2*h*f
    = 8h^2 + 4hf + 4sh        (attention counted over the full s x s square, Megatron's convention)
plus the output layer 2*h*V. Training = 3 x forward (backward = 2 x forward). Activation recomputation
is *not* counted: MFU measures useful work, so recompute lowers MFU, as it should.
With f = 4h this is 72*l*h^2 + 12*l*s*h + 6*h*V per token, Narayanan's formula divided by B*s.
``attention=False`` drops the 4sh attention term (the "6N" count of Kaplan et al. / Chinchilla, matmul
parameters only): the two MFU figures bracket how much of the work the attention kernel does. Causal
attention needs only half the s x s square; the full-square convention (as Megatron, PaLM, torchtitan) is
kept so numbers compare with theirs.
"""
from __future__ import annotations

import time

from megacpt.config import ModelConfig
from megacpt.progress import eta_s

# Dense (no sparsity) peak FLOP/s per device from vendor datasheets. Keys are matched as substrings of
# torch.cuda.get_device_name(); order matters (more specific first).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12},  # H200 SXM: same tensor cores as H100 SXM
    "H100 PCIe": {"bf16": 756e12, "fp8": 1513e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12},  # H100 SXM5 (also H100 80GB HBM3)
    "A100": {"bf16": 312e12, "fp32": 19.5e12},        # A100 SXM/PCIe, fp32 without TF32
}


def peak_flops(device_name: str, dtype: str, override: float | None = None) -> float | None:
    """Per-device peak FLOP/s for ``dtype`` (bf16/fp32); None when unknown (MFU then not reported)."""
    if override is not None:
        return float(override)
    for key, table in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return table.get(dtype)
    return None


def flops_per_token(cfg: ModelConfig, seq_length: int, training: bool = True, attention: bool = True) -> float:
    h, l, f, v = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.padded_vocab()
    fwd = l * (8 * h * h + 4 * h * f + (4 * seq_length * h if attention else 0)) + 2 * h * v
    return 3.0 * fwd if training else float(fwd)


class Throughput:
    """Accumulates tokens and wall time between log lines (per-rank tokens, reported per device)."""

    def __init__(self, flops_per_token: float, n_devices: int, peak: float | None):
        self.fpt, self.n_devices, self.peak = flops_per_token, n_devices, peak
        self.started, self.steps = time.perf_counter(), 0   # this run (not reset per window): the ETA
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, tokens: int) -> None:
        """One step's tokens."""
        self.tokens += tokens
        self.steps += 1

    def eta_s(self, steps_left: int) -> float | None:
        """Seconds to run ``steps_left`` more steps at this run's pace so far (evaluation and checkpoint
        time included); None before the first step."""
        return eta_s(self.steps, self.steps + steps_left, time.perf_counter() - self.started)

    def report(self) -> dict[str, float]:
        """tokens/s (global), TFLOP/s per device, MFU (None if the peak is unknown); resets the window."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = tps * self.fpt / self.n_devices / 1e12
        out = {"tokens_per_s": tps, "tflops_per_device": tflops,
               "mfu": (tflops * 1e12 / self.peak) if self.peak else None, "window_s": dt}
        self.reset()
        return out


def memory_stats(device) -> dict[str, float]:
    """Peak allocated / reserved GiB on CUDA; resident set size on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import psutil

    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}
