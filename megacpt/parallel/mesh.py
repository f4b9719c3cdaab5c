"""The (pp, dp, tp) device mesh, built once from ``ParallelConfig``.

Dimension order follows Megatron/torchtitan: tp innermost (neighbouring ranks, i.e. one node's NVLink
domain), then dp, pp outermost. Every dimension is present even at size 1, so ``mesh["tp"]`` etc. always
work. All size checks run before any process group is created.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megacpt.config import ModelConfig, ParallelConfig
from megacpt.errors import UserError

MESH_DIMS = ("pp", "dp", "tp")


def validate(pcfg: ParallelConfig, world_size: int, model_cfg: ModelConfig | None = None) -> ParallelConfig:
    """Resolve dp and check sizes against the world and the model; raises UserError naming the field."""
    resolved = pcfg.resolve(world_size)
    if model_cfg is not None:
        resolved.validate_model(model_cfg)
    return resolved


def default_device_type() -> str:
    """cuda when the process group has NCCL (also as in "cpu:gloo,cuda:nccl"), else cpu (gloo)."""
    backend = str(dist.get_backend()) if dist.is_initialized() else ""
    return "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"


def build_mesh(pcfg: ParallelConfig, world_size: int | None = None, model_cfg: ModelConfig | None = None,
               device_type: str | None = None) -> DeviceMesh:
    """A 3-D DeviceMesh with dims ``MESH_DIMS``. Needs an initialised default process group."""
    if not dist.is_initialized():
        raise UserError("build_mesh: torch.distributed is not initialised (launch with torchrun, or call "
                        "dist.init_process_group first)")
    world = dist.get_world_size()
    if world_size is not None and world_size != world:
        raise UserError(f"build_mesh: world_size={world_size} but the process group has {world} ranks")
    p = validate(pcfg, world, model_cfg)
    shape = (p.pipeline_model_parallel_size, p.data_parallel_size, p.tensor_model_parallel_size)
    return init_device_mesh(device_type or default_device_type(), shape, mesh_dim_names=MESH_DIMS)


def mesh_sizes(mesh: DeviceMesh) -> dict[str, int]:
    return {name: mesh[name].size() for name in MESH_DIMS}


def check_mesh_matches(mesh: DeviceMesh, pcfg: ParallelConfig) -> ParallelConfig:
    """The resolved config of a mesh built by ``build_mesh``; errors if ``pcfg`` asks for other sizes."""
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise UserError(f"mesh dims {mesh.mesh_dim_names} are not {MESH_DIMS}: build it with build_mesh")
    p = pcfg.resolve(mesh.size())
    want = (p.pipeline_model_parallel_size, p.data_parallel_size, p.tensor_model_parallel_size)
    have = tuple(mesh[n].size() for n in MESH_DIMS)
    if want != have:
        raise UserError(f"parallel config asks for (pp, dp, tp) = {want} but the mesh is {have}")
    return p
