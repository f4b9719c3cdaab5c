"""Cross-entropy on plain or vocab-parallel logits (Megatron's ``vocab_parallel_cross_entropy``).

With tensor parallelism the model returns local logits [.., V/tp] (rank r holds vocab rows
[r*V/tp, (r+1)*V/tp)). The loss needs three all-reduces over the tp group (max, sum of exp, target
logit); the backward is local: softmax - one_hot on the rank's slice. No [tokens, V] tensor is gathered.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy


class _CopyToTPRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward (Megatron's ``copy_to_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Use on replicated hidden states [.., H] before a vocab-parallel matmul with a local weight slice
    (``h @ embed_out.weight.to_local().T``, or a fused linear+CE with ``process_group``): each rank's
    backward only sees its vocab slice, so the gradient w.r.t. ``h`` must be summed over the tp group."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return _CopyToTPRegion.apply(x, group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, ignore_index, vocab_size):
        # logits [N, Vl] (local slice), targets [N] global ids
        logits = logits.float()
        n, vl = logits.shape
        if vocab_size is not None and vocab_start + vl > vocab_size:  # padded rows never get probability
            cols = torch.arange(vocab_start, vocab_start + vl, device=logits.device)
            logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
        gmax = logits.max(dim=-1).values
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local_t = targets - vocab_start
        in_range = (local_t >= 0) & (local_t < vl)
        safe_t = local_t.clamp(0, vl - 1)
        tgt_logit = torch.where(in_range, shifted.gather(1, safe_t[:, None]).squeeze(1), 0.0)
        dist.all_reduce(tgt_logit, group=group)
        loss = sum_exp.log() - tgt_logit
        valid = targets != ignore_index
        loss = torch.where(valid, loss, 0.0)
        softmax = exp / sum_exp[:, None]
        ctx.save_for_backward(softmax, safe_t, in_range & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_t, hit, valid = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - one_hot(target), on this rank's slice
        grad[torch.arange(grad.shape[0], device=grad.device)[hit], safe_t[hit]] -= 1.0
        grad *= (grad_loss * valid)[:, None]
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, group=None,
                                 ignore_index: int = -100, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token NLL [N] from local logits [N, V/tp] over ``group`` (None/size 1: plain logits).

    ``vocab_size``: real vocab; logits of padded rows (index >= vocab_size) are masked out.
    """
    world = dist.get_world_size(group) if (group is not None and dist.is_initialized()) else 1
    if world == 1:
        logits = local_logits.float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits[:, :vocab_size]
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    vocab_start = dist.get_rank(group) * local_logits.shape[-1]
    return _VocabParallelCE.apply(local_logits, targets, vocab_start, group, ignore_index, vocab_size)


def fused_lm_nll_sum(hidden: torch.Tensor, embed_out_weight: torch.Tensor, targets: torch.Tensor, group=None,
                     ignore_index: int = -100, vocab_size: int | None = None) -> torch.Tensor:
    """Sum of next-token NLL from final hidden states [..., H] through the fused linear + cross-entropy
    (never [tokens, V] logits). Under TP ``embed_out_weight`` is the vocab-sharded DTensor: its local
    shard is used and the op reduces over ``group``."""
    w = embed_out_weight.to_local() if group is not None else embed_out_weight  # [V_pad/tp, H] under TP
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), w, targets.reshape(-1),
                                      reduction="sum", ignore_index=ignore_index, vocab_size=vocab_size,
                                      process_group=group)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, group=None, ignore_index: int = -100,
            vocab_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss over non-ignored positions. logits [b, s, V or V/tp], targets [b, s]."""
    nll = vocab_parallel_cross_entropy(logits.flatten(0, -2), targets.flatten(), group, ignore_index, vocab_size)
    n = (targets != ignore_index).sum().clamp(min=1)
    return nll.sum() / n


def tp_group_of(model: torch.nn.Module):
    """The tp process group of a model parallelised by ``apply_tp`` (None when not vocab-parallel)."""
    out = getattr(model, "embed_out", None)
    w = getattr(out, "weight", None) if out is not None else None
    mesh = getattr(w, "device_mesh", None)  # FSDP alone shards it over "dp": not vocab-parallel
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if mesh is None or "tp" not in names:
        return None
    tp_mesh = mesh["tp"] if len(names) > 1 else mesh
    return tp_mesh.get_group() if tp_mesh.size() > 1 else None
