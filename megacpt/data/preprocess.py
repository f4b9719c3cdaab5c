"""Preprocessing (`megacpt preprocess`, flags in ``megacpt.data.cli``): raw text -> Megatron indexed datasets ``OUT_{key}_document.{bin,idx}``.

Token-for-token what Megatron-LM's ``tools/preprocess_data.py`` writes for the same input, tokenizer and
flags: each text (or each item of a list-valued text) is tokenized with ``tokenizer(text)`` semantics;
items that tokenize to nothing are dropped; a document with tokens gets the EOD appended to its last
sequence with ``--append-eod``; a document without tokens is kept with zero sequences (so every input
record keeps its ``doc_id``); dtype uint16 when vocab < 65,500, else int32; ``--partitions K`` assigns
records round-robin (or in contiguous blocks with ``--keep-sequential-samples``) and the merged output
lists partition 0's records first.

Unlike Megatron, bad input stops the run at once with ``file:line: what`` (or is counted and skipped
with ``--skip-bad-lines``), an input without any record is an error (unless ``allow_empty``), and nothing
partial is left: outputs are written to temp files and renamed. A job interrupted by a signal removes its
temporaries and says how far it got; one killed with -9 leaves them to the next job writing the same output,
which removes them (``megacpt.io.claim_output``). Workers die quietly with the job.

Memory: the parent holds at most ``2 * workers + 2`` chunks of ``--chunk-bytes`` (default 1 MiB) of raw
text and their token arrays in flight, plus the index arrays (12 bytes per sequence + 8 per document),
independent of the corpus size otherwise.
"""
from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megacpt.data.encoder import build_encoder
from megacpt.data.indexed import IndexedDatasetWriter, dataset_files, optimal_dtype, sidecar_path, write_sidecar
from megacpt.data.merge import merge_datasets
from megacpt.data.readers import Chunk, count_records, expand_inputs, iter_chunks, parse_chunk, plain_text_bytes
from megacpt.errors import InputError, UserError
from megacpt.io import check_writable_dir, claim_output, describe_interrupt, pause_for_test, quiet_worker
from megacpt.progress import Progress

