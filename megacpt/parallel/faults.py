"""A peer that is gone or silent, as the collectives of gloo, nccl and the c10d store report it.

Every multi-process command (``train``, ``score perplexity``) turns such an exception into one line that says
what happened and how to resume, instead of a backend traceback; any other exception is this rank's own fault
and is raised as it is.
"""
from __future__ import annotations

import re

import torch.distributed as dist

# how gloo, nccl and the c10d store word a peer that is gone (a closed or reset socket) or silent (a timeout)
_PEER_FAILURE_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                       "timeout", "connection refused", "communicator was aborted", "remote process exited")


def is_peer_failure(e: BaseException) -> bool:
    """Whether a collective's exception means another rank is gone or silent, not a fault of this rank."""
    if isinstance(e, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_FAILURE_WORDS)


def failure_reason(e: BaseException) -> str:
    """The backend's first sentence, without its source location: "Connection closed by peer [host]:port"."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
    return reason.split(". ")[0][:240]
