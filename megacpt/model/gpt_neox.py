"""A plain PyTorch GPT-NeoX (Pythia), numerically the same model as HF ``GPTNeoXForCausalLM``.

Parameter names equal HF's minus the ``gpt_neox.`` prefix (HF's on-disk ``embed_out`` name for the output
layer). Parallelism is applied from outside (``megacpt.parallel``); the code here stays TP-agnostic by
deriving the number of local heads from the width of the (possibly column-sharded) QKV output.

Two implementations of the layer, one set of parameters: ``Layer`` (plain torch, the reference) and
``TELayer`` (``model.impl=te``: transformer-engine's fused LayerNorm+Linear, Linear, LayerNorm+MLP and
attention kernels, optional fp8), whose parameters carry the same names (``fast_paths.TE_NAME_MAP``), so
checkpoints, the HF name map and parallelism are shared.

Shapes in comments: b batch, s sequence, H hidden, nh heads (local under TP), hd head dim, V padded vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megacpt.config import ModelConfig
from megacpt.errors import UserError
from megacpt.model import fast_paths

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    # HF's gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh approximation
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables [b, s, rotary_dim] (HF layout: the frequencies repeated twice, rotate-half style).

    Computed per call from the positions (no buffers), so meta-device init, pipeline stages and FSDP never
    have to carry or re-initialise rotary state; it is ``rotary_dim / 2`` exponentials per call.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [b, s, rotary_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotary on the first ``rotary_dim`` dims of each head. x [b, nh, s, hd] (``heads_dim=1``) or
    [b, s, nh, hd] (``heads_dim=2``); cos/sin [b, s, rotary_dim]."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)  # broadcast over heads
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def doc_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [b, 1, s, s], True = may attend: causal and within the same document."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [b, s, s]
    return (same_doc & causal).unsqueeze(1)


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each document start (Megatron's ``--reset-position-ids``). [b, s]."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the most recent document start at or before each position
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


@dataclass
class LayerCache:
    """One layer's key/value buffers [b, nh, max_len, hd] and the column the next tokens are written at."""

    k: torch.Tensor
    v: torch.Tensor
    start: int = 0


class KVCache:
    """Key/value cache for incremental decoding of a batch of left-padded sequences.

    ``valid`` [b, max_len] marks the columns that hold real tokens (left padding is never attended) and
    positions count real tokens only, so a left-padded row sees exactly what it would see unpadded.
    Filled by ``GPTNeoX.forward_cached``; single-process models only (no TP / pipeline stages).
    """

    def __init__(self, model: "GPTNeoX", batch: int, max_len: int):
        p = model.embed_out.weight
        nh = model.cfg.num_heads
        hd = model.cfg.head_dim
        self.layers = [LayerCache(torch.empty(batch, nh, max_len, hd, device=p.device, dtype=p.dtype),
                                  torch.empty(batch, nh, max_len, hd, device=p.device, dtype=p.dtype))
                       for _ in model.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)
        self.length = 0  # filled columns
        self.max_len = max_len


