"""Novelty score: per-document NLL of an indexed dataset under a (base) model — the scoring pass.

Definition (docs/method.md §2.1): document d's stored tokens t_0..t_{n-1} (its sequences
concatenated, EOD included when present) are cut into consecutive chunks of at most L tokens; inside a
chunk every token but the first is predicted from the chunk's preceding tokens only. ``n_pred`` counts
predicted tokens, ``nll_sum`` sums their NLL (nats, accumulated in float64), and
``nll_mean = nll_sum / n_pred``. **Convention: a document with n_pred = 0 (0 or 1 tokens, or 0-token
documents Megatron keeps for empty texts) gets nll_sum = 0 and nll_mean = NaN** (its perplexity is
undefined; selection treats NaN as "no score").

How the pass is made fast and lean:
- chunks are sorted by length and batched up to ``tokens_per_batch`` (rows x padded length) or
  ``micro_batch_size`` rows; rows are right-padded, so causal attention alone keeps padding out of every
  real token's context, and padded positions are never scored (no [b, s, s] mask, no packing waste
  beyond the small length spread inside a sorted batch);
- the trunk gives hidden states [b, s, H]; only the predicted positions' rows [N, H] go through
  ``fused_linear_cross_entropy`` (Triton on GPU, chunked torch on CPU), so [N, V] logits never exist;
- ``torch.inference_mode``; fp32 by default on CPU (exact), bf16 by default on GPU (fp32 accumulation).

The CLI (``megacpt score perplexity``) commits results in shards of ``--shard-docs`` documents through
``megacpt.selection.scores.ShardedScoreWriter``; under torchrun the pending shards are dealt round-robin
to the data-parallel ranks and rank 0 assembles the final Parquet file. Batches depend only on the shard,
so 1 rank, N ranks and a killed-then-resumed run write identical files.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from megacpt.errors import UserError

SCORER = "perplexity"
COLUMNS = ("doc_id", "n_pred", "nll_sum", "nll_mean")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


# ----------------------------------------------------------------------------------------------------
# library: NLL of token sequences (also what eval uses for label log-likelihoods and held-out perplexity)
# ----------------------------------------------------------------------------------------------------
def _output_layer(model) -> tuple[torch.Tensor, int, object]:
    """(weight [V_local, H], real vocab size, vocab-parallel process group or None) of a GPTNeoX."""
    w = model.embed_out.weight
    group = getattr(model, "vocab_parallel_group", None)
    if group is None and hasattr(w, "device_mesh"):  # parallelised by the caller with megacpt.parallel
        from megacpt.parallel import tp_group_of

        group = tp_group_of(model)
    if hasattr(w, "to_local"):  # DTensor (tensor parallel): the rank's vocab shard
        w = w.to_local()
    return w, int(model.cfg.vocab_size), group


def chunk_spans(length: int, seq_length: int) -> list[tuple[int, int]]:
    """[start, end) of the consecutive <= L-token chunks of a length-``length`` token sequence."""
    return [(s, min(s + seq_length, length)) for s in range(0, length, seq_length)]


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
    weight, vocab, group = _output_layer(model) if last else (None, int(model.cfg.vocab_size), None)
    device = weight.device if last else model.device
    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

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
            stats["tokens"] = stats.get("tokens", 0) + int(lengths[idx].sum())
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


# ----------------------------------------------------------------------------------------------------
# the job: checks, sharded resumable output, data parallel
# ----------------------------------------------------------------------------------------------------
def check_vocab(model_vocab: int, prefix: str, meta: dict | None, model_tokenizer: str | None) -> list[str]:
    """Raise if the dataset's tokenizer does not fit the model; return warnings to print."""
    warnings: list[str] = []
    tok = (meta or {}).get("tokenizer") or {}
    if not meta:
        warnings.append(f"{prefix}.meta.json missing: cannot check the dataset's tokenizer against the model")
    elif tok.get("vocab_size") is not None and int(tok["vocab_size"]) > model_vocab:
        raise UserError(f"{prefix}.meta.json: the dataset's tokenizer has vocab_size {tok['vocab_size']} > the "
                        f"model's vocabulary {model_vocab}: the data was tokenized for another model")
    if model_tokenizer and tok.get("vocab_size") is not None:
        try:
            from megacpt.data.tokenizer import load_tokenizer

            mt = load_tokenizer(model_tokenizer).identity()
        except Exception as e:  # an unreadable shipped tokenizer is not fatal: the sidecar check stands
            warnings.append(f"could not read the model's tokenizer {model_tokenizer}: {e}")
        else:
            if int(mt.get("vocab_size", -1)) != int(tok["vocab_size"]):
                raise UserError(f"the model's tokenizer {model_tokenizer} has vocab_size {mt.get('vocab_size')}"
                                f", the dataset's ({prefix}.meta.json) {tok['vocab_size']}: different tokenizers")
            if tok.get("sha256") and mt.get("sha256") and tok["sha256"] != mt["sha256"]:
                warnings.append(f"the model's tokenizer {model_tokenizer} differs (sha256) from the dataset's; "
                                "vocab sizes agree, scoring anyway")
    return warnings


