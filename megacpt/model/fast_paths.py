"""Optional GPU fast paths, imported lazily; the torch path is the fallback and the reference.

- attention: ``flash_attn.flash_attn_func`` (pip ``flash-attn``) for causal attention without a document
  mask on CUDA fp16/bf16 tensors. Without it, ``F.scaled_dot_product_attention`` already dispatches to
  FlashAttention-2 / memory-efficient kernels on GPU, so "auto" falls back silently.
- LayerNorm: apex ``FusedLayerNorm`` or transformer-engine ``LayerNorm`` when asked for explicitly (both
  keep the ``weight``/``bias`` parameter names); "auto"/"torch" use ``nn.LayerNorm``.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from megacpt.errors import UserError
from megacpt.optional import optional, require


@functools.lru_cache(maxsize=None)
def _optional(module: str, feature: str):
    """The module, None when not installed; an installed but broken one raises with its real exception."""
    return optional(module, feature)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, required: bool = False):
    """Causal attention with flash-attn. q/k/v [b, nh, s, hd] -> [b, nh, s, hd], or None when unusable."""
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    fa = _optional("flash_attn", "model.attention_backend") if usable else None
    if fa is None:
        if required:
            raise UserError("model.attention_backend=flash needs the flash-attn package and CUDA fp16/bf16 "
                            "tensors (pip install 'megacpt[gpu]'), and no document mask")
        return None
    out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


def layer_norm(hidden: int, eps: float, backend: str = "torch") -> nn.Module:
    if backend in ("torch", "auto"):
        return nn.LayerNorm(hidden, eps=eps)
    if backend == "apex":
        mod = require("apex.normalization", "model.layernorm_backend=apex", "build NVIDIA apex from its repository")
        return mod.FusedLayerNorm(hidden, eps=eps)
    if backend == "te":
        te = require("transformer_engine.pytorch", "model.layernorm_backend=te",
                     "pip install 'transformer-engine[pytorch]' (or 'megacpt[gpu]')")
        return te.LayerNorm(hidden, eps=eps)
    raise UserError(f"model.layernorm_backend: unknown {backend!r} (torch, auto, apex, te)")
