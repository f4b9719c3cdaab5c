"""`megacpt train --dry-run`: the printed plan's arithmetic against hand-computed values and megatron-core."""
import math
import re
from pathlib import Path

import pytest
import yaml

from megacpt.cli import main
from megacpt.config import ModelConfig
from megacpt.train.job import load_job_config
from megacpt.errors import UserError
from megacpt.train.plan import build_plan, count_parameters, estimate_memory, parse_dataset_tokens

from .conftest import job_overrides, make_dataset

REPO = Path(__file__).resolve().parents[2]
DACP = REPO / "examples/configs/finpythia-6.9b-dacp.yaml"


def _num(text: str, label: str) -> str:
    m = re.search(rf"^\s*{re.escape(label)}\s+(.+)$", text, re.M)
    assert m, f"no line {label!r} in:\n{text}"
    return m.group(1)


def test_dacp_6_9b_recipe_token_arithmetic(capsys):
    assert main(["train", "--config", str(DACP), "--dry-run", "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    # hand-computed: 4 nodes x 8 GPUs, tp 2 -> dp 16; 1024 / (4 x 16) = 16 micro-batches per step
    assert _num(out, "world size").startswith("32 = dp 16 x pp 1 x tp 2")
    assert _num(out, "batch") == "global 1024 = micro 4 x dp 16 x 16 micro-batches per step"
    # 1024 sequences x 2048 tokens = 2,097,152 tokens per step (Pythia's 2M-token batch)
    assert _num(out, "tokens per step") == "2,097,152 (1024 x 2048)"
    assert _num(out, "steps") == "11,444"
    # 11,444 x 2,097,152 = 23,999,807,488 tokens = 11,444 x 1024 = 11,718,656 samples
    assert _num(out, "total") == "23,999,807,488 tokens (11,718,656 samples)"
    # one epoch of the planned 24e9 tokens holds (24e9 - 1) // 2048 = 11,718,749 samples -> 0.99999 epochs
    line = out.split("/data/fin/full_text_document\n", 1)[1].splitlines()[0]
    assert "24,000,000,000 tokens (given), 11,718,749 samples/epoch: draws 11,718,656 samples = 0.99999 epochs" in line
    # LR: 1.2e-5 peak after 114 warm-up steps, cosine to 1.2e-6 at step 11,444; half-way (step 5,779) the
    # cosine is at its midpoint: 1.2e-6 + (1.2e-5 - 1.2e-6) / 2 = 6.6e-6
    assert re.search(r"step\s+114\s+1\.2e-05\s+\(end of warm-up\)", out)
    assert re.search(r"step\s+5,779\s+6\.6e-06\s+\(50% of decay\)", out)
    assert re.search(r"step\s+11,444\s+1\.2e-06\s+\(end of decay\)", out)
    assert re.search(r"step\s+1\s+1\.053e-07\s+\(first step\)", out)  # 1.2e-5 / 114
    assert "6,857,302,016 parameters" in out  # Pythia-6.9B's published parameter count
    # a layout that does not divide the batch is refused with the field named, as a real launch would
    assert main(["train", "--config", str(DACP), "--dry-run", "--world-size", "12"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err


def test_recipe_validates_with_print_config(capsys):
    import json

    assert main(["train", "--config", str(DACP), "--print-config", "--world-size", "32"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["parallel"]["data_parallel_size"] == 16 and cfg["model"]["hidden_size"] == 4096
    assert cfg["data"]["blend"] == ["/data/fin/full_text_document"]  # no replay by default


def test_existing_dataset_size_wins_and_matches_megatron(tiny_data, tmp_path, capsys):
    from megacpt.data.gpt_dataset import build_gpt_datasets
    from megacpt.data.indexed import IndexedDataset

    over = job_overrides(tiny_data, "data.split=90,10,0", "train.train_iters=40",
                         f"data.planned_tokens={{{tiny_data['train']}: 999999}}")
    job = load_job_config(None, over)
    plan = build_plan(job, 1)
    (c,) = plan.components
    ds = IndexedDataset(tiny_data["train"])
    end = round(0.9 * ds.num_documents)  # megatron-core: train = documents [0, round(0.9 n))
    assert c.source == "dataset" and c.train_tokens == int(ds.sequence_lengths[:end].sum())
    assert c.samples_per_epoch == (c.train_tokens - 1) // 32
    assert c.samples == 40 * 8 and c.epochs == pytest.approx(320 / c.samples_per_epoch)
    assert any("the dataset's is used" in w for w in plan.warnings)  # the planned count was far off
    # megatron-core's own epoch: a 1-sample request builds exactly one epoch's sample index
    built = build_gpt_datasets(tiny_data["train"], "90,10,0", 32, (1, 1, 0), seed=1234, cache_dir=tmp_path)[0]
    assert len(built) == c.samples_per_epoch


def test_weighted_blend_and_unknown_sizes(tiny_data, tmp_path):
    other = make_dataset(tmp_path / "other", n_docs=30, seed=5)
    job = load_job_config(None, job_overrides(tiny_data, f"data.blend=[3, {tiny_data['train']}, 1, {other}, 1, /nope/x]",
                                              "train.train_iters=10"))
    plan = build_plan(job, 1, {"/nope/x": 64_000})  # a missing dataset is never opened: its size is given
    a, b, c = plan.components
    # megatron-core: ceil(80 x w) samples per component, weights normalised 3:1:1
    assert (a.samples, b.samples, c.samples) == (math.ceil(80 * 0.6), math.ceil(80 * 0.2), math.ceil(80 * 0.2))
    assert c.source == "given" and c.train_tokens == 64_000 and c.samples_per_epoch == (64_000 - 1) // 32
    plan = build_plan(job, 1)
    assert plan.components[2].source == "unknown" and plan.components[2].epochs is None
    with pytest.raises(UserError, match=r"--dataset-tokens names \['/other'\]"):
        build_plan(job, 1, {"/other": 5})


def test_parameter_count_exact():
    import torch

    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.model.presets import get_preset

    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=80,
                      make_vocab_size_divisible_by=64)
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    # published totals (EleutherAI/pythia-* model cards / HF checkpoints)
    assert count_parameters(get_preset("pythia-6.9b")) == 6_857_302_016
    assert count_parameters(get_preset("pythia-1b")) == 1_011_781_632


def test_memory_estimate_by_hand(tiny_data):
    job = load_job_config(None, job_overrides(tiny_data, "parallel.tensor_model_parallel_size=2",
                                              "parallel.sequence_parallel=true", "train.micro_batch_size=1",
                                              "train.global_batch_size=4", "model.recompute_granularity=selective"))
    job.validate(4)  # dp 2
    m = job.model  # tiny: H 64, I 256, L 2, padded vocab 1024 (multiple of 8 x tp 2)
    h, i, v, s = 64, 256, m.padded_vocab(2), 32
    layer_mat, layer_rep = 4 * h * h + 2 * h * i + 3 * h + i, 6 * h
    stage = 2 * (layer_mat / 2 + layer_rep) + 2 * v * h / 2 + 2 * h
    mem = estimate_memory(job, 2)
    assert mem["model_state"] == pytest.approx(16 * stage / 2)                      # FSDP over dp 2
    assert mem["fsdp_gathered"] == pytest.approx(2 * (layer_mat / 2 + layer_rep) * (4 + 4))
    # precision auto plans for a GPU (bf16): per s*b*H, fp32 residual 4 / tp (SP), gathered LayerNorm
    # outputs 2 + 2, sharded (8 + 4*I/H) / tp
    assert mem["activations"] == pytest.approx(s * 1 * h * (4 / 2 + 4 + (8 + 4 * i / h) / 2) * 2)  # 2 layers
    assert mem["weight_copies"] == pytest.approx(2 * (4 * h * h + 2 * h * i) / 2 * 2)
    assert mem["logits"] == pytest.approx(2 * 4 * 1 * s * v / 2)                    # fused_loss false
    assert mem["total"] == pytest.approx(sum(x for k, x in mem.items() if k != "total"))
    job.train.precision = "fp32"  # fp32: the bf16 terms double, no autocast copies
    mem = estimate_memory(job, 2)
    assert mem["activations"] == pytest.approx(s * 1 * h * (4 / 2 + 8 + 4 * (4 + 2 * i / h) / 2) * 2)
    assert "weight_copies" not in mem


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_terms_match_what_the_layer_saves(recompute, precision):
    """The per-layer terms of the estimate against the bytes megacpt's layer really saves for backward
    (saved-tensor hooks; the difference between a 4- and a 2-layer model is two layers)."""
    import torch

    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.train.plan import activation_bytes_per_layer

    h, s, b = 256, 128, 2
    over = {"model": {"vocab_size": 512, "hidden_size": h, "num_heads": 4, "max_position_embeddings": s,
                      "recompute_granularity": recompute},
            "data": {"seq_length": s, "blend": ["x"]}, "train": {"micro_batch_size": b, "precision": precision}}

    def saved(layers):
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=layers, **over["model"])
        model = GPTNeoX(cfg).train()
        ids = torch.randint(0, 512, (b, s))
        storages = {}
        params = {q.untyped_storage().data_ptr() for q in model.parameters()}  # saved, but no new memory

        def pack(x):
            if x.untyped_storage().data_ptr() not in params:
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model.hidden_states(ids)
        return sum(storages.values())

    measured = (saved(4) - saved(2)) / 2
    from megacpt.train.job import JobConfig

    job = JobConfig.from_dict({**over, "model": {**over["model"], "num_layers": 2}})
    est = activation_bytes_per_layer(job)
    if precision == "bf16" and recompute != "full":
        est += 2 * (4 * h * h + 2 * h * 4 * h)  # autocast's weight copies (estimate_memory's weight_copies)
    assert est == pytest.approx(measured, rel=0.01)


SELECTION = sorted((REPO / "examples/configs").glob("finpythia-1b-selection-*.yaml"))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "planned_tokens" else {f"{prefix}{k}": v})
    return out


def test_selection_arms_differ_only_in_data_and_length(capsys):
    arms = {p.stem.split("selection-")[1]: _flat(yaml.safe_load(p.read_text())) for p in SELECTION}
    assert set(arms) == {"ets", "eta-ppl", "eta-ent", "combined", "random", "full"}
    allowed = {"data.blend", "data.planned_tokens", "train.train_iters", "scheduler.warmup_iters",
               "checkpoint.save", "checkpoint.export_hf", "checkpoint.save_interval", "logging.tensorboard_dir",
               "logging.eval_interval"}
    ref = arms["ets"]
    for name, cfg in arms.items():
        assert set(cfg) == set(ref), name
        assert {k for k in cfg if cfg[k] != ref[k]} <= allowed, name
        assert len(cfg["data.blend"]) == 1, f"{name}: replay is opt-in, not in the recipe"
    # every 10% arm trains one pass over ~2.4B tokens, the full arm over ~24B, same model and peak LR
    for name, cfg in arms.items():
        tokens = next(iter(cfg["data.planned_tokens"].values()))
        assert cfg["train.train_iters"] == tokens // (1024 * 2048)
        assert cfg["scheduler.warmup_iters"] == cfg["train.train_iters"] // 100
    for p in SELECTION:
        assert main(["train", "--config", str(p), "--dry-run", "--world-size", "8"]) == 0
        out = capsys.readouterr().out
        assert "epochs" in out and "0.99" in out  # one pass (just under one epoch)


def test_dry_run_flags_and_errors(capsys):
    assert parse_dataset_tokens(["/a/b_text_document=24e9", "/c=1_000"]) == {"/a/b_text_document": 24_000_000_000,
                                                                              "/c": 1000}
    with pytest.raises(UserError, match="expected PREFIX=TOKENS"):
        parse_dataset_tokens(["/a/b"])
    assert main(["train", "--config", str(DACP), "--dry-run", "--world-size", "32",
                 "--dataset-tokens", "/data/fin/full_text_document=12e9"]) == 0
    assert _num(capsys.readouterr().out, "steps") == "11,444"  # the recipe's length is kept...
    assert main(["train", "--config", str(DACP), "--dry-run", "--world-size", "32",
                 "--dataset-tokens", "/data/fin/full_text_document=12e9"]) == 0
    assert "= 1.99998 epochs" in capsys.readouterr().out  # ...and the plan shows it is now two passes
    assert main(["train", "--config", str(DACP), "--dataset-tokens", "/x=1"]) == 2
    assert "only used by --dry-run" in capsys.readouterr().err
