"""`megacpt eval perplexity`: token-weighted perplexity of a model on held-out indexed datasets.

Per-document NLL is the scoring pass's (``megacpt.score.nll.score_documents``, docs/method.md's
definition: documents split into chunks of at most ``seq_length`` tokens, every token but a chunk's first
predicted from that chunk only); a dataset's perplexity is
``exp(sum nll_sum / sum n_pred)`` over its documents, i.e. weighted by tokens, not a mean of per-document
perplexities.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from megacpt.errors import UserError
from megacpt.eval.lm import EvalLM
from megacpt.eval.metrics import bootstrap_ci


def document_nll(lm: EvalLM, prefix: str, seq_length: int, max_documents: int | None = None):
    """(nll_sum [D] float64, n_pred [D] int64) per document of ``prefix``, by the scoring pass's library."""
    from megacpt.data.indexed import IndexedDataset
    from megacpt.score.job import check_vocab
    from megacpt.score.nll import ScoringConfig, score_documents

    try:
        ds = IndexedDataset(prefix)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"--data {prefix}: cannot open indexed dataset ({e})") from None
    for w in check_vocab(lm.vocab_size, prefix, ds.meta, lm.info.tokenizer.get("path") if lm.info else None):
        print(f"[eval] warning: {w}")
    end = ds.num_documents if max_documents is None else min(max_documents, ds.num_documents)
    cfg = ScoringConfig(seq_length=seq_length, micro_batch_size=lm.batch_size).validate()
    cols = score_documents(lm.model, ds, 0, end, cfg)
    return cols["nll_sum"], cols["n_pred"]


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
