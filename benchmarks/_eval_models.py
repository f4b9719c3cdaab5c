"""Shared setup of the eval benchmarks: one random-weight GPT-NeoX as both an HF model and a megacpt
model (same weights). Their tokenizer is ``id_tokenizer``: text is space-separated token ids (EOD = 0)."""
from __future__ import annotations

import tempfile


def hf_and_megacpt(preset: str):
    """(cfg, HF GPTNeoXForCausalLM, megacpt GPTNeoX) with identical random weights. The megacpt model's
    vocab_size is the padded row count: this random HF model has no padding rows, so both softmaxes
    (and argmaxes) range over the same rows."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megacpt.convert import load_model
    from megacpt.model.hf_config import hf_config_from_model_config
    from megacpt.model.presets import PRESETS

    cfg = PRESETS[preset]
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config_from_model_config(cfg))).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = load_model(d)
    model.cfg.vocab_size = cfg.padded_vocab()
    return cfg, hf, model


def id_tokenizer(vocab_size: int):
    """Text is space-separated token ids, id 0 is EOD: megacpt's NullTokenizer (Megatron-LM main's convention)."""
    from megacpt.data.tokenizer import NullTokenizer

    return NullTokenizer(vocab_size, eod_id=0)
