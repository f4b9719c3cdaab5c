"""Megatron MMIDIDX indexed datasets (`PREFIX.bin` + `PREFIX.idx`), byte-compatible with megatron-core.

`.idx` layout (little endian), as megatron-core's ``_IndexWriter`` writes it:
  b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 n_sequences | u64 n_doc_indices
  | int32[n_sequences] sequence lengths | int64[n_sequences] byte pointers into .bin
  | int64[n_doc_indices] document indices (0, then the sequence count after each document)
`.bin` is the concatenation of all sequences' tokens in that dtype.

A *document* is ``document_indices[d]:document_indices[d+1]`` sequences; an empty document has none.
Beside the pair, ``PREFIX.meta.json`` (the sidecar) records the tokenizer and counts.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from megacpt.errors import UserError
from megacpt.io import commit_tmp, discard_tmp, pause_for_test, tmp_path_for, write_json_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES = {c: t for t, c in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's rule: uint16 when the vocab size is below 65,500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".meta.json")


def dataset_files(prefix: str | os.PathLike) -> list[Path]:
    """The files a writer of dataset ``prefix`` writes: ``.bin``, ``.idx``, the sidecar (for `claim_output`)."""
    return [*data_paths(prefix), sidecar_path(prefix)]


def read_sidecar(prefix: str | os.PathLike) -> dict[str, Any] | None:
    p = sidecar_path(prefix)
    return json.loads(p.read_text()) if p.exists() else None


def write_sidecar(prefix: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json_atomic(sidecar_path(prefix), meta)


class IndexedDatasetWriter:
    """Streams sequences to a temp `.bin`; `finalize()` writes the `.idx` and renames both into place.

    Memory is O(#sequences) for the index arrays (12 bytes per sequence), independent of tokens.
    Until `finalize()` succeeds nothing with the final names exists, and any old pair at PREFIX is
    removed before the new one is moved in, so a crash never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.int32):
        if dtype not in DTYPE_CODES:
            raise UserError(f"unsupported token dtype {dtype}")
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        self.bin_path, self.idx_path = data_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = tmp_path_for(self.bin_path)
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._pending_lengths: list[int] = []
        # document indices as int64 blocks (8 bytes/document, not a Python int each)
        self._doc_blocks: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._pending_docs: list[int] = []
        self._n_documents = 0
        self._n_sequences = 0
        self.n_tokens = 0
        self._max_token = np.iinfo(self.dtype).max if np.issubdtype(self.dtype, np.integer) else None

    # -- writing ---------------------------------------------------------------------------
    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and self._max_token is not None and (arr.max() > self._max_token or arr.min() < 0):
            raise UserError(
                f"token id {int(arr.max())} does not fit dtype {np.dtype(self.dtype).name} of {self.prefix}"
            )
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._pending_lengths.append(int(arr.size))
        self._n_sequences += 1
        self.n_tokens += int(arr.size)
        if len(self._pending_lengths) >= 1 << 16:
            self._flush_lengths()

    def end_document(self) -> None:
        self._pending_docs.append(self._n_sequences)
        self._n_documents += 1
        if len(self._pending_docs) >= 1 << 16:
            self._flush_docs()

    def add_document(self, sequences: Iterable[Sequence[int] | np.ndarray]) -> None:
        """One document made of zero or more sequences (Megatron: an empty text has zero)."""
        for seq in sequences:
            self.add_sequence(seq)
        self.end_document()

    def add_raw(self, token_bytes: bytes | memoryview, lengths: np.ndarray, doc_ends: np.ndarray) -> None:
        """Bulk append already-encoded tokens (same dtype): ``lengths`` per sequence and, per document,
        the number of sequences it ends after (relative to this batch). Used by parallel preprocess."""
        self._bin.write(token_bytes)
        self._flush_lengths()
        lengths = np.asarray(lengths, dtype=np.int32)
        self._lengths.append(lengths)
        self._flush_docs()
        doc_ends = np.asarray(doc_ends, dtype=np.int64)
        self._doc_blocks.append(self._n_sequences + doc_ends)
        self._n_documents += int(doc_ends.size)
        self._n_sequences += int(lengths.size)
        self.n_tokens += int(lengths.sum(dtype=np.int64))

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append a whole dataset (Megatron's ``IndexedDatasetBuilder.add_index``); dtypes must match."""
        import shutil

        other = IndexedDataset(prefix)
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise UserError(f"cannot merge {prefix} (dtype {np.dtype(other.dtype).name}) into {self.prefix} "
                            f"(dtype {np.dtype(self.dtype).name})")
        with open(data_paths(prefix)[0], "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        self.add_raw(b"", np.array(other.sequence_lengths), np.array(other.document_indices[1:]))

    def _flush_lengths(self) -> None:
        if self._pending_lengths:
            self._lengths.append(np.asarray(self._pending_lengths, dtype=np.int32))
            self._pending_lengths = []

    def _flush_docs(self) -> None:
        if self._pending_docs:
            self._doc_blocks.append(np.asarray(self._pending_docs, dtype=np.int64))
            self._pending_docs = []

    @property
    def n_documents(self) -> int:
        return self._n_documents

    @property
    def n_sequences(self) -> int:
        return self._n_sequences

    # -- finishing -------------------------------------------------------------------------
    def finalize(self) -> None:
        self._flush_lengths()
        self._flush_docs()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_indices = np.concatenate(self._doc_blocks)
        idx_tmp = tmp_path_for(self.idx_path)
        try:
            write_index(idx_tmp, self.dtype, lengths, doc_indices)
            pause_for_test("indexed-finalize")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.idx_path)  # an old .idx must never pair with the new .bin
            commit_tmp(self._bin_tmp, self.bin_path)
            commit_tmp(idx_tmp, self.idx_path)
        except BaseException:
            for p in (idx_tmp, self._bin_tmp):
                discard_tmp(p)
            raise

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._bin.close()
        discard_tmp(self._bin_tmp)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(path: str | os.PathLike, dtype: type, lengths: np.ndarray, doc_indices: np.ndarray) -> None:
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", lengths.size))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_indices, dtype=np.int64).tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is sequence i; ``ds.document(d)`` is document d's tokens."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path = data_paths(prefix)
        for p in (bin_path, idx_path):
            if not p.exists():
                raise UserError(f"indexed dataset {self.prefix}: missing {p}")
        with open(idx_path, "rb") as f:
            header = f.read(9 + 8 + 1 + 8 + 8)
        if len(header) < 34 or header[:9] != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic)")
        version, = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise UserError(f"{idx_path}: unsupported index version {version}, expected {VERSION}")
        code = header[17]
        if code not in CODE_DTYPES:
            raise UserError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        n_seq, n_doc_idx = struct.unpack("<QQ", header[18:34])
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = 34
        expected = off + n_seq * 4 + n_seq * 8 + n_doc_idx * 8
        if self._idx.size < expected:
            raise UserError(f"{idx_path}: truncated index ({self._idx.size} bytes, expected >= {expected})")
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n_seq, off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n_seq, off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(self._idx, np.int64, n_doc_idx, off)
        itemsize = np.dtype(self.dtype).itemsize
        n_bytes = int(self.sequence_lengths.sum(dtype=np.int64)) * itemsize
        size = bin_path.stat().st_size
        if size != n_bytes:
            raise UserError(f"{bin_path}: size {size} bytes does not match its index ({n_bytes} bytes)")
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // np.dtype(self.dtype).itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        s = self._start(i)
        return self._bin[s : s + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        seq = self[i]
        end = seq.size if length is None else offset + length
        return seq[offset:end]

    def document_span(self, d: int) -> tuple[int, int]:
        """First sequence and one past the last sequence of document d."""
        return int(self.document_indices[d]), int(self.document_indices[d + 1])

    def document_length(self, d: int) -> int:
        a, b = self.document_span(d)
        return int(self.sequence_lengths[a:b].sum(dtype=np.int64))

    def document_lengths(self) -> np.ndarray:
        """Token count of every document, int64 [num_documents]."""
        csum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return csum[self.document_indices[1:]] - csum[self.document_indices[:-1]]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences concatenated; sequences are contiguous in .bin)."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"document {d} out of range for {self.num_documents} documents")
        a, b = self.document_span(d)
        if a == b:
            return self._bin[0:0]
        s = self._start(a)
        return self._bin[s : s + int(self.sequence_lengths[a:b].sum(dtype=np.int64))]

    @property
    def meta(self) -> dict[str, Any] | None:
        return read_sidecar(self.prefix)

    def require_documents(self) -> "IndexedDataset":
        """Self, or a UserError naming the dataset when it has no documents (nothing to train on, score or
        select: its input was empty)."""
        if self.num_documents == 0:
            raise UserError(f"the dataset {self.prefix} has 0 documents (was its input empty? `megacpt "
                            "preprocess` writes an empty dataset only with --allow-empty)")
        return self
