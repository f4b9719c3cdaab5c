"""Logits parity with HF ``GPTNeoXForCausalLM`` (fp32, 1e-5) on random tiny configs."""
from __future__ import annotations

import pytest
import torch

from megacpt.config import ModelConfig
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.model.hf_config import hf_config_from_model_config, model_config_from_hf

import transformers

CONFIGS = [
    # odd vocab (no padding rows), parallel residual, Pythia's 25% rotary
    dict(vocab_size=997, make_vocab_size_divisible_by=1, hidden_size=64, num_layers=2, num_heads=4,
         rotary_pct=0.25, use_parallel_residual=True),
    # sequential residual, half rotary, a different base, padded vocab (HF's vocab = our padded rows)
    dict(vocab_size=1001, make_vocab_size_divisible_by=64, hidden_size=48, num_layers=3, num_heads=3,
         rotary_pct=0.5, rotary_base=500.0, use_parallel_residual=False),
    # full rotary, odd head count, non-4x MLP, tanh GELU
    dict(vocab_size=313, make_vocab_size_divisible_by=1, hidden_size=40, num_layers=2, num_heads=5,
         rotary_pct=1.0, intermediate_size=72, hidden_act="gelu_new", use_parallel_residual=True),
]


def hf_model(cfg: ModelConfig):
    hf_cfg = transformers.GPTNeoXConfig(**hf_config_from_model_config(cfg))
    hf_cfg._attn_implementation = "eager"
    return transformers.GPTNeoXForCausalLM(hf_cfg).eval()


def copy_hf_into(model: GPTNeoX, hf) -> None:
    """The name map: strip ``gpt_neox.``; HF's in-memory ``lm_head`` is ``embed_out`` on disk and here."""
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith("attention.bias") or k.endswith("attention.masked_bias") or "rotary_emb" in k:
            continue
        k = k.removeprefix("gpt_neox.")
        sd["embed_out.weight" if k == "lm_head.weight" else k] = v
    missing, unexpected = model.load_state_dict(sd, strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_logits_match_hf(idx):
    torch.manual_seed(idx)
    cfg = ModelConfig(**CONFIGS[idx]).validate()
    hf = hf_model(cfg)
    # HF's post_init gives zero biases / unit LayerNorms: randomise everything so each term is tested
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    model = GPTNeoX(cfg).eval()
    copy_hf_into(model, hf)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = model(ids)
        pos = torch.arange(5, 22).expand(3, 17)  # explicit, shifted positions
        ref_pos = hf(input_ids=ids, position_ids=pos).logits
        out_pos = model(ids, position_ids=pos)
    assert out.shape == (3, 17, cfg.padded_vocab())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_pos, ref_pos, rtol=0, atol=1e-5)
    # hidden_states is the trunk the fused loss / scoring pass uses with embed_out.weight
    torch.testing.assert_close(model.hidden_states(ids) @ model.embed_out.weight.T, out, rtol=0, atol=1e-5)


def test_hf_config_field_names_old_and_new():
    new = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0,
                                                         "partial_rotary_factor": 0.5}}
    old = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "rotary_pct": 0.5, "rotary_emb_base": 20000.0}
    for d in (new, old):
        cfg = model_config_from_hf(d, vocab_size=50277)
        assert (cfg.rotary_pct, cfg.rotary_base, cfg.vocab_size, cfg.padded_vocab()) == (0.5, 20000.0, 50277, 50304)
    # our exported dict round-trips through the installed transformers' GPTNeoXConfig
    cfg = ModelConfig(**CONFIGS[1]).validate()
    hf_cfg = transformers.GPTNeoXConfig(**hf_config_from_model_config(cfg)).to_dict()
    back = model_config_from_hf(hf_cfg, vocab_size=cfg.vocab_size)
    for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "rotary_pct", "rotary_base",
              "use_parallel_residual", "vocab_size"):
        assert getattr(back, f) == getattr(cfg, f), f
    assert back.padded_vocab() == cfg.padded_vocab()


def test_hf_config_rejects_other_architectures():
    from megacpt.errors import InputError

    with pytest.raises(InputError, match="model_type"):
        model_config_from_hf({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(InputError, match="num_hidden_layers"):
        model_config_from_hf({"model_type": "gpt_neox", "vocab_size": 10, "hidden_size": 8,
                              "num_attention_heads": 2})
