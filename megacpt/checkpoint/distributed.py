"""Collective helpers of the checkpoint code; every one is a no-op without a process group."""
from __future__ import annotations

import contextlib
import warnings

import torch.distributed as dist


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
    msg = [f"{type(err).__name__}: {err}" if err is not None else None]
    dist.broadcast_object_list(msg, src=0)
    if err is not None:
        raise err
    if msg[0] is not None:
        raise RuntimeError(f"checkpoint: rank 0 failed: {msg[0]}")


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

