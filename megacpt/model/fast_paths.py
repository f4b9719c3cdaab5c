"""Optional GPU fast paths, imported lazily; the torch path is the fallback and the reference.

- attention (``model.attention_backend``): "flash" = ``flash_attn.flash_attn_func`` (pip ``flash-attn``)
  for causal attention without a document mask on CUDA fp16/bf16 tensors; "sdpa_flash" / "cudnn" = torch's
  ``F.scaled_dot_product_attention`` held to its FlashAttention-2 / cuDNN kernel (an error, not a slower
  kernel, when that one cannot run); "sdpa" = SDPA's own choice; "auto" = flash-attn when installed, else
  SDPA's choice (the only setting that falls back, by definition).
- LayerNorm: apex ``FusedLayerNorm`` or transformer-engine ``LayerNorm`` when asked for explicitly (both
  keep the ``weight``/``bias`` parameter names); "auto"/"torch" use ``nn.LayerNorm``.
- layers (``model.impl=te``): transformer-engine's fused modules run the layer (``gpt_neox.TELayer``).
  Their parameters are *the torch path's parameters*: ``TE_NAME_MAP`` says which TE attribute is which
  torch-path parameter, and ``alias_parameters`` moves each such parameter to the module and name the
  torch path has (``input_layernorm.weight``, ``mlp.dense_h_to_4h.weight``, ...) while the TE module keeps
  reading it under its own attribute name. ``named_parameters``, ``state_dict``, DCP checkpoints, optimizer
  state, FSDP sharding and the HF name map therefore see one set of names for both paths; TE's fp8
  scaling state (its ``_extra_state``) is left out of state dicts (``drop_te_extra_state``).
"""
from __future__ import annotations

import contextlib
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


_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def sdpa(q, k, v, backend: str, is_causal: bool = False, attn_mask=None):
    """``F.scaled_dot_product_attention``, restricted to one kernel for "sdpa_flash" / "cudnn"."""
    if backend not in _SDPA_BACKENDS:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                    is_causal=is_causal)
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):
            raise
        raise UserError(f"model.attention_backend={backend}: torch's {_SDPA_BACKENDS[backend]} kernel cannot "
                        f"run here ({q.device.type}, {q.dtype}, head dim {q.shape[-1]}"
                        f"{', document mask' if attn_mask is not None else ''}); use sdpa or auto") from None


def transformer_engine():
    """``transformer_engine.pytorch`` for ``model.impl=te``: not installed / installed but broken / no CUDA
    device -> UserError."""
    te = require("transformer_engine.pytorch", "model.impl=te",
                 "pip install --no-build-isolation 'transformer-engine[pytorch]' on a CUDA machine "
                 "(benchmarks/gpu_checks.sh says what can be carried to a GPU box without network)")
    if not torch.cuda.is_available():
        raise UserError("model.impl=te runs on CUDA GPUs only (transformer-engine's kernels); use impl=torch here")
    return te


def te_device() -> torch.device:
    """Where TE modules create their parameters: the default device (meta under ``torch.device("meta")``),
    except that CPU becomes CUDA when there is one (TE's kernels are CUDA only)."""
    dev = torch.get_default_device()
    if dev.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def te_recipe():
    """``transformer_engine.common.recipe`` (DelayedScaling, Format)."""
    return require("transformer_engine.common.recipe", "model.fp8", "install transformer-engine (model.impl=te)")


