"""Data parallelism: FSDP2 (``fully_shard``, per-layer units + root) or DDP (composable ``replicate``).

Both keep parameter names unchanged (no wrapper module), so checkpoints and the HF name map see the plain
model's names. FSDP2 composes with TP (params already DTensors over tp become 2-D (dp, tp) DTensors) and
with PP (each stage is sharded on its own; ``reshard_after_forward=False`` there, as every micro-batch
would otherwise all-gather again).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megacpt.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_fsdp(module: nn.Module, dp_mesh: DeviceMesh, param_dtype: str = "float32",
               reduce_dtype: str = "float32", reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``module`` (GPTNeoX or a pipeline stage) over ``dp_mesh``: one FSDP unit per layer + the root
    (embeddings, final norm, output layer), so only one layer's full parameters live at a time."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    _set_fp8_group(module, dp_mesh)
    layers = list(module.layers.values())
    for i, layer in enumerate(layers):
        # the last layer's params are needed again right away by backward: keep them gathered
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # root (embeddings, final norm, output layer): None = FSDP's "auto": stays gathered after forward, as
    # backward needs it at once; it also lets a fused loss read embed_out.weight after hidden_states()
    fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=None if reshard_after_forward else False)
    if hasattr(module, "hidden_states"):
        # the fused-loss / scoring path calls model.hidden_states(...) rather than model(...): give it the
        # same all-gather/reshard hooks as forward
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(module, "hidden_states")
    return module


def _set_fp8_group(module: nn.Module, dp_mesh: DeviceMesh) -> None:
    """fp8 (model.impl=te): TE reduces its amaxes over the data-parallel group, so every replica quantizes
    with the same scales."""
    if hasattr(module, "fp8_group"):
        module.fp8_group = dp_mesh.get_group()


def apply_ddp(module: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Replicate ``module`` over ``dp_mesh`` with gradient all-reduce (bucketed, overlapped with backward)."""
    from torch.distributed._composable.replicate import replicate

    if any(hasattr(p, "device_mesh") for p in module.parameters()):
        raise UserError("parallel.data_parallel_type=ddp: the model has DTensor (tensor-parallel) parameters; "
                        "use fsdp")
    _set_fp8_group(module, dp_mesh)
    replicate(module, device_mesh=dp_mesh, bucket_cap_mb=100)
    return module
