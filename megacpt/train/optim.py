"""AdamW with Megatron's weight-decay exclusions, and the LR schedule (linear warm-up, then decay).

The schedule is a pure function of the step number and the config, so resuming needs only the step
(saved with the checkpoint); the scheduler's state dict also records the config it ran with so a resume
under a changed schedule is reported, not silent.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from megacpt.config import OptimizerConfig, SchedulerConfig
from megacpt.errors import UserError
from megacpt.optional import require


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices/embeddings, and undecayed biases + norm weights (Megatron rule).

    A parameter is excluded when it is 1-D (LayerNorm weight/bias, linear biases) — also under TP/FSDP
    sharding, where ``p.ndim`` is the logical (DTensor) rank. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_dtensor(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def _split_dtensor_groups(groups: list[dict]) -> list[dict]:
    """foreach kernels cannot mix DTensor (TP/FSDP-sharded) and plain tensors in one call: one group each."""
    out = []
    for g in groups:
        for want in (True, False):
            ps = [p for p in g["params"] if _is_dtensor(p) == want]
            if ps:
                out.append({**g, "params": ps})
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW. ``impl=auto``: fused on CUDA (one kernel per step; foreach when params are DTensors), the
    single-tensor loop on CPU (torch's CPU default)."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise UserError("optimizer: the model has no trainable parameters")
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.impl
    on_cuda = params[0].is_cuda
    if impl == "apex":
        FusedAdam = require("apex.optimizers", "optimizer.impl=apex",
                            "build NVIDIA apex from its repository, or use impl: fused").FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **kw)
    if impl == "auto":
        if not on_cuda:
            return torch.optim.AdamW(groups, foreach=False, **kw)
        impl = "fused" if not any(_is_dtensor(p) for p in params) else "foreach"
    if impl == "fused" and not on_cuda:
        raise UserError("optimizer.impl: fused AdamW needs CUDA parameters; use foreach or auto on CPU")
    if impl == "foreach":
        groups = _split_dtensor_groups(groups)
    return torch.optim.AdamW(groups, fused=(impl == "fused"), foreach=(impl == "foreach"), **kw)


class LRSchedule:
    """Megatron semantics: optimizer step ``n`` (1-based) uses ``lr(n)``.

    warm-up (n <= W): init + (peak - init) * n / W
    decay (W < n <= D): min + coeff * (peak - min), coeff = 0.5 * (1 + cos(pi * r)) (cosine) or 1 - r
        (linear) or 1 (constant), r = (n - W) / (D - W)
    after D: min_lr.
    """

    def __init__(self, opt: OptimizerConfig, sched: SchedulerConfig, train_iters: int):
        self.peak, self.min_lr, self.init = opt.lr, sched.min_lr, sched.warmup_init_lr
        self.warmup = sched.warmup_iters
        self.decay_iters = sched.decay_iters if sched.decay_iters is not None else train_iters
        self.style = sched.decay_style

    def __call__(self, n: int) -> float:
        if self.warmup > 0 and n <= self.warmup:
            return self.init + (self.peak - self.init) * n / self.warmup
        if self.style == "constant":
            return self.peak
        if n > self.decay_iters:
            return self.min_lr
        r = (n - self.warmup) / max(1, self.decay_iters - self.warmup)
        coeff = 0.5 * (math.cos(math.pi * r) + 1.0) if self.style == "cosine" else 1.0 - r
        return self.min_lr + coeff * (self.peak - self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, n: int) -> float:
        lr = self(n)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"peak": self.peak, "min_lr": self.min_lr, "init": self.init, "warmup": self.warmup,
                "decay_iters": self.decay_iters, "style": self.style}

    def differences(self, saved: dict) -> list[str]:
        """Fields where a checkpoint's schedule differs from this one (the config wins; the caller logs it)."""
        now = self.state_dict()
        return [f"{k}: checkpoint {saved.get(k)!r} -> config {v!r}" for k, v in now.items() if saved.get(k) != v]
