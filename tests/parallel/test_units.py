"""Single-process checks of the parallel building blocks: config validation, stage splitting, the
per-head QKV layout that makes a contiguous TP split correct, and the loss helpers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacpt.config import ModelConfig, ParallelConfig
from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.parallel.loss import lm_loss, vocab_parallel_cross_entropy
from megacpt.parallel.mesh import build_mesh, validate
from megacpt.parallel.pipeline import split_stage, stage_ids, stage_layers
from tests.parallel.workers import make_model, tiny_cfg


@pytest.mark.parametrize("pcfg,world,match", [
    (ParallelConfig(tensor_model_parallel_size=3), 4, "not divisible by tp\\*pp"),
    (ParallelConfig(tensor_model_parallel_size=2, data_parallel_size=3), 4, "data_parallel_size"),
    (ParallelConfig(tensor_model_parallel_size=8), 8, "num_heads=4 is not divisible by tp=8"),
    (ParallelConfig(pipeline_model_parallel_size=3), 3, "num_layers=4 is not divisible by 3"),
    (ParallelConfig(pipeline_model_parallel_size=2, pipeline_schedule="interleaved_1f1b"), 2,
     "virtual_pipeline_model_parallel_size"),
    (ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), 2,
     "interleaved_1f1b"),
    (ParallelConfig(tensor_model_parallel_size=2, data_parallel_type="ddp"), 4, "ddp does not compose"),
    (ParallelConfig(pipeline_schedule="zb"), 1, "unknown schedule"),
    (ParallelConfig(mixed_precision_param="fp8"), 1, "mixed_precision_param"),
])
def test_validation_names_the_field(pcfg, world, match):
    with pytest.raises(UserError, match=match):
        validate(pcfg, world, tiny_cfg())


def test_validation_vocab_and_tied():
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, padded_vocab_size=101)
    with pytest.raises(UserError, match="padded vocab 101 is not divisible by tp=2"):
        validate(ParallelConfig(tensor_model_parallel_size=2), 2, cfg)
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=True)
    with pytest.raises(UserError, match="tie_word_embeddings"):
        validate(ParallelConfig(pipeline_model_parallel_size=2), 2, cfg)
    assert validate(ParallelConfig(tensor_model_parallel_size=2), 8, tiny_cfg()).data_parallel_size == 4


def test_build_mesh_needs_process_group():
    with pytest.raises(UserError, match="not initialised"):
        build_mesh(ParallelConfig(), 1)


def test_stage_split_keeps_full_model_names():
    model = make_model()
    full = dict(model.named_parameters())
    assert stage_ids(1, 2, 2) == [1, 3] and stage_layers(3, 4, 8) == [6, 7]
    seen = {}
    for s in range(4):
        part = split_stage(model, s, 4)
        names = dict(part.named_parameters())
        assert all(k.startswith(f"layers.{s}.") or not k.startswith("layers.") for k in names)
        assert ("embed_in.weight" in names) == (s == 0) and ("embed_out.weight" in names) == (s == 3)
        assert not set(names) & set(seen), "a parameter is owned by two stages"
        seen.update(names)
    assert set(seen) == set(full)
    for k, v in seen.items():
        assert torch.equal(v, full[k])
    with pytest.raises(UserError, match="not divisible by 3"):
        stage_layers(0, 3, 4)


def test_chained_stages_equal_full_model():
    model = make_model().eval()
    ids = torch.randint(0, 101, (2, 9))
    doc = torch.tensor([[0] * 4 + [1] * 5] * 2)
    with torch.no_grad():
        h = ids
        for s in range(4):
            h = split_stage(model, s, 4)(h, doc_ids=doc)
        torch.testing.assert_close(h, model(ids, doc_ids=doc), rtol=0, atol=1e-6)


def test_qkv_contiguous_split_gives_whole_heads():
    """Rows [r*3H/tp, (r+1)*3H/tp) of the fused QKV are heads [r*nh/tp, (r+1)*nh/tp), each with q, k, v:
    running attention on one rank's slice reproduces those heads of the full computation."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    attn = GPTNeoX(cfg).layers["0"].attention
    x = torch.randn(2, 7, cfg.hidden_size)
    from megacpt.model.gpt_neox import rotary_cos_sin

    cos, sin = rotary_cos_sin(torch.arange(7).expand(2, 7), cfg.rotary_dim, cfg.rotary_base, x.dtype)
    with torch.no_grad():
        full = attn.core(attn.query_key_value(x), cos, sin, None)  # [b, s, nh*hd]
        tp, hd = 2, cfg.head_dim
        w, b = attn.query_key_value.weight, attn.query_key_value.bias
        rows = w.shape[0] // tp
        for r in range(tp):
            local_qkv = F.linear(x, w[r * rows:(r + 1) * rows], b[r * rows:(r + 1) * rows])
            local = attn.core(local_qkv, cos, sin, None)  # [b, s, nh/tp*hd]
            heads = cfg.num_heads // tp
            torch.testing.assert_close(local, full[..., r * heads * hd:(r + 1) * heads * hd], rtol=0, atol=1e-6)


def test_loss_helpers_single_process():
    logits = torch.randn(2, 5, 16, requires_grad=True)
    tgt = torch.randint(0, 12, (2, 5))
    tgt[0, 0] = -100
    ref = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, tgt), ref)
    # padded rows (>= vocab_size) are excluded from the softmax
    masked = vocab_parallel_cross_entropy(logits.flatten(0, 1), tgt.flatten(), vocab_size=12)
    ref12 = F.cross_entropy(logits[..., :12].flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(masked, ref12)
