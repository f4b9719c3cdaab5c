"""`megacpt tokenizer train --input FILES --vocab-size N --out DIR`: a GPT-NeoX-style byte-level BPE."""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE (NFC, GPT-2 regex, <|endoftext|> = EOD)")
    t.add_argument("--input", nargs="+", required=True,
                   help=".txt (one text per line) or any `megacpt preprocess` input (jsonl/gz/zst/parquet/dir)")
    t.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text in jsonl/parquet inputs")
    t.add_argument("--vocab-size", type=int, required=True, help="total vocab incl. the 2 special tokens")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="output dir (tokenizer.json + tokenizer_config.json)")


def run(args: argparse.Namespace) -> int:
    from megacpt.data.readers import expand_inputs
    from megacpt.data.tokenizer import load_tokenizer, train_bpe
    from megacpt.errors import UserError
    from megacpt.io import check_writable_dir

    txt = [p for p in args.input if p.endswith(".txt")]
    other = [p for p in args.input if not p.endswith(".txt")]
    if other:
        expand_inputs(other)  # fail on missing/unsupported inputs before training
    for p in txt:
        if not os.path.isfile(p):
            raise UserError(f"--input {p}: no such file")
    check_writable_dir(os.path.join(args.out, "tokenizer.json"))
    out = train_bpe(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency,
                    json_keys=args.json_keys)
    tok = load_tokenizer(out)
    print(f"wrote {out}: vocab_size={tok.vocab_size} eod={tok.eod}")
    return 0
