"""JSON with tensors: how a checkpoint stores every non-tensor value (extras, optimizer hyper-parameters)
without pickle. Tensors are raw bytes in base64 (``{"__tensor__": {dtype, shape, data}}``), tuples are
``{"__tuple__": [...]}``, so the round trip is exact and loading never runs code."""
from __future__ import annotations

import base64
from typing import Any

import torch

from megacpt.errors import UserError


def to_jsonable(obj: Any, where: str = "extra") -> Any:
    """Encode ``obj`` (dict/list/tuple/scalars/None/tensors) as JSON-able data; tensors as raw bytes."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "full_tensor"):  # gathering it here (rank 0 only) would hang the other ranks
            raise UserError(f"{where}: a DTensor; put its .full_tensor() (or local shard) in extras")
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "data": base64.b64encode(raw).decode("ascii")}}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: key {k!r} is not a string (checkpoint extras are saved as JSON)")
            out[k] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return obj.item()
    raise UserError(f"{where}: {type(obj).__name__} cannot be saved in a checkpoint "
                    "(use JSON-able values or tensors; nothing is pickled)")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj and len(obj) == 1:
            d = obj["__tensor__"]
            dtype = getattr(torch, d["dtype"])
            raw = bytearray(base64.b64decode(d["data"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(d["shape"]).clone()
        if "__tuple__" in obj and len(obj) == 1:
            return tuple(from_jsonable(v) for v in obj["__tuple__"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj

