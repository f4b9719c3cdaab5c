"""A CPU stand-in for the slice of ``transformer_engine.pytorch`` that ``model.impl=te`` uses, for testing
our side of the contract where TE cannot run (no CUDA): the constructor signatures, the parameter names and
registration order, TE's ``register_parameter(name, param, **init_kwargs)`` override, ``_extra_state``
(TE's fp8 metadata) and the tensor layouts (bshd attention, output [b, s, h*d], mask True = masked out).

The math is plain torch in the same precision as the torch path, so the torch and TE implementations of the
model must agree to float rounding here; whether the real TE kernels agree within bf16 tolerance is what
the ``gpu``-marked tests in tests/model/test_te.py check on a GPU with TE installed. TE's "gelu" is the
tanh approximation (transformer_engine/common/util/math.h), reproduced here.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class _Base(nn.Module):
    """TE's TransformerEngineBaseModule: records init metadata per parameter, carries fp8 extra state."""

    def __init__(self):
        super().__init__()
        self.param_init_meta = {}
        self.fp8_meta = {"amax_history": torch.zeros(4)}

    def register_parameter(self, name, param, **kwargs):
        super().register_parameter(name, param)
        if name not in self.param_init_meta:
            self.param_init_meta[name] = kwargs

    def get_extra_state(self):
        return self.fp8_meta["amax_history"].clone()

    def set_extra_state(self, state):
        self.fp8_meta["amax_history"] = state


def _p(*shape, device=None):
    return nn.Parameter(torch.empty(*shape, device=device))


def _linear_params(mod, in_features, out_features, bias, device):
    """TE's ``weight`` [out, in] and ``bias`` [out] (an empty plain tensor without bias, as TE does)."""
    mod.register_parameter("weight", _p(out_features, in_features, device=device), init_fn="normal")
    if bias:
        mod.register_parameter("bias", _p(out_features, device=device), init_fn="zeros")
    else:
        mod.bias = torch.Tensor()


class LayerNormLinear(_Base):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, device="cuda", **kw):
        super().__init__()
        self.eps = eps
        self.register_parameter("layer_norm_weight", _p(in_features, device=device), init_fn="ones")
        self.register_parameter("layer_norm_bias", _p(in_features, device=device), init_fn="zeros")
        _linear_params(self, in_features, out_features, bias, device)

    def forward(self, x):
        y = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return F.linear(y, self.weight, self.bias if self.bias.numel() else None)


class Linear(_Base):
    def __init__(self, in_features, out_features, bias=True, device="cuda", **kw):
        super().__init__()
        _linear_params(self, in_features, out_features, bias, device)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias if self.bias.numel() else None)


class LayerNormMLP(_Base):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, bias=True, activation="gelu", device="cuda", **kw):
        super().__init__()
        if activation not in _ACT:
            raise NotImplementedError(f"Activation type {activation} is not supported!")
        self.eps, self.activation = eps, activation
        self.register_parameter("layer_norm_weight", _p(hidden_size, device=device))
        self.register_parameter("layer_norm_bias", _p(hidden_size, device=device))
        self.register_parameter("fc1_weight", _p(ffn_hidden_size, hidden_size, device=device))
        self.register_parameter("fc1_bias", _p(ffn_hidden_size, device=device))
        self.register_parameter("fc2_weight", _p(hidden_size, ffn_hidden_size, device=device))
        self.register_parameter("fc2_bias", _p(hidden_size, device=device))

    def forward(self, x):
        y = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return F.linear(_ACT[self.activation](F.linear(y, self.fc1_weight, self.fc1_bias)), self.fc2_weight,
                        self.fc2_bias)


class DotProductAttention(nn.Module):
    def __init__(self, num_attention_heads, kv_channels, attention_dropout=0.0, qkv_format="sbhd",
                 attn_mask_type="causal", **kw):
        super().__init__()
        assert qkv_format == "bshd" and attention_dropout == 0.0
        self.attn_mask_type = attn_mask_type
        self.calls = []

    def forward(self, q, k, v, attention_mask=None, attn_mask_type=None, checkpoint_core_attention=False):
        mt = attn_mask_type or self.attn_mask_type
        self.calls.append((mt, checkpoint_core_attention))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))                        # [b, nh, s, hd]
        if mt == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            assert mt == "arbitrary" and attention_mask is not None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask)  # TE: True = masked out
        b, nh, s, hd = out.shape
        return out.transpose(1, 2).reshape(b, s, nh * hd)


AUTOCAST_CALLS: list = []


@contextlib.contextmanager
def autocast(enabled=True, recipe=None, amax_reduction_group=None, **kw):
    AUTOCAST_CALLS.append((enabled, recipe, amax_reduction_group))
    yield


recipe = types.SimpleNamespace(
    Format=types.SimpleNamespace(HYBRID="HYBRID"),
    DelayedScaling=lambda **kw: ("DelayedScaling", tuple(sorted(kw.items()))),
)
