"""Tensor- and pipeline-parallel layouts of the scoring pass (forward only, no FSDP/DDP: dp ranks hold
whole replicas).

TP: the DTensor plan of ``megacpt.parallel`` (vocab-parallel ``embed_out``, replicated hidden states; the fused
output layer runs over the tp group). PP: ``PipelineStageScorer`` streams activations stage to stage with
point-to-point sends; why not ``torch.distributed.pipelining``'s schedules: docs/parallelism.md.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megacpt.config import ModelConfig, ParallelConfig
from megacpt.convert import load_weights
from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.parallel import build_mesh, tp_group_of
from megacpt.parallel.pipeline import split_stage
from megacpt.parallel.tensor_parallel import apply_tp
from megacpt.score.job import dist_info

def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: str, timeout_s: float = 1800.0):
    """Under torchrun (WORLD_SIZE > 1) start the process group: nccl on GPU, gloo on CPU. Every collective
    gives up after ``timeout_s`` (data-parallel ranks meet only at the end: the fastest waits for the slowest)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        gpu = device in ("auto", "cuda") and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist_info()


class PipelineStageScorer:
    """This rank's pipeline stage for the forward-only scoring pass.

    Every stage walks the same batches (they are built from the dataset, so no shapes travel): stage 0
    embeds the tokens, a later stage receives the previous stage's activations [b, s, H], runs its layers
    and sends them on asynchronously (so the stages work on consecutive batches at once); the last stage
    applies the final LayerNorm and returns the hidden states that ``chunk_nll`` scores.
    """

    def __init__(self, part, pp_group, pp_rank: int, pp: int, device: torch.device, tp_size: int = 1,
                 max_in_flight: int = 2):
        self.part, self.cfg, self.device = part, part.cfg, device
        self.pp_group, self.pp_rank, self.pp_size, self.tp_size = pp_group, pp_rank, pp, tp_size
        self.is_last_stage = pp_rank == pp - 1
        self.embed_out = part.embed_out
        self.vocab_parallel_group = getattr(part, "vocab_parallel_group", None)
        self.dtype = next(part.parameters()).dtype
        self._prev = dist.get_global_rank(pp_group, pp_rank - 1) if pp_rank > 0 else None
        self._next = dist.get_global_rank(pp_group, pp_rank + 1) if not self.is_last_stage else None
        self._sends: list = []
        self._max_in_flight = max_in_flight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        b, s = input_ids.shape
        if self._prev is None:
            x = input_ids
        else:
            x = torch.empty(b, s, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self._prev, group=self.pp_group)
        h = self.part.hidden_states(x)
        if self.is_last_stage:
            return h
        self._sends.append((dist.isend(h.contiguous(), dst=self._next, group=self.pp_group), h))
        while len(self._sends) > self._max_in_flight:  # bound the activations kept alive for sends
            self._sends.pop(0)[0].wait()
        return None

    def compile_layers(self, dynamic: bool | None = None) -> None:
        self.part.compile_layers(dynamic)

    def finish(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


def parallel_scoring_model(model_path: str, mcfg: ModelConfig, tp: int, pp: int, world: int, device: torch.device,
                           dtype: torch.dtype = torch.float32):
    """This rank's part of the model at ``model_path`` on the mesh (pp, dp, tp), without FSDP/DDP (inference:
    dp ranks hold whole replicas). TP: the DTensor plan of ``megacpt.parallel`` (vocab-parallel
    ``embed_out``, replicated hidden states; the fused output layer runs over the tp group). PP > 1: a
    ``PipelineStageScorer`` for the rank's stage. Built on the meta device (and split) before any memory
    is used; ``load_weights`` then reads only this rank's tensors, so no rank ever holds the whole model."""
    if mcfg.tie_word_embeddings and pp > 1:
        raise UserError("--pipeline-model-parallel-size: tied input/output embeddings would live on two stages; "
                        "score this model with tensor/data parallelism instead")
    mesh = build_mesh(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), world,
                      mcfg, device_type=device.type)
    pp_rank = mesh["pp"].get_local_rank()
    with torch.device("meta"):
        model = GPTNeoX(mcfg)
    part = split_stage(model, pp_rank, pp, copy_model=False) if pp > 1 else model
    part = part.to(dtype).to_empty(device=device)
    if mcfg.tie_word_embeddings:  # to_empty materialises each parameter on its own: tie again
        part.embed_out.weight = part.embed_in.weight
    if tp > 1:
        apply_tp(part, mesh["tp"])
        part.vocab_parallel_group = tp_group_of(part) if part.embed_out is not None else None
    load_weights(part, model_path)
    if pp == 1:
        return part.eval()
    return PipelineStageScorer(part.eval(), mesh["pp"].get_group(), pp_rank, pp, device, tp_size=tp)
