"""A summary of an indexed dataset (`megacpt inspect`): counts, a document-length histogram, the first documents."""
from __future__ import annotations

from typing import Any

import numpy as np

from megacpt.data.indexed import IndexedDataset
from megacpt.data.tokenizer import load_tokenizer, tokenizer_from_identity


def summarize(prefix: str, n_docs: int = 3, tokenizer_path: str | None = None, max_chars: int = 300) -> dict[str, Any]:
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
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else tokenizer_from_identity(ident)
        out["first_documents"] = [tok.decode(ds.document(d).tolist())[:max_chars]
                                  for d in range(min(n_docs, ds.num_documents))]
    return out
