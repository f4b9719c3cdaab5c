"""Resharding: a checkpoint saved at one layout loads bit-exactly at another (4 gloo processes).

For each layout the workers load a single-process checkpoint, check every local shard, take one
deterministic step and save (async) at that layout; the parent loads that back at tp1/pp1/dp1 and compares
with the single-process reference that took the same step: both directions, bit-exact. The same run loads
an HF dir (``load_weights``) and its conversion at tp2*pp2 and saves them for the HF round trip.
One process spawn serves every test here (spawning 4 torch processes dominates the cost on 2 cores).
"""
from __future__ import annotations

import json

import pytest
import torch

from megacpt.testing import run_distributed
from megacpt.checkpoint import load_checkpoint, read_tensors, save_checkpoint, verify_checkpoint

from .helpers import assert_states_equal, build, fake_step, full, model_config, named_state, optimizer

pytest.importorskip("megacpt.parallel.pipeline")

LAYOUTS = {
    # name: (ParallelConfig kwargs, virtual stages per rank)
    "tp2pp2": (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 1),
    "pp2vpp2_fsdp2": (dict(pipeline_model_parallel_size=2, data_parallel_type="fsdp",
                           virtual_pipeline_model_parallel_size=2, pipeline_schedule="interleaved_1f1b"), 2),
}


def _layouts_worker(rank: int, world: int, root_in: str, out: str, hf_dir: str, ck_conv: str) -> dict:
    owned = {layout: _reshard(rank, world, layout, root_in, f"{out}/{layout}") for layout in LAYOUTS}
    _convert_at_tp2pp2(world, hf_dir, ck_conv, f"{out}/conv")
    owned["damaged"] = _damaged_collective_load(rank, root_in, f"{out}/damaged")
    return owned