MAX_REPORTED_SKIPS = 100


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str | None = None
    tokenizer_type: str = "auto"
    vocab_file: str | None = None     # GPT2BPETokenizer: GPT-2-format vocab.json
    merge_file: str | None = None     # GPT2BPETokenizer: GPT-2-format merges.txt
    gpt2_parse_special: bool = False  # GPT2BPETokenizer: literal <|endoftext|> -> EOD id (Megatron >= Sept 2025)
    legacy_tokenizer: bool = False    # Megatron's --legacy-tokenizer: the classic tokenizers (our default ids)
    vocab_size: int | None = None     # NullTokenizer: ids 0..N-1 in the text, EOD N (megatron-core 0.16)
    null_eod_id: int | None = None    # NullTokenizer: Megatron-LM main's convention, vocabulary N with this EOD
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1                  # tokenizing processes; 0 = in this process
    partitions: int = 1
    partition_index: int | None = None  # run only this partition (a separate job); merge later
    keep_sequential_samples: bool = False
    skip_bad_lines: bool = False
    allow_empty: bool = False         # write a 0-document dataset instead of refusing an input without records
    hf_dataset: str | None = None
    split: str | None = None
    dtype: str = "auto"               # auto (Megatron's rule) | uint16 | int32
    chunk_bytes: int = 1 << 20
    fast: bool = True                 # exact fast BPE path where available (falls back per document)
    log_interval: float = 5.0         # seconds between progress lines (non-terminal stderr)
    progress: bool = True
    split_sentences: bool = False     # Megatron's NLTK punkt splitting: refused, see validate
    keep_newlines: bool = False
    lang: str = "english"

    def validate(self) -> None:
        if self.legacy_tokenizer and (self.gpt2_parse_special or self.null_eod_id is not None):
            raise UserError("--legacy-tokenizer selects Megatron's classic tokenizers, which have no "
                            f"{'--gpt2-parse-special-tokens' if self.gpt2_parse_special else '--null-tokenizer-eod-id'}")
        if self.split_sentences:
            raise UserError(
                "--split-sentences is not supported: Megatron splits with NLTK's punkt model, which it downloads "
                "at run time (nltk.download('punkt')); no PyPI package ships that data offline-cleanly, so "
                "megacpt cannot reproduce Megatron's sentence boundaries. Split sentences upstream and store each "
                "document's sentences as a JSON list: every list item becomes one sequence of the document")
        if self.keep_newlines or self.lang != "english":
            raise UserError("--keep-newlines and --lang only apply to --split-sentences")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise UserError(f"--json-keys must be non-empty and distinct, got {self.json_keys}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.partitions < 1:
            raise UserError(f"--partitions must be >= 1, got {self.partitions}")
        if self.partition_index is not None and not 0 <= self.partition_index < self.partitions:
            raise UserError(f"--partition-index {self.partition_index} not in [0, {self.partitions})")
        if not self.inputs and not self.hf_dataset:
            raise UserError("give --input PATH [PATH ...] or --hf-dataset NAME_OR_PATH")
        if self.dtype not in ("auto", "uint16", "int32"):
            raise UserError(f"--dtype must be auto, uint16 or int32, got {self.dtype}")


def output_prefix(prefix: str, key: str, partition: int | None = None) -> str:
    """Megatron naming: ``OUT_{key}_document``; partition p of K: ``OUT_{p}_{key}_document``."""
    base = prefix if partition is None else f"{prefix}_{partition}"
    return f"{base}_{key}_document"


def choose_dtype(vocab_size: int, requested: str) -> type:
    if requested == "auto":
        return optimal_dtype(vocab_size)
    dt = {"uint16": np.uint16, "int32": np.int32}[requested]
    if vocab_size - 1 > np.iinfo(dt).max:
        raise UserError(f"--dtype {requested} cannot hold token ids up to {vocab_size - 1} (vocab size {vocab_size})")
    return dt


# --- worker side ---------------------------------------------------------------------------------

_W: dict[str, Any] = {}  # per-process state set by _init_worker


def _init_worker(cfg: PreprocessConfig, dtype: type, partition_of: tuple[str, int, int], encoder=None) -> None:
    """``encoder`` is the parent's, inherited through fork (its fast path is verified once, there)."""
    _W["cfg"], _W["dtype"], _W["partition_of"] = cfg, dtype, partition_of
    _W["encoder"] = encoder or _build_encoder(cfg)


def _init_pool_worker(*args) -> None:
    quiet_worker()  # no traceback on SIGTERM/SIGINT/a dead parent: the parent reports the interruption
    _init_worker(*args)


def _build_encoder(cfg: PreprocessConfig):
    return build_encoder(cfg.tokenizer_model, cfg.tokenizer_type, fast=cfg.fast, vocab_file=cfg.vocab_file,
                         merge_file=cfg.merge_file, gpt2_parse_special=cfg.gpt2_parse_special,
                         vocab_size=cfg.vocab_size, null_eod_id=cfg.null_eod_id)


def _partition(g: int, spec: tuple[str, int, int]) -> int:
    mode, k, size = spec
    return 0 if k == 1 else (g % k if mode == "round-robin" else g // size)


def encode_chunk(chunk: Chunk) -> dict[str, Any]:
    """Parse + tokenize one chunk. Returns, per partition and key, ``(token bytes, sequence lengths,
    doc_ends)`` ready for `IndexedDatasetWriter.add_raw`, plus counts and any bad records."""
    cfg: PreprocessConfig = _W["cfg"]
    spec = _W["partition_of"]
    keep = None
    if cfg.partition_index is not None:
        keep = lambda g: _partition(g, spec) == cfg.partition_index  # noqa: E731
    parsed = parse_chunk(chunk, cfg.json_keys, cfg.skip_bad_lines, keep,
                         getattr(_W["encoder"].tokenizer, "check_text", None))
    result: dict[str, Any] = {"error": parsed.error, "skipped": parsed.skipped, "nbytes": chunk.nbytes,
                              "n_records": len(parsed.line_numbers), "out": {}, "fallbacks": 0}
    if parsed.error is not None:
        return result
    parts = np.fromiter((_partition(g, spec) for g in parsed.global_index), np.int64, len(parsed.global_index))
    encoder = _W["encoder"]
    for key in cfg.json_keys:
        docs = encoder.encode_documents(parsed.texts[key], cfg.append_eod)
        result["fallbacks"] += encoder.pop_fallbacks()
        for p in np.unique(parts) if parts.size else []:
            sel = np.flatnonzero(parts == p)
            result["out"][(int(p), key)] = _pack([docs[i] for i in sel], _W["dtype"])
    return result


def _pack(docs: list[list[np.ndarray]], dtype: type) -> tuple[bytes, np.ndarray, np.ndarray]:
    seqs = [s for d in docs for s in d]
    lengths = np.fromiter((s.size for s in seqs), np.int32, len(seqs))
    flat = np.concatenate(seqs).astype(dtype) if seqs else np.zeros(0, dtype)
    doc_ends = np.cumsum([len(d) for d in docs], dtype=np.int64)
    return flat.tobytes(), lengths, doc_ends


# --- parent side -----------------------------------------------------------------------------------

def _partition_spec(cfg: PreprocessConfig, sources) -> tuple[str, int, int]:
    if cfg.partitions == 1:
        return ("round-robin", 1, 0)
    if cfg.keep_sequential_samples:
        total = count_records(sources, cfg.json_keys, hf_dataset=_hf(cfg))
        return ("sequential", cfg.partitions, max(1, math.ceil(total / cfg.partitions)))
    return ("round-robin", cfg.partitions, 0)


def _hf(cfg: PreprocessConfig):
    return (cfg.hf_dataset, cfg.split) if cfg.hf_dataset else None


def preprocess(cfg: PreprocessConfig) -> dict[str, dict[str, Any]]:
    """Run preprocessing; returns ``{output prefix: sidecar dict}`` of every dataset written."""
    cfg.validate()
    # everything that can fail before the work fails here
    encoder = _build_encoder(cfg)
    tokenizer = encoder.tokenizer
    if cfg.fast and encoder.fast is None and encoder.fast_status.startswith("HF tokenizers"):
        print(f"preprocess: the exact fast BPE path is not used for this tokenizer: {encoder.fast_reason}; "
              "tokenizing with HF tokenizers (about 3x slower)", file=sys.stderr)
    if cfg.append_eod:
        tokenizer.require_eod()
    dtype = choose_dtype(tokenizer.vocab_size, cfg.dtype)
    sources = expand_inputs(cfg.inputs, cfg.split)
    check_writable_dir(cfg.output_prefix)
    spec = _partition_spec(cfg, sources)

    if cfg.partitions == 1:
        targets = {(0, k): output_prefix(cfg.output_prefix, k) for k in cfg.json_keys}
    else:
        parts = range(cfg.partitions) if cfg.partition_index is None else [cfg.partition_index]
        targets = {(p, k): output_prefix(cfg.output_prefix, k, p) for p in parts for k in cfg.json_keys}
    merged = ([output_prefix(cfg.output_prefix, k) for k in cfg.json_keys]
              if cfg.partitions > 1 and cfg.partition_index is None else [])
    stats = {"n_records": 0, "nbytes": 0, "skipped": 0, "skipped_examples": [], "fallbacks": 0}
    phase = ["tokenize"]
    with contextlib.ExitStack() as claims, describe_interrupt(lambda: _interrupt_note(phase[0], stats, targets)):
        for prefix in [*targets.values(), *merged]:  # another live job's output is refused here
            claims.enter_context(claim_output(prefix, dataset_files(prefix)))
        return _preprocess(cfg, encoder, dtype, sources, spec, targets, merged, stats, phase)


def _interrupt_note(phase: str, stats: dict, targets: dict) -> str:
    outs = list(targets.values())
    named = outs[0] + (f" and {len(outs) - 1} more" if len(outs) > 1 else "")
    if phase == "tokenize":
        return f"after {stats['n_records']:,} documents; nothing was written to {named}; re-run the same command"
    return f"while writing {named} (after {stats['n_records']:,} documents); re-run the same command"


def _describe_inputs(cfg: PreprocessConfig, sources) -> str:
    names = [s.path for s in sources] + ([cfg.hf_dataset] if cfg.hf_dataset else [])
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _preprocess(cfg: PreprocessConfig, encoder, dtype: type, sources, spec, targets: dict, merged: list[str],
                stats: dict, phase: list[str]) -> dict[str, dict[str, Any]]:
    tokenizer = encoder.tokenizer
    writers = {t: IndexedDatasetWriter(prefix, dtype) for t, prefix in targets.items()}
    t0 = time.perf_counter()
    results = _run_chunks(cfg, dtype, spec, sources, encoder)
    try:
        pause_for_test("preprocess-start")
        for result in results:
            if result["error"] is not None:
                raise InputError(*result["error"])
            stats["skipped"] += len(result["skipped"])
            room = MAX_REPORTED_SKIPS - len(stats["skipped_examples"])
            stats["skipped_examples"] += [f"{p}:{ln}: {why}" for p, ln, why in result["skipped"][:max(room, 0)]]
            stats["n_records"] += result["n_records"]
            stats["nbytes"] += result["nbytes"]
            stats["fallbacks"] += result["fallbacks"]
            for target, (data, lengths, doc_ends) in result["out"].items():
                writers[target].add_raw(data, lengths, doc_ends)
            pause_for_test("preprocess-write")
        if stats["n_records"] == 0 and not cfg.allow_empty:
            skipped = f"; {stats['skipped']} bad line(s) skipped" if stats["skipped"] else ""
            part = f" (partition {cfg.partition_index})" if cfg.partition_index is not None else ""
            raise UserError(f"no documents in {_describe_inputs(cfg, sources)}{part}: empty, or every line "
                            f"blank or skipped{skipped}; nothing was written (pass --allow-empty to write an "
                            "empty dataset)")
        phase[0] = "finalize"
        for prefix in targets.values():
            sidecar_path(prefix).unlink(missing_ok=True)  # an old sidecar must not describe new data
        for w in writers.values():
            w.finalize()
    except BaseException:
        results.close()  # ends the worker pool now, not when the generator is collected
        for w in writers.values():
            w.abort()
        raise
    elapsed = time.perf_counter() - t0
    if stats["skipped"] and cfg.progress:
        print(f"skipped {stats['skipped']} bad line(s) (--skip-bad-lines); first: {stats['skipped_examples'][0]}",
              file=sys.stderr)
    metas = {}
    for (p, key), prefix in targets.items():
        w = writers[(p, key)]
        meta = {
            "tokenizer": tokenizer.identity(),
            "dtype": np.dtype(dtype).name,
            "num_documents": w.n_documents,
            "num_sequences": w.n_sequences,
            "num_tokens": w.n_tokens,
            "json_key": key,
            "append_eod": cfg.append_eod,
            "inputs": [s.path for s in sources] + ([cfg.hf_dataset] if cfg.hf_dataset else []),
            "partition": None if cfg.partitions == 1 else {"index": p, "count": cfg.partitions, "mode": spec[0]},
            "input_records": stats["n_records"],
            "input_bytes": stats["nbytes"],
            "skipped_lines": stats["skipped"],
            "skipped_examples": stats["skipped_examples"],
            "tokenizer_path": encoder.fast_status,
            "fast_path_fallbacks": stats["fallbacks"],
            "seconds": round(elapsed, 3),
            "created_by": "megacpt preprocess",
        }
        write_sidecar(prefix, meta)
        metas[prefix] = meta
    for key, out in zip(cfg.json_keys, merged):
        metas[out] = merge_datasets([targets[(p, key)] for p in range(cfg.partitions)], out)
    return metas


def _run_chunks(cfg: PreprocessConfig, dtype: type, spec, sources, encoder):
    """Yield encoded chunks in input order; at most ``2 * workers + 2`` in flight (bounded memory)."""
    chunks = iter_chunks(sources, cfg.json_keys, cfg.chunk_bytes, hf_dataset=_hf(cfg))
    bar = _progress(cfg, sources)
    if cfg.workers == 0:
        _init_worker(cfg, dtype, spec, encoder)
        for c in chunks:
            r = encode_chunk(c)
            _tick(bar, r)
            yield r
        _close(bar)
        return
    fork = sys.platform == "linux"
    ctx = mp.get_context("fork" if fork else "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: workers = cores
    pool = ctx.Pool(cfg.workers, initializer=_init_pool_worker,
                    initargs=(cfg, dtype, spec, encoder if fork else None))
    try:
        pending: collections.deque = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(encode_chunk, (c,)))
            while len(pending) > 2 * cfg.workers + 1:
                r = pending.popleft().get()
                _tick(bar, r)
                yield r
        while pending:
            r = pending.popleft().get()
            _tick(bar, r)
            yield r
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        _close(bar)


def _progress(cfg: PreprocessConfig, sources) -> Progress:
    """Bytes drive it (MB/s, and the ETA where the input size is known); docs/s beside them."""
    return Progress("preprocess", plain_text_bytes(sources) if not cfg.hf_dataset else None, unit="B",
                    every_s=cfg.log_interval, enabled=cfg.progress)


def _tick(bar: Progress, r) -> None:
    bar.update(r["nbytes"], docs=r["n_records"])


def _close(bar: Progress) -> None:
    bar.close()
