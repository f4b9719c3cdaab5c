"""Checkpoint integrity: the manifest of sizes + CRC-32s recorded while writing, checked by every loader,
`megacpt checkpoint verify`, and `train` on a damaged latest checkpoint (names the previous one, resumes)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from megacpt.checkpoint import (CheckpointManager, DamagedCheckpoint, checkpoint_tensors, load_checkpoint,
                                read_model_config, read_tensors, save_checkpoint, verify_checkpoint)
from megacpt.checkpoint.unpickler import safe_reader
from megacpt.cli import main
from megacpt.convert import load_model
from megacpt.errors import UserError

from .helpers import assert_states_equal, build, fake_step, model_config, named_state, optimizer

SHARD = "__0_0.distcp"


def _trained(tmp_path: Path, name: str = "ck") -> Path:
    """A one-process checkpoint root with optimizer state, model config and a tokenizer file."""
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {"vocab": {"a": 0}}}\n')
    model = build()
    opt = optimizer(model.parameters())
    fake_step(model.parameters(), opt)
    save_checkpoint(tmp_path / name, 1, model, opt, extra={"it": 1}, rank_extra={"r": 0},
                    model_config=model_config(), tokenizer=tok, run_config={"x": 1})
    return tmp_path / name


def _item_ends(ck: Path) -> dict[str, int]:
    """'model' / 'optim' -> the end offset (in the shard) of the last item of that kind."""
    md = safe_reader(ck).read_metadata()
    ends = {"model": 0, "optim": 0}
    for idx, info in md.storage_data.items():
        assert info.relative_path == SHARD
        kind = idx.fqn.split(".")[0]
        ends[kind] = max(ends[kind], info.offset + info.length)
    return ends


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- writing

def test_manifest_lists_every_file_checksummed_while_writing(tmp_path, monkeypatch):
    """Every file of a (sync or async) save is in complete.json's manifest with its true size and CRC-32,
    and none of them was read back to compute it."""
    import megacpt.checkpoint.state as S

    def no_reread(path):
        raise AssertionError(f"{path} was read back to checksum it")

    monkeypatch.setattr(S, "file_crc32", no_reread)
    sync = _trained(tmp_path, "sync") / "iter_0000001"
    model = build()
    opt = optimizer(model.parameters())
    fake_step(model.parameters(), opt)
    mgr = CheckpointManager(tmp_path / "async", async_save=True)
    mgr.save(1, model, opt, rank_extra={"r": 0}, model_config=model_config())
    mgr.close()
    for ck in (sync, tmp_path / "async" / "iter_0000001"):
        manifest = json.loads((ck / "complete.json").read_text())["manifest"]
        assert manifest["checksum"] == "crc32"
        on_disk = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())
        assert sorted(manifest["files"]) == [f for f in on_disk if f != "complete.json"]
        assert {".metadata", SHARD, "objects.json", "extra.json", "model_config.json",
                "rank_extra/rank_00000.json"} <= set(manifest["files"])
        for rel, entry in manifest["files"].items():
            data = (ck / rel).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, rel
        assert verify_checkpoint(ck).manifest
    assert "tokenizer/tokenizer.json" in json.loads((sync / "complete.json").read_text())["manifest"]["files"]


# ---------------------------------------------------------------------------------------------- damage

@pytest.mark.fault(fault="truncated .distcp shard (inside the weights)",
                   stage="convert / score / eval (load a checkpoint)",
                   sees="one line: checkpoint DIR is damaged (__0_0.distcp: expected N bytes, found M bytes)",
                   left="the checkpoint untouched; no output written")
def test_truncated_weights_is_one_line_naming_the_file(tmp_path, capsys):
    ck = _trained(tmp_path) / "iter_0000001"
    size = (ck / SHARD).stat().st_size
    cut = _item_ends(ck)["model"] // 2  # inside the weights
    os.truncate(ck / SHARD, cut)
    rc = main(["convert", "megacpt-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"megacpt convert: error: checkpoint {ck} is damaged ({SHARD}: expected {size} bytes, "
                                f"found {cut} bytes)")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(DamagedCheckpoint, match=rf"{SHARD}: expected {size} bytes, found {cut} bytes"):
        load_model(tmp_path / "ck")  # what score / eval load through
    with pytest.raises(DamagedCheckpoint, match=SHARD):
        read_tensors(ck, ["embed_in.weight"])


@pytest.mark.fault(fault="truncated .distcp shard (inside the optimizer state only)",
                   stage="score / eval / init_from (weights-only load), checkpoint verify",
                   sees="one line: checkpoint DIR is damaged (__0_0.distcp: expected N bytes, found M bytes)",
                   left="the checkpoint untouched")
def test_optimizer_state_truncation_detected_by_weights_only_load_and_verify(tmp_path, capsys):
    ck = _trained(tmp_path) / "iter_0000001"
    size = (ck / SHARD).stat().st_size
    ends = _item_ends(ck)
    assert ends["model"] < ends["optim"] == size  # the shard ends in optimizer state
    os.truncate(ck / SHARD, ends["model"])  # every weight intact, some optimizer state gone
    for load in (lambda: load_checkpoint(ck, build()), lambda: load_model(ck),
                 lambda: load_checkpoint(ck, build(), optimizer(build().parameters()))):
        with pytest.raises(DamagedCheckpoint, match=rf"{SHARD}: expected {size} bytes, found {ends['model']} bytes"):
            load()
    assert main(["checkpoint", "verify", str(tmp_path / "ck")]) == 1
    assert capsys.readouterr().out == f"DAMAGED {ck}: {SHARD}: expected {size} bytes, found {ends['model']} bytes\n"


@pytest.mark.fault(fault="one flipped byte, same size (.distcp, JSON)", stage="any checkpoint load, checkpoint verify",
                   sees="one line: checkpoint DIR is damaged "
                        "(FILE: expected crc32 X, found crc32 Y (same size, different bytes))",
                   left="the checkpoint untouched")
def test_flipped_byte_with_the_same_size_is_found_by_the_checksum(tmp_path, capsys):
    ck = _trained(tmp_path) / "iter_0000001"
    _flip(ck / SHARD, _item_ends(ck)["model"] - 3)  # inside a weight: the load itself would not notice
    crc = r"expected crc32 [0-9a-f]{8}, found crc32 [0-9a-f]{8} \(same size, different bytes\)"
    with pytest.raises(DamagedCheckpoint, match=rf"is damaged \({SHARD}: {crc}\)$"):
        verify_checkpoint(ck)
    with pytest.raises(DamagedCheckpoint, match=SHARD):
        load_checkpoint(ck, build())
    with pytest.raises(DamagedCheckpoint, match=SHARD):
        checkpoint_tensors(ck)
    rc = main(["convert", "megacpt-to-hf", "--ckpt", str(ck), "--out", str(tmp_path / "hf")])
    assert rc == 2 and SHARD in _one_line(capsys.readouterr().err)
    # JSON files are checked as they are read
    ck2 = _trained(tmp_path, "ck2") / "iter_0000001"
    text = (ck2 / "model_config.json").read_text()
    (ck2 / "model_config.json").write_text(text.replace('"hidden_size": 32', '"hidden_size": 33'))
    with pytest.raises(DamagedCheckpoint, match=rf"model_config\.json: {crc}"):
        read_model_config(ck2)


def test_recently_written_files_are_not_remembered_as_verified(tmp_path):
    """A process remembers verified files by (size, mtime): one written in the last seconds is checked again,
    so a change within the filesystem's timestamp granularity is still found."""
    ck = _trained(tmp_path) / "iter_0000001"
    verify_checkpoint(ck)
    st = (ck / SHARD).stat()
    _flip(ck / SHARD, 100)
    os.utime(ck / SHARD, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(DamagedCheckpoint, match=SHARD):
        verify_checkpoint(ck)


# ---------------------------------------------------------------------------------------------- verify

def test_checkpoint_verify_command(tmp_path, capsys):
    root = tmp_path / "run"
    model = build()
    mgr = CheckpointManager(root, keep_last=0)
    for it in (1, 2):
        mgr.save(it, model, model_config=model_config())
    one, two = root / "iter_0000001", root / "iter_0000002"
    assert main(["checkpoint", "verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {two}: 5 files, ") and out.endswith("bytes, sizes and crc32 match\n")
    assert main(["checkpoint", "verify", str(one)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {one}: ")
    _flip(one / SHARD, 100)
    assert main(["checkpoint", "verify", str(root), "--all"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"OK {two}")
    assert lines[0].startswith(f"DAMAGED {one}: {SHARD}: expected crc32 ")
    assert main(["checkpoint", "verify", str(root), "--all", "--json"]) == 1
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in recs] == ["damaged", "ok"] and recs[0]["problems"][0]["file"] == SHARD
    assert recs[1]["files"] == 5 and recs[1]["path"] == str(two)
    os.unlink(two / "extra.json")
    assert main(["checkpoint", "verify", str(two)]) == 1
    assert capsys.readouterr().out == f"DAMAGED {two}: extra.json: expected 3 bytes, found no such file\n"
    assert main(["checkpoint", "verify", str(tmp_path)]) == 2
    assert "neither a checkpoint root" in _one_line(capsys.readouterr().err)


def test_previous_checkpoint_skips_damaged_ones(tmp_path):
    from megacpt.checkpoint import previous_checkpoint

    root = tmp_path / "run"
    mgr = CheckpointManager(root, keep_last=0)
    model = build()
    for it in (1, 2, 3):
        mgr.save(it, model)
    one, two, three = (root / f"iter_000000{i}" for i in (1, 2, 3))
    assert previous_checkpoint(three) == two and previous_checkpoint(one) is None
    os.truncate(two / SHARD, 10)
    assert previous_checkpoint(three) == one  # sizes are checked; the offer must be loadable
    (three / "complete.json").unlink()       # not complete: never offered, never listed
    assert previous_checkpoint(root / "iter_0000004") == one


def test_verify_flags_are_frozen():
    from megacpt.cli import build_command_parser

    args = build_command_parser("checkpoint").parse_args(["verify", "/ck", "--all", "--json"])
    assert (args.action, args.path, args.all, args.json) == ("verify", "/ck", True, True)


# ---------------------------------------------------------------------------------------------- old format

def _strip_manifest(ck: Path) -> None:
    """What a checkpoint saved by megacpt before manifests looks like: complete.json without one."""
    info = json.loads((ck / "complete.json").read_text())
    del info["manifest"]
    (ck / "complete.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


@pytest.mark.fault(fault="truncated .distcp shard of a checkpoint without a manifest (older megacpt)",
                   stage="any checkpoint load, checkpoint verify",
                   sees="a note that it cannot be verified; truncation: one line, "
                        "FILE: expected at least N bytes (.metadata)",
                   left="the checkpoint untouched")
def test_old_checkpoint_without_manifest_loads_with_a_note(tmp_path, capsys, caplog, monkeypatch):
    ck = _trained(tmp_path) / "iter_0000001"
    _strip_manifest(ck)
    model = build()
    opt = optimizer(model.parameters())
    fake_step(model.parameters(), opt)
    model2 = build(seed=2)
    opt2 = optimizer(model2.parameters())
    monkeypatch.setattr(logging.getLogger("megacpt"), "propagate", True)  # an earlier `megacpt train` stops it
    loaded = load_checkpoint(tmp_path / "ck", model2, opt2)
    assert loaded.extra == {"it": 1}
    assert_states_equal(named_state(model, opt), named_state(model2, opt2))
    notes = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert notes == [f"checkpoint {ck} has no manifest (saved before megacpt recorded checksums): its files "
                     "cannot be verified"]
    assert read_model_config(ck) == model_config()
    assert main(["checkpoint", "verify", str(ck)]) == 3
    assert capsys.readouterr().out.startswith(f"UNVERIFIED {ck}: no manifest")
    # a truncated shard is still found, against .metadata
    end = _item_ends(ck)["optim"]
    os.truncate(ck / SHARD, end - 10)
    with pytest.raises(DamagedCheckpoint, match=rf"{SHARD}: expected at least {end} bytes \(\.metadata\), "
                                                rf"found {end - 10} bytes"):
        load_model(ck)


# ---------------------------------------------------------------------------------------------- train

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tests.train.conftest import make_dataset

    d = tmp_path_factory.mktemp("integrity_data")
    return {"train": make_dataset(d / "train"), "valid": make_dataset(d / "valid", n_docs=20, seed=1)}


@pytest.mark.fault(fault="latest checkpoint damaged (truncated or flipped byte)", stage="train (resume)",
                   sees="one line: checkpoint iter_N is damaged (FILE: expected, found); the previous complete "
                        "checkpoint is iter_M: resume from it with checkpoint.load=ROOT/iter_M",
                   left="both checkpoints untouched; resuming from iter_M re-saves iter_N")
def test_train_on_damaged_latest_names_the_previous_checkpoint_and_resumes_from_it(tiny_data, tmp_path, capsys):
    from megacpt.train import trainer
    from megacpt.train.job import load_job_config
    from tests.train.conftest import job_overrides

    root = tmp_path / "run"
    over = job_overrides(tiny_data, "train.train_iters=4", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
                         "data.eval_prefixes={}", f"checkpoint.save={root}")
    first = trainer.train(load_job_config(None, over))
    two, four = root / "iter_0000002", root / "iter_0000004"
    names = sorted(checkpoint_tensors(four, prefix=""))
    want = read_tensors(four, names, prefix="")
    size = (four / SHARD).stat().st_size
    os.truncate(four / SHARD, size - 1000)
    rc = main(["train", *over])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"megacpt train: error: checkpoint {four} is damaged ({SHARD}: expected {size} bytes, "
                                f"found {size - 1000} bytes); the previous complete checkpoint is iter_0000002: "
                                f"resume from it with checkpoint.load={two}")
    # the offered resume continues exactly as a resume from an intact latest would
    again = trainer.train(load_job_config(None, [*over, f"checkpoint.load={two}"]))
    assert sorted(again.losses) == [3, 4] and all(again.losses[i] == first.losses[i] for i in (3, 4))
    got = read_tensors(four, names, prefix="")
    for n in names:
        assert torch.equal(got[n], want[n]), n
    assert verify_checkpoint(root).path == four
    # same size, one byte flipped: found by the checksum when restoring, with the same offer
    _flip(four / SHARD, size // 2)
    with pytest.raises(UserError, match=rf"checkpoint {re.escape(str(four))} is damaged "
                                        rf"\({SHARD}: expected crc32 .*\); "
                                        rf"the previous complete checkpoint is iter_0000002: resume from it with "
                                        rf"checkpoint.load={re.escape(str(two))}$"):
        trainer.train(load_job_config(None, [*over, "train.train_iters=6"]))
    shutil.rmtree(two)
    os.truncate(four / SHARD, 10)  # found before any model is built
    with pytest.raises(UserError, match=rf"is damaged .*; no earlier complete checkpoint is left in "
                                        rf"{re.escape(str(root))}$"):
        trainer.train(load_job_config(None, [*over, "train.train_iters=6"]))
