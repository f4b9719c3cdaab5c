"""Streaming readers for preprocessing inputs: jsonl (.jsonl/.json, plain, .gz, .zst), parquet and local
HF `datasets`, cut into *chunks* the parent sends to workers.

The parent only splits bytes into lines (cheap); JSON parsing, validation and tokenization happen in the
workers (`parse_chunk`), so both cores do the expensive work. Every record keeps its ``file:line``
(1-based line of a jsonl file, 1-based row of a parquet file / dataset) for error messages.
"""
from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from megacpt.errors import InputError, UserError
from megacpt.optional import require

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".json.zstd")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "jsonl" | "parquet" | "hf"
    split: str | None = None


@dataclass
class Chunk:
    """A run of consecutive records of one source. ``global_start`` = index of the first record over all
    sources (used for round-robin partitions); ``first_line`` = its 1-based line/row in ``path``."""

    path: str
    first_line: int
    global_start: int
    lines: list[bytes] | None = None           # jsonl: raw lines, newline kept
    columns: dict[str, list[Any]] | None = None  # parquet/hf: key -> values
    nbytes: int = 0

    def __len__(self) -> int:
        if self.lines is not None:
            return len(self.lines)
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class ParsedChunk:
    """Per key, one entry per kept record: a str (one sequence) or list[str] (Megatron: one sequence
    per list item). ``line_numbers`` / ``global_index`` of the kept records; ``skipped`` bad records."""

    texts: dict[str, list[Any]]
    line_numbers: list[int]
    global_index: list[int]
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    error: tuple[str, int, str] | None = None


def _is_jsonl(name: str) -> bool:
    return name.lower().endswith(JSONL_SUFFIXES)


def _is_hf_disk_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def expand_inputs(inputs: Sequence[str], hf_split: str | None = None) -> list[Source]:
    """Files, directories (their supported files, sorted, recursively) and globs -> ordered sources.
    Fails before any work on a missing path or an unsupported file type."""
    sources: list[Source] = []
    for item in inputs:
        p = Path(item)
        if any(c in item for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"--input {item}: the pattern matches no file")
            sources += expand_inputs(matches, hf_split)
            continue
        if not p.exists():
            raise UserError(f"--input {item}: no such file or directory")
        if p.is_dir():
            if _is_hf_disk_dir(p):
                sources.append(Source(str(p), "hf", hf_split))
                continue
            files = sorted(str(f) for f in p.rglob("*") if f.is_file()
                           and (_is_jsonl(f.name) or f.name.lower().endswith(PARQUET_SUFFIXES)))
            if not files:
                raise UserError(f"--input {item}: directory has no .jsonl/.json(.gz/.zst)/.parquet files")
            sources += expand_inputs(files, hf_split)
        elif _is_jsonl(p.name):
            sources.append(Source(str(p), "jsonl"))
        elif p.name.lower().endswith(PARQUET_SUFFIXES):
            sources.append(Source(str(p), "parquet"))
        else:
            raise UserError(f"--input {item}: unsupported file type (expected .jsonl, .json, .jsonl.gz, "
                            ".jsonl.zst, .parquet, a directory of them, or a datasets save_to_disk dir)")
    return sources


def open_binary(path: str) -> io.BufferedIOBase:
    """A binary stream of the decompressed file (gzip / zstd by suffix)."""
    low = path.lower()
    if low.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if low.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(path), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


