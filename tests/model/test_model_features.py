"""Document-aware masking, activation checkpointing, torch.compile on the plain model."""
from __future__ import annotations

import pytest
import torch

from megacpt.errors import UserError
from megacpt.model import GPTNeoX, get_preset
from megacpt.model.gpt_neox import position_ids_from_doc_ids
from tests.conftest import requires_gpu


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPTNeoX(get_preset("tiny", **kw))


def test_doc_mask_packed_equals_separate_documents():
    model = _model().eval()
    a, b = torch.randint(0, 1000, (1, 5)), torch.randint(0, 1000, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    pos = position_ids_from_doc_ids(doc_ids)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        out = model(packed, position_ids=pos, doc_ids=doc_ids)
        torch.testing.assert_close(out[:, :5], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 5:], model(b), rtol=0, atol=1e-5)
        # without reset positions the second document sees its absolute positions, but still only itself
        out_abs = model(packed, doc_ids=doc_ids)
        torch.testing.assert_close(out_abs[:, 5:], model(b, position_ids=torch.arange(5, 12)), rtol=0, atol=1e-5)
        # a single document id everywhere is plain causal attention
        torch.testing.assert_close(model(packed, doc_ids=torch.zeros_like(packed)), model(packed),
                                   rtol=0, atol=1e-5)
        # and the mask changes the result where documents meet
        assert not torch.allclose(out_abs[:, 5:], model(packed)[:, 5:], atol=1e-4)


def test_position_ids_from_doc_ids_batch():
    doc = torch.tensor([[3, 3, 4, 4, 4, 9], [0, 1, 2, 2, 2, 2]])
    assert position_ids_from_doc_ids(doc).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_checkpointing_same_gradients(granularity):
    ids = torch.randint(0, 1000, (2, 16))
    ref_loss, ref_grads = _loss_and_grads(_model().train(), ids)
    model = _model(recompute_granularity=granularity).train()
    assert any(l.recompute or l.attention.recompute_core for l in model.layers.values())
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=1e-6, msg=n)
    with pytest.raises(UserError, match="recompute_granularity"):
        model.set_recompute("some")


def test_padded_rows_exist_and_real_rows_are_first():
    cfg = get_preset("tiny", vocab_size=1001)
    model = GPTNeoX(cfg)
    assert cfg.padded_vocab() == 1008 and model.embed_in.weight.shape[0] == 1008
    assert model(torch.randint(0, 1001, (1, 3))).shape[-1] == 1008


def _check_compile(backend: str, doc_ids: bool):
    model = _model().train()
    ids = torch.randint(0, 1000, (2, 17))
    kw = {"doc_ids": torch.tensor([[0] * 6 + [1] * 10] * 2)} if doc_ids else {}
    inp, tgt = ids[:, :-1], ids[:, 1:].flatten()

    def step(m):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(inp, **kw).flatten(0, 1), tgt)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = step(model)
    # fullgraph: the model traces without graph breaks (what the trainer relies on for speed)
    loss, grads = step(torch.compile(model, backend=backend, fullgraph=True))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("doc_ids", [False, True])
def test_torch_compile_fullgraph_traces(doc_ids):
    _check_compile("aot_eager", doc_ids)  # dynamo + AOT autograd, no codegen: seconds, not a minute


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    _check_compile("inductor", doc_ids=False)


def test_meta_init_then_materialise():
    """Large models are built on the meta device (no memory), parallelised, then materialised."""
    cfg = get_preset("tiny")
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    assert model.embed_in.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 1000, (1, 5)))
    assert torch.isfinite(out).all()
    assert torch.equal(model.layers["0"].input_layernorm.weight, torch.ones(cfg.hidden_size))
    # scaled init on the residual-branch outputs
    std_qkv = model.layers["0"].attention.query_key_value.weight.std().item()
    std_out = model.layers["0"].mlp.dense_4h_to_h.weight.std().item()
    assert std_out < std_qkv


def test_optional_gpu_paths_fail_clearly_without_them():
    import importlib.util

    from megacpt.model.fast_paths import flash_attention

    q = torch.randn(1, 2, 4, 8)
    assert flash_attention(q, q, q) is None  # CPU / fp32: the SDPA fallback is used
    with pytest.raises(UserError, match="flash-attn"):
        flash_attention(q, q, q, required=True)
    if importlib.util.find_spec("apex") is None:
        with pytest.raises(UserError, match="apex"):
            GPTNeoX(get_preset("tiny", layernorm_backend="apex"))
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(UserError, match="transformer-engine"):
            GPTNeoX(get_preset("tiny", layernorm_backend="te"))
    with pytest.raises(UserError, match="layernorm_backend"):
        get_preset("tiny", layernorm_backend="fast")
    with pytest.raises(UserError, match="attention_backend"):
        get_preset("tiny", attention_backend="xformers")


@requires_gpu
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_cuda_bf16_matches_fp32(backend):
    """GPU paths (SDPA flash kernels; flash-attn when installed) agree with the fp32 reference."""
    model = _model(attention_backend=backend).cuda()
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
        out = model.to(torch.bfloat16)(ids).float()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_kv_cache_decoding_equals_full_forward():
    """forward_cached: a left-padded batch prefilled at once, then 3 tokens one at a time, gives the
    hidden states of a plain full forward of each unpadded row (padding never attended, positions right)."""
    from megacpt.model.gpt_neox import KVCache

    model = _model().eval()
    rows = [[5, 9, 11, 3, 7], [2, 8], [4, 4, 4, 1]]
    extra = [[6, 1, 2], [3, 3, 9], [7, 8, 5]]
    width = max(map(len, rows))
    ids = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        valid[i, width - len(r):] = True
    with torch.no_grad():
        cache = KVCache(model, 3, width + 3)
        prefill = model.forward_cached(ids, cache, valid)
        steps = [model.forward_cached(torch.tensor([[e[j]] for e in extra]), cache)[:, 0] for j in range(3)]
        for i, r in enumerate(rows):
            full = model.hidden_states(torch.tensor([r + extra[i]]))[0]
            n = len(r)
            torch.testing.assert_close(prefill[i, width - n:], full[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.stack([x[i] for x in steps]), full[n:n + 3], atol=1e-5, rtol=1e-5)
        with pytest.raises(UserError, match="KV cache holds"):
            model.forward_cached(torch.tensor([[1], [1], [1]]), cache)
