"""Per-document NLL under a model: the scoring maths (docs/method.md §2.1).

Definition: document d's stored tokens t_0..t_{n-1} (its sequences concatenated, EOD included when
present) are cut into consecutive chunks of at most L tokens; inside a chunk every token but the first is
predicted from the chunk's preceding tokens only. ``n_pred`` counts predicted tokens, ``nll_sum`` sums
their NLL (nats, accumulated in float64), and ``nll_mean = nll_sum / n_pred``. **Convention: a document
with n_pred = 0 (0 or 1 tokens, or 0-token documents Megatron keeps for empty texts) gets nll_sum = 0 and
nll_mean = NaN** (its perplexity is undefined; selection treats NaN as "no score").

How the pass is made fast and lean:
- chunks are sorted by length and batched up to ``tokens_per_batch`` (rows x padded length) or
  ``micro_batch_size`` rows; rows are right-padded, so causal attention alone keeps padding out of every
  real token's context, and padded positions are never scored (no [b, s, s] mask, no packing waste
  beyond the small length spread inside a sorted batch);
- the trunk gives hidden states [b, s, H]; only the predicted positions' rows [N, H] go through
  ``fused_linear_cross_entropy`` (Triton on GPU, chunked torch on CPU), so [N, V] logits never exist;
- ``torch.inference_mode``; fp32 by default on CPU (exact), bf16 by default on GPU (fp32 accumulation).

``sequence_nll`` is also what ``eval`` uses for label log-likelihoods and held-out perplexity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from megacpt.errors import UserError
from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megacpt.parallel import tp_group_of

COLUMNS = ("doc_id", "n_pred", "nll_sum", "nll_mean")


@dataclass
class ScoringConfig:
    """How to run the scoring forward passes (none of this changes a score beyond fp rounding)."""

    seq_length: int = 2048                 # L: longest chunk, in tokens
    tokens_per_batch: int = 8192           # rows x padded length per forward (ignored with micro_batch_size)
    micro_batch_size: int | None = None    # fixed rows per forward instead of a token budget
    impl: str = "auto"                     # fused output layer: auto | triton | torch
    loss_chunk: int = 1024                 # tokens per [chunk, V] fp32 buffer of the torch output layer
    compile_loss: bool = False             # torch path: torch.compile its log-sum-exp (CPU speed, ~10 s once)

    def validate(self) -> "ScoringConfig":
        if self.seq_length < 2:
            raise UserError(f"--seq-length must be >= 2 (a chunk needs a context token), got {self.seq_length}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.micro_batch_size is None and self.tokens_per_batch < self.seq_length:
            raise UserError(f"--tokens-per-batch ({self.tokens_per_batch}) must be >= --seq-length "
                            f"({self.seq_length})")
        if self.impl not in ("auto", "triton", "torch"):
            raise UserError(f"--impl must be auto, triton or torch, got {self.impl!r}")
        return self



def output_layer(model) -> tuple[torch.Tensor, int, object]:
    """(weight [V_local, H], real vocab size, vocab-parallel process group or None) of a GPTNeoX."""
    w = model.embed_out.weight
    group = getattr(model, "vocab_parallel_group", None)
    if group is None and hasattr(w, "device_mesh"):  # parallelised by the caller with megacpt.parallel
        group = tp_group_of(model)
    if hasattr(w, "to_local"):  # DTensor (tensor parallel): the rank's vocab shard
        w = w.to_local()
    return w, int(model.cfg.vocab_size), group


def chunk_spans(length: int, seq_length: int) -> list[tuple[int, int]]:
    """[start, end) of the consecutive <= L-token chunks of a length-``length`` token sequence."""
    return [(s, min(s + seq_length, length)) for s in range(0, length, seq_length)]


def predicted_tokens(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """n_pred of documents of these lengths: every token but the first of each <= L-token chunk."""
    lengths = np.asarray(lengths, np.int64)
    return lengths - (-(-lengths // seq_length))  # length - number of chunks


def _batches(lengths: np.ndarray, cfg: ScoringConfig) -> Iterable[np.ndarray]:
    """Indices of chunks per forward: longest first, so each batch's padding is small."""
    order = np.argsort(-lengths, kind="stable")
    i = 0
    while i < order.size:
        longest = int(lengths[order[i]])
        rows = cfg.micro_batch_size or max(1, cfg.tokens_per_batch // max(longest, 1))
        yield order[i : i + rows]
        i += rows


@torch.inference_mode()
def chunk_nll(model, chunks: Sequence[np.ndarray | Sequence[int]], cfg: ScoringConfig,
              target_starts: Sequence[int] | None = None, stats: dict | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Score each chunk (<= L tokens) on its own: token j >= max(1, target_starts[i]) is predicted from
    tokens < j of the same chunk. Returns (n_pred int64 [k], nll_sum float64 [k]).

    ``stats`` (optional) accumulates ``input_tokens`` (the chunks' tokens, first ones included) and
    ``forward_tokens`` (rows x padded length): their ratio is the padding. Tokens *scored* are the predicted
    positions, ``n_pred.sum()`` (docs/method.md §2.1).

    ``model`` is a ``megacpt.model.gpt_neox.GPTNeoX`` (``hidden_states`` + ``embed_out``), in the dtype
    to score in, on its device, or a ``PipelineStageScorer``: every stage runs the same batches; only the
    last one returns scores (zeros elsewhere).
    """
    k = len(chunks)
    n_pred = np.zeros(k, np.int64)
    nll_sum = np.zeros(k, np.float64)
    lengths = np.fromiter((len(c) for c in chunks), np.int64, k)
    if lengths.size and lengths.max() > cfg.seq_length:
        raise ValueError(f"a chunk has {int(lengths.max())} tokens > seq_length {cfg.seq_length}")
    starts = np.ones(k, np.int64) if target_starts is None else np.maximum(np.asarray(target_starts), 1)
    last = getattr(model, "is_last_stage", True)  # a PipelineStageScorer that is not last only forwards
    weight, vocab, group = output_layer(model) if last else (None, int(model.cfg.vocab_size), None)
    device = weight.device if last else model.device
    live = np.nonzero(lengths >= 2)[0]  # 0/1-token chunks predict nothing
    for sel in _batches(lengths[live], cfg):
        idx = live[sel]
        s = int(lengths[idx].max())
        ids = np.zeros((idx.size, s), np.int64)  # right padding with token 0 (never attended, never scored)
        for r, i in enumerate(idx):
            ids[r, : lengths[i]] = np.asarray(chunks[i], dtype=np.int64)
        if ids.max() >= vocab or ids.min() < 0:
            bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
            raise UserError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
        ids_t = torch.from_numpy(ids).to(device)
        hidden = model.hidden_states(ids_t)                                   # [b, s, H]
        if not last:  # sent on to the next stage; the last stage scores this batch
            continue
        pos = torch.arange(1, s, device=device)
        # predicted positions j (targets ids[:, j], context ids[:, :j]): start_i <= j < len_i
        scored = (pos[None, :] < torch.from_numpy(lengths[idx]).to(device)[:, None]) & \
                 (pos[None, :] >= torch.from_numpy(starts[idx]).to(device)[:, None])   # [b, s-1]
        h = hidden[:, :-1][scored]                                            # [N, H]
        t = ids_t[:, 1:][scored]                                              # [N]
        nll = fused_linear_cross_entropy(h, weight, t, impl=cfg.impl, vocab_size=vocab,
                                         process_group=group, chunk_size=cfg.loss_chunk,
                                         compile_lse=cfg.compile_loss)                     # [N] fp32
        row = torch.arange(idx.size, device=device)[:, None].expand_as(scored)[scored]
        sums = torch.zeros(idx.size, dtype=torch.float64, device=device).index_add_(0, row, nll.double())
        nll_sum[idx] = sums.cpu().numpy()
        n_pred[idx] = scored.sum(1).cpu().numpy()
        if stats is not None:
            stats["input_tokens"] = stats.get("input_tokens", 0) + int(lengths[idx].sum())
            stats["forward_tokens"] = stats.get("forward_tokens", 0) + ids.size
    return n_pred, nll_sum


def sequence_nll(model, token_lists: Sequence[np.ndarray | Sequence[int]], seq_length: int,
                 cfg: ScoringConfig | None = None, target_starts: Sequence[int] | None = None,
                 stats: dict | None = None) -> list[tuple[int, float]]:
    """(n_pred, nll_sum) per token list, with the per-document definition of this module: lists longer
    than ``seq_length`` are cut into chunks, the first token of each chunk is not predicted.

    ``target_starts[i]`` (optional) scores only tokens at index >= it (e.g. the label after a prompt for
    log-likelihood classification); a list longer than ``seq_length`` with ``target_starts`` is an error
    (truncate the prompt on the left first).
    """
    cfg = cfg or ScoringConfig(seq_length=seq_length, tokens_per_batch=max(seq_length, 8192))
    if cfg.seq_length != seq_length:
        cfg = ScoringConfig(**{**asdict(cfg), "seq_length": seq_length})
    cfg.validate()
    chunks, owner, starts = [], [], []
    for i, toks in enumerate(token_lists):
        n = len(toks)
        if target_starts is not None:
            if n > seq_length:
                raise ValueError(f"sequence {i} has {n} tokens > seq_length {seq_length} with target_starts")
            chunks.append(toks), owner.append(i), starts.append(target_starts[i])
            continue
        for a, b in chunk_spans(n, seq_length):
            chunks.append(toks[a:b]), owner.append(i), starts.append(1)
    n_pred, nll = chunk_nll(model, chunks, cfg, starts, stats)
    tot_n = np.zeros(len(token_lists), np.int64)
    tot_nll = np.zeros(len(token_lists), np.float64)
    np.add.at(tot_n, np.asarray(owner, np.int64), n_pred)
    np.add.at(tot_nll, np.asarray(owner, np.int64), nll)
    return [(int(a), float(b)) for a, b in zip(tot_n, tot_nll)]


def score_documents(model, ds, start: int, end: int, cfg: ScoringConfig, stats: dict | None = None
                    ) -> dict[str, np.ndarray]:
    """Score columns (doc_id, n_pred, nll_sum, nll_mean) of documents [start, end) of an IndexedDataset."""
    docs = [ds.document(d) for d in range(start, end)]
    res = sequence_nll(model, docs, cfg.seq_length, cfg, stats=stats)
    n_pred = np.array([r[0] for r in res], np.int64)
    nll_sum = np.array([r[1] for r in res], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        nll_mean = np.where(n_pred > 0, nll_sum / np.maximum(n_pred, 1), np.nan)
    return {"doc_id": np.arange(start, end, dtype=np.int64), "n_pred": n_pred, "nll_sum": nll_sum,
            "nll_mean": nll_mean}