def _damaged_collective_load(rank: int, root_in: str, out: str) -> str | None:
    """A byte flipped in the shard, whose checksum rank 1 computes (the files are dealt out over the ranks):
    every rank raises the same error, none waits."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    from megacpt.checkpoint import DamagedCheckpoint

    ck = Path(out) / "iter_0000002"
    if rank == 0:
        shutil.copytree(Path(root_in) / "iter_0000002", ck)
        data = bytearray((ck / "__0_0.distcp").read_bytes())
        data[100] ^= 1
        (ck / "__0_0.distcp").write_bytes(bytes(data))
    dist.barrier()
    try:
        load_checkpoint(ck, build(seed=7))
    except DamagedCheckpoint as e:
        return str(e)
    return None


def _stage_parts(world: int, pcfg, full_model, vpp: int = 1) -> list:
    from megacpt.parallel import build_mesh, parallelize_part
    from megacpt.parallel.pipeline import split_stage, stage_ids

    mesh = build_mesh(pcfg, world, full_model.cfg)
    p = pcfg.resolve(world)
    pp = p.pipeline_model_parallel_size
    ids = stage_ids(mesh["pp"].get_local_rank(), pp, vpp)
    return [parallelize_part(split_stage(full_model, sid, pp * vpp, copy_model=j < len(ids) - 1), mesh, p,
                             in_pipeline=True) for j, sid in enumerate(ids)]


def _reshard(rank: int, world: int, layout: str, root_in: str, root_out: str) -> list[str]:
    from megacpt.config import ParallelConfig
    from megacpt.checkpoint import CheckpointManager

    kw, vpp = LAYOUTS[layout]
    parts = _stage_parts(world, ParallelConfig(**kw), build(seed=123), vpp)  # init differs from the checkpoint
    params = [q for part in parts for q in part.parameters()]
    opt = optimizer(params)  # one optimizer over all chunks of this rank
    model_arg = parts[0] if len(parts) == 1 else parts
    ck = load_checkpoint(root_in, model_arg, opt)
    assert ck.iteration == 2 and ck.extra == {"from": "single"}

    # every local shard equals the slice of the single-process tensor (read in full here)
    names = [n for part in parts for n, _ in part.named_parameters()]
    ref = read_tensors(root_in, names)
    state_names = [f"state.{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq", "step")]
    ref_opt = read_tensors(root_in, state_names, prefix="optim.")
    by_name = {n: q for part in parts for n, q in part.named_parameters()}
    for n in names:
        assert torch.equal(full(by_name[n].detach()), ref[n]), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(full(opt.state[by_name[n]][k]), ref_opt[f"state.{n}.{k}"]), (n, k)
    assert opt.param_groups[0]["lr"] == 3e-3

    fake_step(params, opt)
    mgr = CheckpointManager(root_out, keep_last=1, async_save=True)
    mgr.save(3, model_arg, opt, extra={"from": layout}, rank_extra={"rank": rank}, model_config=model_config())
    mgr.close()
    return names


def _convert_at_tp2pp2(world: int, hf_dir: str, ck_conv: str, root_out: str) -> None:
    from megacpt.config import ParallelConfig
    from megacpt.convert import load_config, load_weights
    from megacpt.model.gpt_neox import GPTNeoX
    from megacpt.checkpoint import CheckpointManager

    cfg = load_config(ck_conv)  # vocab padded for tp2 by the conversion
    pcfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    torch.manual_seed(0)
    (a,) = _stage_parts(world, pcfg, GPTNeoX(cfg))
    torch.manual_seed(1)
    (b,) = _stage_parts(world, pcfg, GPTNeoX(cfg))
    load_weights(a, hf_dir)             # full HF tensors -> this rank's shards
    load_checkpoint(ck_conv, b)         # the converted checkpoint, resharded by DCP
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(full(x.detach()), full(y.detach())), n
    CheckpointManager(root_out).save(0, a, model_config=cfg)


@pytest.fixture(scope="module")
def layouts_run(tmp_path_factory):
    """The single-process reference, its checkpoint, an HF dir + its tp2*pp2 conversion; one 4-rank run."""
    pytest.importorskip("transformers")
    from megacpt.convert.hf_gpt_neox import hf_to_megacpt
    from tests.convert.helpers import make_hf_dir

    tmp = tmp_path_factory.mktemp("layouts")
    ref = build(seed=0)
    opt = optimizer(ref.parameters())
    for _ in range(2):
        fake_step(ref.parameters(), opt)
    opt.param_groups[0]["lr"] = 3e-3
    save_checkpoint(tmp / "in", 2, ref, opt, extra={"from": "single"})
    hf = make_hf_dir(tmp / "hf", seed=4)
    conv = hf_to_megacpt(hf, tmp / "conv_in", tp=2, pp=2)
    owned = run_distributed(_layouts_worker, 4, str(tmp / "in"), str(tmp / "out"), str(hf), str(conv),
                            timeout=300)
    fake_step(ref.parameters(), opt)  # the step every layout took after loading
    return dict(tmp=tmp, ref=ref, opt=opt, owned=owned, hf=hf)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reshard_single_to_layout_and_back(layouts_run, layout):
    ref, opt = layouts_run["ref"], layouts_run["opt"]
    # every parameter is owned by some rank (TP/DP replicas own the same names)
    owned = sorted({n for r in layouts_run["owned"] for n in r[layout]})
    assert owned == sorted(n for n, _ in ref.named_parameters())
    model2 = build(seed=1)
    opt2 = optimizer(model2.parameters())
    ck = load_checkpoint(layouts_run["tmp"] / "out" / layout, model2, opt2)
    assert ck.iteration == 3 and ck.extra == {"from": layout} and ck.rank_extra == {"rank": 0}
    assert_states_equal(named_state(ref, opt), named_state(model2, opt2))
    assert sorted(p.name for p in (ck.path / "rank_extra").iterdir()) == [f"rank_{r:05d}.json" for r in range(4)]
    info = json.loads((ck.path / "complete.json").read_text())
    assert info["world_size"] == 4
    # every rank's files are in the one manifest rank 0 wrote
    on_disk = sorted(p.relative_to(ck.path).as_posix() for p in ck.path.rglob("*") if p.is_file())
    assert sorted(info["manifest"]["files"]) == [f for f in on_disk if f != "complete.json"]
    assert len([f for f in on_disk if f.endswith(".distcp")]) > 1
    assert verify_checkpoint(ck.path).files == len(on_disk) - 1


@pytest.mark.distributed
def test_damage_found_by_one_rank_stops_every_rank(layouts_run):
    msgs = [r["damaged"] for r in layouts_run["owned"]]
    assert len(set(msgs)) == 1 and msgs[0] is not None, msgs
    assert "__0_0.distcp: expected crc32 " in msgs[0] and "(same size, different bytes)" in msgs[0]


@pytest.mark.distributed
def test_hf_round_trip_through_tp2pp2_is_bit_exact(layouts_run, tmp_path):
    """HF -> (load_weights / converted checkpoint) at tp2*pp2 -> save there -> HF: every tensor bit-exact."""
    from megacpt.convert.hf_gpt_neox import megacpt_to_hf
    from tests.convert.helpers import assert_bit_exact, read_safetensors_dir

    out = megacpt_to_hf(layouts_run["tmp"] / "out" / "conv", tmp_path / "hf_out")
    assert_bit_exact(read_safetensors_dir(layouts_run["hf"]), read_safetensors_dir(out))
