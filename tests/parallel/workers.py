"""Module-level worker functions for the spawned gloo processes (must be importable by the children)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megacpt.config import ModelConfig, ParallelConfig
from megacpt.model.gpt_neox import GPTNeoX, position_ids_from_doc_ids

STEPS = 3
LR = 1e-2


def tiny_cfg() -> ModelConfig:
    # 4 layers (2 stages x 2 virtual), 4 heads (tp 2), odd real vocab padded to 128 (tp 2 divides it)
    return ModelConfig(vocab_size=101, hidden_size=32, num_layers=4, num_heads=4, rotary_pct=0.5,
                       max_position_embeddings=64, make_vocab_size_divisible_by=64).validate()


def make_model() -> GPTNeoX:
    torch.manual_seed(1234)
    model = GPTNeoX(tiny_cfg())
    with torch.no_grad():  # random biases/norms too, so every parameter's gradient path is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(n: int = 4, s: int = 16):
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 101, (n, s + 1), generator=g)
    doc_ids = torch.zeros(n, s, dtype=torch.long)
    doc_ids[:, 9:] = 1  # two packed documents per row: the doc mask must survive every layout
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), doc_ids


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def reference(steps: int = STEPS):
    """Single-process losses and step-0 gradients of the same model, batch and optimizer."""
    from megacpt.parallel.loss import lm_loss

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    inp, tgt, doc = batch()
    pos = position_ids_from_doc_ids(doc)  # positions restart per document: a second kwarg through PP
    losses, grads = [], None
    for step in range(steps):
        opt.zero_grad()
        loss = lm_loss(model(inp, doc_ids=doc, position_ids=pos), tgt)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():  # forward-only loss after training (validation path)
        losses.append(lm_loss(model(inp, doc_ids=doc, position_ids=pos), tgt).item())
    return losses, grads


def run_layout(rank: int, world: int, pcfg: ParallelConfig, n_microbatches: int = 2, steps: int = STEPS,
               via_hidden: bool = False):
    """Train ``steps`` AdamW steps under ``pcfg``; returns (global losses, step-0 full grads of owned params).

    ``via_hidden``: True: ``hidden_states`` @ local ``embed_out.weight`` (+ ``copy_to_tp_region``);
    "fused": ``hidden_states`` + the fused linear-cross-entropy kernel with ``process_group``."""
    from megacpt.parallel import build_mesh, copy_to_tp_region, lm_loss, parallelize, tp_group_of
    from megacpt.parallel.pipeline import broadcast_loss, build_pipeline

    mesh = build_mesh(pcfg, world, tiny_cfg())
    dp_mesh = mesh["dp"]
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    inp, tgt, doc = batch()
    b = inp.shape[0] // dp  # this dp rank's share of the global batch
    inp, tgt, doc = (t[dp_rank * b:(dp_rank + 1) * b] for t in (inp, tgt, doc))
    pos = position_ids_from_doc_ids(doc)
    model = make_model()
    if pcfg.pipeline_model_parallel_size > 1:
        pipe = build_pipeline(model, mesh, pcfg, n_microbatches)
        params = dict(pipe.named_parameters())
        def fwd_bwd():
            return broadcast_loss(pipe.step(inp, tgt, doc_ids=doc, position_ids=pos), mesh)

        def evaluate():
            return broadcast_loss(pipe.eval_step(inp, tgt, doc_ids=doc, position_ids=pos), mesh)
    else:
        model = parallelize(model, mesh, pcfg)
        params = dict(model.named_parameters())
        group = tp_group_of(model)

        def fwd_bwd():
            if via_hidden == "fused":  # the fused kernel: vocab-parallel itself, sums dL/dh over tp
                from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

                h = model.hidden_states(inp, doc_ids=doc, position_ids=pos)
                w = model.embed_out.weight
                w = w.to_local() if group is not None else w  # [V/tp, H] under TP
                loss = fused_linear_cross_entropy(h.flatten(0, 1), w, tgt.flatten(), reduction="mean",
                                                  impl="torch", process_group=group)
            elif via_hidden:
                # [b, s, H] full; its gradient from a vocab slice must be summed over tp
                h = copy_to_tp_region(model.hidden_states(inp, doc_ids=doc, position_ids=pos), group)
                w = model.embed_out.weight
                w = w.to_local() if group is not None else w  # [V/tp, H] under TP
                loss = lm_loss(h @ w.T, tgt, group=group)
            else:
                loss = lm_loss(model(inp, doc_ids=doc, position_ids=pos), tgt, group=group)
            loss.backward()
            return loss.detach()

        def evaluate():
            with torch.no_grad():
                return lm_loss(model(inp, doc_ids=doc, position_ids=pos), tgt, group=group)
    opt = torch.optim.AdamW(params.values(), lr=LR)
    losses, grads = [], None
    for step in range(steps):
        opt.zero_grad()
        loss = fwd_bwd()
        if step == 0:
            # numpy: torch tensors cross the result queue as shared-memory handles that die with the child
            grads = {n: _full(p.grad).detach().numpy().copy() for n, p in params.items()}
        opt.step()
        losses.append(loss)
    losses.append(evaluate())  # forward-only loss after training (validation path)
    if dp > 1:  # each dp rank's loss is the mean of its equal share: average them
        losses = torch.stack(losses)
        dist.all_reduce(losses, group=dp_mesh.get_group())
        losses = losses / dp
    return [float(l) for l in losses], grads


def run_layouts(rank: int, world: int, layouts: list[tuple[ParallelConfig, bool]]):
    """Several (config, via_hidden) layouts in one process group (spawning is the slow part on 2 cores)."""
    return [run_layout(rank, world, p, via_hidden=h) for p, h in layouts]


def vocab_parallel_ce_check(rank: int, world: int):
    """Vocab-parallel CE (with padded rows masked, ignore_index) vs plain CE on the gathered logits:
    max abs difference of per-token losses and of logits gradients (this rank's slice)."""
    import torch.nn.functional as F

    from megacpt.parallel.loss import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(5)
    full = torch.randn(12, 128, generator=g) * 3  # [N, V_pad]
    tgt = torch.randint(0, 101, (12,), generator=g)
    tgt[3] = -100
    w = torch.randn(12, generator=g)  # weights per token, so the backward sees a non-uniform grad
    ref_in = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in[:, :101], tgt, ignore_index=-100, reduction="none")
    (ref * w).sum().backward()
    vl = 128 // world
    local = full[:, rank * vl:(rank + 1) * vl].clone().requires_grad_(True)
    out = vocab_parallel_cross_entropy(local, tgt, group=dist.group.WORLD, vocab_size=101)
    (out * w).sum().backward()
    return ((out - ref).abs().max().item(),
            (local.grad - ref_in.grad[:, rank * vl:(rank + 1) * vl]).abs().max().item())


def run_layouts_and_ce(rank: int, world: int, layouts):
    return vocab_parallel_ce_check(rank, world), run_layouts(rank, world, layouts)
