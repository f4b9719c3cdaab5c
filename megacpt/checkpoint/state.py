"""DCP training state: ``CheckpointManager.save`` (atomic, optionally async, keep-last-k) and
``load_checkpoint`` (in place, at the current layout, with optimizer and extras)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist
import torch.nn as nn

from megacpt.checkpoint.checksum import ALGORITHM, FileRecords, file_crc32, hashing_storage_writer, write_json
from megacpt.checkpoint.distributed import (broadcast_error, broadcast_object, is_distributed, quiet_single_process,
                                            rank, world_size)
from megacpt.checkpoint.encoding import from_jsonable, to_jsonable
from megacpt.checkpoint.files import (COMPLETE, FORMAT, LATEST, MODEL_CONFIG, atomic_text, copy_tokenizer,
                                      fsync_dir, iteration_dirname, latest_checkpoint, list_checkpoints, read_complete,
                                      read_json, resolve_checkpoint)
from megacpt.checkpoint.integrity import verify
from megacpt.checkpoint.names import is_tensor, normalize, state_items
from megacpt.checkpoint.unpickler import safe_reader
from megacpt.checkpoint.weights import checkpoint_tensors
from megacpt.errors import UserError
from megacpt.io import (claim_output, commit_tmp, discard_tmp, pause_for_test, remove_stale_temps, tmp_dir_for,
                        write_json_atomic)

log = logging.getLogger(__name__)


def _layout() -> dict:
    return {"world_size": world_size()}


# ----------------------------------------------------------------------------------------------------
# save

@dataclass
class _Pending:
    future: Any
    tmp: Path
    final: Path
    iteration: int
    records: FileRecords          # the files this rank wrote, with their sizes and checksums
    optimizer: str = "none"


class CheckpointManager:
    """Saves ``ROOT/iter_XXXXXXX`` checkpoints atomically, keeps the last ``keep_last`` (0: all).

    With ``async_save`` the tensors are staged to CPU memory and written by a background thread
    (``dcp.async_save`` on a dedicated gloo group); the checkpoint is finalised (marked complete,
    ``latest`` updated, old ones pruned) by the next ``save``/``wait``/``close`` on every rank.

    ``ROOT`` is this job's from construction to `close` (``megacpt.io.claim_output``, taken by rank 0 alone: the
    other ranks only write into the temp dirs rank 0 names): a second live job saving there is refused, naming
    the holder's pid and host, and the temp dirs of a killed save (``.iter_X.HOST-PID-RAND.tmp``, unlocked) are
    removed, at the start and before each save. A save in progress is locked by its writer, so it is never
    removed. Use as a context manager, or call `close`.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, async_save: bool = False,
                 collective_timeout_s: float | None = None):
        if keep_last < 0:
            raise UserError(f"checkpoint.keep_last: {keep_last} must be >= 0 (0 keeps all)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        # the writer thread's group gives up on a lost peer as the job's own collectives do (None: torch's default)
        self.collective_timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
        self._pending: _Pending | None = None
        self._async_pg = None
        self._claim = contextlib.ExitStack()
        err = None
        if rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # the lock is .ROOT.lock beside ROOT (resolved: ROOT may be "." or end in "..")
                self._claim.enter_context(claim_output(self.root.resolve(), files=[], dirs=[self.root]))
                for old in self.root.glob("iter_*.tmp"):  # older megacpt's temp dirs (no owner): under the lock
                    shutil.rmtree(old, ignore_errors=True)
            except (OSError, UserError) as e:
                self._claim.close()
                err = e if isinstance(e, UserError) else UserError(f"checkpoint: cannot create {self.root}: {e}")
        broadcast_error(err)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public ------------------------------------------------------------------------------------
    def save(self, iteration: int, model: nn.Module | Sequence[nn.Module], optimizer: Any = None, *,
             extra: dict | None = None, rank_extra: dict | None = None, model_config: Any = None,
             tokenizer: str | os.PathLike | None = None, run_config: dict | None = None,
             layer_offset: int | Sequence[int] = 0) -> Path:
        """Save (collective: call on every rank). Returns the final checkpoint dir.

        ``extra``: JSON-able values and tensors, identical on all ranks (rank 0's copy is kept).
        ``rank_extra``: per-rank values (RNG state); restored only on a rank of the same number.
        ``run_config``: the resolved training config, saved as ``run_config.json``.
        """
        self.wait()
        models, optimizers, offsets = normalize(model, optimizer, layer_offset)
        final = self.root / iteration_dirname(iteration)
        err, tmp = None, None
        if rank() == 0:
            try:
                remove_stale_temps([], [self.root])  # killed saves since the claim (kept while young: io.py)
                tmp = tmp_dir_for(final)  # .iter_X.HOST-PID-RAND.tmp, locked by rank 0 until renamed
                (tmp / "rank_extra").mkdir()
            except OSError as e:
                if tmp is not None:
                    discard_tmp(tmp)
                err = UserError(f"checkpoint: cannot create a temp dir beside {final}: {e}")
        broadcast_error(err)
        tmp = Path(broadcast_object(None if tmp is None else str(tmp)))
        try:
            return self._save(tmp, final, iteration, models, optimizers, offsets, extra, rank_extra, model_config,
                              tokenizer, run_config)
        except BaseException:
            if rank() == 0:
                discard_tmp(tmp)
            raise

    def _save(self, tmp: Path, final: Path, iteration: int, models, optimizers, offsets, extra, rank_extra,
              model_config, tokenizer, run_config) -> Path:
        import torch.distributed.checkpoint as dcp  # lazy: see unpickler.py

        # an optimizer that never stepped has no state; asking torch for its state dict would initialise it
        # with a zero-gradient step (AdamW: step=1), changing the training run: save "empty" instead
        has_state = any(len(o.state) for o in optimizers)
        rank_json, bad = None, None
        try:
            rank_json = None if rank_extra is None else to_jsonable(rank_extra, f"rank_extra (rank {rank()})")
        except UserError as e:
            bad = e
        if is_distributed():  # agree on both before anything else is collective
            flags: list = [None] * world_size()
            dist.all_gather_object(flags, (has_state, None if bad is None else str(bad)))
            has_state = any(f[0] for f in flags)
            msgs = [f[1] for f in flags if f[1]]
            if msgs and bad is None:
                bad = UserError(msgs[0])
        if bad is not None:
            raise bad
        optim_kind = "none" if not optimizers else ("saved" if has_state else "empty")
        items = state_items(models, optimizers if has_state else [], offsets)
        tensors = {k: v for k, v, _, _ in items if is_tensor(v)}
        objects = {k: to_jsonable(v, k) for k, v, _, _ in items if not is_tensor(v)}
        if is_distributed():  # optimizer hyper-parameters of other pipeline stages: gather them all on rank 0
            gathered: list = [None] * world_size()
            dist.all_gather_object(gathered, objects)
            for g in gathered:
                objects.update(g)
        records = FileRecords(tmp)  # every file this rank writes, checksummed on its way to disk
        if rank_json is not None:
            write_json(tmp / "rank_extra" / f"rank_{rank():05d}.json", rank_json, records)
        err = None
        if rank() == 0:
            try:
                write_json(tmp / "objects.json", objects, records)
                write_json(tmp / "extra.json", to_jsonable(extra or {}, "extra"), records)
                if model_config is not None:
                    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
                    write_json(tmp / MODEL_CONFIG, cfg, records)
                if run_config is not None:
                    write_json(tmp / "run_config.json", run_config, records)
                if tokenizer is not None:
                    copy_tokenizer(tokenizer, tmp / "tokenizer", records)
            except (OSError, UserError) as e:
                err = e if isinstance(e, UserError) else UserError(f"checkpoint: writing {tmp}: {e}")
        broadcast_error(err)

        writer = hashing_storage_writer(tmp, records)  # DCP's FileSystemWriter, its shards checksummed
        if self.async_save:
            if is_distributed() and self._async_pg is None:
                self._async_pg = dist.new_group(backend="gloo", timeout=self.collective_timeout)  # the writer's own
            with quiet_single_process():
                fut = dcp.async_save(tensors, checkpoint_id=str(tmp), storage_writer=writer,
                                     process_group=self._async_pg, no_dist=not is_distributed())
            fut = getattr(fut, "upload_completion", fut)
            self._pending = _Pending(fut, tmp, final, int(iteration), records, optim_kind)
        else:
            with quiet_single_process():
                dcp.save(tensors, checkpoint_id=str(tmp), storage_writer=writer, no_dist=not is_distributed())
            self._pending = _Pending(None, tmp, final, int(iteration), records, optim_kind)
            self.wait()
        return final

    def wait(self) -> None:
        """Finish a pending (async) save: wait for the writes, mark complete, update ``latest``, prune."""
        p, self._pending = self._pending, None
        if p is None:
            return
        err = None
        if p.future is not None:
            try:
                p.future.result()
            except BaseException as e:  # noqa: BLE001 - reported on every rank below
                err = e
        files = p.records.as_dict()
        if is_distributed():  # every rank's shards are on disk before rank 0 marks the checkpoint complete
            flags = [None] * world_size()
            dist.all_gather_object(flags, (None if err is None else f"rank {rank()}: {err}", files))
            bad = [f[0] for f in flags if f[0] is not None]
            if bad:
                raise RuntimeError(f"checkpoint: async save of {p.tmp} failed: {'; '.join(bad)}")
            files = {k: v for f in flags for k, v in f[1].items()}
        elif err is not None:
            if rank() == 0:
                discard_tmp(p.tmp)
            raise err
        err = None
        if rank() == 0:
            try:
                self._finalize(p, files)
            except OSError as e:
                err = UserError(f"checkpoint: finalising {p.tmp}: {e}")
            except BaseException:
                discard_tmp(p.tmp)
                raise
            if err is not None:
                discard_tmp(p.tmp)
        broadcast_error(err)

    def close(self) -> None:
        """Finish a pending save, then give ``ROOT`` up (its lock)."""
        try:
            self.wait()
        finally:
            if self._async_pg is not None:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(self._async_pg)
                self._async_pg = None
            self._claim.close()

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    # -- internals (rank 0) ----------------------------------------------------------------------------
    def _finalize(self, p: _Pending, files: dict[str, dict]) -> None:
        pause_for_test("checkpoint-save")
        # the manifest: every file of the checkpoint as its writer saw it (complete.json itself excluded)
        unrecorded = sorted(q.relative_to(p.tmp).as_posix() for q in p.tmp.rglob("*")
                            if q.is_file() and q.relative_to(p.tmp).as_posix() not in files)
        if unrecorded:  # written by a path that bypassed our streams (a torch change?): hash them by reading
            log.warning("checkpoint %s: %d file(s) (%s) were written without passing through a checksum; "
                        "reading them back to checksum them", p.tmp, len(unrecorded), ", ".join(unrecorded[:3]))
            for rel in unrecorded:
                files[rel] = {"size": (p.tmp / rel).stat().st_size, ALGORITHM: file_crc32(p.tmp / rel)}
        write_json_atomic(p.tmp / COMPLETE, {
            "format": FORMAT, "iteration": p.iteration, "optimizer": p.optimizer, **_layout(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "manifest": {"checksum": ALGORITHM, "files": dict(sorted(files.items()))}})
        fsync_dir(p.tmp)
        old = None
        if p.final.exists():  # saving the same iteration again (e.g. after a resume): swap, then drop
            old = tmp_dir_for(p.final)  # an owner-named empty dir, which the rename replaces
            os.replace(p.final, old)
        commit_tmp(p.tmp, p.final)
        fsync_dir(self.root)
        with atomic_text(self.root / LATEST) as f:
            f.write(p.final.name + "\n")
        fsync_dir(self.root)
        if old is not None:
            discard_tmp(old)
        self._prune(keep=p.final)

    def _prune(self, keep: Path) -> None:
        if self.keep_last == 0:
            return
        done = list_checkpoints(self.root)
        for path in done[:-self.keep_last]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, iteration: int, model, optimizer=None, **kw) -> Path:
    """One synchronous save with keep-all (see ``CheckpointManager.save`` for the arguments)."""
    keep = kw.pop("keep_last", 0)
    with CheckpointManager(root, keep_last=keep) as mgr:
        return mgr.save(iteration, model, optimizer, **kw)


@dataclass
class LoadedCheckpoint:
    path: Path
    iteration: int
    extra: dict
    rank_extra: dict | None       # None when the checkpoint had no file for this rank
    info: dict                    # complete.json


def load_checkpoint(path: str | os.PathLike, model: nn.Module | Sequence[nn.Module], optimizer: Any = None, *,
                    layer_offset: int | Sequence[int] = 0, strict: bool = True) -> LoadedCheckpoint:
    """Load model (+ optimizer) in place at the *current* layout; returns iteration and extras.

    Collective when a process group exists. ``path``: root (follows ``latest``) or an iteration dir.
    Tensors are cast to the model's dtypes. ``strict``: every model tensor must be in the checkpoint.
    First every file's size and checksum is checked against the manifest (``integrity.verify``, shared out
    over the ranks), also when only the weights are loaded; a mismatch raises ``DamagedCheckpoint``.
    """
    import torch.distributed.checkpoint as dcp  # lazy: see unpickler.py
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

    ck = resolve_checkpoint(path)
    info = read_complete(ck)
    verify(ck, info, collective=True)  # every file's size and checksum, before any tensor is read
    models, optimizers, offsets = normalize(model, optimizer, layer_offset)
    if optimizers and info.get("optimizer") == "none":
        raise UserError(f"checkpoint {ck}: holds weights only (no optimizer state); load it without an "
                        "optimizer (e.g. as checkpoint.init_from)")
    if info.get("optimizer") == "empty":  # saved before the first step: a fresh optimizer is the same state
        optimizers = []
    items = state_items(models, optimizers, offsets)
    stored = checkpoint_tensors(ck, prefix="")
    objects = read_json(ck / "objects.json") if optimizers else {}

    want, problems = {}, []
    for key, v, _, _ in items:
        if not is_tensor(v):
            continue
        if key not in stored:
            if strict or key.startswith("optim."):
                problems.append(f"missing tensor {key!r}")
            continue
        shape = tuple(v.shape)  # DTensor/FSDP: the global shape
        if stored[key][0] != shape:
            problems.append(f"tensor {key!r}: checkpoint shape {list(stored[key][0])} != model shape {list(shape)}")
            continue
        want[key] = v
    for key, v, _, _ in items:
        if not is_tensor(v) and key.startswith("optim.") and key not in objects:
            problems.append(f"missing optimizer value {key!r} in objects.json")
    if problems:
        raise UserError(f"checkpoint {ck}: {len(problems)} problem(s): " + "; ".join(problems[:8])
                        + (" ..." if len(problems) > 8 else ""))

    # DCP writes into the tensors it is given (local shards of DTensors included), casting dtypes
    with quiet_single_process():
        dcp.load(want, storage_reader=safe_reader(ck), no_dist=not is_distributed())

    per_chunk_model: list[dict] = [dict() for _ in models]
    per_chunk_optim: list[dict] = [dict() for _ in optimizers]
    for key, v, i, local in items:
        if key.startswith("model."):
            if key in want:
                per_chunk_model[i][local] = want[key]
        else:
            per_chunk_optim[i][local] = want[key] if is_tensor(v) else from_jsonable(objects[key])
    for i, m in enumerate(models):
        set_model_state_dict(m, per_chunk_model[i], options=StateDictOptions(strict=strict))
    shared = len(optimizers) == 1 and len(models) > 1
    for j, opt in enumerate(optimizers):
        set_optimizer_state_dict(nn.ModuleList(models) if shared else models[j], opt, per_chunk_optim[j],
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))

    extra = from_jsonable(read_json(ck / "extra.json"))
    rfile = ck / "rank_extra" / f"rank_{rank():05d}.json"
    rank_extra = from_jsonable(read_json(rfile)) if rfile.is_file() else None
    return LoadedCheckpoint(ck, int(info["iteration"]), extra, rank_extra, info)
