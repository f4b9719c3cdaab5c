"""`megacpt tokenizer|preprocess|merge|inspect`: argparse and ``run`` of the data commands.

Each command parses its flags (Megatron-LM's names where it has one) into a typed config or plain
arguments and calls the library: ``tokenizer.train_bpe``, ``preprocess.preprocess``,
``merge.merge_datasets``, ``summary.summarize``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megacpt.data.merge import find_prefixes, merge_datasets
from megacpt.data.preprocess import PreprocessConfig, preprocess
from megacpt.data.readers import expand_inputs
from megacpt.data.summary import summarize
from megacpt.data.tokenizer import load_tokenizer, train_bpe
from megacpt.errors import UserError
from megacpt.io import check_writable_dir


# -- `megacpt tokenizer train` ----------------------------------------------------------------------------
def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE (NFC, GPT-2 regex, <|endoftext|> = EOD)")
    t.add_argument("--input", nargs="+", required=True,
                   help=".txt (one text per line) or any `megacpt preprocess` input (jsonl/gz/zst/parquet/dir)")
    t.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding text in jsonl/parquet inputs")
    t.add_argument("--vocab-size", type=int, required=True, help="total vocab incl. the 2 special tokens")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="output dir (tokenizer.json + tokenizer_config.json)")


def run_tokenizer(args: argparse.Namespace) -> int:
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


# -- `megacpt preprocess` ---------------------------------------------------------------------------------
def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("input data")
    g.add_argument("--input", nargs="+", default=[], help="jsonl/json(.gz/.zst), parquet, dirs, globs, "
                   "datasets save_to_disk dirs")
    g.add_argument("--hf-dataset", default=None, help="anything datasets.load_dataset reads locally")
    g.add_argument("--split", default=None, help="split of --hf-dataset / a DatasetDict on disk")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="one output dataset per key")
    g.add_argument("--skip-bad-lines", action="store_true", help="count, report and skip bad records "
                   "instead of stopping at the first one")
    g.add_argument("--allow-empty", action="store_true", help="write an empty dataset when the input has no "
                   "records (default: an error naming the input)")
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="auto",
                   choices=["HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                            "auto"],
                   help="auto: SentencePieceTokenizer for a .model file, GPT2BPETokenizer for --vocab-file/"
                   "--merge-file or a GPT-2 vocab.json, else HuggingFaceTokenizer. NullTokenizer: the text is "
                   "whitespace-separated token ids (needs --vocab-size)")
    g.add_argument("--tokenizer-model", default=None, help="HF tokenizer dir / tokenizer.json / .model")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2-format vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2-format merges.txt")
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="Megatron-LM's flag for its classic tokenizer system, accepted for drop-in scripts: the ids "
                   "are our defaults (classic GPT2BPETokenizer, NullTokenizer with EOD N); refuses the flags the "
                   "classic system lacks")
    g.add_argument("--gpt2-parse-special-tokens", dest="gpt2_parse_special", action="store_true",
                   help="GPT2BPETokenizer: encode a literal <|endoftext|> in text as the EOD id, as Megatron-LM's "
                   "tokenizer system since Sept 2025 does (default: the classic _GPT2BPETokenizer, as text)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: token ids 0..N-1 in the text, EOD id N (megatron-core 0.16/0.17)")
    g.add_argument("--null-tokenizer-eod-id", dest="null_eod_id", type=int, default=None,
                   help="NullTokenizer, Megatron-LM main's convention: vocabulary N including this EOD id "
                   "(main's default is N-1)")
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to each non-empty document")
    g.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"],
                   help="token dtype (auto: Megatron's rule, uint16 when vocab < 65,500)")
    g.add_argument("--no-fast-tokenizer", dest="fast", action="store_false",
                   help="always use HF tokenizers (no exact fast BPE path)")
    g.add_argument("--split-sentences", action="store_true",
                   help="Megatron's NLTK sentence splitting: not supported (an error says why)")
    g.add_argument("--keep-newlines", action="store_true", help="with --split-sentences only")
    g.add_argument("--lang", default="english", help="with --split-sentences only")
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.{bin,idx,meta.json}")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (0: in-process)")
    g.add_argument("--partitions", type=int, default=1, help="split records into K partitions (Megatron order)")
    g.add_argument("--partition-index", type=int, default=None,
                   help="process only this partition (a separate job); join with `megacpt merge`")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="partitions are contiguous blocks instead of round-robin")
    g.add_argument("--log-interval", type=float, default=5.0,
                   help="seconds between progress lines when stderr is not a terminal (default 5; a terminal gets a bar)")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20, help="raw bytes per work unit")
    g.add_argument("--quiet", action="store_true", help="no progress bar or lines")


def preprocess_config(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=list(args.input), output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        gpt2_parse_special=args.gpt2_parse_special, vocab_size=args.vocab_size, null_eod_id=args.null_eod_id,
        legacy_tokenizer=args.legacy_tokenizer,
        json_keys=list(args.json_keys), append_eod=args.append_eod,
        workers=args.workers, partitions=args.partitions, partition_index=args.partition_index,
        keep_sequential_samples=args.keep_sequential_samples, skip_bad_lines=args.skip_bad_lines,
        allow_empty=args.allow_empty,
        hf_dataset=args.hf_dataset, split=args.split, dtype=args.dtype, chunk_bytes=args.chunk_bytes,
        fast=args.fast, log_interval=args.log_interval, progress=not args.quiet,
        split_sentences=args.split_sentences, keep_newlines=args.keep_newlines, lang=args.lang,
    )


def run_preprocess(args: argparse.Namespace) -> int:
    metas = preprocess(preprocess_config(args))
    for prefix, m in metas.items():
        if m.get("partition") is None or args.partition_index is not None:
            print(f"{prefix}: {m['num_documents']} documents, {m['num_tokens']} tokens, dtype {m['dtype']}, "
                  f"{m['skipped_lines']} skipped")
    return 0


# -- `megacpt merge` --------------------------------------------------------------------------------------
def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes in order, or one directory (all its datasets, sorted by name)")
    parser.add_argument("--output-prefix", required=True)


def run_merge(args: argparse.Namespace) -> int:
    if len(args.input) == 1 and Path(args.input[0]).is_dir():
        prefixes = find_prefixes(args.input[0])
    else:
        prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in args.input]
    meta = merge_datasets(prefixes, args.output_prefix)
    print(f"{args.output_prefix}: {meta['num_documents']} documents, {meta['num_tokens']} tokens "
          f"from {len(prefixes)} datasets")
    return 0


# -- `megacpt inspect` ------------------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--num-docs", type=int, default=3, help="documents to decode and show")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer to decode with (default: the sidecar's)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_inspect(args: argparse.Namespace) -> int:
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    s = summarize(prefix, args.num_docs, args.tokenizer_model)
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return 0
    print(f"{s['prefix']}: {s['num_documents']} documents ({s['empty_documents']} empty), "
          f"{s['num_sequences']} sequences, {s['num_tokens']} tokens, dtype {s['dtype']}")
    if "doc_length" in s:
        L = s["doc_length"]
        print(f"document length: min {L['min']} mean {L['mean']:.1f} p50 {L['p50']:.0f} p99 {L['p99']:.0f} max {L['max']}")
        peak = max(h for _, h in s["histogram"])
        for rng, h in s["histogram"]:
            print(f"  {rng:>16} {h:>10} {'#' * max(1, round(40 * h / peak))}")
    for d, text in enumerate(s.get("first_documents", [])):
        print(f"--- document {d} ---\n{text}")
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {
    "tokenizer": (add_tokenizer_arguments, run_tokenizer),
    "preprocess": (add_preprocess_arguments, run_preprocess),
    "merge": (add_merge_arguments, run_merge),
    "inspect": (add_inspect_arguments, run_inspect),
}