def attention_core(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   cache: "LayerCache | None", head_dim: int, backend: str) -> torch.Tensor:
    """qkv [b, s, nh*3*hd] -> context [b, s, nh*hd]: rotary + softmax(QK^T/sqrt(hd)) V (``Attention.core``)."""
    b, s, _ = qkv.shape
    qkv = qkv.view(b, s, -1, 3 * head_dim).transpose(1, 2)  # [b, nh, s, 3*hd]
    q, k, v = qkv.split(head_dim, dim=-1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        end = cache.start + s
        cache.k[:, :, cache.start:end] = k
        cache.v[:, :, cache.start:end] = v
        out = F.scaled_dot_product_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, -1)
    out = None
    if backend in ("auto", "flash") and mask is None:
        out = fast_paths.flash_attention(q, k, v, required=backend == "flash")
    if out is None:
        if backend == "flash":  # flash-attn has no document masks
            raise UserError("model.attention_backend=flash: flash-attn runs causal attention without a "
                            "document mask only (data.reset_attention_mask=false); use sdpa or auto")
        out = fast_paths.sdpa(q, k, v, backend, is_causal=mask is None, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, s, -1)  # [b, s, nh*hd]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.attention_backend = cfg.attention_backend
        # output rows laid out per head as [q_h, k_h, v_h] (HF / Megatron): a contiguous column split over tp
        # ranks therefore hands each rank whole heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.recompute_core = False  # selective activation checkpointing (Megatron "selective")

    def core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             mask: torch.Tensor | None, cache: "LayerCache | None" = None) -> torch.Tensor:
        """qkv [b, s, nh*3*hd] -> context [b, s, nh*hd]: rotary + softmax(QK^T/sqrt(hd)) V.

        With ``cache`` (generation) the new keys/values are written at columns [start, start + s) of the
        layer's buffers and the queries attend over columns [0, start + s) under ``mask`` [b, 1, s, start+s].
        """
        return attention_core(qkv, cos, sin, mask, cache, self.head_dim, self.attention_backend)

    def forward(self, x, cos, sin, mask, cache=None):
        qkv = self.query_key_value(x)  # [b, s, 3*H/tp]
        if self.recompute_core and self.training and torch.is_grad_enabled():
            ctx = torch.utils.checkpoint.checkpoint(self.core, qkv, cos, sin, mask, use_reentrant=False)
        else:
            ctx = self.core(qkv, cos, sin, mask, cache)
        return self.dense(ctx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise UserError(f"model.hidden_act: unknown {cfg.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = fast_paths.layer_norm(cfg.hidden_size, cfg.layernorm_eps, cfg.layernorm_backend)
        self.post_attention_layernorm = fast_paths.layer_norm(cfg.hidden_size, cfg.layernorm_eps,
                                                              cfg.layernorm_backend)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.recompute = False  # full activation checkpointing of this layer

    def _forward(self, x, cos, sin, mask, cache=None):
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, cache)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x, cos, sin, mask, cache=None):
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache)


# TE computes these activations itself (its "gelu" is the tanh approximation: transformer_engine/common/
# util/math.h); any other (Pythia's exact "gelu") runs in torch between two TE linears
_TE_ACTIVATIONS = {"gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu",
                   "silu": "silu"}


class TEAttention(nn.Module):
    """``model.impl=te`` attention: LayerNormLinear (input LayerNorm + QKV), rotary, DotProductAttention
    (TE picks its fused cuDNN / flash kernel), Linear (dense). Same parameters as ``Attention`` plus the
    input LayerNorm's (aliased to ``input_layernorm``, see ``fast_paths.TE_NAME_MAP``)."""

    def __init__(self, cfg: ModelConfig, te, device):
        super().__init__()
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.query_key_value = te.LayerNormLinear(h, 3 * h, eps=cfg.layernorm_eps, bias=cfg.attention_bias,
                                                  device=device)
        self.dense = te.Linear(h, h, bias=cfg.attention_bias, device=device)
        self.core_attention = te.DotProductAttention(cfg.num_heads, cfg.head_dim, attention_dropout=0.0,
                                                     qkv_format="bshd", attn_mask_type="causal")
        self.recompute_core = False  # selective recompute: TE's checkpoint_core_attention

    def forward(self, x, cos, sin, mask, cache=None):
        qkv = self.query_key_value(x)  # LayerNorm(x) @ W_qkv^T + b, one kernel pair      [b, s, 3H]
        if cache is not None:  # decoding: the torch core (TE's module keeps no KV cache); same math
            return self.dense(attention_core(qkv, cos, sin, mask, cache, self.head_dim, "sdpa"))
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, -1, 3 * self.head_dim).split(self.head_dim, dim=-1)  # [b, s, nh, hd] each
        q = apply_rotary(q, cos, sin, heads_dim=2).contiguous()
        k = apply_rotary(k, cos, sin, heads_dim=2).contiguous()
        # TE's mask convention is the opposite of ours: True = masked out
        kw = {} if mask is None else {"attention_mask": ~mask, "attn_mask_type": "arbitrary"}
        ctx = self.core_attention(q, k, v.contiguous(),
                                  checkpoint_core_attention=self.recompute_core and self.training, **kw)
        return self.dense(ctx)  # ctx [b, s, nh*hd]


