"""`megacpt eval perplexity`: token-weighted perplexity of a model on held-out indexed datasets.

Per-document NLL follows METHOD.md's definition (documents split into chunks of at most ``seq_length``
tokens, every token but a chunk's first predicted from that chunk only); a dataset's perplexity is
``exp(sum nll_sum / sum n_pred)`` over its documents, i.e. weighted by tokens, not a mean of per-document
perplexities.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megacpt.errors import UserError
from megacpt.eval.lm import EvalLM, token_nll
from megacpt.eval.metrics import bootstrap_ci


def _chunks(lengths: np.ndarray, L: int) -> list[tuple[int, int, int]]:
    """(doc, start, length) of every chunk with >= 2 tokens (a 1-token chunk predicts nothing)."""
    out = []
    for d, n in enumerate(lengths.tolist()):
        for s in range(0, n, L):
            if min(L, n - s) >= 2:
                out.append((d, s, min(L, n - s)))
    return out


@torch.inference_mode()
def document_nll(lm: EvalLM, prefix: str, seq_length: int, max_documents: int | None = None):
    """(nll_sum [D] float64, n_pred [D] int64) per document of the indexed dataset ``prefix``."""
    from megacpt.data.indexed import IndexedDataset

    try:
        ds = IndexedDataset(prefix)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"--data {prefix}: cannot open indexed dataset ({e})") from None
    meta = ds.meta or {}
    want = (meta.get("tokenizer") or {}).get("sha256")
    have = (lm.info.tokenizer if lm.info else {}).get("sha256")
    if want and have and want != have:
        raise UserError(f"--data {prefix}: tokenized with another tokenizer (sha256 {want[:12]}…) than the "
                        f"model's ({have[:12]}…)")
    lengths = ds.document_lengths()
    if max_documents is not None:
        lengths = lengths[:max_documents]
    nll = np.zeros(len(lengths), dtype=np.float64)
    npred = np.zeros(len(lengths), dtype=np.int64)
    chunks = sorted(_chunks(lengths, seq_length), key=lambda c: -c[2])
    w = lm.model.embed_out.weight
    padded = w.shape[0]
    for b in range(0, len(chunks), lm.batch_size):
        batch = chunks[b:b + lm.batch_size]
        toks = [ds.document(d)[s:s + n].astype(np.int64) for d, s, n in batch]
        top = max(int(t.max()) for t in toks)
        if top >= padded:
            raise UserError(f"--data {prefix}: token id {top} >= the model's {padded} embedding rows")
        hidden = lm._forward_hidden([t[:-1].tolist() for t in toks])  # [b, s, H]
        rows = torch.cat([torch.full((len(t) - 1,), r) for r, t in enumerate(toks)])
        cols = torch.cat([torch.arange(len(t) - 1) for t in toks])
        tgt = torch.from_numpy(np.concatenate([t[1:] for t in toks])).to(w.device)
        per_tok = token_nll(hidden[rows, cols], w, tgt, lm.vocab_size).double().cpu()
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, per_tok)
        for r, (d, _, n) in enumerate(batch):
            nll[d] += float(sums[r])
            npred[d] += n - 1
    return nll, npred


def heldout_perplexity(lm: EvalLM, prefixes: Sequence[str], seq_length: int,
                       max_documents: int | None = None, n_boot: int = 1000, seed: int = 0, log=print) -> dict:
    """``{"ppl:<name>": {kind, metric: "perplexity", value, n (documents), n_pred, ci95, ...}}``: entries of a
    results JSON's ``tasks`` (so `eval compare` treats them like tasks). The CI resamples documents."""
    if seq_length < 2 or seq_length > lm.max_length:
        raise UserError(f"--seq-length {seq_length} must be in [2, {lm.max_length}] (the model's length)")
    out = {}
    for prefix in prefixes:
        nll, npred = document_nll(lm, prefix, seq_length, max_documents)
        total, n = float(nll.sum()), int(npred.sum())
        if n == 0:
            raise UserError(f"--data {prefix}: no predictable token (every document has < 2 tokens)")
        name = "ppl:" + Path(prefix).name
        ci = bootstrap_ci(lambda idx: math.exp(nll[idx].sum() / max(int(npred[idx].sum()), 1)), len(nll),
                          n_boot=n_boot, seed=seed)
        out[name] = {"kind": "perplexity", "metric": "perplexity", "value": math.exp(total / n), "n": int(len(nll)),
                     "ci95": list(ci), "prefix": str(prefix), "nll_per_token": total / n, "nll_sum": total,
                     "n_pred": n, "seq_length": seq_length}
        log(f"[eval] {name}: perplexity {out[name]['value']:.3f} over {n} tokens")
    return out