def _model_identity(path: str, cfg) -> dict:
    p = Path(path).resolve()
    files = {str(f.relative_to(p)): f.stat().st_size for f in sorted(p.rglob("*"))
             if f.is_file() and f.suffix in (".safetensors", ".bin", ".distcp", ".json")} if p.is_dir() else {}
    return {"path": str(p), "config": cfg.to_dict(), "files": files}


def _dist_info() -> tuple[int, int, object]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def _collective_device(dist) -> torch.device:
    """nccl reduces only CUDA tensors; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(dist, ok: bool) -> None:
    """Collective: raise on every rank if any rank failed (so none waits forever in the next barrier)."""
    if dist is None:
        return
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device(dist))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if ok and not int(flag):
        raise UserError("another rank failed before scoring started (see its error)")


def _peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def score_dataset(model, dataset_prefix: str, seq_length: int, out: str, cfg: ScoringConfig | None = None,
                  shard_docs: int = 4096, resume: bool = False, dtype_name: str = "fp32",
                  model_identity: dict | None = None, progress: bool = True) -> dict:
    """Score every document of ``dataset_prefix`` into the Parquet file ``out``; returns a summary.

    Collective when a process group is initialised: every rank calls it with its model replica; pending
    shards go round-robin to ranks; rank 0 writes ``out``. ``resume``: continue from ``out.shards/``.
    """
    from megacpt.data.indexed import IndexedDataset
    from megacpt.selection.documents import dataset_identity
    from megacpt.selection.scores import ShardedScoreWriter, score_metadata

    cfg = cfg or ScoringConfig(seq_length=seq_length)
    cfg.seq_length = seq_length
    cfg.validate()
    rank, world, dist = _dist_info()
    # data parallel ranks: with a vocab-parallel (tp) group the ranks of one group score the same shards
    # and only its first rank writes (mesh layout: tp innermost, so the group is rank // tp)
    group = getattr(model, "vocab_parallel_group", None)
    tp = getattr(model, "tp_size", None) or (dist.get_world_size(group) if (dist and group is not None) else 1)
    # pipeline stages (mesh (pp, dp, tp), pp outermost): the stages of one replica run the same shards,
    # and the last stage's first tp rank writes
    pp, pp_rank = getattr(model, "pp_size", 1), getattr(model, "pp_rank", 0)
    dp_size = world // (tp * pp)
    dp_rank, writes = (rank // tp) % dp_size, rank % tp == 0 and pp_rank == pp - 1
    ds = IndexedDataset(dataset_prefix)
    if ds.num_documents == 0:
        raise UserError(f"{dataset_prefix}: the dataset has no documents")
    outp = Path(out)
    shards_dir = Path(str(outp) + ".shards")
    if outp.exists():
        if resume:
            if rank == 0:
                print(f"score perplexity: {outp} is already complete; nothing to resume", file=sys.stderr)
            return {"out": str(outp), "already_complete": True}
        raise UserError(f"{outp} exists; pass --resume to finish an interrupted run, or remove it")
    if shards_dir.exists() and not resume:
        raise UserError(f"{shards_dir} holds shards of an interrupted run: pass --resume to finish it, or "
                        "remove the directory to start over")
    meta = score_metadata(SCORER, "nll_mean", dataset_identity(dataset_prefix, ds), {
        "seq_length": seq_length, "dtype": dtype_name, "model": model_identity or {},
        "n_pred_zero": "nll_sum = 0, nll_mean = NaN",
    })
    if dist:  # every rank has checked OUT and OUT.shards before rank 0 creates OUT.shards
        dist.barrier()
    writer = None
    try:
        if rank == 0:  # creates OUT.shards/state.json or checks it against this run's metadata
            writer = ShardedScoreWriter(out, meta, ds.num_documents, shard_docs)
    finally:
        _agree(dist, writer is not None or rank != 0)  # a rank-0 error must not leave the others waiting
    if rank != 0:
        writer = ShardedScoreWriter(out, meta, ds.num_documents, shard_docs)
    pending = writer.pending()
    if dist:
        dist.barrier()  # everyone has listed the same pending shards before anyone commits
    mine = pending[dp_rank::dp_size]
    done_before = writer.num_shards - len(pending)
    if rank == 0 and done_before:
        print(f"score perplexity: resuming, {done_before}/{writer.num_shards} shards already committed",
              file=sys.stderr)
    device = model.device if hasattr(model, "is_last_stage") else _output_layer(model)[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {}
    doc_lens = ds.document_lengths()  # [num_documents] int64, once (an O(#docs) cumsum)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        todo = sum(int(doc_lens[slice(*writer.span(k))].sum()) for k in mine)
        bar = tqdm(total=todo, unit="tok", unit_scale=True, desc=f"score perplexity (rank 0/{world})",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    docs = 0
    for k in mine:
        a, b = writer.span(k)
        cols = score_documents(model, ds, a, b, cfg, stats)
        if writes:
            writer.commit(k, cols)
        docs += b - a
        if bar is not None:
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(docs_s=f"{docs / el:,.1f}", shard=f"{k + 1}/{writer.num_shards}")
            bar.update(int(doc_lens[a:b].sum()))
    if hasattr(model, "finish"):
        model.finish()  # a pipeline stage's last activations have been received downstream
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    totals = torch.tensor([stats.get("tokens", 0), docs, stats.get("forward_tokens", 0)], dtype=torch.float64)
    totals *= float(writes)  # count each tp group once
    if dist:
        totals = totals.to(_collective_device(dist))
        dist.all_reduce(totals)
        totals = totals.cpu()
        dist.barrier()
    if rank == 0:
        writer.finalize()
    if dist:
        dist.barrier()
    summary = {"out": str(outp), "documents_scored": int(totals[1]), "tokens_scored": int(totals[0]),
               "padding_fraction": 1 - float(totals[0]) / max(float(totals[2]), 1.0),
               "seconds": elapsed, "tokens_per_s": float(totals[0]) / max(elapsed, 1e-9),
               "tokens_per_s_per_rank": float(totals[0]) / max(elapsed, 1e-9) / world,
               "world_size": world, "shards_resumed": done_before, **_peak_memory(device)}
    return summary


# ----------------------------------------------------------------------------------------------------
# CLI: `megacpt score perplexity`
# ----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ScoringConfig()
    p.add_argument("--model", required=True, help="HF GPT-NeoX dir or megacpt checkpoint (root or iter dir)")
    p.add_argument("--data", required=True, metavar="PREFIX", help="indexed dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--seq-length", type=int, required=True, help="L: chunk length; first token of a chunk "
                   "is not predicted")
    p.add_argument("--out", required=True, help="output Parquet: doc_id, n_pred, nll_sum, nll_mean")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--micro-batch-size", type=int, default=None, help="chunks per forward pass")
    g.add_argument("--tokens-per-batch", type=int, default=d.tokens_per_batch,
                   help="rows x padded length per forward pass (default %(default)s)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor parallel size (needs megacpt.parallel); dp = world size / (tp * pp)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (layers split evenly); activations stream stage to stage, the last "
                        "stage scores")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU); recorded in the output metadata")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--impl", choices=["auto", "triton", "torch"], default="auto", help="fused output layer")
    p.add_argument("--compile-loss", action="store_true",
                   help="CPU output layer: torch.compile its log-sum-exp (faster; one compile per process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer layer and (CPU) the output layer's log-sum-exp "
                        "(implies --compile-loss; ~10%% faster on CPU once compiled: compile time per "
                        "process, amortised over a long pass)")
    p.add_argument("--shard-docs", type=int, default=4096, help="documents per committed (resumable) shard")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run from OUT.shards/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json

    if args.seq_length < 2:
        raise UserError(f"--seq-length must be >= 2, got {args.seq_length}")
    cfg = ScoringConfig(seq_length=args.seq_length, tokens_per_batch=args.tokens_per_batch,
                        micro_batch_size=args.micro_batch_size, impl=args.impl,
                        compile_loss=args.compile_loss or args.compile).validate()
    from megacpt.convert import find_tokenizer, load_config, load_model
    from megacpt.data.indexed import IndexedDataset, read_sidecar

    # every check that needs no model weights, before loading them
    ds = IndexedDataset(args.data)
    if ds.num_documents == 0:
        raise UserError(f"{args.data}: the dataset has no documents")
    if Path(args.out).exists() and not args.resume:
        raise UserError(f"{args.out} exists; pass --resume to finish an interrupted run, or remove it")
    tp, world_env = args.tensor_model_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
    pp = args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_env % (tp * pp):
        raise UserError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must be >= 1 "
                        f"and divide the world size {world_env} (launch with torchrun --nproc-per-node)")
    mcfg = load_config(args.model)
    for w in check_vocab(mcfg.vocab_size, args.data, read_sidecar(args.data), find_tokenizer(args.model)):
        print(f"megacpt score perplexity: warning: {w}", file=sys.stderr)

    rank, world, dist = _init_distributed(args.device)
    device = _pick_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if tp * pp > 1:  # this rank's part only: built on meta, materialised, then only its tensors are read
        model = parallel_scoring_model(args.model, mcfg, tp, pp, world, device, _DTYPES[dtype_name])
    else:
        model, mcfg = load_model(args.model, dtype=_DTYPES[dtype_name], device=device)
    if args.compile:
        model.compile_layers()
    summary = score_dataset(model, args.data, args.seq_length, args.out, cfg, shard_docs=args.shard_docs,
                            resume=args.resume, dtype_name=dtype_name,
                            model_identity=_model_identity(args.model, mcfg), progress=not args.no_progress)
    if rank == 0:
        print(json.dumps(summary, indent=None), file=sys.stderr)
    if dist:
        dist.destroy_process_group()
    return 0


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _init_distributed(device: str):
    """Under torchrun (WORLD_SIZE > 1) start the process group: nccl on GPU, gloo on CPU."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        gpu = device in ("auto", "cuda") and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # a long timeout: ranks meet only at the end, after possibly uneven shards
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=6))
    return _dist_info()


