"""`megacpt score perplexity`: argparse and ``run`` over the scoring library (``megacpt.score``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megacpt.config import add_dtype_argument, torch_dtype_name
from megacpt.convert import find_tokenizer, load_config, load_model
from megacpt.data.indexed import IndexedDataset, read_sidecar
from megacpt.errors import UserError
from megacpt.io import describe_interrupt
from megacpt.parallel.faults import failure_reason, is_peer_failure
from megacpt.score.job import check_vocab, model_identity, score_dataset
from megacpt.score.flags import add_scorer_arguments
from megacpt.score.nll import COLUMNS, ScoringConfig
from megacpt.score.parallel import init_distributed, parallel_scoring_model, pick_device

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ScoringConfig()
    p.add_argument("--model", required=True, help="HF GPT-NeoX dir or megacpt checkpoint (root or iter dir)")
    add_scorer_arguments(p, COLUMNS[1:], shard_docs=4096)
    p.add_argument("--seq-length", type=int, required=True, help="L: chunk length; first token of a chunk "
                   "is not predicted")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--micro-batch-size", type=int, default=None, help="chunks per forward pass")
    g.add_argument("--tokens-per-batch", type=int, default=d.tokens_per_batch,
                   help="rows x padded length per forward pass (default %(default)s)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor parallel size (needs megacpt.parallel); dp = world size / (tp * pp)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages (layers split evenly); activations stream stage to stage, the last "
                        "stage scores")
    add_dtype_argument(p, "auto", help="compute dtype (auto: bf16 on GPU, fp32 on CPU); recorded in the output "
                       "metadata")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--impl", choices=["auto", "triton", "torch"], default="auto", help="fused output layer")
    p.add_argument("--compile-loss", action="store_true",
                   help="CPU output layer: torch.compile its log-sum-exp (faster; one compile per process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer layer and (CPU) the output layer's log-sum-exp "
                        "(implies --compile-loss; ~10%% faster on CPU once compiled: compile time per "
                        "process, amortised over a long pass)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run from OUT.shards/")
    p.add_argument("--collective-timeout-s", type=float, default=1800.0,
                   help="under torchrun: a rank waiting longer than this for another (gone or hung) gives up with "
                        "one line; ranks meet at the end, so raise it if they finish their shards far apart "
                        "(default %(default)g)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (terminal) or lines (otherwise)")


def run(args: argparse.Namespace) -> int:
    if args.seq_length < 2:
        raise UserError(f"--seq-length must be >= 2, got {args.seq_length}")
    cfg = ScoringConfig(seq_length=args.seq_length, tokens_per_batch=args.tokens_per_batch,
                        micro_batch_size=args.micro_batch_size, impl=args.impl,
                        compile_loss=args.compile_loss or args.compile).validate()
    # every check that needs no model weights, before loading them
    IndexedDataset(args.data).require_documents()
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

    if args.collective_timeout_s <= 0:
        raise UserError(f"--collective-timeout-s must be > 0, got {args.collective_timeout_s:g}")
    rank, world, dist = init_distributed(args.device, args.collective_timeout_s)
    try:
        summary = _score(args, cfg, mcfg, rank, world)
    except Exception as e:
        if dist is None or not is_peer_failure(e):
            raise
        raise UserError(f"rank {rank}: lost a peer while scoring ({failure_reason(e)}): another rank's process or "
                        f"node died or stopped answering (collectives give up after --collective-timeout-s="
                        f"{args.collective_timeout_s:g} s). The committed shards are kept in {args.out}.shards: "
                        "relaunch every node with the same command plus --resume to score the rest") from None
    if rank == 0:
        print(json.dumps(summary, indent=None), file=sys.stderr)
    if dist:
        dist.destroy_process_group()
    return 0


def _score(args: argparse.Namespace, cfg: ScoringConfig, mcfg, rank: int, world: int) -> dict:
    """This rank's part of the scoring pass (collective under torchrun); returns the summary."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    device = pick_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, torch_dtype_name(dtype_name))
    if tp * pp > 1:  # this rank's part only: built on meta, materialised, then only its tensors are read
        model = parallel_scoring_model(args.model, mcfg, tp, pp, world, device, dtype)
    else:
        model, mcfg = load_model(args.model, dtype=dtype, device=device)
    if args.compile:
        model.compile_layers()
    with describe_interrupt(lambda: f"{f'on rank {rank}' if world > 1 else ''}; the committed shards are kept in "
                                    f"{args.out}.shards: re-run the same command with --resume"):
        return score_dataset(model, args.data, args.seq_length, args.out, cfg, shard_docs=args.shard_docs,
                             resume=args.resume, dtype_name=dtype_name,
                             model_identity=model_identity(args.model, mcfg), progress=not args.no_progress)

