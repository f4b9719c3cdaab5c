"""Tiny HF GPT-NeoX dirs with random weights (every tensor randomised, biases and LayerNorms included)."""
from __future__ import annotations

from pathlib import Path

import torch

# HF GPTNeoXConfig kwargs; odd vocab sizes so vocab padding is exercised
HF_CONFIGS = [
    dict(vocab_size=997, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
         rotary_pct=0.25, use_parallel_residual=True),
    dict(vocab_size=1001, hidden_size=48, num_hidden_layers=4, num_attention_heads=6, intermediate_size=96,
         rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False),
    dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
         rotary_pct=1.0, hidden_act="gelu_new", use_parallel_residual=True),
]


def make_hf_dir(path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    import transformers

    kw = {**HF_CONFIGS[0], **overrides}
    cfg = transformers.GPTNeoXConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(str(path))
    return Path(path)


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.GPTNeoXForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # compare bits (0.0 vs -0.0 and NaN payloads count)
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k
