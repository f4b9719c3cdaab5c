"""Tensor (and sequence) parallelism for ``GPTNeoX`` with DTensor ``parallelize_module``.

Sharding, per layer (tp ranks, H hidden, F MLP width, V padded vocab):
- ``attention.query_key_value``  column-parallel: weight [3H/tp, H]. HF/Megatron lay the 3H output rows out
  per head as [q_h, k_h, v_h], so a contiguous row split gives each rank whole heads (nh/tp of them) with
  their own q, k and v; the attention code infers its local head count from the width it receives.
- ``attention.dense``            row-parallel:    weight [H, H/tp], output all-reduced (or reduce-scattered).
- ``mlp.dense_h_to_4h`` column-, ``mlp.dense_4h_to_h`` row-parallel ([F/tp, H] / [H, F/tp]).
- ``embed_in``   vocab-parallel (rows [V/tp, H]): each rank looks up its vocab range, others contribute 0,
  the partial sums are all-reduced.
- ``embed_out``  vocab-parallel column split [V/tp, H]: the model returns *local* logits [b, s, V/tp]
  (never gathered); use ``megacpt.parallel.loss.vocab_parallel_cross_entropy`` or the fused loss with
  ``process_group=tp_group`` on ``hidden_states`` and ``embed_out.weight.to_local()``.
- sequence parallel (optional): activations between the TP regions (residual stream, LayerNorms) are split
  over the sequence dim ([b, s/tp, H]); the column-parallel inputs all-gather, the row-parallel outputs
  reduce-scatter (same communication volume as the all-reduce, 1/tp of the activation memory).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from megacpt.errors import UserError


def tp_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, object]:
    """The DTensor plan for the modules this (possibly pipeline-split) model has: data, not code."""
    seq = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between regions
    plan: dict[str, object] = {}
    if getattr(model, "embed_in", None) is not None:
        plan["embed_in"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    for i in model.layers.keys():
        p = f"layers.{i}"
        plan[f"{p}.attention.query_key_value"] = ColwiseParallel(input_layouts=seq)
        plan[f"{p}.attention.dense"] = RowwiseParallel(output_layouts=seq)
        plan[f"{p}.mlp.dense_h_to_4h"] = ColwiseParallel(input_layouts=seq)
        plan[f"{p}.mlp.dense_4h_to_h"] = RowwiseParallel(output_layouts=seq)
        if sequence_parallel:
            plan[f"{p}.input_layernorm"] = SequenceParallel()
            plan[f"{p}.post_attention_layernorm"] = SequenceParallel()
    if getattr(model, "final_layer_norm", None) is not None and sequence_parallel:
        plan["final_layer_norm"] = SequenceParallel()
    if getattr(model, "embed_out", None) is not None:
        # local logits [b, s, V/tp]
        plan["embed_out"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=True)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a GPTNeoX or a pipeline stage of one) in place over the 1-D ``tp_mesh``."""
    tp = tp_mesh.size()
    cfg = model.cfg
    if cfg.num_heads % tp or cfg.intermediate_size % tp or cfg.padded_vocab() % tp:
        raise UserError(f"tensor parallel size {tp}: heads {cfg.num_heads}, intermediate_size "
                        f"{cfg.intermediate_size} and padded vocab {cfg.padded_vocab()} must all divide by it")
    if cfg.tie_word_embeddings:
        raise UserError("model.tie_word_embeddings: not supported with tensor parallelism")
    if tp == 1:
        return model
    parallelize_module(model, tp_mesh, tp_plan(model, sequence_parallel))
    # the model needs the full sequence length for rotary positions when activations are seq-sharded
    model.sequence_parallel_size = tp if sequence_parallel else 1
    return model
