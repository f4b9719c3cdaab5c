"""Pipeline parallelism with ``torch.distributed.pipelining``: split GPTNeoX by layers into stages and
run GPipe, 1F1B or interleaved 1F1B over micro-batches.

Stage ``k`` of ``S = pp * vpp`` owns a contiguous block of ``L / S`` layers; the first stage also owns
``embed_in``, the last ``final_layer_norm`` and ``embed_out``. Rank ``r`` of the pp group holds stages
``r, r + pp, r + 2pp, ...`` (one unless interleaved). A stage is the plain model with the modules it does
not own removed, so its parameter names are the full model's (``layers.7.mlp...``) and DCP checkpoints
reshard across pipeline layouts by name.

The trainer's entry: ``pipe = build_pipeline(model, mesh, pcfg, n_microbatches)`` then per step
``loss = pipe.step(input_ids, targets)`` (forward + backward of all micro-batches; the mean loss on ranks
holding the last stage, None elsewhere), optimizer over ``pipe.parameters()``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megacpt.config import ParallelConfig
from megacpt.errors import UserError
from megacpt.parallel import parallelize_part
from megacpt.parallel.loss import fused_lm_nll_sum, lm_loss, tp_group_of
from megacpt.parallel.mesh import check_mesh_matches


def stage_ids(pp_rank: int, pp: int, vpp: int = 1) -> list[int]:
    """Stages held by a pp rank: looped assignment (rank r: r, r+pp, ...), as interleaved 1F1B expects."""
    return [pp_rank + v * pp for v in range(vpp)]


def stage_layers(stage: int, num_stages: int, num_layers: int) -> list[int]:
    if num_layers % num_stages:
        raise UserError(f"model.num_layers={num_layers} is not divisible by {num_stages} pipeline stages")
    per = num_layers // num_stages
    return list(range(stage * per, (stage + 1) * per))


def split_stage(model: nn.Module, stage: int, num_stages: int, copy_model: bool = True) -> nn.Module:
    """The stage's module: ``model`` (or a deep copy) with the layers and end modules it does not own removed.

    For large models build ``model`` on the meta device, split, parallelise, then ``to_empty`` + init/load.
    """
    part = copy.deepcopy(model) if copy_model else model
    keep = {str(i) for i in stage_layers(stage, num_stages, len(part.layers))}
    for k in list(part.layers.keys()):
        if k not in keep:
            del part.layers[k]
    if stage != 0:
        part.embed_in = None
    if stage != num_stages - 1:
        part.final_layer_norm = None
        part.embed_out = None
    return part


class Pipeline:
    """The pipeline-parallel model parts of this rank and their schedule."""

    def __init__(self, parts: list[nn.Module], stages: list, schedule, n_microbatches: int):
        self.parts, self.stages, self.schedule, self.n_microbatches = parts, stages, schedule, n_microbatches
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def named_parameters(self):
        for part in self.parts:  # names are unique across parts (full-model names)
            yield from part.named_parameters()

    def train(self, mode: bool = True) -> "Pipeline":
        for part in self.parts:
            part.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

    def _run(self, fn, input_ids, targets, position_ids, doc_ids):
        if input_ids.shape[0] % self.n_microbatches:
            raise UserError(f"pipeline: batch size {input_ids.shape[0]} is not divisible by "
                            f"{self.n_microbatches} micro-batches")
        kwargs = {k: v for k, v in (("position_ids", position_ids), ("doc_ids", doc_ids)) if v is not None}
        if position_ids is not None and position_ids.dim() == 1:
            kwargs["position_ids"] = position_ids.expand_as(input_ids).contiguous()
        args = (input_ids,) if self.has_first else ()
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        fn(*args, target=targets if self.has_last else None, losses=losses, **kwargs)
        if not self.has_last:
            return None
        return torch.stack([l.detach().float() for l in losses]).mean()

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward + backward of one (local) batch [b, s] split into micro-batches; gradients accumulate in
        the parts (scaled so they equal the gradient of the mean micro-batch loss). Every pp rank passes
        the same batch; only the first stage reads ``input_ids``, only the last ``targets``."""
        return self._run(self.schedule.step, input_ids, targets, position_ids, doc_ids)

    @torch.no_grad()
    def eval_step(self, input_ids, targets, position_ids=None, doc_ids=None) -> torch.Tensor | None:
        """Forward only (validation loss): mean micro-batch loss on the last stage, None elsewhere."""
        return self._run(self.schedule.eval, input_ids, targets, position_ids, doc_ids)


