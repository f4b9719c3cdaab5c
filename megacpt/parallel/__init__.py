"""Parallelism applied from outside the plain model: ``build_mesh`` -> ``parallelize`` (TP + DP) or
``pipeline.build_pipeline`` (PP, with TP + DP on each stage)."""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megacpt.config import ParallelConfig
from megacpt.errors import UserError
from megacpt.parallel.loss import (copy_to_tp_region, lm_loss, tp_group_of,  # noqa: F401
                                   vocab_parallel_cross_entropy)
from megacpt.parallel.mesh import MESH_DIMS, build_mesh, check_mesh_matches  # noqa: F401


def parallelize_part(module: nn.Module, mesh: DeviceMesh, p: ParallelConfig, in_pipeline: bool = False) -> nn.Module:
    """TP then data parallel on one model (or pipeline stage), in place. ``p`` is resolved."""
    # lazy: torch.distributed.tensor.parallel / fsdp cost about half of `import torch` again (-X importtime);
    # single-device scoring and evaluation import this package (tp_group_of) and never need them
    from megacpt.parallel.data_parallel import apply_ddp, apply_fsdp
    from megacpt.parallel.tensor_parallel import apply_tp

    if p.tensor_model_parallel_size > 1:
        apply_tp(module, mesh["tp"], sequence_parallel=p.sequence_parallel)
    if p.data_parallel_size > 1:
        if p.data_parallel_type == "fsdp":
            apply_fsdp(module, mesh["dp"], p.mixed_precision_param, p.mixed_precision_reduce,
                       reshard_after_forward=p.fsdp_reshard_after_forward and not in_pipeline)
        else:
            apply_ddp(module, mesh["dp"])
    return module


def parallelize(model: nn.Module, mesh: DeviceMesh, pcfg: ParallelConfig) -> nn.Module:
    """Apply tensor parallelism (DTensor) and FSDP2/DDP to ``model`` in place; returns it.

    Under TP the model returns vocab-parallel *local* logits [b, s, V/tp]: compute the loss with
    ``lm_loss(logits, targets, group=tp_group_of(model))``. For pp > 1 use
    ``megacpt.parallel.pipeline.build_pipeline`` instead.
    """
    p = check_mesh_matches(mesh, pcfg)
    p.validate_model(model.cfg)
    if p.pipeline_model_parallel_size > 1:
        raise UserError("parallelize: pipeline_model_parallel_size > 1 needs "
                        "megacpt.parallel.pipeline.build_pipeline(model, mesh, pcfg, n_microbatches)")
    return parallelize_part(model, mesh, p)
