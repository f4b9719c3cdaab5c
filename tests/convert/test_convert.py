"""HF GPT-NeoX <-> megacpt: bit-exact round trips, logits parity, load_model, CLI, sharded files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megacpt.cli import main
from megacpt.convert import find_tokenizer, load_config, load_model
from megacpt.convert.hf_gpt_neox import hf_to_megacpt, megacpt_to_hf, name_map
from megacpt.checkpoint import checkpoint_tensors, latest_checkpoint

from .helpers import HF_CONFIGS, assert_bit_exact, hf_logits, make_hf_dir, read_safetensors_dir



@pytest.mark.parametrize("idx", range(len(HF_CONFIGS)))
def test_round_trip_bit_exact_and_logits(tmp_path, idx):
    hf = make_hf_dir(tmp_path / "hf", seed=idx, **HF_CONFIGS[idx])
    layouts = [(1, 1), (2, 2)] if idx == 0 else [(1, 1)]  # tp2*pp2 padding once (also in test_distributed)
    ids = torch.randint(0, HF_CONFIGS[idx]["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(idx))
    ref = hf_logits(hf, ids)
    for tp, pp in layouts:
        ck = hf_to_megacpt(hf, tmp_path / f"ck{tp}{pp}", tp=tp, pp=pp)
        cfg = load_config(ck)
        # megacpt pads the vocab to a multiple of 128 * tp (Megatron); padding rows are zeros
        assert cfg.padded_vocab() % (128 * tp) == 0 and cfg.vocab_size == HF_CONFIGS[idx]["vocab_size"]
        emb = checkpoint_tensors(ck)["embed_in.weight"][0]
        assert emb == (cfg.padded_vocab(), HF_CONFIGS[idx]["hidden_size"])

        out = megacpt_to_hf(ck, tmp_path / f"hf{tp}{pp}")
        assert_bit_exact(read_safetensors_dir(hf), read_safetensors_dir(out))
        # the exported dir loads in transformers and gives the same logits
        assert torch.equal(hf_logits(out, ids), ref)

        # load_model from the checkpoint (root, and the iteration dir) and from the HF dir
        for path in (ck, latest_checkpoint(ck), hf):
            model, mcfg = load_model(path)
            assert not model.training
            with torch.no_grad():
                logits = model(ids)[..., : mcfg.vocab_size]
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_dtypes_and_sharded_files(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", dtype=torch.bfloat16)
    ck = hf_to_megacpt(hf, tmp_path / "ck")
    assert checkpoint_tensors(ck)["layers.0.mlp.dense_h_to_4h.weight"][1] == torch.bfloat16  # stored as given
    # bf16 -> bf16, split into many shards with an index: still bit-exact
    out = megacpt_to_hf(ck, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_bit_exact(read_safetensors_dir(hf), read_safetensors_dir(out))
    # a sharded HF dir (index) converts back, bit-exact
    ck2 = hf_to_megacpt(out, tmp_path / "ck2")
    assert_bit_exact(read_safetensors_dir(hf), read_safetensors_dir(megacpt_to_hf(ck2, tmp_path / "hf3")))
    # --dtype float32 export: exact upcast; load_model casts to the dtype asked for
    f32 = read_safetensors_dir(megacpt_to_hf(ck, tmp_path / "f32", dtype="float32"))
    src = read_safetensors_dir(hf)
    assert all(f32[k].dtype == torch.float32 and torch.equal(f32[k], src[k].float()) for k in src)
    model, _ = load_model(ck, dtype=torch.float32)
    assert model.embed_in.weight.dtype == torch.float32
    assert torch.equal(model.embed_in.weight[:997], src["gpt_neox.embed_in.weight"].float())


def test_legacy_config_and_buffers_accepted(tmp_path):
    """Pythia dirs made by transformers 4.x: rotary_pct/rotary_emb_base fields and inv_freq/bias buffers."""
    from safetensors.torch import load_file, save_file

    hf = make_hf_dir(tmp_path / "hf", **HF_CONFIGS[1])
    cfg = json.loads((hf / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (hf / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(hf / "model.safetensors"))
    weights = dict(sd)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    mcfg = load_config(hf)
    assert (mcfg.rotary_pct, mcfg.rotary_base) == (0.5, 500.0)
    out = megacpt_to_hf(hf_to_megacpt(hf, tmp_path / "ck"), tmp_path / "out")
    assert_bit_exact(weights, read_safetensors_dir(out))  # buffers are not weights: dropped


def test_tied_embeddings(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", **{**HF_CONFIGS[2], "tie_word_embeddings": True})
    ck = hf_to_megacpt(hf, tmp_path / "ck")
    model, cfg = load_model(ck)
    assert model.embed_out.weight is model.embed_in.weight
    out = megacpt_to_hf(ck, tmp_path / "out")
    assert "embed_out.weight" not in read_safetensors_dir(out)
    ids = torch.randint(0, 320, (1, 9))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(hf, ids), atol=0, rtol=0)


def test_name_map_is_one_to_one():
    from megacpt.config import ModelConfig
    from megacpt.model.gpt_neox import GPTNeoX

    cfg = ModelConfig(vocab_size=100, hidden_size=16, num_layers=3, num_heads=2)
    pairs = name_map(cfg)
    with torch.device("meta"):
        names = set(GPTNeoX(cfg).state_dict())
    assert {m for m, _ in pairs} == names  # every model tensor, nothing else
    assert len({h for _, h in pairs}) == len(pairs)
    assert all(h == m or h == "gpt_neox." + m for m, h in pairs)


def test_cli_and_tokenizer_travel(tmp_path, capsys):
    hf = make_hf_dir(tmp_path / "hf")
    (hf / "tokenizer.json").write_text('{"fake": true}')
    (hf / "tokenizer_config.json").write_text("{}")
    assert find_tokenizer(hf) == str(hf)
    assert main(["convert", "hf-to-megacpt", "--hf", str(hf), "--out", str(tmp_path / "ck"),
                 "--tensor-model-parallel-size", "2", "--pp", "2"]) == 0
    tok = find_tokenizer(tmp_path / "ck")
    assert tok is not None and sorted(p.name for p in Path(tok).iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]  # the weights are not copied along
    assert main(["convert", "megacpt-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
                 "--dtype", "float32"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'
    assert_bit_exact(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "out"))
    # --tp 3 does not divide 4 heads: clean one-line error, exit 2
    assert main(["convert", "hf-to-megacpt", "--hf", str(hf), "--out", str(tmp_path / "ck3"), "--tp", "3"]) == 2
    assert "num_heads=4 is not divisible by tp=3" in capsys.readouterr().err


def test_cli_flags_frozen():
    from megacpt.cli import build_command_parser

    p = build_command_parser("convert")
    a = p.parse_args(["hf-to-megacpt", "--hf", "H", "--out", "O", "--tp", "2", "--pp", "4", "--allow-pickle",
                      "--tokenizer", "T"])
    assert (a.hf, a.out, a.tp, a.pp, a.allow_pickle, a.tokenizer) == ("H", "O", 2, 4, True, "T")
    a = p.parse_args(["megacpt-to-hf", "--ckpt", "C", "--out", "O", "--dtype", "bfloat16", "--max-shard-size", "2"])
    assert (a.ckpt, a.out, a.dtype, a.max_shard_size) == ("C", "O", "bf16", 2.0)  # an alias, stored canonical


@pytest.mark.parametrize("tied", [False, True])
def test_load_weights_into_an_existing_model(tmp_path, tied):
    """What `train` uses for init_from: HF dir or checkpoint into a (here plain) model, vocab padded further."""
    from megacpt.convert import load_weights
    from megacpt.model.gpt_neox import GPTNeoX

    hf = make_hf_dir(tmp_path / "hf", **{**HF_CONFIGS[2], "tie_word_embeddings": tied})
    ref, cfg = load_model(hf)
    cfg.padded_vocab_size = 512  # e.g. the trainer pads for a larger tp: extra zero rows
    ck = hf_to_megacpt(hf, tmp_path / "ck")  # 320 rows -> 384
    for src, model_cfg in ((hf, cfg), (ck, load_config(ck))):
        model = GPTNeoX(model_cfg)
        load_weights(model, src)
        for n, p in model.named_parameters():
            want = ref.state_dict()[n]
            assert torch.equal(p[: want.shape[0]], want), n
            assert not p[want.shape[0]:].any(), n
        assert (model.embed_out.weight is model.embed_in.weight) == tied
