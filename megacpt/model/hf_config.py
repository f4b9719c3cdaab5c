"""``ModelConfig`` <-> HF ``GPTNeoXConfig`` fields (config.json), for old and new transformers.

transformers < 5 stores the rotary fraction/base as ``rotary_pct`` / ``rotary_emb_base``; 5.x stores
them in ``rope_parameters`` (``partial_rotary_factor``, ``rope_theta``; older 4.x had ``rope_scaling``).
HF's ``vocab_size`` is the embedding row count, i.e. our padded vocab.
"""
from __future__ import annotations

from megacpt.config import ModelConfig
from megacpt.errors import InputError


def model_config_from_hf(d: dict, vocab_size: int | None = None, path: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an HF config dict read from ``path`` (named in errors). ``vocab_size``: the
    real tokenizer vocab when known (else HF's vocab_size, i.e. no padding rows are assumed)."""
    if d.get("model_type", "gpt_neox") != "gpt_neox":
        raise InputError(path, None, f"model_type {d.get('model_type')!r} is not gpt_neox")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise InputError(path, None, f"rope type {rope_type!r} is not supported (only default rotary)")
    rotary_pct = rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))
    try:
        hf_vocab = int(d["vocab_size"])
        cfg = ModelConfig(
            vocab_size=vocab_size if vocab_size is not None else hf_vocab,
            padded_vocab_size=hf_vocab,
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d.get("intermediate_size") or 4 * int(d["hidden_size"])),
            rotary_pct=float(rotary_pct),
            rotary_base=float(rotary_base),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            layernorm_eps=float(d.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(d.get("use_parallel_residual", True)),
            attention_bias=bool(d.get("attention_bias", True)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise InputError(path, None, f"missing field {e.args[0]!r}") from None
    return cfg.validate()


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """An HF config.json dict (written with both the old and the new rotary field names)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.padded_vocab(),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_pct},
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": cfg.layernorm_eps,
        "use_parallel_residual": cfg.use_parallel_residual,
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
