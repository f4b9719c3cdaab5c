"""Global, layout-independent names of a model's and optimizer's state (``model.<fqn>``, ``optim.<key>``).

DTensor (TP) and FSDP2 shards are named by their parameter's global name and saved by their global shape;
a pipeline stage numbering its layers from 0 shifts ``layers.{local}.`` to ``layers.{local + offset}.``.
So the same names come out of every layout, and DCP reshards on load.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from megacpt.errors import UserError

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def shift_layers(key: str, offset: int) -> str:
    """``layers.{i}.`` -> ``layers.{i + offset}.`` (a pipeline stage's local name -> the global name)."""
    if not offset:
        return key
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", key, count=1)


def is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def state_items(models: list[nn.Module], optimizers: list, offsets: list[int]) -> list[tuple[str, Any, int, str]]:
    """(global key, value, owner, local key) of model params/buffers (owner: model chunk index) and of the
    flattened optimizer state (owner: optimizer index)."""
    from torch.distributed.checkpoint.state_dict import (  # lazy: DCP is slow to import (see unpickler.py)
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    items: list[tuple[str, Any, int, str]] = []
    for i, m in enumerate(models):
        sd = m if isinstance(m, Mapping) else get_model_state_dict(m)  # a plain {name: tensor} is accepted
        for k, v in sd.items():
            items.append((f"model.{shift_layers(k, offsets[i])}", v, i, k))
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    shared = len(optimizers) == 1 and len(models) > 1  # one optimizer over all chunks of a pipeline rank
    for j, opt in enumerate(optimizers):
        owner = nn.ModuleList(models) if shared else models[j]
        for k, v in get_optimizer_state_dict(owner, opt, options=opts).items():
            # "state.layers.3.mlp...exp_avg", "param_groups.layers.3.mlp...lr" ("state.<chunk>.layers..." if shared)
            head, _, rest = k.partition(".")
            chunk = j
            if shared:
                c, _, rest = rest.partition(".")
                chunk = int(c)
            items.append((f"optim.{head}.{shift_layers(rest, offsets[chunk])}", v, j, k))
    seen: dict[str, tuple] = {}
    for key, _, i, local in items:
        if key in seen and seen[key] != (i, local):
            raise UserError(f"checkpoint: {key!r} comes from two model chunks; give each pipeline chunk its "
                            "global first-layer index as layer_offset")
        seen[key] = (i, local)
    return items


def normalize(models, optimizers, layer_offset) -> tuple[list[nn.Module], list, list[int]]:
    if hasattr(models, "parts") and not isinstance(models, nn.Module):  # megacpt.parallel.pipeline.Pipeline
        models = list(models.parts)
    models = [models] if isinstance(models, (nn.Module, Mapping)) else as_list(models)
    optimizers = as_list(optimizers)
    offsets = as_list(layer_offset) if isinstance(layer_offset, (list, tuple)) else [layer_offset] * len(models)
    if len(offsets) != len(models):
        raise UserError(f"checkpoint: {len(models)} model chunk(s) but {len(offsets)} layer_offset value(s)")
    if optimizers and any(isinstance(m, Mapping) for m in models):
        raise UserError("checkpoint: an optimizer needs the nn.Module it optimizes, not a plain state dict")
    if len(optimizers) > 1 and len(optimizers) != len(models):
        raise UserError(f"checkpoint: {len(models)} model chunk(s) need one optimizer each, or one for all; "
                        f"got {len(optimizers)}")
    return models, optimizers, [int(o) for o in offsets]

