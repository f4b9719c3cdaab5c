"""Single-process checkpoints: exact resume, extras, keep-last-k, async, atomicity under kill -9, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megacpt.errors import UserError
from megacpt.checkpoint import (CheckpointManager, from_jsonable, latest_checkpoint, list_checkpoints,
                                      load_checkpoint, read_model_config, save_checkpoint, to_jsonable)

from .helpers import assert_states_equal, build, fake_step, model_config, named_state, optimizer, reseal


def test_exact_resume_model_optimizer_extras(tmp_path):
    model = build()
    opt = optimizer(model.parameters())
    for _ in range(2):
        fake_step(model.parameters(), opt)
    opt.param_groups[0]["lr"] = 3e-3  # a scheduler changed it: must come back
    rng = torch.get_rng_state()
    extra = {"consumed_samples": 96, "sched": {"last": 2, "betas": (0.9, 0.95)}, "note": None}
    save_checkpoint(tmp_path, 2, model, opt, extra=extra, rank_extra={"rng": rng}, model_config=model_config(),
                    run_config={"train": {"train_iters": 10}})

    model2 = build(seed=1)
    opt2 = optimizer(model2.parameters())  # fresh: no state yet, lr 1e-2
    ck = load_checkpoint(tmp_path, model2, opt2)
    assert ck.iteration == 2 and ck.extra == extra and torch.equal(ck.rank_extra["rng"], rng)
    assert opt2.param_groups[0]["lr"] == 3e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    assert_states_equal(named_state(model, opt), named_state(model2, opt2))
    for _ in range(2):  # and training continues identically
        fake_step(model.parameters(), opt)
        fake_step(model2.parameters(), opt2)
    assert_states_equal(named_state(model, opt), named_state(model2, opt2))
    assert read_model_config(tmp_path) == model_config()
    assert json.loads((ck.path / "run_config.json").read_text()) == {"train": {"train_iters": 10}}


def test_weights_only_load_and_dtype_cast(tmp_path):
    model = build()
    save_checkpoint(tmp_path, 1, model, optimizer(model.parameters()))
    model2 = build(seed=3).to(torch.bfloat16)
    load_checkpoint(tmp_path / "iter_0000001", model2)  # no optimizer: weights only, cast to bf16
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n


def test_save_before_first_step_does_not_touch_the_optimizer(tmp_path):
    """torch would initialise an empty optimizer with a zero-grad step (AdamW step=1): not when we save."""
    model, model2 = build(), build()
    opt, opt2 = optimizer(model.parameters()), optimizer(model2.parameters())
    save_checkpoint(tmp_path, 0, model, opt)
    assert not opt.state
    model3 = build(seed=4)
    opt3 = optimizer(model3.parameters())
    load_checkpoint(tmp_path, model3, opt3)
    assert not opt3.state
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        fake_step(m.parameters(), o)
    assert_states_equal(named_state(model, opt), named_state(model2, opt2))
    assert_states_equal(named_state(model, opt), named_state(model3, opt3))


def test_json_codec_round_trip():
    value = {"t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "u8": torch.tensor([1, 255], dtype=torch.uint8),
             "i64": torch.tensor(-(2**40)), "f64": torch.tensor([1e-300]), "b": torch.tensor([True, False]),
             "empty": torch.zeros(0, 3), "tup": (1, (2.5, "x")), "list": [None, True, {"k": 1}]}
    back = from_jsonable(json.loads(json.dumps(to_jsonable(value))))
    assert back.keys() == value.keys() and back["tup"] == value["tup"] and back["list"] == value["list"]
    for k in ("t", "u8", "i64", "f64", "b", "empty"):
        assert back[k].dtype == value[k].dtype and back[k].shape == value[k].shape and torch.equal(back[k], value[k])
    with pytest.raises(UserError, match=r"extra\.sched: object cannot be saved"):
        to_jsonable({"sched": object()})
    with pytest.raises(UserError, match="key 3 is not a string"):
        to_jsonable({3: 1})


def test_keep_last_k_and_resave(tmp_path):
    model = build()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20, 30, 40):
        mgr.save(it, model, extra={"it": it})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000030", "iter_0000040"]
    assert latest_checkpoint(tmp_path).name == "iter_0000040"
    mgr.save(40, model, extra={"it": "again"})  # same iteration again (after a resume): replaced
    assert load_checkpoint(tmp_path, model).extra == {"it": "again"}
    assert sorted(os.listdir(tmp_path)) == ["iter_0000030", "iter_0000040", "latest"]
    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for it in range(3):
        keep_all.save(it, model)
    assert len(list_checkpoints(tmp_path / "all")) == 3
    with pytest.raises(UserError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_async_save_stages_before_returning(tmp_path):
    model = build()
    opt = optimizer(model.parameters())
    fake_step(model.parameters(), opt)
    before = named_state(model, opt)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=True)
    mgr.save(1, model, opt, extra={"a": 1})
    assert latest_checkpoint(tmp_path) is None  # not complete before wait/next save/close
    fake_step(model.parameters(), opt)  # training goes on (in place) while the writer runs
    mgr.save(2, model, opt)  # waits for and finalises iteration 1 first
    assert latest_checkpoint(tmp_path).name == "iter_0000001"
    mgr.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_0000001", "iter_0000002"]
    after = named_state(model, opt)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for it, want in ((1, before), (2, after)):  # each holds the state of the moment save() was called
        model2 = build(seed=5)
        opt2 = optimizer(model2.parameters())
        load_checkpoint(tmp_path / f"iter_{it:07d}", model2, opt2)
        assert_states_equal(want, named_state(model2, opt2))


def test_load_errors_name_the_tensor(tmp_path):
    from megacpt.config import ModelConfig
    from megacpt.model.gpt_neox import GPTNeoX

    model = build()
    save_checkpoint(tmp_path, 1, model)
    wider = GPTNeoX(ModelConfig(**{**model_config().to_dict(), "intermediate_size": 64}))
    with pytest.raises(UserError, match=r"'model\.layers\.0\.mlp\.dense_h_to_4h\.weight': checkpoint shape \[128, 32\] "
                                        r"!= model shape \[64, 32\]"):
        load_checkpoint(tmp_path, wider)
    with pytest.raises(UserError, match=r"holds weights only \(no optimizer state\)"):
        fresh = build()
        load_checkpoint(tmp_path, fresh, optimizer(fresh.parameters()))  # saved without an optimizer
    deeper = GPTNeoX(ModelConfig(**{**model_config().to_dict(), "num_layers": 5}))
    with pytest.raises(UserError, match=r"missing tensor 'model\.layers\.4\."):
        load_checkpoint(tmp_path, deeper)


# ---------------------------------------------------------------------------------------------- kill -9
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {repo!r})
    from tests.checkpoint.helpers import build, optimizer, fake_step
    import megacpt.checkpoint as C
    import megacpt.checkpoint.state as S

    root, where = sys.argv[1], sys.argv[2]
    model = build(); opt = optimizer(model.parameters()); fake_step(model.parameters(), opt)
    mgr = C.CheckpointManager(root, keep_last=3)
    mgr.save(1, model, opt, extra={{"it": 1}})
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "writing":        # in the middle of DCP writing the tensor files
        from torch.distributed.checkpoint import filesystem
        filesystem._write_files_from_queue = die
    elif where == "finalize":     # complete.json written into the .tmp dir, not yet renamed
        S.fsync_dir = die
    fake_step(model.parameters(), opt)
    mgr.save(2, model, opt, extra={{"it": 2}})
    print("not killed")
""")


