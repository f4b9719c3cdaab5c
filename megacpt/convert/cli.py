"""`megacpt convert hf-to-megacpt|megacpt-to-hf`: thin entry point over ``megacpt.convert.hf_gpt_neox``."""
from __future__ import annotations

import argparse
import sys

from megacpt.config import add_dtype_argument
from megacpt.convert.hf_gpt_neox import hf_to_megacpt, megacpt_to_hf
from megacpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h = sub.add_parser("hf-to-megacpt", help="HF GPT-NeoX dir (safetensors) -> megacpt DCP checkpoint root",
                       description="HF GPT-NeoX dir -> megacpt checkpoint root (OUT/latest -> iter_0000000). "
                                   "The checkpoint is layout-free: it loads at any TP/PP/DP layout.")
    h.add_argument("--hf", required=True, metavar="HF_DIR", help="dir with config.json + *.safetensors")
    h.add_argument("--out", required=True, metavar="CKPT_DIR", help="new checkpoint root")
    h.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                   help="validate the split and pad the vocab to a multiple of 128*tp (default 1)")
    h.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                   help="validate that the layers split into this many pipeline stages (default 1)")
    h.add_argument("--tokenizer", default=None,
                   help="tokenizer dir/file to ship in the checkpoint (default: the HF dir's tokenizer, if any)")
    h.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin with torch.load(weights_only=True) (default: refuse pickles)")

    m = sub.add_parser("megacpt-to-hf", help="megacpt checkpoint -> HF GPT-NeoX dir (safetensors + config.json)",
                       description="megacpt checkpoint (root with 'latest', or an iter dir) -> HF GPT-NeoX dir, "
                                   "loadable by transformers.GPTNeoXForCausalLM.from_pretrained.")
    m.add_argument("--ckpt", required=True, metavar="CKPT_DIR", help="checkpoint root or iter_XXXXXXX dir")
    m.add_argument("--out", required=True, metavar="HF_DIR", help="new (or empty) output dir")
    add_dtype_argument(m, "auto", help="dtype of the exported weights (auto: as stored in the checkpoint)")
    m.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="split the safetensors into shards of at most this many GiB (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-megacpt":
        if args.tp < 1 or args.pp < 1:
            raise UserError(f"--tp {args.tp} / --pp {args.pp}: must be >= 1")
        out = hf_to_megacpt(args.hf, args.out, tp=args.tp, pp=args.pp, tokenizer=args.tokenizer,
                            allow_pickle=args.allow_pickle)
    else:
        if args.max_shard_size <= 0:
            raise UserError(f"--max-shard-size {args.max_shard_size}: must be > 0")
        out = megacpt_to_hf(args.ckpt, args.out, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_size * 2**30))
    print(f"megacpt convert {args.direction}: wrote {out}", file=sys.stderr)
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"convert": (add_arguments, run)}
