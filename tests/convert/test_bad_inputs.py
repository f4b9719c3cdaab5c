"""Bad conversion inputs: each gives a clear error naming the tensor or file, and nothing is unpickled."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megacpt.cli import main
from megacpt.convert import load_model
from megacpt.convert.hf_gpt_neox import hf_to_megacpt, megacpt_to_hf
from megacpt.errors import UserError
from megacpt.checkpoint import latest_checkpoint
from tests.checkpoint.helpers import reseal

from .helpers import assert_bit_exact, make_hf_dir, read_safetensors_dir



@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("src") / "hf", **dict(num_hidden_layers=2))


@pytest.fixture
def hf(hf_src, tmp_path):
    return shutil.copytree(hf_src, tmp_path / "hf")


def _edit_weights(hf, fn):
    sd = load_file(str(hf / "model.safetensors"))
    fn(sd)
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(hf, **kw):
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(kw)
    (hf / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(hf, tmp_path):
    _edit_weights(hf, lambda sd: sd.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(UserError, match=r"missing tensor.*gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias.*model\.safetensors"):
        hf_to_megacpt(hf, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    with pytest.raises(UserError, match="dense_4h_to_h.bias"):
        load_model(hf)


def test_shape_mismatch(hf, tmp_path):
    _edit_weights(hf, lambda sd: sd.__setitem__("gpt_neox.layers.0.attention.dense.weight", torch.zeros(64, 63)))
    with pytest.raises(UserError, match=r"model\.safetensors: tensor 'gpt_neox\.layers\.0\.attention\.dense\.weight' "
                                        r"has shape \[64, 63\], config\.json implies \[64, 64\]"):
        hf_to_megacpt(hf, tmp_path / "ck")


def test_unexpected_tensor(hf, tmp_path):
    _edit_weights(hf, lambda sd: sd.__setitem__("score.weight", torch.zeros(3, 64)))
    with pytest.raises(UserError, match=r"unexpected tensor.*score\.weight"):
        hf_to_megacpt(hf, tmp_path / "ck")


def test_unsupported_architecture(hf, tmp_path):
    _edit_config(hf, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(UserError, match=r"config\.json: unsupported architecture LlamaForCausalLM.*only GPT-NeoX"):
        hf_to_megacpt(hf, tmp_path / "ck")
    assert main(["convert", "hf-to-megacpt", "--hf", str(hf), "--out", str(tmp_path / "ck")]) == 2


def test_unsupported_rope_scaling(hf, tmp_path):
    _edit_config(hf, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.25})
    with pytest.raises(UserError, match="rope type 'linear' is not supported"):
        hf_to_megacpt(hf, tmp_path / "ck")


def test_bad_config_json(hf, tmp_path):
    (hf / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON"):
        load_model(hf)
    os.unlink(hf / "config.json")
    with pytest.raises(UserError, match="neither an HF model dir"):
        load_model(hf)


@pytest.mark.fault(fault="corrupt safetensors header", stage="convert hf-to-megacpt",
                   sees="one line: model.safetensors: not a readable safetensors file",
                   left="no checkpoint directory")
def test_corrupt_safetensors(hf, tmp_path):
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        hf_to_megacpt(hf, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.fault(fault="truncated safetensors", stage="loading an HF model (score, eval, train init)",
                   sees="one line naming model.safetensors and the tensor whose bytes are missing",
                   left="nothing (a read)")
def test_truncated_safetensors(hf, tmp_path):
    """The tensor data read with plain file I/O (not mmap): a file cut short names the file and tensor."""
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors.*(truncated|not a readable)"):
        load_model(hf)


def test_safetensors_reader_all_dtypes(tmp_path):
    from megacpt.convert.hf_gpt_neox import HFWeights

    g = torch.Generator().manual_seed(0)
    sd = {f"t_{d}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 50).to(d)
          for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool)}
    sd["scalar"], sd["empty"] = torch.tensor(2.5), torch.zeros(0, 4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    w = HFWeights(tmp_path)
    for k, v in sd.items():
        got = w.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_refused_or_weights_only(hf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = load_file(str(hf / "model.safetensors"))
    os.unlink(hf / "model.safetensors")
    torch.save(sd, hf / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: is a pickle checkpoint; refusing"):
        hf_to_megacpt(hf, tmp_path / "ck")
    # plain tensors in a pickle load with weights_only=True when asked for
    ck = hf_to_megacpt(hf, tmp_path / "ck", allow_pickle=True)
    assert_bit_exact(sd, read_safetensors_dir(megacpt_to_hf(ck, tmp_path / "out")))
    # ... but a pickle that runs code is rejected, never executed
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"gpt_neox.embed_in.weight": _Evil()}, f)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: cannot be read with torch\.load\(weights_only=True\)"):
        hf_to_megacpt(hf, tmp_path / "ck2", allow_pickle=True)
    assert not (tmp_path / "PWNED").exists()


def test_sharded_index_points_to_missing_file(hf, tmp_path):
    out = megacpt_to_hf(hf_to_megacpt(hf, tmp_path / "ck"), tmp_path / "sh", max_shard_bytes=32 * 1024)
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    os.unlink(victim)
    with pytest.raises(UserError, match=rf"model\.safetensors\.index\.json: tensor .* is in {victim.name}, which does not exist"):
        load_model(out)


def test_outputs_refused_when_occupied(hf, tmp_path):
    ck = hf_to_megacpt(hf, tmp_path / "ck")
    with pytest.raises(UserError, match="already holds a checkpoint"):
        hf_to_megacpt(hf, ck)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        megacpt_to_hf(ck, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_checkpoint_problems(hf, tmp_path):
    ck = hf_to_megacpt(hf, tmp_path / "ck")
    with pytest.raises(UserError, match="not found"):
        megacpt_to_hf(tmp_path / "nope", tmp_path / "o1")
    # an incomplete save (no complete.json) is never read
    it = ck / "iter_0000000"
    shutil.copytree(it, tmp_path / "iter_0000005.tmp")
    os.unlink(tmp_path / "iter_0000005.tmp" / "complete.json")
    with pytest.raises(UserError, match="incomplete"):
        load_model(tmp_path / "iter_0000005.tmp")
    # latest pointing nowhere: the newest complete checkpoint is used (with a warning); none left: error
    (ck / "latest").write_text("iter_0000009\n")
    assert latest_checkpoint(ck) == it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("iter_0000009\n")
    with pytest.raises(UserError, match=r"latest: points to 'iter_0000009', which is not a complete checkpoint"):
        load_model(empty)
    (ck / "latest").write_text("iter_0000000\n")
    # model_config.json disagrees with the stored tensors
    cfg = json.loads((it / "model_config.json").read_text())
    (it / "model_config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(UserError, match=r"is damaged \(model_config\.json: expected \d+ bytes"):
        megacpt_to_hf(ck, tmp_path / "o2")
    reseal(it)  # edited by hand, manifest included
    with pytest.raises(UserError, match=r"tensor 'layers\.0\.mlp\.dense_h_to_4h\.weight' has shape \[256, 64\]"):
        megacpt_to_hf(ck, tmp_path / "o2")
    with pytest.raises(UserError, match=r"'model\.layers\.0\.mlp\.dense_h_to_4h\.weight': checkpoint shape \[256, 64\] "
                                        r"!= model shape \[128, 64\]"):
        load_model(ck)
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.tmp-*"))