def build_pipeline(model: nn.Module, mesh: DeviceMesh, pcfg: ParallelConfig, n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   vocab_size: int | None = None, fused_loss: bool = False) -> Pipeline:
    """Split ``model`` into this rank's stages, apply TP / data parallel to each, and build the schedule.

    ``loss_fn(output, target)`` (default: mean next-token cross-entropy, vocab-parallel under TP;
    ``vocab_size`` masks padded vocab rows). ``fused_loss``: the last stage outputs its final hidden
    states and the default loss is the fused linear + cross-entropy over ``embed_out.weight`` (its local
    vocab shard under TP), so no stage ever holds [tokens, vocab] logits. ``model`` is consumed (its last
    stage reuses the object).
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                        ScheduleInterleaved1F1B)

    p = check_mesh_matches(mesh, pcfg)
    p.validate_model(model.cfg)
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    if n_microbatches < pp:
        raise UserError(f"pipeline: {n_microbatches} micro-batches < pp={pp} stages leaves ranks idle; "
                        "use at least pp (ideally 4x pp)")
    if p.pipeline_schedule == "interleaved_1f1b" and n_microbatches % pp:
        raise UserError(f"pipeline: interleaved 1F1B needs micro-batches ({n_microbatches}) divisible by pp={pp}")
    pp_mesh = mesh["pp"]
    pp_rank = pp_mesh.get_local_rank()
    device = (torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda"
              else torch.device(mesh.device_type))
    num_stages = pp * vpp
    ids = stage_ids(pp_rank, pp, vpp)
    parts, stages = [], []
    for j, sid in enumerate(ids):
        part = split_stage(model, sid, num_stages, copy_model=j < len(ids) - 1)
        parallelize_part(part, mesh, p, in_pipeline=True)
        parts.append(part)
        stages.append(PipelineStage(part, sid, num_stages, device, group=pp_mesh.get_group()))

    if loss_fn is None:
        last = parts[-1]
        group = tp_group_of(last) if stages[-1].is_last else None
        if fused_loss and stages[-1].is_last:
            last.output_hidden_states = True

            def loss_fn(hidden, target, ignore_index=-100):
                # embed_out.weight is gathered over dp here: the root stays unsharded in a pipeline
                nll = fused_lm_nll_sum(hidden, last.embed_out.weight, target, group=group,
                                       ignore_index=ignore_index, vocab_size=vocab_size)
                return nll / (target != ignore_index).sum().clamp(min=1)
        else:
            def loss_fn(logits, target):
                return lm_loss(logits, target, group=group, vocab_size=vocab_size)

    if p.pipeline_schedule == "gpipe":
        schedule = ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn)
    elif p.pipeline_schedule == "1f1b":
        schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
    return Pipeline(parts, stages, schedule, n_microbatches)


def broadcast_loss(loss: torch.Tensor | None, mesh: DeviceMesh) -> torch.Tensor:
    """The last stage's loss on every rank of the pp group (for logging)."""
    pp_mesh = mesh["pp"]
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    buf = loss.detach().float().reshape(1).to(device) if loss is not None else torch.zeros(1, device=device)
    group = pp_mesh.get_group()
    last = dist.get_global_rank(group, pp_mesh.size() - 1)
    dist.broadcast(buf, src=last, group=group)
    return buf[0]