def fp8_autocast(enabled: bool, group=None):
    """TE's fp8 context with delayed scaling (HYBRID: E4M3 forward, E5M2 gradients; amax history 1024,
    max), amaxes reduced over ``group`` (the data-parallel group, so every rank scales alike); a null
    context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    te, recipe = transformer_engine(), te_recipe()
    r = recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=1024, amax_compute_algo="max")
    if hasattr(te, "autocast"):  # TE >= 2.8
        return te.autocast(enabled=True, recipe=r, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=r, fp8_group=group)


# TE attribute (path relative to a TELayer) -> the torch-path parameter it is (same relative path form).
# The TE modules' own ``weight``/``bias`` already sit at torch-path names (attention.query_key_value.weight,
# attention.dense.bias, mlp.dense_h_to_4h.weight under the exact-GELU MLP, ...); these are the others.
TE_NAME_MAP: dict[str, str] = {
    # LayerNormLinear(QKV) fuses the input LayerNorm
    "attention.query_key_value.layer_norm_weight": "input_layernorm.weight",
    "attention.query_key_value.layer_norm_bias": "input_layernorm.bias",
    # exact-GELU MLP: LayerNormLinear(fc1, fusing post_attention_layernorm) + torch GELU + Linear(fc2)
    "mlp.dense_h_to_4h.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.layer_norm_bias": "post_attention_layernorm.bias",
    # an activation TE computes itself: one LayerNormMLP (LayerNorm, fc1, activation, fc2)
    "mlp.fused.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.fused.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.fused.fc1_weight": "mlp.dense_h_to_4h.weight",
    "mlp.fused.fc1_bias": "mlp.dense_h_to_4h.bias",
    "mlp.fused.fc2_weight": "mlp.dense_4h_to_h.weight",
    "mlp.fused.fc2_bias": "mlp.dense_4h_to_h.bias",
}


class ParamHolder(nn.Module):
    """Holds parameters that a fused TE module reads (a LayerNorm's, an MLP linear's): it gives them the
    torch path's names. Never called."""

    def forward(self, *args):  # noqa: D401
        raise RuntimeError("ParamHolder is storage for a fused module's parameters; it is never called")


class _AliasMixin:
    """Attribute access for aliased parameters: ``self.<te name>`` reads/writes the owner's parameter."""

    def __getattr__(self, name):
        aliases = self.__dict__.get("_megacpt_aliases")
        if aliases is not None and name in aliases:
            owner, attr = aliases[name]
            return getattr(owner, attr)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        aliases = self.__dict__.get("_megacpt_aliases")
        if aliases is not None and name in aliases:
            owner, attr = aliases[name]
            setattr(owner, attr, value)
            return
        super().__setattr__(name, value)


@functools.lru_cache(maxsize=None)
def _aliased_class(cls: type) -> type:
    return type(cls.__name__, (_AliasMixin, cls), {"__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__})


def alias_parameters(root: nn.Module, name_map: dict[str, str] = TE_NAME_MAP) -> list[tuple[str, str]]:
    """Move each mapped parameter of ``root``'s TE modules to its torch-path owner (a ``ParamHolder`` or
    module that ``root`` already has at that path); the TE module reads it through an alias from then on.

    The very same tensor changes owner (no copy): values, ``requires_grad`` and devices are kept. Returns
    the (TE name, torch name) pairs applied; a map entry whose TE module or parameter is absent (the other
    MLP variant, ``bias=False``) is skipped. Aliases hold the owner module, so a deep copy of ``root``
    (pipeline stages) aliases the copy's owners, and ``to_empty``/FSDP replacing the owner's parameter is
    what the TE module reads next.
    """
    applied = []
    for te_name, torch_name in name_map.items():
        mod_path, _, attr = te_name.rpartition(".")
        try:
            mod = root.get_submodule(mod_path)
        except AttributeError:
            continue
        if attr not in mod._parameters or mod._parameters[attr] is None:
            continue
        owner_path, _, owner_attr = torch_name.rpartition(".")
        owner = root.get_submodule(owner_path)
        if owner._parameters.get(owner_attr) is not None:
            raise RuntimeError(f"alias_parameters: {torch_name} already holds a parameter (map entry {te_name})")
        param = mod._parameters.pop(attr)
        owner.register_parameter(owner_attr, param)
        if not isinstance(mod, _AliasMixin):
            mod.__class__ = _aliased_class(type(mod))
        mod.__dict__.setdefault("_megacpt_aliases", {})[attr] = (owner, owner_attr)
        applied.append((te_name, torch_name))
    return applied


def drop_te_extra_state(module: nn.Module) -> None:
    """Keep TE's ``_extra_state`` (fp8 amax history and scales) out of ``module``'s state dicts, and do not
    ask for it when loading: checkpoints hold parameters only, identical for both implementations. After
    a resume TE re-derives its fp8 scales, as on the first step of any fp8 run."""

    def drop(mod, state_dict, prefix, local_metadata):
        for k in [k for k in state_dict if k.endswith("._extra_state") or k == "_extra_state"]:
            del state_dict[k]

    def forgive(mod, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]

    module._register_state_dict_hook(drop)
    module.register_load_state_dict_post_hook(forgive)


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