@pytest.mark.parametrize("where", ["writing", "finalize"])
def test_save_killed_midway_leaves_previous_checkpoint(tmp_path, where):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "killer.py"
    script.write_text(_KILLER.format(repo=repo))
    root = tmp_path / "ck"
    r = subprocess.run([sys.executable, str(script), str(root), where], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    # the killed save left only a .tmp dir: never listed, never pointed to
    assert (root / "iter_0000002.tmp").is_dir()
    assert [p.name for p in list_checkpoints(root)] == ["iter_0000001"]
    assert latest_checkpoint(root).name == "iter_0000001"
    model = build(seed=9)
    assert load_checkpoint(root, model).extra == {"it": 1}
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(root / "iter_0000002.tmp", model)
    # the next save cleans up the leftover
    CheckpointManager(root, keep_last=3).save(3, model)
    assert sorted(os.listdir(root)) == ["iter_0000001", "iter_0000003", "latest"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_metadata_is_not_unpickled(tmp_path, monkeypatch):
    """DCP's .metadata is a pickle: only DCP's metadata classes may be built from it."""
    import pickle

    monkeypatch.chdir(tmp_path)
    model = build()
    save_checkpoint(tmp_path / "ck", 1, model, model_config=model_config())
    md = tmp_path / "ck" / "iter_0000001" / ".metadata"
    md.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(UserError, match=r"is damaged \(\.metadata: expected \d+ bytes"):  # the manifest disagrees
        load_checkpoint(tmp_path / "ck", build())
    reseal(md.parent)  # a crafted checkpoint comes with a matching manifest: the unpickler is what stops it
    with pytest.raises(UserError, match=r"\.metadata references posix\.system.*refusing to unpickle"):
        load_checkpoint(tmp_path / "ck", build())
    from megacpt.convert import load_model

    with pytest.raises(UserError, match="refusing to unpickle"):
        load_model(tmp_path / "ck")
    md.write_bytes(b"\x80\x04garbage")
    reseal(md.parent)
    with pytest.raises(UserError, match="unreadable .metadata"):
        load_checkpoint(tmp_path / "ck", build())
    assert not (tmp_path / "PWNED").exists()
