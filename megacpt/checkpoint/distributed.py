"""Collective helpers of the checkpoint code; every one is a no-op without a process group."""
from __future__ import annotations

import contextlib
import warnings

import torch.distributed as dist

from megacpt.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_error(err: BaseException | None) -> None:
    """Raise on every rank if rank 0 failed (so no rank waits forever in the next collective)."""
    if not is_distributed():
        if err is not None:
            raise err
        return
    msg = [None if err is None else (isinstance(err, UserError), f"{type(err).__name__}: {err}", str(err))]
    dist.broadcast_object_list(msg, src=0)
    if err is not None:
        raise err
    if msg[0] is not None:
        user, typed, text = msg[0]
        if user:  # the user's to fix (e.g. another live job holds the save root): one line on every rank
            raise UserError(f"rank 0: {text}")
        raise RuntimeError(f"checkpoint: rank 0 failed: {typed}")


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. the name of a directory rank 0 created)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load ("assuming the intent is ..."): that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield

