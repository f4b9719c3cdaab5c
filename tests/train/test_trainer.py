"""The training loop on CPU: learning, NaN handling, SIGTERM save, exact resume after kill -9, DP parity."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megacpt.train.job import load_job_config
from megacpt.errors import UserError
from megacpt.testing import run_distributed
from megacpt.train import trainer
from megacpt.checkpoint import latest_checkpoint, read_tensors, checkpoint_tensors
from tests.faults import leftovers
from tests.train.conftest import job_overrides, make_dataset


def job(data, *extra):
    return load_job_config(None, job_overrides(data, *extra))


def test_loss_goes_down_and_eval_runs(tiny_data, tmp_path):
    r = trainer.train(job(tiny_data, "train.train_iters=12", "train.fused_loss=true", "optimizer.lr=1e-2",
                          "scheduler.decay_style=constant", "train.micro_batch_size=4",
                          f"logging.jsonl={tmp_path / 'm.jsonl'}"))
    first, last = sum(r.losses[i] for i in (1, 2, 3)) / 3, sum(r.losses[i] for i in (10, 11, 12)) / 3
    assert last < first - 0.3, (first, last)
    assert r.eval["valid"]["loss"] < first and r.eval["valid"]["ppl"] > 1
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    train_recs = [x for x in recs if x["kind"] == "train"]
    assert [x["iteration"] for x in train_recs] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "rss_gib"} <= set(train_recs[0])
    assert any(x["kind"] == "eval/valid" for x in recs)


def test_compile_matches_eager(tiny_data):
    """train.compile=true (each layer's forward compiled) trains like eager: same losses within fp noise."""
    eager = trainer.train(job(tiny_data, "train.train_iters=3", "train.fused_loss=true"))
    compiled = trainer.train(job(tiny_data, "train.train_iters=3", "train.fused_loss=true", "train.compile=true"))
    for it in (1, 2, 3):
        assert abs(compiled.losses[it] - eager.losses[it]) < 1e-4, (it, compiled.losses, eager.losses)


def test_nan_steps_are_skipped_then_stop(tiny_data, monkeypatch):
    real = trainer.micro_loss
    bad = {2, 3}  # 0-based iterations whose loss is NaN

    def flaky(model, tokens, cfg, fused, it, doc_ids=None):
        s = real(model, tokens, cfg, fused, it, doc_ids)
        return s * float("nan") if it in bad else s

    monkeypatch.setattr(trainer, "micro_loss", flaky)
    r = trainer.train(job(tiny_data, "train.max_consecutive_nan_skips=3"))
    assert r.skipped_steps == 2 and r.iteration == 6
    assert sorted(r.losses) == [1, 2, 5, 6]
    bad.update(range(6))
    with pytest.raises(trainer.TrainingDiverged, match="3 non-finite steps in a row at iteration 3"):
        trainer.train(job(tiny_data, "train.max_consecutive_nan_skips=3"))


def test_nan_skip_leaves_weights_untouched(tiny_data, monkeypatch):
    real = trainer.micro_loss
    monkeypatch.setattr(trainer, "micro_loss", lambda m, t, c, f, it, d=None:
                        real(m, t, c, f, it, d) * (float("inf") if it >= 1 else 1.0))
    seen = []
    orig_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(1), orig_step(self, *a, **k))[1])
    with pytest.raises(trainer.TrainingDiverged):
        trainer.train(job(tiny_data, "train.max_consecutive_nan_skips=2"))
    assert len(seen) == 1  # only the first (finite) iteration stepped


@pytest.mark.fault(fault="SIGTERM mid-run", stage="train",
                   sees="training stops after the current step with a warning naming the checkpoint it saved; "
                        "the re-run resumes from that step and finishes",
                   left="a complete checkpoint of the step it stopped at, `latest` pointing to it")
def test_sigterm_saves_and_exits_then_resumes(tiny_data, tmp_path):
    ck = tmp_path / "ck"
    j = job(tiny_data, f"checkpoint.save={ck}", "checkpoint.async_save=true")
    r = trainer.train(j, on_step=lambda it, loss: os.kill(os.getpid(), signal.SIGTERM) if it == 3 else None)
    assert r.stop_reason == "signal" and r.iteration == 3
    assert latest_checkpoint(ck).name == "iter_0000003"
    saved = json.loads((latest_checkpoint(ck) / "run_config.json").read_text())
    assert saved["train"]["train_iters"] == 6 and saved["model"]["hidden_size"] == 64
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    r2 = trainer.train(job(tiny_data, f"checkpoint.save={ck}"))
    assert r2.stop_reason == "done" and r2.iteration == 6 and sorted(r2.losses) == [4, 5, 6]


