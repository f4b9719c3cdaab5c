"""Pipeline-parallel scoring: megacpt's forward-only streaming vs torch.distributed.pipelining's schedules.

Why the scoring pass keeps its own streaming (docs/parallelism.md): its batches change shape from one to the
next (chunks are sorted by length and packed to a token budget, so a batch is [b, s] with both varying),
while ``torch.distributed.pipelining`` stages exchange activations through buffers whose shapes are inferred
once. This script measures both on the same documents, pp=2 on gloo (two CPU processes, one thread each):

  stream   megacpt.score.parallel.PipelineStageScorer + megacpt.score.nll.chunk_nll: length-sorted batches
           of any shape, activations sent stage to stage with isend/recv
  gpipe    ScheduleGPipe(PipelineStage).eval on fixed [rows, L] batches (every chunk right-padded to L, the
           only shape the schedule can reuse), 2 micro-batches per step, the same fused scoring on the last
           stage

and first checks what the schedule does when the shape changes between steps. Printed: tokens forwarded
(real + padding), wall seconds, real tokens/s, and the largest per-document NLL difference between the two
(the same weights: they must agree). A random-weight toy model: the ratio of forwarded tokens is the point,
wall time on a shared 2-core machine is indicative only.

    python benchmarks/score_pipeline.py [--docs 192] [--seq-length 512] [--tokens-per-batch 4096]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megacpt.config import ModelConfig
from megacpt.testing import run_distributed


def _model(seed: int):
    from megacpt.model.gpt_neox import GPTNeoX

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, rotary_pct=0.25,
                      max_position_embeddings=1024)
    return GPTNeoX(cfg).eval()


def _documents(n: int, seed: int) -> list[np.ndarray]:
    """Web-like lengths: log-normal, median ~300 tokens, a long tail cut at 4 x 512."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, n).astype(int), 2, 2048)
    return [rng.integers(0, 8192, int(k)) for k in lengths]


def _rank_main(rank: int, world: int, docs: list[np.ndarray], seq_length: int, tokens_per_batch: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import ScheduleGPipe

    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from megacpt.parallel.pipeline import split_stage
    from megacpt.score.nll import ScoringConfig, chunk_spans, sequence_nll
    from megacpt.score.parallel import PipelineStageScorer

    device = torch.device("cpu")
    group = dist.new_group(list(range(world)))
    out: dict = {}
    cfg = ScoringConfig(seq_length=seq_length, tokens_per_batch=tokens_per_batch)

    # -- stream: megacpt's pass ------------------------------------------------------------------------
    part = split_stage(_model(0), rank, world, copy_model=False)
    scorer = PipelineStageScorer(part, group, rank, world, device)
    stats: dict = {}
    dist.barrier()
    t0 = time.perf_counter()
    res = sequence_nll(scorer, docs, seq_length, cfg, stats=stats)
    scorer.finish()
    dist.barrier()
    out["stream_s"] = time.perf_counter() - t0
    if rank == world - 1:
        out["stream_nll"] = [r[1] for r in res]
        out["stream_forward_tokens"] = stats["forward_tokens"]
        out["real_tokens"] = stats["input_tokens"]

    # -- gpipe: torch.distributed.pipelining, fixed [rows, L] ---------------------------------------------
    part = split_stage(_model(0), rank, world, copy_model=False)
    if rank == world - 1:
        part.output_hidden_states = True  # the last stage returns final hidden states; scored below
    stage = PipelineStage(part, rank, world, device, group=group)
    n_micro = 2
    rows = max(n_micro, (tokens_per_batch // seq_length) // n_micro * n_micro)
    sched = ScheduleGPipe(stage, n_micro)

    # shape change between steps: does the schedule still compute the right thing? (compared on the last
    # stage with the whole model run in one process on the same ids)
    reference = _model(0)
    gen = torch.Generator().manual_seed(1)
    verdict = []
    try:
        with torch.inference_mode():
            for s in (seq_length, seq_length // 2):
                ids = torch.randint(0, 8192, (rows, s), generator=gen)
                if rank == 0:
                    sched.eval(ids)
                    continue
                h = sched.eval()
                want = reference.hidden_states(ids)
                if tuple(h.shape) != tuple(want.shape):
                    verdict.append(f"[{rows}, {s}] batch -> output {list(h.shape)}, expected {list(want.shape)}")
                else:
                    verdict.append(f"[{rows}, {s}] batch -> max |diff| {float((h - want).abs().max()):.1e}")
        out["shape_change"] = "; ".join(verdict) or "(first stage)"
    except Exception as e:  # noqa: BLE001 - recorded, printed by the parent
        out["shape_change"] = f"{'; '.join(verdict)}; then {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    dist.barrier()
    stage = PipelineStage(part, rank, world, device, group=group)  # fresh buffers after the failed step
    sched = ScheduleGPipe(stage, n_micro)

    chunks, owner = [], []
    for i, d in enumerate(docs):
        for a, b in chunk_spans(len(d), seq_length):
            chunks.append(d[a:b])
            owner.append(i)
    nll = np.zeros(len(docs))
    forwarded = 0
    w = part.embed_out.weight if rank == world - 1 else None
    dist.barrier()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(chunks), rows):
            block = chunks[k:k + rows]
            ids = torch.zeros(rows, seq_length, dtype=torch.long)
            lens = torch.zeros(rows, dtype=torch.long)
            for r, c in enumerate(block):
                ids[r, :len(c)] = torch.from_numpy(c)
                lens[r] = len(c)
            forwarded += ids.numel()
            if rank == 0:
                sched.eval(ids)
                continue
            h = sched.eval()                                                        # [rows, L, H]
            pos = torch.arange(1, seq_length)
            scored = pos[None, :] < lens[:, None]                                   # [rows, L-1]
            tok = fused_linear_cross_entropy(h[:, :-1][scored], w, ids[:, 1:][scored], vocab_size=8192)
            row = torch.arange(rows)[:, None].expand_as(scored)[scored]
            sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, row, tok.double())
            for r in range(len(block)):
                nll[owner[k + r]] += float(sums[r])
    dist.barrier()
    out["gpipe_s"] = time.perf_counter() - t0
    if rank == world - 1:
        out["gpipe_nll"] = nll.tolist()
        out["gpipe_forward_tokens"] = forwarded
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=192)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    docs = _documents(a.docs, a.seed)
    res = run_distributed(_rank_main, 2, docs, a.seq_length, a.tokens_per_batch, timeout=1800)
    last = res[-1]
    real = last["real_tokens"]
    diff = float(np.max(np.abs(np.array(last["stream_nll"]) - np.array(last["gpipe_nll"]))))
    print(f"documents {a.docs}, {real:,} real tokens, L={a.seq_length}, tokens/batch {a.tokens_per_batch}, pp=2 (gloo)")
    print(f"torch.distributed.pipelining, a step of another shape after the first: {res[-1]['shape_change']}")
    for name in ("stream", "gpipe"):
        fwd, sec = last[f"{name}_forward_tokens"], max(r[f"{name}_s"] for r in res)
        print(f"  {name:6s}  forwarded {fwd:>9,} tokens ({fwd / real:.2f}x real)  {sec:7.2f} s  "
              f"{real / sec:9,.0f} real tokens/s")
    print(f"  gpipe / stream: {last['gpipe_forward_tokens'] / last['stream_forward_tokens']:.2f}x tokens forwarded, "
          f"{max(r['gpipe_s'] for r in res) / max(r['stream_s'] for r in res):.2f}x time")
    print(f"  max |per-document NLL difference| {diff:.2e} nats")


if __name__ == "__main__":
    main()
