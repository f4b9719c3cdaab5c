"""Score files: Parquet keyed by ``doc_id`` with metadata naming the scored dataset and the scorer.

Schema metadata key ``megacpt.scores`` holds JSON::

    {"format": 1, "scorer": "pos-entropy", "metric": "pos_entropy",
     "dataset": <megacpt.data.identity.dataset_identity>, "config": {...scorer config...}}

Scorers commit results in shards under ``OUT.shards/`` (each shard an atomic Parquet file), so an
interrupted run resumes where it stopped; the final file is assembled atomically and the shard
directory removed. A resumed run must have the same dataset and config as the shards on disk.
The committed shards are progress, kept on an interruption; only temporaries are removed
(``megacpt.io.claim_output``: the writer holds OUT's lock and first removes stale temporaries of OUT
and inside OUT.shards/).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from megacpt.errors import UserError
from megacpt.io import atomic_path, check_writable_dir, claim_output, describe_interrupt, pause_for_test, write_json_atomic
from megacpt.progress import Progress

META_KEY = b"megacpt.scores"
FORMAT = 1


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


def score_metadata(scorer: str, metric: str, dataset: dict, config: dict) -> dict[str, Any]:
    return {"format": FORMAT, "scorer": scorer, "metric": metric, "dataset": dataset, "config": config}


def write_scores(path: str | os.PathLike, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    pa, pq = _pa()
    table = pa.table(columns)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@dataclass
class ScoreFile:
    path: str
    columns: dict[str, np.ndarray]
    meta: dict[str, Any]            # {} for files without megacpt metadata

    @property
    def num_rows(self) -> int:
        return len(self.columns["doc_id"])


def read_scores(path: str | os.PathLike) -> ScoreFile:
    """Read a score file and check it is keyed by doc_id = 0..n-1 (any row order on disk)."""
    pa, pq = _pa()
    if not Path(path).exists():
        raise UserError(f"score file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta: dict[str, Any] = {}
    if raw:
        meta = json.loads(raw)
    else:  # files written by other megacpt tools may carry their own key; keep whatever JSON is there
        for k, v in (table.schema.metadata or {}).items():
            if k.startswith(b"megacpt"):
                try:
                    meta = json.loads(v)
                except ValueError:
                    pass
    if "doc_id" not in table.column_names:
        raise UserError(f"{path}: no doc_id column (columns: {', '.join(table.column_names)})")
    cols = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
    doc_id = cols["doc_id"].astype(np.int64)
    order = np.argsort(doc_id, kind="stable")
    if not np.array_equal(doc_id[order], np.arange(doc_id.size)):
        raise UserError(f"{path}: doc_id must be 0..{doc_id.size - 1} with each id exactly once")
    if not np.array_equal(order, np.arange(order.size)):
        cols = {n: c[order] for n, c in cols.items()}
    return ScoreFile(str(path), cols, meta)


class ShardedScoreWriter:
    """Resumable score output: shard k covers doc ids [k*shard_docs, min((k+1)*shard_docs, n)).

    With ``claim`` (one writer per output: rank 0 of a distributed pass) it holds OUT's lock until `close`
    (or `finalize`, or the end of a ``with`` block), after removing stale temporaries."""

    def __init__(self, out: str | os.PathLike, meta: dict[str, Any], num_documents: int, shard_docs: int,
                 overwrite: bool = False, claim: bool = True):
        if shard_docs <= 0:
            raise UserError(f"--shard-docs must be positive, got {shard_docs}")
        self.out = Path(out)
        self.dir = Path(str(self.out) + ".shards")
        check_writable_dir(self.out)
        self._claim = contextlib.ExitStack()
        if claim:
            self._claim.enter_context(claim_output(self.out, [self.out], dirs=[self.dir]))
        try:
            self._open(meta, num_documents, shard_docs, overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, meta: dict[str, Any], num_documents: int, shard_docs: int, overwrite: bool) -> None:
        if self.out.exists() and not overwrite:
            raise UserError(f"{self.out} exists; pass --overwrite to replace it")
        self.meta, self.n, self.shard_docs = meta, num_documents, shard_docs
        state = {"meta": meta, "num_documents": num_documents, "shard_docs": shard_docs}
        state_path = self.dir / "state.json"
        if self.dir.exists() and state_path.exists():
            old = json.loads(state_path.read_text())
            if old != json.loads(json.dumps(state, default=str)):
                if not overwrite:
                    raise UserError(
                        f"{self.dir} holds shards of a different dataset or scorer config; remove it or "
                        "pass --overwrite to start over"
                    )
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not state_path.exists():
            write_json_atomic(state_path, state)

    def close(self) -> None:
        """Release OUT's lock (the shards stay: an unfinished pass resumes from them)."""
        self._claim.close()

    def __enter__(self) -> "ShardedScoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_docs)

    def span(self, k: int) -> tuple[int, int]:
        return k * self.shard_docs, min((k + 1) * self.shard_docs, self.n)

    def _path(self, k: int) -> Path:
        return self.dir / f"shard_{k:06d}.parquet"

    def pending(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self._path(k).exists()]

    def committed_documents(self) -> int:
        return self.n - sum(b - a for a, b in map(self.span, self.pending()))

    def commit(self, k: int, columns: dict[str, np.ndarray]) -> None:
        a, b = self.span(k)
        if not np.array_equal(np.asarray(columns["doc_id"]), np.arange(a, b)):
            raise RuntimeError(f"shard {k}: doc ids do not cover [{a}, {b})")
        write_scores(self._path(k), columns, self.meta)
        pause_for_test("score-shard")

    def finalize(self) -> None:
        pa, pq = _pa()
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{len(missing)} shards missing, first {missing[0]}")
        tables = [pq.read_table(self._path(k)) for k in range(self.num_shards)]
        if tables:
            table = pa.concat_tables(tables)
            cols = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
        else:
            cols = None
        if cols is None:  # an empty dataset: keep the schema of no shard; write an empty doc_id column
            cols = {"doc_id": np.zeros(0, np.int64)}
        write_scores(self.out, cols, self.meta)
        shutil.rmtree(self.dir)
        self.close()


def run_sharded(writer: ShardedScoreWriter, name: str, compute: Callable[[int, int], dict[str, np.ndarray]],
                results: Iterable[tuple[int, dict[str, np.ndarray]]] | None = None) -> None:
    """Drive a writer: compute each pending shard (or consume (k, columns) from ``results``)."""
    pending = writer.pending()
    prog = Progress(name, writer.n)
    prog.done = prog.start_done = writer.n - sum(writer.span(k)[1] - writer.span(k)[0] for k in pending)
    if pending and prog.done:
        print(f"{name}: resuming, {prog.done}/{writer.n} docs already scored", file=sys.stderr)
    it = results if results is not None else ((k, compute(*writer.span(k))) for k in pending)
    with writer, describe_interrupt(lambda: f"after {writer.committed_documents():,}/{writer.n:,} documents; the "
                                    f"committed shards are kept in {writer.dir}: re-run the same command to resume"):
        for k, cols in it:
            writer.commit(k, cols)
            a, b = writer.span(k)
            prog.update(b - a)
        prog.close()
        writer.finalize()
