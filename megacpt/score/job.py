"""The scoring pass over an indexed dataset: sharded, resumable, data parallel (``score_dataset``).

Results are committed in shards of ``shard_docs`` documents through ``megacpt.score.files.ShardedScoreWriter``;
under torchrun the pending shards are dealt round-robin to the data-parallel ranks and rank 0 assembles the
final Parquet file. Batches depend only on the shard, so 1 rank, N ranks and a killed-then-resumed run
write identical files.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed

from megacpt.data.identity import dataset_identity
from megacpt.data.indexed import IndexedDataset
from megacpt.data.tokenizer import load_tokenizer
from megacpt.errors import UserError
from megacpt.progress import Progress
from megacpt.score.files import ShardedScoreWriter, score_metadata
from megacpt.score.nll import ScoringConfig, output_layer, predicted_tokens, score_documents

SCORER = "perplexity"


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


def model_identity(path: str, cfg) -> dict:
    p = Path(path).resolve()
    files = {str(f.relative_to(p)): f.stat().st_size for f in sorted(p.rglob("*"))
             if f.is_file() and f.suffix in (".safetensors", ".bin", ".distcp", ".json")} if p.is_dir() else {}
    return {"path": str(p), "config": cfg.to_dict(), "files": files}


def dist_info() -> tuple[int, int, object]:
    """(rank, world size, torch.distributed or None without a process group)."""
    dist = torch.distributed
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
    cfg = cfg or ScoringConfig(seq_length=seq_length)
    cfg.seq_length = seq_length
    cfg.validate()
    rank, world, dist = dist_info()
    # data parallel ranks: with a vocab-parallel (tp) group the ranks of one group score the same shards
    # and only its first rank writes (mesh layout: tp innermost, so the group is rank // tp)
    group = getattr(model, "vocab_parallel_group", None)
    tp = getattr(model, "tp_size", None) or (dist.get_world_size(group) if (dist and group is not None) else 1)
    # pipeline stages (mesh (pp, dp, tp), pp outermost): the stages of one replica run the same shards,
    # and the last stage's first tp rank writes
    pp, pp_rank = getattr(model, "pp_size", 1), getattr(model, "pp_rank", 0)
    dp_size = world // (tp * pp)
    dp_rank, writes = (rank // tp) % dp_size, rank % tp == 0 and pp_rank == pp - 1
    ds = IndexedDataset(dataset_prefix).require_documents()
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
        if rank == 0:  # holds OUT's lock; creates OUT.shards/state.json or checks it against this run's metadata
            writer = ShardedScoreWriter(out, meta, ds.num_documents, shard_docs)
    finally:
        _agree(dist, writer is not None or rank != 0)  # a rank-0 error must not leave the others waiting
    if rank != 0:
        writer = ShardedScoreWriter(out, meta, ds.num_documents, shard_docs, claim=False)
    pending = writer.pending()
    if dist:
        dist.barrier()  # everyone has listed the same pending shards before anyone commits
    mine = pending[dp_rank::dp_size]
    done_before = writer.num_shards - len(pending)
    if rank == 0 and done_before:
        print(f"score perplexity: resuming, {done_before}/{writer.num_shards} shards already committed",
              file=sys.stderr)
    device = model.device if hasattr(model, "is_last_stage") else output_layer(model)[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {}
    # the progress counts tokens scored (predicted positions, known from the lengths alone), like the summary
    doc_pred = predicted_tokens(ds.document_lengths(), seq_length)  # [num_documents] int64, once (O(#docs))
    todo = sum(int(doc_pred[slice(*writer.span(k))].sum()) for k in mine)
    bar = Progress(f"score perplexity (rank 0/{world})", todo, unit="tok", enabled=progress and rank == 0)
    t0 = time.perf_counter()
    docs = scored = 0
    for k in mine:
        a, b = writer.span(k)
        cols = score_documents(model, ds, a, b, cfg, stats)
        if writes:
            writer.commit(k, cols)
        docs, scored = docs + b - a, scored + int(cols["n_pred"].sum())
        bar.update(int(doc_pred[a:b].sum()), docs=b - a)
    if hasattr(model, "finish"):
        model.finish()  # a pipeline stage's last activations have been received downstream
    elapsed = time.perf_counter() - t0
    bar.close()
    # tokens_scored: predicted positions, the sum of the n_pred this run wrote (docs/method.md §2.1);
    # padding = 1 - input tokens / forwarded (padded) tokens
    totals = torch.tensor([scored, docs, stats.get("forward_tokens", 0),
                           stats.get("input_tokens", 0)], dtype=torch.float64)
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
               "padding_fraction": 1 - float(totals[3]) / max(float(totals[2]), 1.0),
               "seconds": elapsed, "tokens_per_s": float(totals[0]) / max(elapsed, 1e-9),
               "tokens_per_s_per_rank": float(totals[0]) / max(elapsed, 1e-9) / world,
               "world_size": world, "shards_resumed": done_before, **_peak_memory(device)}
    return summary

