"""Sizes and checksums of checkpoint files, computed as the bytes are written (never by re-reading them).

Every file a save writes passes through a `HashingStream`, which counts and CRC-32s the bytes on their way
to disk, and lands in the `FileRecords` of the rank that wrote it: DCP's ``__R_N.distcp`` shards and
``.metadata`` through `hashing_storage_writer` (DCP's ``FileSystemWriter`` with a filesystem whose write
streams hash), the JSON files through `write_json`, the tokenizer through `copy_file`. Rank 0 gathers every
rank's records into the manifest of ``complete.json`` (``integrity.py`` checks them on load).

The checksum is CRC-32 (``zlib.crc32``, the IEEE polynomial of zip/gzip/PNG): it finds accidental damage
(truncation, a flipped byte, a block of zeros) at ~4 GB/s on one core, the cost of writing or reading the
file being the limit. It is not a defence against deliberate tampering (nothing unpickles code from a
checkpoint anyway: ``unpickler.py``). ``ALGORITHM`` names it in the manifest, so another can follow.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from megacpt.errors import UserError
from megacpt.io import atomic_path

ALGORITHM = "crc32"
_CHUNK = 8 << 20


def crc32_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


class HashingStream:
    """A binary file open for writing that counts and CRC-32s every byte passing through ``write``.

    Only what DCP and ``torch.save`` call on a write stream is offered (``write``, ``tell``, ``flush``,
    ``fileno`` for fsync, ``close``); a writer that seeks back would make the running checksum wrong, so
    ``seek`` is deliberately missing and fails loudly.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self.size = 0
        self.crc = 0

    def write(self, b) -> int:
        n = self._f.write(b)  # a buffered file writes everything or raises
        self.crc = zlib.crc32(b, self.crc)
        self.size += memoryview(b).nbytes
        return n

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    @property
    def digest(self) -> str:
        return crc32_hex(self.crc)


class FileRecords:
    """``{path relative to the checkpoint dir: {"size": bytes, "crc32": hex}}`` of the files one rank
    wrote; thread-safe (DCP may write from several threads, an async save from a background one)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._files: dict[str, dict] = {}
        self._lock = threading.Lock()

    def rel(self, path: str | os.PathLike) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def add(self, path: str | os.PathLike, size: int, digest: str) -> None:
        with self._lock:
            self._files[self.rel(path)] = {"size": int(size), ALGORITHM: digest}

    def rename(self, old: str | os.PathLike, new: str | os.PathLike) -> None:
        with self._lock:
            entry = self._files.pop(self.rel(old), None)
            if entry is not None:
                self._files[self.rel(new)] = entry

    def as_dict(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._files)


@contextlib.contextmanager
def hashing_open(path: str | os.PathLike, records: FileRecords) -> Iterator[HashingStream]:
    """Open ``path`` for writing through a `HashingStream`; recorded when closed without an error."""
    with open(path, "wb") as f:
        stream = HashingStream(f)
        yield stream
    records.add(path, stream.size, stream.digest)


def write_bytes(path: str | os.PathLike, data: bytes, records: FileRecords) -> None:
    """Write ``data`` atomically (``io.atomic_path``), recording its size and checksum."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            stream = HashingStream(f)
            stream.write(data)
    records.add(path, stream.size, stream.digest)


def write_json(path: str | os.PathLike, obj: Any, records: FileRecords) -> None:
    """``io.write_json_atomic``'s format, recorded."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), records)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, records: FileRecords) -> None:
    """Copy ``src`` to ``dst``, checksumming the bytes written."""
    with open(src, "rb") as fin, hashing_open(dst, records) as out:
        while chunk := fin.read(_CHUNK):
            out.write(chunk)


def file_crc32(path: str | os.PathLike) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc32_hex(crc)


def hashing_storage_writer(path: str | os.PathLike, records: FileRecords):
    """DCP's ``FileSystemWriter`` for ``path`` whose files (shards, ``.metadata``) are recorded as written.

    DCP opens every file it writes through ``self.fs.create_stream(path, "wb")`` (the shards in
    ``_write_files_from_queue``, the metadata in ``finish``, as ``.metadata.tmp`` renamed through
    ``self.fs.rename``): a filesystem whose write streams are `HashingStream` s sees every byte once.
    """
    # lazy: torch.distributed.checkpoint costs ~1 s to import (see unpickler.py)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, p, mode: str):
            if "w" not in mode:
                with super().create_stream(p, mode) as stream:
                    yield stream
                return
            if mode != "wb":
                raise ValueError(f"checkpoint: DCP opened {p} with mode {mode!r}; only 'wb' can be checksummed")
            with hashing_open(p, records) as stream:
                yield stream

        def rename(self, p, new_path) -> None:
            super().rename(p, new_path)
            records.rename(p, new_path)

    writer = FileSystemWriter(str(path))
    writer.fs = _HashingFileSystem()
    return writer


# ----------------------------------------------------------------------------------------------------
# comparing what was recorded with what is there

class DamagedCheckpoint(UserError):
    """A checkpoint file differs from its manifest entry: ``problems`` = [(file, expected, found)]."""

    def __init__(self, checkpoint: str | os.PathLike, problems: list[tuple[str, str, str]]):
        self.checkpoint = Path(checkpoint)
        self.problems = list(problems)
        file, expected, found = self.problems[0]
        more = f"; {len(self.problems) - 1} more damaged file(s)" if len(self.problems) > 1 else ""
        super().__init__(f"checkpoint {self.checkpoint} is damaged ({file}: expected {expected}, "
                         f"found {found}{more})")


def size_problem(rel: str, entry: dict, size: int | None) -> tuple[str, str, str] | None:
    if size is None:
        return rel, f"{entry['size']} bytes", "no such file"
    if size != entry["size"]:
        return rel, f"{entry['size']} bytes", f"{size} bytes"
    return None


def crc_problem(rel: str, entry: dict, digest: str) -> tuple[str, str, str] | None:
    if digest != entry[ALGORITHM]:
        return rel, f"{ALGORITHM} {entry[ALGORITHM]}", f"{ALGORITHM} {digest} (same size, different bytes)"
    return None


def check_bytes(checkpoint: Path, rel: str, data: bytes, manifest: dict | None) -> None:
    """Raise `DamagedCheckpoint` if ``data`` (the bytes of ``rel``, just read) is not what was written."""
    entry = (manifest or {}).get("files", {}).get(rel)
    if entry is None:
        return
    problem = size_problem(rel, entry, len(data)) or crc_problem(rel, entry, crc32_hex(zlib.crc32(data)))
    if problem is not None:
        raise DamagedCheckpoint(checkpoint, [problem])


def manifest_of(checkpoint: Path, info: dict) -> dict | None:
    """The manifest of a ``complete.json`` (None: saved before megacpt recorded checksums)."""
    manifest = info.get("manifest")
    if manifest is None:
        return None
    if manifest.get("checksum") != ALGORITHM or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{checkpoint / 'complete.json'}: manifest with checksum {manifest.get('checksum')!r} "
                        f"(this megacpt verifies {ALGORITHM!r} manifests)")
    return manifest
