"""Checking a checkpoint against the manifest its save recorded (``complete.json``; see ``checksum.py``).

What is checked, and when:

- `verify` compares every file of the manifest with the disk: first its size (a stat: any truncation, in the
  weights or in the optimizer state, is found without reading anything), then its CRC-32, reading the whole
  file. The first mismatch is one line: ``checkpoint C is damaged (FILE: expected X, found Y)``.
- Every reader of tensors verifies *all* files of the checkpoint first: ``load_checkpoint`` (train resume,
  ``load_model`` for score/eval, ``load_weights`` for ``init_from``) and ``weights.py`` (``convert
  megacpt-to-hf``). A weights-only load checks the optimizer state's bytes too: damage anywhere means the
  save or the storage failed, and a reader that skips those bytes must not be the one that hides it.
- Cost: one extra sequential read of the checkpoint (CRC-32 runs at ~4 GB/s per core, so the disk is the
  bound). Under a process group the files are dealt out over the ranks (rank r hashes files r, r+world, ...)
  and the findings all-gathered, so the checkpoint is read once in all, not once per rank. Each process
  remembers what it verified (path, size, mtime, checksum; files written in the last 2 s are not
  remembered, so a later write always shows in the mtime): loading the same checkpoint again (pipeline
  chunks, export's groups of tensors) costs a stat per file.
- ``checksums=False`` checks sizes only: what ``train`` does before any process group exists, and how the
  previous complete checkpoint to offer is chosen (`previous_checkpoint`).
- A checkpoint without a manifest (saved before megacpt recorded checksums) still loads, with a one-line note
  that it cannot be verified; its DCP shards are checked against ``.metadata`` (every stored item lies
  inside its file), which finds truncation.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megacpt.checkpoint.checksum import (ALGORITHM, DamagedCheckpoint, crc_problem, file_crc32, manifest_of,
                                         size_problem)
from megacpt.checkpoint.distributed import is_distributed, rank, world_size
from megacpt.checkpoint.files import COMPLETE, iteration_of, list_checkpoints, read_json, resolve_checkpoint
from megacpt.checkpoint.unpickler import safe_reader
from megacpt.errors import UserError

log = logging.getLogger(__name__)

_VERIFIED: set[tuple[str, int, int, str]] = set()   # (path, size, mtime_ns, crc32) this process checked
# A file is remembered only if its mtime is older than this when it is checked: a later write then always
# changes its mtime, even on filesystems whose timestamps are coarse (git's "racy clean" rule).
_SETTLED_NS = 2_000_000_000
_NOTED: set[str] = set()                             # manifest-less checkpoints already noted


@dataclass
class Verified:
    path: Path
    files: int
    bytes: int
    manifest: bool      # False: no manifest (an older megacpt); only sizes against .metadata were checked

    def line(self) -> str:
        if not self.manifest:
            return (f"UNVERIFIED {self.path}: no manifest (saved before megacpt recorded checksums); "
                    f"{self.files} DCP shard(s) hold every item .metadata lists, nothing more can be checked")
        return f"OK {self.path}: {self.files} files, {self.bytes:,} bytes, sizes and {ALGORITHM} match"


def verify(ck: Path, info: dict | None = None, *, checksums: bool = True, collective: bool = False,
           note: bool = True) -> Verified:
    """Check the files of the (resolved) checkpoint dir ``ck``; raise `DamagedCheckpoint` on a mismatch.

    ``collective``: call on every rank of the process group; the checksums are shared out over the ranks.
    ``note``: log (once) that a checkpoint without a manifest cannot be verified (loaders do; the
    ``verify`` command prints its own line).
    """
    info = read_json(ck / COMPLETE) if info is None else info
    manifest = manifest_of(ck, info)
    wrong_size: list[tuple[str, str, str]] = []   # (file, expected, found): a wrong size says more, first
    wrong_crc: list[tuple[str, str, str]] = []
    if manifest is None:
        wrong_size, n_files = _layout_problems(ck)
        result = Verified(ck, n_files, 0, manifest=False)
        if note and rank() == 0 and str(ck) not in _NOTED:
            _NOTED.add(str(ck))
            log.warning("checkpoint %s has no manifest (saved before megacpt recorded checksums): its files "
                        "cannot be verified", ck)
    else:
        files = sorted(manifest["files"].items())
        stats = {}
        for rel, entry in files:
            try:
                st = os.stat(ck / rel)
            except FileNotFoundError:
                st = None
            p = size_problem(rel, entry, None if st is None else st.st_size)
            if p is not None:
                wrong_size.append(p)
            else:
                stats[rel] = st
        if checksums:
            share, me = (world_size(), rank()) if collective else (1, 0)
            for i, (rel, entry) in enumerate(files):
                if i % share != me or rel not in stats:
                    continue
                key = (str(ck / rel), stats[rel].st_size, stats[rel].st_mtime_ns, entry[ALGORITHM])
                if key in _VERIFIED:
                    continue
                settled = stats[rel].st_mtime_ns < time.time_ns() - _SETTLED_NS
                p = crc_problem(rel, entry, file_crc32(ck / rel))
                if p is not None:
                    wrong_crc.append(p)
                elif settled:
                    _VERIFIED.add(key)
        result = Verified(ck, len(files), sum(e["size"] for _, e in files), manifest=True)
    if collective and is_distributed():
        gathered: list = [None] * world_size()
        dist.all_gather_object(gathered, (wrong_size, wrong_crc))
        wrong_size = list(dict.fromkeys(p for g in gathered for p in g[0]))
        wrong_crc = sorted(set(p for g in gathered for p in g[1]))
    if wrong_size or wrong_crc:
        raise DamagedCheckpoint(ck, wrong_size + wrong_crc)
    return result


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> Verified:
    """`verify` a checkpoint root (follows ``latest``) or iteration dir, in this process."""
    return verify(resolve_checkpoint(path), checksums=checksums)


def _layout_problems(ck: Path) -> tuple[list[tuple[str, str, str]], int]:
    """Without a manifest: does every item ``.metadata`` lists lie inside its shard file?"""
    if not (ck / ".metadata").is_file():
        return [(".metadata", "a file", "no such file")], 0
    md = safe_reader(ck).read_metadata()
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, end in sorted(ends.items()):
        size = os.stat(ck / rel).st_size if (ck / rel).is_file() else None
        if size is None:
            problems.append((rel, f"at least {end} bytes (.metadata)", "no such file"))
        elif size < end:
            problems.append((rel, f"at least {end} bytes (.metadata)", f"{size} bytes"))
    return problems, len(ends)


def previous_checkpoint(damaged: Path) -> Path | None:
    """The newest complete checkpoint before ``damaged`` in its root whose files have their recorded sizes."""
    before = iteration_of(damaged)
    if before is None:
        return None
    for p in reversed(list_checkpoints(damaged.parent)):
        if iteration_of(p) >= before:
            continue
        try:
            verify(p, checksums=False)
        except UserError:
            continue
        return p
    return None
