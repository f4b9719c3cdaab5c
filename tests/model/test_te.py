"""model.impl: torch | te. On CPU (no transformer-engine): the switch, its errors, the one name map and
everything built on it (state dicts, DCP, optimizer names, init, copies, meta builds, recompute, fp8
context, KV cache), with tests/model/te_standin.py standing in for TE's modules. With a GPU and TE
installed (``pytest -m gpu``): real TE against the torch path."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megacpt.config import ModelConfig, ParallelConfig
from megacpt.errors import UserError
from megacpt.model import fast_paths
from megacpt.model.gpt_neox import GPTNeoX, KVCache, Layer
from megacpt.model.presets import get_preset
from tests.conftest import requires_gpu
from tests.model import te_standin


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(fast_paths, "transformer_engine", lambda: te_standin)
    monkeypatch.setattr(fast_paths, "te_recipe", lambda: te_standin.recipe)
    te_standin.AUTOCAST_CALLS.clear()
    return te_standin


def _cfg(act="gelu", parallel=True, **kw):
    return get_preset("tiny", hidden_act=act, use_parallel_residual=parallel, **kw)


def _pair(cfg, seed=0):
    """A torch-path model and a TE-path model holding the same weights (the torch model's, loaded)."""
    torch.manual_seed(seed)
    ref = GPTNeoX(cfg)
    te = GPTNeoX(dataclasses.replace(cfg, impl="te"))
    _check_init(te)
    te.load_state_dict(ref.state_dict(), strict=True)
    return ref, te


def _check_init(model):
    """init_weights' rule reached every TE-held parameter: LayerNorms 1/0, biases 0, N(0, std) weights with
    the residual-branch outputs scaled by 1/sqrt(2L)."""
    std = model.cfg.init_std
    for n, p in model.named_parameters():
        if n.endswith("layernorm.weight") or n.endswith("layer_norm.weight"):
            assert torch.all(p == 1), n
        elif n.endswith(".bias"):
            assert torch.all(p == 0), n
        else:
            want = std / (2 * model.cfg.num_layers) ** 0.5 if n.endswith(("attention.dense.weight",
                                                                          "mlp.dense_4h_to_h.weight")) else std
            assert abs(float(p.detach().std()) - want) < 0.15 * want, (n, float(p.detach().std()), want)


def test_asking_for_te_when_absent_or_broken_is_a_clear_error(monkeypatch):
    import megacpt.optional as opt

    real = opt.importlib.import_module

    def absent(name, *a):
        if name.startswith("transformer_engine"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="transformer_engine")
        return real(name, *a)

    monkeypatch.setattr(opt.importlib, "import_module", absent)
    with pytest.raises(UserError, match="model.impl=te needs transformer_engine, which is not installed"):
        GPTNeoX(_cfg(impl="te"))

    def broken(name, *a):
        if name.startswith("transformer_engine"):
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real(name, *a)

    monkeypatch.setattr(opt.importlib, "import_module", broken)
    with pytest.raises(UserError, match="installed.*fails to import: OSError: libcudart"):
        GPTNeoX(_cfg(impl="te"))


def test_config_checks():
    with pytest.raises(UserError, match="model.impl"):
        _cfg(impl="tensorrt")
    with pytest.raises(UserError, match="fp8 needs model.impl=te"):
        _cfg(fp8=True)
    with pytest.raises(UserError, match="full recompute"):
        _cfg(impl="te", fp8=True, recompute_granularity="full")
    with pytest.raises(UserError, match="impl=te runs tp=1"):
        ParallelConfig(tensor_model_parallel_size=2).resolve(2).validate_model(_cfg(impl="te"))
    with pytest.raises(UserError, match="attention_backend"):
        _cfg(attention_backend="xformers")
    # impl and fp8 say how the model runs, not what it is: never stored with the config
    d = _cfg(impl="te", fp8=True).to_dict()
    assert "impl" not in d and "fp8" not in d and ModelConfig.from_dict(d).impl == "torch"


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("parallel", [True, False])
def test_same_parameters_same_function(standin, act, parallel):
    """Same names, order and shapes; the torch weights load strictly and give the same logits and
    gradients (the stand-in's math is torch's)."""
    ref, te = _pair(_cfg(act, parallel))
    sd_ref, sd_te = ref.state_dict(), te.state_dict()
    assert list(sd_te) == list(sd_ref)                       # names and order: no _extra_state, no TE names
    for k in sd_ref:
        assert sd_te[k].shape == sd_ref[k].shape and torch.equal(sd_te[k], sd_ref[k]), k
    assert [n for n, _ in te.named_parameters()] == [n for n, _ in ref.named_parameters()]
    layer = te.layers["0"]
    assert (layer.mlp.fused is not None) == (act != "gelu")  # exact GELU: LayerNormLinear + torch GELU + Linear
    ids = torch.randint(0, 1000, (2, 33))
    torch.testing.assert_close(te(ids), ref(ids), atol=1e-5, rtol=1e-5)
    doc_ids = torch.tensor([[0] * 10 + [1] * 23, [0] * 33])  # document mask: TE's "arbitrary" mask path
    torch.testing.assert_close(te(ids, doc_ids=doc_ids), ref(ids, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)
    assert layer.attention.core_attention.calls[-1][0] == "arbitrary"
    for m in (ref, te):
        F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = dict(ref.named_parameters())
    for n, p in te.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_name_map_targets_are_torch_parameters(standin):
    torch_names = {n for n, _ in Layer(_cfg()).named_parameters()}
    assert set(fast_paths.TE_NAME_MAP.values()) <= torch_names
    te_layer = GPTNeoX(_cfg(impl="te")).layers["0"]
    # every TE module's parameter is one of the torch path's, by identity
    owned = {id(p) for p in te_layer.parameters()}
    assert id(te_layer.attention.query_key_value.layer_norm_weight) == id(te_layer.input_layernorm.weight)
    assert id(te_layer.mlp.dense_h_to_4h.layer_norm_bias) in owned
    assert not any(n.split(".")[-1].startswith(("layer_norm_", "fc1_", "fc2_")) for n, _ in te_layer.named_parameters())
    with pytest.raises(RuntimeError, match="never called"):
        te_layer.input_layernorm(torch.zeros(1))


def test_checkpoints_cross_load_and_dcp_names(standin):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict)

    ref, te = _pair(_cfg(), seed=1)
    torch.manual_seed(7)
    other = GPTNeoX(_cfg())                                  # different weights, torch path
    te.load_state_dict(other.state_dict(), strict=True)     # a torch checkpoint into TE (no _extra_state asked)
    ids = torch.randint(0, 1000, (2, 17))
    torch.testing.assert_close(te(ids), other(ids), atol=1e-5, rtol=1e-5)
    ref.load_state_dict(te.state_dict(), strict=True)       # and back
    torch.testing.assert_close(ref(ids), other(ids), atol=1e-5, rtol=1e-5)
    dcp = get_model_state_dict(te)
    assert set(dcp) == set(other.state_dict()) and not any("extra_state" in k for k in dcp)
    set_model_state_dict(te, {k: torch.zeros_like(v) for k, v in dcp.items()}, options=StateDictOptions(strict=True))
    assert all(float(p.abs().sum()) == 0 for p in te.parameters())
    opt = torch.optim.AdamW(te.parameters(), lr=1e-3)
    F.cross_entropy(te(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    osd = get_optimizer_state_dict(te, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    names = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in osd if k.startswith("state.")}
    assert names == {n for n, _ in other.named_parameters()}


def test_aliases_follow_copies_and_meta_builds(standin):
    cfg = dataclasses.replace(_cfg(), impl="te")
    with torch.device("meta"):
        meta = GPTNeoX(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    _check_init(meta)
    ref = GPTNeoX(_cfg())
    meta.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(meta(ids), ref(ids), atol=1e-5, rtol=1e-5)   # the TE modules read the new params
    clone = copy.deepcopy(meta)                                             # pipeline stages deep-copy the model
    with torch.no_grad():
        clone.layers["0"].input_layernorm.weight.mul_(2.0)
    assert clone.layers["0"].attention.query_key_value.layer_norm_weight is clone.layers["0"].input_layernorm.weight
    assert torch.equal(meta.layers["0"].attention.query_key_value.layer_norm_weight, ref.layers["0"].input_layernorm.weight)
    assert not torch.allclose(clone(ids), meta(ids))


def test_recompute_fp8_context_and_compile(standin):
    ref, te = _pair(_cfg(recompute_granularity="selective"))
    ids = torch.randint(0, 1000, (2, 17))
    for m in (ref, te):
        m.train()
        F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert te.layers["0"].attention.core_attention.calls[-1] == ("causal", True)
    grads = dict(ref.named_parameters())
    for n, p in te.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4)
    full = GPTNeoX(_cfg(impl="te", recompute_granularity="full")).train()
    full(ids).sum().backward()                               # torch checkpoint around the TE layer
    fp8 = GPTNeoX(_cfg(impl="te", fp8=True))
    fp8.fp8_group = "dp-group"
    fp8(ids)
    (enabled, recipe, group), = standin.AUTOCAST_CALLS
    assert enabled and group == "dp-group"
    assert recipe == ("DelayedScaling", (("amax_compute_algo", "max"), ("amax_history_len", 1024),
                                         ("fp8_format", "HYBRID")))
    te(ids)
    assert len(standin.AUTOCAST_CALLS) == 1                  # bf16 TE model: no fp8 context
    with pytest.raises(UserError, match="torch.compile"):
        te.compile_layers()


def test_kv_cache_decoding(standin):
    ref, te = _pair(_cfg())
    ids = torch.randint(0, 1000, (2, 12))
    outs = []
    for m in (ref, te):
        cache = KVCache(m, 2, 16)
        h = [m.forward_cached(ids[:, :8], cache)]
        for t in range(8, 12):
            h.append(m.forward_cached(ids[:, t:t + 1], cache))
        outs.append(torch.cat(h, 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


# -- real transformer-engine on a GPU --------------------------------------------------------------------
def _real_te():
    return pytest.importorskip("transformer_engine.pytorch")


def _gpu_pair(act, fp8=False):
    cfg = get_preset("tiny", hidden_size=256, num_heads=4, num_layers=2, hidden_act=act,
                     max_position_embeddings=256)
    torch.manual_seed(0)
    ref = GPTNeoX(cfg).cuda()
    te = GPTNeoX(dataclasses.replace(cfg, impl="te", fp8=fp8)).cuda()
    te.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, te


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_real_te_matches_torch_in_bf16(act):
    """Real TE kernels vs the torch path on the same weights, bf16 autocast: logits, loss and every
    gradient within bf16 tolerance; the parameter names are the torch path's."""
    _real_te()
    cfg, ref, te = _gpu_pair(act)
    assert list(te.state_dict()) == list(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (4, 129), device="cuda")
    losses = []
    for m in (ref, te):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append((logits.float(), loss.detach()))
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(losses[1][1], losses[0][1], atol=5e-3, rtol=5e-3)
    grads = dict(ref.named_parameters())
    for n, p in te.named_parameters():
        g, r = p.grad.float(), grads[n].grad.float()
        assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.99, n
        torch.testing.assert_close(g.norm(), r.norm(), rtol=3e-2, atol=1e-6)
    doc_ids = torch.zeros(4, 128, dtype=torch.long, device="cuda")
    doc_ids[:, 60:] = 1
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(te(ids[:, :-1], doc_ids=doc_ids).float(), ref(ids[:, :-1], doc_ids=doc_ids).float(),
                                   atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@requires_gpu
def test_real_te_fp8_trains():
    """fp8 (delayed scaling) on an H100/H200: the loss after a few AdamW steps stays within 2% of bf16's."""
    te_mod = _real_te()
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    del te_mod
    cfg, ref, te = _gpu_pair("gelu", fp8=True)
    ids = torch.randint(0, cfg.vocab_size, (8, 129), device="cuda")
    final = []
    for m in (ref, te):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        final.append(float(loss))
    assert all(map(lambda x: x == x, final))
    assert abs(final[1] - final[0]) / final[0] < 0.02, final
