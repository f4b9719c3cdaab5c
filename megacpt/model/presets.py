"""Named model shapes. Pythia numbers are from each model's HF ``config.json`` (EleutherAI/pythia-*,
revision main) and agree with Table 1 of Biderman et al., "Pythia" (arXiv 2304.01373). All Pythia
models share: rotary on 25% of head dims (base 10000), parallel residual, GELU, 4x MLP, untied
embeddings, LayerNorm eps 1e-5, 2048 positions, tokenizer vocab 50,277 (``padded_vocab_size`` is the
embedding row count of the released checkpoints, which differs by model).

The tiny presets are ours, for CPU tests and the toy-scale reproduction; their vocab is a placeholder
that the caller replaces with the locally trained tokenizer's ``vocab_size``.
"""
from __future__ import annotations

import dataclasses

from megacpt.config import ModelConfig
from megacpt.errors import UserError


def _pythia(hidden: int, layers: int, heads: int, padded_vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=50277, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=4 * hidden, rotary_pct=0.25, rotary_base=10000.0,
                       max_position_embeddings=2048, layernorm_eps=1e-5, use_parallel_residual=True,
                       padded_vocab_size=padded_vocab)


PRESETS: dict[str, ModelConfig] = {
    # name: (hidden, layers, heads, embedding rows) -- EleutherAI/pythia-<size>/config.json
    "pythia-70m": _pythia(512, 6, 8, 50304),
    "pythia-160m": _pythia(768, 12, 12, 50304),
    "pythia-410m": _pythia(1024, 24, 16, 50304),
    "pythia-1b": _pythia(2048, 16, 8, 50304),
    "pythia-1.4b": _pythia(2048, 24, 16, 50304),
    "pythia-2.8b": _pythia(2560, 32, 32, 50304),
    "pythia-6.9b": _pythia(4096, 32, 32, 50432),
    "pythia-12b": _pythia(5120, 36, 40, 50688),
    # ours: unit tests (~0.2M params with vocab 1000)
    "tiny": ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, rotary_pct=0.25,
                        max_position_embeddings=256, make_vocab_size_divisible_by=8),
    # ours: toy-scale DACP reproduction, ~3.2M params without embeddings (4L/256H/4 heads, Pythia layout)
    "toy-4m": ModelConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, rotary_pct=0.25,
                          max_position_embeddings=512),
    # ours: a larger toy, ~10.6M params without embeddings (6L/384H/6 heads)
    "toy-11m": ModelConfig(vocab_size=16384, hidden_size=384, num_layers=6, num_heads=6, rotary_pct=0.25,
                           max_position_embeddings=1024),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A fresh copy of a preset, with field overrides (e.g. ``vocab_size`` of a local tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"model.preset: unknown {name!r}; known: {', '.join(PRESETS)}")
    try:
        return dataclasses.replace(PRESETS[name], **overrides).validate()
    except TypeError as e:
        raise UserError(f"model: bad override for preset {name!r}: {e}") from None
