"""Load a GPT-NeoX from an HF dir or a megacpt checkpoint; HF <-> megacpt conversion (``hf_gpt_neox``).

- ``load_model(path, dtype, device) -> (GPTNeoX, ModelConfig)``: single process, eval mode. ``path`` is an
  HF GPT-NeoX dir (config.json + safetensors) or a megacpt checkpoint (root with ``latest``, or one
  ``iter_XXXXXXX`` dir). Weights stream in one tensor (HF) or one DCP read (megacpt) at a time into a model
  built on the meta device, so only one copy of the weights is ever in memory. A checkpoint's files are
  checked against the sizes and checksums its save recorded first (``megacpt.checkpoint.integrity``).
- ``load_weights(model, path, layer_offset=0)``: the same weights into an existing, possibly parallelized
  model (DTensor TP, FSDP2, a pipeline stage) - what ``train`` uses for ``init_from``. Collective.
- ``find_tokenizer(path) -> str | None``: the tokenizer shipped with a model dir or checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megacpt.checkpoint import is_checkpoint, load_checkpoint, read_model_config, resolve_checkpoint, shift_layers
from megacpt.config import ModelConfig
from megacpt.convert.hf_gpt_neox import find_hf_tokenizer, hf_state_dict, pad_vocab, read_hf_config
from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX


def _kind(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"model {p}: not found")
    if is_checkpoint(p) or p.name.endswith(".tmp"):
        return "megacpt"
    if (p / "config.json").is_file():
        return "hf"
    raise UserError(f"model {p}: neither an HF model dir (config.json) nor a megacpt checkpoint "
                    "(a root with 'latest' or an iter_XXXXXXX dir)")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF dir or a megacpt checkpoint, without loading weights."""
    if _kind(path) == "hf":
        return read_hf_config(path)[1]
    return read_model_config(path)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               allow_pickle: bool = False):
    """-> (GPTNeoX in eval mode, ModelConfig). See the module docstring."""
    kind = _kind(path)
    cfg = load_config(path)
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty materialises each parameter on its own: tie again
        model.embed_out.weight = model.embed_in.weight
    params = model.state_dict()
    if kind == "hf":
        with torch.no_grad():
            for name, t in hf_state_dict(path, cfg, allow_pickle=allow_pickle):
                params[name].copy_(t)
    else:
        load_checkpoint(path, model, strict=True)
    return model.eval(), cfg


def load_weights(model: torch.nn.Module, path: str | os.PathLike, layer_offset: int = 0,
                 allow_pickle: bool = False) -> None:
    """Load HF or megacpt weights into ``model`` at its current layout (call on every rank)."""
    if _kind(path) == "megacpt":
        load_checkpoint(path, model, layer_offset=layer_offset, strict=True)
        return
    # lazy: torch.distributed.checkpoint costs ~1 s to import (megacpt/checkpoint/unpickler.py)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                          set_model_state_dict)

    # local (maybe DTensor) entries this rank owns, by their global name
    own = {shift_layers(k, layer_offset): (k, v) for k, v in get_model_state_dict(model).items()}
    full = {}
    for name, t in hf_state_dict(path, allow_pickle=allow_pickle, names=set(own)):
        local, target = own[name]
        if t.shape[0] != target.shape[0] and name in ("embed_in.weight", "embed_out.weight"):
            t = pad_vocab(t, target.shape[0], name)  # the model pads the vocab further (e.g. for tp)
        if tuple(t.shape) != tuple(target.shape):
            raise UserError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the model expects "
                            f"{list(target.shape)}")
        full[local] = t.to(target.dtype)
    loaded = {g for g, (local, _) in own.items() if local in full}
    if "embed_out.weight" in own and "embed_out.weight" not in loaded and "embed_in.weight" in loaded:
        full[own["embed_out.weight"][0]] = full[own["embed_in.weight"][0]]  # tied: HF stores only embed_in
        loaded.add("embed_out.weight")
    missing = sorted(set(own) - loaded)
    if missing:
        raise UserError(f"{path}: no weights for {missing[:5]}")
    # full tensors -> each rank's DTensor/FSDP shard
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))


def find_tokenizer(path: str | os.PathLike) -> str | None:
    """The tokenizer dir shipped with an HF model dir or a megacpt checkpoint (None if there is none)."""
    if _kind(path) == "hf":
        return find_hf_tokenizer(path)
    tok = resolve_checkpoint(path) / "tokenizer"
    return str(tok) if tok.is_dir() else None


__all__ = ["load_model", "load_weights", "load_config", "find_tokenizer"]
