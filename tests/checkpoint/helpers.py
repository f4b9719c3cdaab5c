"""A tiny GPTNeoX + AdamW with a deterministic, layout-independent "training step".

The step's gradient is an elementwise function of the parameter (``0.1 * p + 0.01``), so a sharded model
(DTensor TP, FSDP2, a pipeline stage) and the single-process model take bit-identical steps: the
checkpoint tests compare states across layouts exactly, without depending on the forward pass.
"""
from __future__ import annotations

import torch

from megacpt.config import ModelConfig

CFG = dict(vocab_size=250, hidden_size=32, num_layers=4, num_heads=4, make_vocab_size_divisible_by=64)


def model_config() -> ModelConfig:
    return ModelConfig(**CFG).validate()


def build(seed: int = 0):
    from megacpt.model.gpt_neox import GPTNeoX

    torch.manual_seed(seed)
    return GPTNeoX(model_config())


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


@torch.no_grad()
def fake_step(params, opt) -> None:
    for p in params:
        p.grad = p.detach() * 0.1 + 0.01
    opt.step()
    opt.zero_grad(set_to_none=True)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def named_state(model, opt) -> dict[str, torch.Tensor]:
    """{param name: full value} and {param name + '.' + state key: full value} for comparisons."""
    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[n] = full(p.detach()).clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}.{k}"] = full(v).clone()
    return out


def assert_states_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def reseal(ck) -> None:
    """Record every file's current size and CRC-32 in ``complete.json``: a hand edit that also rewrote the
    manifest (or a crafted checkpoint), so that a test reaches the checks behind the manifest."""
    import json
    import zlib
    from pathlib import Path

    ck = Path(ck)
    info = json.loads((ck / "complete.json").read_text())
    info["manifest"]["files"] = {
        p.relative_to(ck).as_posix(): {"size": len(p.read_bytes()), "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
        for p in sorted(ck.rglob("*")) if p.is_file() and p.name != "complete.json"}
    (ck / "complete.json").write_text(json.dumps(info))