class _ZstdFrames(io.RawIOBase):
    """Decompress every zstd frame of a file; a truncated last frame is an error (zstandard's
    stream_reader silently stops there, which would drop the rest of the corpus unnoticed)."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._f = open(path, "rb")
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._f.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame (truncated file)")
                return 0
            while data:
                self._in_frame = True
                self._buf += self._d.decompress(data)
                data = b""
                if self._d.eof:  # frame complete: leftover bytes start the next frame
                    data = self._d.unused_data
                    self._d = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def plain_text_bytes(sources: Sequence[Source]) -> int | None:
    """Total bytes that ``iter_chunks`` will count (``Chunk.nbytes``) when every source is uncompressed JSONL
    (their file sizes); None otherwise (compressed or columnar: known only once read). Drives the ETA."""
    if not sources or any(s.kind != "jsonl" or not s.path.lower().endswith((".jsonl", ".json")) for s in sources):
        return None
    return sum(os.path.getsize(s.path) for s in sources)


def iter_chunks(sources: Sequence[Source], json_keys: Sequence[str], chunk_bytes: int = 1 << 20,
                chunk_rows: int = 4096, hf_dataset: tuple[str, str | None] | None = None) -> Iterator[Chunk]:
    """Chunks of ~``chunk_bytes`` (jsonl) or ``chunk_rows`` rows (columnar), in input order."""
    g = 0
    for src in sources:
        chunks = (_jsonl_chunks(src.path, g, chunk_bytes) if src.kind == "jsonl"
                  else _columnar_chunks(src, json_keys, g, chunk_rows))
        for c in chunks:
            yield c
            g = c.global_start + len(c)
    if hf_dataset is not None:
        yield from _columnar_chunks(Source(hf_dataset[0], "hf-load", hf_dataset[1]), json_keys, g, chunk_rows)


def _jsonl_chunks(path: str, g: int, chunk_bytes: int) -> Iterator[Chunk]:
    line = 1
    try:
        with open_binary(path) as f:
            while lines := f.readlines(chunk_bytes):
                yield Chunk(path, line, g, lines=lines, nbytes=sum(map(len, lines)))
                line += len(lines)
                g += len(lines)
    except (OSError, EOFError) as e:  # not gzip, truncated gzip (EOFError), unreadable file
        raise InputError(path, line, f"cannot read: {e}") from e
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ == "ZstdError":
            raise InputError(path, line, f"cannot read: corrupt zstd data: {e}") from e
        raise


def _columnar_chunks(src: Source, json_keys: Sequence[str], g: int, chunk_rows: int) -> Iterator[Chunk]:
    row = 1
    for batch in _arrow_batches(src, json_keys, chunk_rows):
        columns = {k: batch.column(k).to_pylist() for k in json_keys}
        n = batch.num_rows
        nbytes = sum(len(v.encode("utf-8", "surrogatepass")) for vals in columns.values() for v in vals
                     if isinstance(v, str))
        yield Chunk(src.path, row, g, columns=columns, nbytes=nbytes)
        row += n
        g += n


def _check_columns(path: str, names: Sequence[str], json_keys: Sequence[str]) -> None:
    missing = [k for k in json_keys if k not in names]
    if missing:
        raise InputError(path, None, f"missing column(s) {missing}; columns are {list(names)}")


def _arrow_batches(src: Source, json_keys: Sequence[str], chunk_rows: int):
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid & co.
            raise InputError(src.path, None, f"not a readable parquet file: {e}") from e
        _check_columns(src.path, pf.schema_arrow.names, json_keys)
        yield from pf.iter_batches(batch_size=chunk_rows, columns=list(json_keys))
        return
    ds = _load_hf(src)
    _check_columns(src.path, ds.column_names, json_keys)
    table = ds.with_format("arrow")
    for start in range(0, len(ds), chunk_rows):
        t = table[start : start + chunk_rows]
        yield t.select(list(json_keys))


def _load_hf(src: Source):
    datasets = require("datasets", f"--input {src.path}", 'pip install "megacpt[datasets]"')

    try:
        if src.kind == "hf":
            ds = datasets.load_from_disk(src.path)
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as e:  # noqa: BLE001
        raise InputError(src.path, None, f"cannot load with datasets: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if src.split is None:
            raise InputError(src.path, None, f"a DatasetDict: choose one of {list(ds)} with --split")
        if src.split not in ds:
            raise InputError(src.path, None, f"no split {src.split!r}; splits are {list(ds)}")
        ds = ds[src.split]
    return ds


# --- parsing (runs in workers) -----------------------------------------------------------------------

def _type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "number", float: "number", dict: "object",
                                     list: "array"}.get(type(v), type(v).__name__)


def _check_value(key: str, v: Any) -> str | None:
    """None if ``v`` is a valid text (a string, or a list of strings as Megatron accepts), else why not."""
    if isinstance(v, str):
        return None
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return None
    return f"key {key!r}: expected a string, got {_type_name(v)}"


def _has_lone_surrogate(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    for s in items:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def parse_chunk(chunk: Chunk, json_keys: Sequence[str], skip_bad_lines: bool,
                keep=None, check_text=None) -> ParsedChunk:
    """Validate and extract texts. ``keep(global_index) -> bool`` selects records (partition jobs).
    ``check_text(str) -> why | None`` is the tokenizer's own check of a text (NullTokenizer: integers).
    Without ``skip_bad_lines`` the first bad record sets ``error`` and parsing stops."""
    out = ParsedChunk({k: [] for k in json_keys}, [], [])
    n = len(chunk)
    for i in range(n):
        gidx = chunk.global_start + i
        if keep is not None and not keep(gidx):
            continue
        lineno = chunk.first_line + i
        why = None
        if chunk.lines is not None:
            obj, why = _parse_line(chunk.lines[i], lineno)
            if why is None:
                for k in json_keys:
                    if k not in obj:
                        why = f"missing key {k!r}"
                        break
                    if (why := _check_value(k, obj[k])) is not None:
                        break
                # lone surrogates can only come from \uD8xx escapes: the bytes were valid UTF-8
                if why is None and b"\\u" in chunk.lines[i] and any(_has_lone_surrogate(obj[k]) for k in json_keys):
                    why = "lone surrogate (\\uD800-\\uDFFF escape without its pair) in a text value"
            values = obj if why is None else None
        else:
            values = {k: chunk.columns[k][i] for k in json_keys}
            for k in json_keys:
                if (why := _check_value(k, values[k])) is not None:
                    break
            if why is None and any(_has_lone_surrogate(values[k]) for k in json_keys):
                why = "lone surrogate in a text value"
        if why is None and check_text is not None:
            for k in json_keys:
                for text in [values[k]] if isinstance(values[k], str) else values[k]:
                    if (why := check_text(text)) is not None:
                        why = f"key {k!r}: {why}"
                        break
                if why is not None:
                    break
        if why is not None:
            if not skip_bad_lines:
                out.error = (chunk.path, lineno, why)
                return out
            out.skipped.append((chunk.path, lineno, why))
            continue
        for k in json_keys:
            out.texts[k].append(values[k])
        out.line_numbers.append(lineno)
        out.global_index.append(gidx)
    return out


def _parse_line(raw: bytes, lineno: int) -> tuple[Any, str | None]:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if s.startswith("\ufeff"):
        return None, "UTF-8 byte order mark (BOM); save the file without a BOM"
    if not s.strip():
        return None, "blank line (expected a JSON object)"
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        return None, "malformed JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_type_name(obj)}"
    return obj, None


@dataclass
class Document:
    path: str
    line: int
    texts: dict[str, Any]


def iter_documents(inputs: Sequence[str], json_keys: Sequence[str] = ("text",),
                   skip_bad_lines: bool = False) -> Iterator[Document]:
    """Single-process iteration over valid records (tokenizer training, tests). Raises InputError."""
    for chunk in iter_chunks(expand_inputs(inputs), json_keys):
        parsed = parse_chunk(chunk, json_keys, skip_bad_lines)
        for j, line in enumerate(parsed.line_numbers):
            yield Document(chunk.path, line, {k: _join(parsed.texts[k][j]) for k in json_keys})
        if parsed.error:
            raise InputError(*parsed.error)


def _join(v: Any) -> str:
    return v if isinstance(v, str) else "".join(v)


def count_records(sources: Sequence[Source], json_keys: Sequence[str],
                  hf_dataset: tuple[str, str | None] | None = None) -> int:
    """Number of records (lines / rows) over all sources: for ``--keep-sequential-samples`` partitions."""
    total = 0
    for src in sources:
        if src.kind == "jsonl":
            n, last = 0, b"\n"
            with open_binary(src.path) as f:
                while block := f.read(8 << 20):
                    n += block.count(b"\n")
                    last = block[-1:]
            total += n + (last != b"\n")  # a last line without newline still counts
        elif src.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(src.path).metadata.num_rows
        else:
            total += len(_load_hf(src))
    if hf_dataset is not None:
        total += len(_load_hf(Source(hf_dataset[0], "hf-load", hf_dataset[1])))
    return total