class PipelineStageScorer:
    """This rank's pipeline stage for the forward-only scoring pass.

    Every stage walks the same batches (they are built from the dataset, so no shapes travel): stage 0
    embeds the tokens, a later stage receives the previous stage's activations [b, s, H], runs its layers
    and sends them on asynchronously (so the stages work on consecutive batches at once); the last stage
    applies the final LayerNorm and returns the hidden states that ``chunk_nll`` scores.
    """

    def __init__(self, part, pp_group, pp_rank: int, pp: int, device: torch.device, tp_size: int = 1,
                 max_in_flight: int = 2):
        import torch.distributed as dist

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
        import torch.distributed as dist

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


def parallel_scoring_model(model_path: str, mcfg, tp: int, pp: int, world: int, device: torch.device,
                           dtype: torch.dtype = torch.float32):
    """This rank's part of the model at ``model_path`` on the mesh (pp, dp, tp), without FSDP/DDP (inference:
    dp ranks hold whole replicas). TP: the DTensor plan of ``megacpt.parallel`` (vocab-parallel
    ``embed_out``, replicated hidden states; the fused output layer runs over the tp group). PP > 1: a
    ``PipelineStageScorer`` for the rank's stage. Built on the meta device (and split) before any memory
    is used; ``load_weights`` then reads only this rank's tensors, so no rank ever holds the whole model."""
    from megacpt.config import ParallelConfig
    from megacpt.convert import load_weights
    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.parallel import build_mesh, tp_group_of
    from megacpt.parallel.pipeline import split_stage
    from megacpt.parallel.tensor_parallel import apply_tp

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


__all__ = ["ScoringConfig", "chunk_nll", "sequence_nll", "score_documents", "score_dataset", "chunk_spans",
           "check_vocab", "add_arguments", "run", "PipelineStageScorer", "parallel_scoring_model"]