def test_data_validation_errors(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"data.blend\[.*missing.*\]: .*missing.bin does not exist"):
        trainer.train(job(tiny_data, f"data.blend=[{tmp_path / 'missing'}]"))
    other = make_dataset(tmp_path / "other", n_docs=5, sha="another-tokenizer")
    with pytest.raises(UserError, match="data.eval_prefixes.valid: tokenizer .* differs"):
        trainer.train(job(tiny_data, f"data.blend=[{other}]"))
    with pytest.raises(UserError, match="data.split: '969,30,1' leaves the test split of .* empty"):
        trainer.train(job(tiny_data, "data.split=969,30,1"))
    big = make_dataset(tmp_path / "big", n_docs=5, vocab=5000)
    with pytest.raises(UserError, match="tokenizer vocab_size 5000 .* > model.vocab_size 1000"):
        trainer.train(job(tiny_data, f"data.blend=[{big}]"))


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from megacpt.checkpoint.state import CheckpointManager
    from megacpt.train.job import load_job_config
    from megacpt.train.trainer import train
    kill_at = int(sys.argv[1])
    finalize = CheckpointManager._finalize

    def killed_mid_save(self, p, files):  # the save's files all written, complete.json not yet
        if p.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        finalize(self, p, files)

    CheckpointManager._finalize = killed_mid_save
    train(load_job_config(None, sys.argv[2:]))
""")


def _child(kill_at, overrides, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, str(kill_at), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def _losses(path):
    return {r["iteration"]: r["loss"] for r in map(json.loads, open(path)) if r["kind"] == "train"}


@pytest.mark.fault(fault="kill -9 mid-checkpoint-save", stage="train",
                   sees="nothing (killed); the re-run resumes from the last complete checkpoint, bitwise",
                   left="the complete checkpoints and the killed save's temp dir .iter_N.HOST-PID-RAND.tmp until the "
                        "re-run, which removes it: nothing after the re-run")
def test_exact_resume_after_kill9(tiny_data, tmp_path):
    """2N steps straight == N steps, kill -9 (in the save of 2N, after checkpoint N), resume, N steps: bitwise;
    the re-run removes the killed save's temp dir."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = job_overrides(tiny_data, "train.train_iters=8", "checkpoint.save_interval=4", "checkpoint.keep_last=0")
    a = _child(-1, [*common, f"checkpoint.save={tmp_path / 'a'}", f"logging.jsonl={tmp_path / 'a.jsonl'}"], repo)
    assert a.returncode == 0, a.stderr[-2000:]
    b_args = [*common, f"checkpoint.save={tmp_path / 'b'}", f"logging.jsonl={tmp_path / 'b.jsonl'}"]
    b = _child(8, b_args, repo)
    assert b.returncode == -signal.SIGKILL, b.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "b").name == "iter_0000004"
    assert [p.name.split(".")[1] for p in (tmp_path / "b").glob(".*.tmp")] == ["iter_0000008"]
    b2 = _child(-1, b_args, repo)
    assert b2.returncode == 0, b2.stderr[-2000:]
    assert leftovers(tmp_path) == []
    its = [r["iteration"] for r in map(json.loads, open(tmp_path / "b.jsonl")) if r["kind"] == "train"]
    assert its == [*range(1, 9), 5, 6, 7, 8]  # the re-run resumed from iter_0000004
    la, lb = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")  # b: 1..6, then 5..8 again
    assert [lb[i] for i in (5, 6, 7, 8)] == [la[i] for i in (5, 6, 7, 8)]
    ca, cb = tmp_path / "a" / "iter_0000008", tmp_path / "b" / "iter_0000008"
    names = sorted(checkpoint_tensors(ca, prefix=""))
    assert names == sorted(checkpoint_tensors(cb, prefix="")) and any(n.startswith("optim.") for n in names)
    ta, tb = read_tensors(ca, names, prefix=""), read_tensors(cb, names, prefix="")
    for n in names:
        assert torch.equal(ta[n], tb[n]), n


def _layouts_worker(rank, world, jobs):
    out = []
    for overrides in jobs:
        r = trainer.train(load_job_config(None, overrides))
        out.append((r.losses, r.eval))
    return out


@pytest.mark.distributed
def test_dp_tp_pp_match_single_process_and_resume_across_layouts(tiny_data, tmp_path):
    """DP=2, TP=2, PP=2 give the single-process losses; a 1-process checkpoint resumes at each of them."""
    single = trainer.train(job(tiny_data, f"checkpoint.save={tmp_path / 's'}", f"checkpoint.export_hf={tmp_path / 'hf'}"))
    ck = tmp_path / "ck"
    trainer.train(job(tiny_data, "train.train_iters=3", "scheduler.decay_iters=6", f"checkpoint.save={ck}"))
    layouts = {"dp": [], "tp": ["parallel.tensor_model_parallel_size=2"],
               "pp": ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=1f1b"]}
    jobs = [job_overrides(tiny_data, *o) for o in layouts.values()]
    jobs[0].append(f"checkpoint.save={tmp_path / 'dp_ck'}")  # two ranks save; rank 0 alone claims the root
    jobs += [job_overrides(tiny_data, *o, f"checkpoint.load={ck}") for o in layouts.values()]
    # init from the exported HF dir at tp=2 (weights sharded on load); lr ~ 0 keeps them: eval == single's
    jobs.append(job_overrides(tiny_data, *layouts["tp"], f"checkpoint.init_from={tmp_path / 'hf'}",
                              "train.train_iters=1", "optimizer.lr=1e-12", "scheduler.warmup_iters=0"))
    # the fused linear+CE loss under FSDP, TP (vocab-parallel over the local embed_out shard) and PP (last stage)
    fused_layouts = {"dp-fused": layouts["dp"], "tp-fused": layouts["tp"], "pp-fused": layouts["pp"]}
    jobs += [job_overrides(tiny_data, *o, "train.fused_loss=true") for o in fused_layouts.values()]
    runs = run_distributed(_layouts_worker, 2, jobs, timeout=500)
    assert runs[1] == runs[0]  # every rank reports the same global losses and eval
    full, resumed = runs[0][:3] + runs[0][7:], runs[0][3:6]
    layouts.update(fused_layouts)
    assert runs[0][6][1]["valid"]["loss"] == pytest.approx(single.eval["valid"]["loss"], rel=1e-5)
    for name, (losses, ev) in zip(layouts, full):
        assert sorted(losses) == sorted(single.losses), name
        for i in single.losses:
            assert losses[i] == pytest.approx(single.losses[i], rel=1e-5, abs=1e-6), (name, i)
        assert ev["valid"]["loss"] == pytest.approx(single.eval["valid"]["loss"], rel=1e-5), name
    for name, (losses, _) in zip(layouts, resumed):
        assert sorted(losses) == [4, 5, 6], name
        for i in (4, 5, 6):
            assert losses[i] == pytest.approx(single.losses[i], rel=1e-5, abs=1e-6), (name, i)
    assert sorted(os.listdir(tmp_path / "dp_ck")) == ["iter_0000006", "latest", "metrics.jsonl"]
    assert leftovers(tmp_path) == []


def test_init_from_hf_and_export(tiny_data, tmp_path):
    """The final model exports to an HF dir (loadable by transformers) and a run initialised from it
    starts from exactly those weights."""
    from transformers import GPTNeoXForCausalLM

    a = trainer.train(job(tiny_data, "train.train_iters=3", f"checkpoint.save={tmp_path / 'a'}",
                          f"checkpoint.export_hf={tmp_path / 'hf'}"))
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.hidden_size == 64 and hf.config.num_hidden_layers == 2
    # lr ~ 0: one step leaves the imported weights as they were, so the eval loss must be a's
    b = trainer.train(job(tiny_data, "train.train_iters=1", "optimizer.lr=1e-12", "scheduler.warmup_iters=0",
                          f"checkpoint.init_from={tmp_path / 'hf'}"))
    assert b.eval["valid"]["loss"] == pytest.approx(a.eval["valid"]["loss"], rel=1e-6)
    with pytest.raises(UserError, match="is not a pythia-70m model"):
        trainer.train(job(tiny_data, "model_preset=pythia-70m", f"checkpoint.init_from={tmp_path / 'hf'}"))
