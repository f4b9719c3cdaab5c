"""`megacpt inspect PREFIX`: counts, a document-length histogram and the first documents decoded."""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np


def summarize(prefix: str, n_docs: int = 3, tokenizer_path: str | None = None, max_chars: int = 300) -> dict[str, Any]:
    from megacpt.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.document_lengths()
    meta = ds.meta or {}
    out: dict[str, Any] = {
        "prefix": prefix,
        "dtype": np.dtype(ds.dtype).name,
        "num_documents": ds.num_documents,
        "num_sequences": len(ds),
        "num_tokens": ds.num_tokens,
        "empty_documents": int((lengths == 0).sum()),
    }
    if lengths.size:
        out["doc_length"] = {"min": int(lengths.min()), "mean": float(lengths.mean()),
                             "p50": float(np.percentile(lengths, 50)), "p99": float(np.percentile(lengths, 99)),
                             "max": int(lengths.max())}
        # power-of-two buckets: [0], [1,2), [2,4), ...
        edges = [0, 1] + [2 ** k for k in range(1, int(np.log2(max(lengths.max(), 1))) + 2)]
        hist, _ = np.histogram(lengths, bins=edges)
        out["histogram"] = [(f"[{a},{b})", int(h)) for a, b, h in zip(edges[:-1], edges[1:], hist) if h]
    if meta:
        out["sidecar"] = {k: meta[k] for k in ("tokenizer", "skipped_lines", "inputs", "append_eod") if k in meta}
    ident = meta.get("tokenizer") or {}
    if n_docs and (tokenizer_path or ident.get("path") or ident.get("type") == "NullTokenizer"):
        from megacpt.data.tokenizer import load_tokenizer, tokenizer_from_identity

        tok = load_tokenizer(tokenizer_path) if tokenizer_path else tokenizer_from_identity(ident)
        out["first_documents"] = [tok.decode(ds.document(d).tolist())[:max_chars]
                                  for d in range(min(n_docs, ds.num_documents))]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--num-docs", type=int, default=3, help="documents to decode and show")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer to decode with (default: the sidecar's)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
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