class TEMLP(nn.Module):
    """``model.impl=te`` MLP, its LayerNorm fused in: one LayerNormMLP when TE computes the activation,
    else LayerNormLinear (fc1) + the torch activation + Linear (fc2) (Pythia's exact GELU)."""

    def __init__(self, cfg: ModelConfig, te, device):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        act = _TE_ACTIVATIONS.get(cfg.hidden_act)
        if act is not None:
            self.dense_h_to_4h = fast_paths.ParamHolder()   # fc1/fc2 parameters, under the torch names
            self.dense_4h_to_h = fast_paths.ParamHolder()
            self.fused = te.LayerNormMLP(h, f, eps=cfg.layernorm_eps, bias=True, activation=act, device=device)
            self.act = None
        else:
            if cfg.hidden_act not in _ACTIVATIONS:
                raise UserError(f"model.hidden_act: unknown {cfg.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
            self.dense_h_to_4h = te.LayerNormLinear(h, f, eps=cfg.layernorm_eps, bias=True, device=device)
            self.dense_4h_to_h = te.Linear(f, h, bias=True, device=device)
            self.fused = None
            self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):  # x: the residual stream; the MLP's LayerNorm runs inside
        if self.fused is not None:
            return self.fused(x)
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class TELayer(nn.Module):
    """``Layer`` on transformer-engine's fused modules. Parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))``:
    both branches read the same x, each through its own fused LayerNorm (LayerNormLinear for QKV,
    LayerNorm+fc1 for the MLP), so fusing the LayerNorms into the branches loses nothing; a sequential
    residual fuses ln2 into the MLP the same way on ``x + attn``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        te = fast_paths.transformer_engine()
        device = fast_paths.te_device()
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = fast_paths.ParamHolder()            # read by attention.query_key_value
        self.post_attention_layernorm = fast_paths.ParamHolder()   # read by the MLP's first module
        self.attention = TEAttention(cfg, te, device)
        self.mlp = TEMLP(cfg, te, device)
        fast_paths.alias_parameters(self)
        self.recompute = False

    def _forward(self, x, cos, sin, mask, cache=None):
        attn = self.attention(x, cos, sin, mask, cache)
        if self.use_parallel_residual:
            return x + attn + self.mlp(x)
        h = x + attn
        return h + self.mlp(h)

    def forward(self, x, cos, sin, mask, cache=None):
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache)


class GPTNeoX(nn.Module):
    """GPT-NeoX causal LM. ``model(input_ids [b, s]) -> logits [b, s, V_pad]``.

    Layers live in a ``ModuleDict`` keyed "0".."L-1": names read ``layers.{i}.…`` like HF, and a pipeline
    stage can drop the layers (and ``embed_in`` / ``final_layer_norm`` / ``embed_out``, set to None) it
    does not own while keeping the full model's parameter names.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        v_pad = cfg.padded_vocab()
        self.embed_in = nn.Embedding(v_pad, cfg.hidden_size)
        layer = TELayer if cfg.impl == "te" else Layer
        self.layers = nn.ModuleDict({str(i): layer(cfg) for i in range(cfg.num_layers)})
        self.final_layer_norm = fast_paths.layer_norm(cfg.hidden_size, cfg.layernorm_eps, cfg.layernorm_backend)
        self.embed_out = nn.Linear(cfg.hidden_size, v_pad, bias=False)
        if cfg.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight
        self.set_recompute(cfg.recompute_granularity)
        # >1 when tensor-parallel applies sequence parallelism: activations arrive as [b, s/tp, H]
        self.sequence_parallel_size = 1
        # forward() returns the final hidden states [b, s, H] instead of logits (the pipeline's last stage
        # when its loss is the fused linear + cross-entropy, which reads embed_out.weight itself)
        self.output_hidden_states = False
        self.fp8_group = None  # impl=te, fp8: the group TE reduces fp8 amaxes over (data parallel sets it)
        if cfg.impl == "te":
            fast_paths.drop_te_extra_state(self)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) weights; output projections of each residual branch scaled by 1/sqrt(2L)
        (Megatron's scaled init); zero biases; LayerNorm 1/0. Also used after ``to_empty`` from meta.

        By parameter name, in parameter order (a tied weight twice), so both implementations (``Layer``,
        ``TELayer``) draw the same values from the same seed."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, p in self.named_parameters(remove_duplicate=False):
            if name.endswith(("layernorm.weight", "layer_norm.weight")):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                is_out = name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight"))
                nn.init.normal_(p, 0.0, out_std if is_out else std)
            else:
                raise RuntimeError(f"init_weights: no initialisation rule for parameter {name}")

    def set_recompute(self, granularity: str | None) -> None:
        """Activation checkpointing: None (off), "full" (each layer), "selective" (core attention only)."""
        if granularity not in (None, "none", "full", "selective"):
            raise UserError(f"model.recompute_granularity: {granularity!r} is not one of none, full, selective")
        for layer in self.layers.values():
            layer.recompute = granularity == "full"
            layer.attention.recompute_core = granularity == "selective"

    def compile_layers(self, dynamic: bool | None = None) -> None:
        """``torch.compile`` each transformer layer's forward, in place (torchtitan's per-block compile).

        Per layer, not the whole model: compile time stays that of one block, and anything applied to the
        layer modules (FSDP2's hooks, TP's DTensor params, activation checkpointing, pipeline stages that
        own a subset of layers) keeps working since only the forward is swapped; state-dict names do not
        change. ``dynamic=None``: static shapes first, dynamic after the first shape change (scoring
        batches of varying length do not recompile per length).
        """
        if self.cfg.impl == "te":
            raise UserError("train.compile / --compile with model.impl=te: transformer-engine's modules are "
                            "fused kernels already and do not trace under torch.compile; use one or the other")
        for layer in self.layers.values():
            layer.forward = torch.compile(layer.forward, dynamic=dynamic)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.embed_in is not None:
            n -= self.embed_in.weight.numel()
        return n

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer-normed hidden states [b, s, H], always a plain full tensor (under sequence
        parallelism the sequence shards are gathered; the output layer itself takes the sharded form)."""
        h = self._trunk(input_ids, position_ids, doc_ids)
        if hasattr(h, "full_tensor"):  # DTensor sharded over the sequence dim by sequence parallelism
            h = h.full_tensor()
        return h

    def _trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding, layers, final LayerNorm, each if this (pipeline-stage) model owns it.

        On a pipeline stage without ``embed_in`` the input is already hidden states [b, s, H], and without
        ``final_layer_norm`` the output is the last owned layer's output.
        """
        h = self.embed_in(input_ids) if self.embed_in is not None else input_ids  # [b, s(/tp), H]
        s = h.shape[1] * self.sequence_parallel_size
        if self.sequence_parallel_size > 1 and self.embed_in is not None and input_ids.shape[1] != s:
            raise UserError(f"sequence parallel: sequence length {input_ids.shape[1]} is not divisible by "
                            f"tp={self.sequence_parallel_size}")
        if position_ids is None:
            position_ids = torch.arange(s, device=h.device)[None]  # [1, s]: cos/sin broadcast over the batch
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        cos, sin = rotary_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rotary_base, h.dtype)
        mask = doc_attention_mask(doc_ids) if doc_ids is not None else None
        with fast_paths.fp8_autocast(self.cfg.impl == "te" and self.cfg.fp8, self.fp8_group):
            for layer in self.layers.values():
                h = layer(h, cos, sin, mask)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return h

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [b, t, H] of ``t`` new tokens per row, attending to everything in ``cache``
        before them (then appended to it). ``valid`` [b, t] (default all True) marks left padding: padded
        columns are never attended to and do not advance positions. Prefill = the whole prompt batch at
        once; decoding = one token per row per call."""
        if self.embed_in is None or self.final_layer_norm is None or self.sequence_parallel_size > 1:
            raise UserError("forward_cached needs the whole model in one process (no pipeline stage / "
                            "sequence parallelism)")
        b, t = input_ids.shape
        start, end = cache.length, cache.length + t
        if end > cache.max_len:
            raise UserError(f"KV cache holds {cache.max_len} positions; {end} needed")
        valid = torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        cache.valid[:, start:end] = valid
        # position of a token = number of real tokens before it in its row
        position_ids = cache.valid[:, :end].long().cumsum(1)[:, start:] - 1                 # [b, t]
        position_ids = position_ids.clamp_min(0)
        h = self.embed_in(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rotary_base, h.dtype)
        cols = torch.arange(end, device=h.device)
        causal = cols[None, :] <= (start + torch.arange(t, device=h.device))[:, None]   # [t, end]
        mask = causal[None] & cache.valid[:, None, :end]                                    # [b, t, end]
        mask = mask | (cols[None, None, :] == (start + torch.arange(t, device=h.device))[None, :, None])
        mask = mask[:, None]  # a padded query attends to itself only: finite, never read      [b, 1, t, end]
        for i, layer in enumerate(self.layers.values()):
            lc = cache.layers[i]
            lc.start = start
            h = layer(h, cos, sin, mask, lc)
        cache.length = end
        return self.final_layer_norm(h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self._trunk(input_ids, position_ids, doc_ids)
        if self.embed_out is None:  # a non-last pipeline stage
            return h
        if self.output_hidden_states:  # last pipeline stage with the fused loss: it applies embed_out
            return h.full_tensor() if hasattr(h, "full_tensor") else h
        return self.embed_out(h)  # [b, s, V_pad]; rows >= cfg.vocab_size are padding
