"""Consolidated weights: full (unsharded) tensors of a checkpoint read in one process, in groups.

What export (``megacpt convert megacpt-to-hf``) and tests use to stream a large model without a process
group: only the requested tensors are materialised.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from megacpt.checkpoint.distributed import quiet_single_process
from megacpt.checkpoint.files import resolve_checkpoint
from megacpt.checkpoint.integrity import verify
from megacpt.checkpoint.unpickler import safe_reader
from megacpt.errors import UserError


def checkpoint_tensors(path: str | os.PathLike, prefix: str = "model.") -> dict[str, tuple[tuple, torch.dtype]]:
    """name (without prefix) -> (global shape, dtype) of the tensors stored in a checkpoint dir.

    Verifies the checkpoint's files first (``integrity.verify``, in this process: no process group is used).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # lazy: see unpickler.py

    ck = resolve_checkpoint(path)
    if not (ck / ".metadata").is_file():
        raise UserError(f"checkpoint {ck}: no .metadata (not a DCP checkpoint, or damaged)")
    verify(ck)
    md = safe_reader(ck).read_metadata()
    return {k[len(prefix):]: (tuple(v.size), v.properties.dtype)
            for k, v in md.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def read_tensors(path: str | os.PathLike, names: Sequence[str], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors ``names`` of a checkpoint, in one process, in their stored dtype.

    Reads only what is asked, so callers stream a large model in groups of tensors.
    """
    import torch.distributed.checkpoint as dcp  # lazy: see unpickler.py

    ck = resolve_checkpoint(path)
    meta = checkpoint_tensors(ck, prefix)
    missing = [n for n in names if n not in meta]
    if missing:
        raise UserError(f"checkpoint {ck}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    sd = {prefix + n: torch.empty(meta[n][0], dtype=meta[n][1]) for n in names}
    with quiet_single_process():
        dcp.load(sd, storage_reader=safe_reader(ck), no_dist=True)
    return {n: sd[prefix + n] for n in names}
