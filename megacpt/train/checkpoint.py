"""Training checkpoints: `torch.distributed.checkpoint` (DCP) save/load with resharding, atomically.

Layout of a checkpoint root::

    ROOT/latest                      text: "iter_0000100" (updated atomically, only after a save is complete)
    ROOT/iter_0000100/               one complete checkpoint
        .metadata, __*_*.distcp      DCP tensors: "model.<fqn>", "optim.<flat key>" (global, layout-free names)
        objects.json                 every non-tensor leaf of the model/optimizer state (lr, betas, ...)
        extra.json                   ``extra`` (rank 0's): scheduler, data position, ... JSON + tensors
        rank_extra/rank_00003.json   ``rank_extra`` of each rank (RNG states): one file per rank
        model_config.json            ModelConfig, so `megacpt.convert.load_model(ROOT)` is self-contained
        tokenizer/                   copy of the tokenizer dir/file, when given
        complete.json                written last: iteration, optimizer (saved|empty|none), world size, time
    ROOT/iter_0000200.tmp/           a save in progress (or killed): never read, removed by the next save

Why this shape:
- Names are *global and layout-independent*: DTensor (TP) and FSDP2 shards are saved by their global
  shape, and a pipeline stage renames ``layers.{local}.`` to ``layers.{local + layer_offset}.``. So a
  checkpoint saved at tp2*pp2 loads at tp1*pp1 (or dp4, ...) and back: DCP reshards on load.
- Nothing is unpickled when loading. DCP would ``torch.load(weights_only=False)`` any non-tensor value
  it stored, so non-tensors never go to DCP: they are split out into JSON (`objects.json`), and
  ``extra``/``rank_extra`` are JSON with tensors encoded as raw bytes (``{"__tensor__": ...}``).
- Atomic: everything is written into ``iter_X.tmp``; ``complete.json`` is written last, the dir is
  renamed to ``iter_X`` and only then ``latest`` is replaced (temp + rename). A save killed at any
  point leaves ``latest`` and all complete checkpoints untouched.

Use (the same calls on every rank, single process works without a process group)::

    mgr = CheckpointManager(root, keep_last=2, async_save=False)
    mgr.save(step, model, optimizer, extra={"scheduler": sched.state_dict(), "consumed_samples": n},
             rank_extra={"torch_rng": torch.get_rng_state()}, model_config=cfg, tokenizer=tok_dir,
             layer_offset=first_layer_of_this_stage)
    mgr.close()                                     # waits for a pending async save
    ck = load_checkpoint(root, model, optimizer, layer_offset=...)   # root or iter dir
    ck.iteration, ck.extra, ck.rank_extra           # rank_extra is None if this rank did not exist

``model`` may be an ``nn.Module`` (plain, DTensor-TP, FSDP2, or a pipeline stage), a list of pipeline
chunks (interleaved 1F1B) or a ``megacpt.parallel.pipeline.Pipeline`` (its ``.parts``); ``optimizer`` one
optimizer over all of them, or one per chunk. megacpt's pipeline stages keep the full model's names
(``split_stage``), so ``layer_offset`` stays 0; a stage numbering its layers from 0 passes its first global
layer index (a list, one per chunk). Optimizer state is found by parameter name (torch's
``get_optimizer_state_dict``), so it reshards like the weights; the optimizer is initialised (zero state)
before loading. ``load_checkpoint(..., optimizer=None)`` loads weights only (e.g. ``init_from``).
An optimizer that has not stepped yet is recorded as "empty" (torch would otherwise initialise it with a
zero-gradient step, changing the run); a checkpoint saved without optimizer refuses to load one.
``ROOT`` must be on a filesystem every rank can see (as DCP requires); rank 0 writes the JSON files.
A model trained at one vocab padding must be rebuilt from the checkpoint's ``model_config.json``
(``read_model_config``), which records ``padded_vocab_size``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from megacpt.errors import UserError
from megacpt.io import write_json_atomic

FORMAT = "megacpt-dcp-v1"
LATEST = "latest"
COMPLETE = "complete.json"
MODEL_CONFIG = "model_config.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def iteration_dirname(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


# ----------------------------------------------------------------------------------------------------
# JSON with tensors (no pickle anywhere)

def to_jsonable(obj: Any, where: str = "extra") -> Any:
    """Encode ``obj`` (dict/list/tuple/scalars/None/tensors) as JSON-able data; tensors as raw bytes."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "full_tensor"):  # gathering it here (rank 0 only) would hang the other ranks
            raise UserError(f"{where}: a DTensor; put its .full_tensor() (or local shard) in extras")
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "data": base64.b64encode(raw).decode("ascii")}}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: key {k!r} is not a string (checkpoint extras are saved as JSON)")
            out[k] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return obj.item()
    raise UserError(f"{where}: {type(obj).__name__} cannot be saved in a checkpoint "
                    "(use JSON-able values or tensors; nothing is pickled)")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj and len(obj) == 1:
            d = obj["__tensor__"]
            dtype = getattr(torch, d["dtype"])
            raw = bytearray(base64.b64decode(d["data"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(d["shape"]).clone()
        if "__tuple__" in obj and len(obj) == 1:
            return tuple(from_jsonable(v) for v in obj["__tuple__"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------
# reading DCP without unpickling arbitrary objects

def _safe_reader(path: str | os.PathLike):
    """A DCP ``FileSystemReader`` whose ``.metadata`` (a pickle) may only build DCP's metadata classes.

    Stock DCP ``pickle.load``s ``.metadata``: a crafted checkpoint would run code on load. Tensor data is
    read by DCP with ``torch.load(weights_only=True)``; we never request non-tensor (pickled) items.
    """
    import io
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    allowed_modules = ("torch.distributed.checkpoint.metadata",)
    allowed = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PureWindowsPath")}

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            ok = (module, name) in allowed or module in allowed_modules or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            if not ok:
                raise UserError(f"checkpoint {path}: .metadata references {module}.{name}, which is not DCP "
                                "metadata; refusing to unpickle it")
            return super().find_class(module, name)

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                try:
                    md = _Unpickler(io.BytesIO(f.read())).load()
                except UserError:
                    raise
                except Exception as e:  # truncated / corrupt
                    raise UserError(f"checkpoint {path}: unreadable .metadata ({type(e).__name__}: {e})") from None
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader(str(path))


# ----------------------------------------------------------------------------------------------------
# distributed helpers (all no-ops without a process group)

def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast_error(err: BaseException | None) -> None:
    """Raise on every rank if rank 0 failed (so no rank waits forever in the next collective)."""
    if not _dist():
        if err is not None:
            raise err
        return
    msg = [f"{type(err).__name__}: {err}" if err is not None else None]
    dist.broadcast_object_list(msg, src=0)
    if err is not None:
        raise err
    if msg[0] is not None:
        raise RuntimeError(f"checkpoint: rank 0 failed: {msg[0]}")


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load ("assuming the intent is ..."): that is our intent."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------
# state dicts with global, layout-independent names

def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _shift_layers(key: str, offset: int) -> str:
    if not offset:
        return key
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", key, count=1)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _state_items(models: list[nn.Module], optimizers: list, offsets: list[int]) -> list[tuple[str, Any, int, str]]:
    """(global key, value, owner, local key) of model params/buffers (owner: model chunk index) and of the
    flattened optimizer state (owner: optimizer index)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    items: list[tuple[str, Any, int, str]] = []
    for i, m in enumerate(models):
        sd = m if isinstance(m, Mapping) else get_model_state_dict(m)  # a plain {name: tensor} is accepted
        for k, v in sd.items():
            items.append((f"model.{_shift_layers(k, offsets[i])}", v, i, k))
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    shared = len(optimizers) == 1 and len(models) > 1  # one optimizer over all chunks of a pipeline rank
    for j, opt in enumerate(optimizers):
        owner = nn.ModuleList(models) if shared else models[j]
        for k, v in get_optimizer_state_dict(owner, opt, options=opts).items():
            # "state.layers.3.mlp...exp_avg", "param_groups.layers.3.mlp...lr" ("state.<chunk>.layers..." if shared)
            head, _, rest = k.partition(".")
            chunk = j
            if shared:
                c, _, rest = rest.partition(".")
                chunk = int(c)
            items.append((f"optim.{head}.{_shift_layers(rest, offsets[chunk])}", v, j, k))
    seen: dict[str, tuple] = {}
    for key, _, i, local in items:
        if key in seen and seen[key] != (i, local):
            raise UserError(f"checkpoint: {key!r} comes from two model chunks; give each pipeline chunk its "
                            "global first-layer index as layer_offset")
        seen[key] = (i, local)
    return items


def _normalize(models, optimizers, layer_offset) -> tuple[list[nn.Module], list, list[int]]:
    if hasattr(models, "parts") and not isinstance(models, nn.Module):  # megacpt.parallel.pipeline.Pipeline
        models = list(models.parts)
    models = [models] if isinstance(models, (nn.Module, Mapping)) else _as_list(models)
    optimizers = _as_list(optimizers)
    offsets = _as_list(layer_offset) if isinstance(layer_offset, (list, tuple)) else [layer_offset] * len(models)
    if len(offsets) != len(models):
        raise UserError(f"checkpoint: {len(models)} model chunk(s) but {len(offsets)} layer_offset value(s)")
    if optimizers and any(isinstance(m, Mapping) for m in models):
        raise UserError("checkpoint: an optimizer needs the nn.Module it optimizes, not a plain state dict")
    if len(optimizers) > 1 and len(optimizers) != len(models):
        raise UserError(f"checkpoint: {len(models)} model chunk(s) need one optimizer each, or one for all; "
                        f"got {len(optimizers)}")
    return models, optimizers, [int(o) for o in offsets]


def _layout() -> dict:
    return {"world_size": _world()}


# ----------------------------------------------------------------------------------------------------
# save

@dataclass
class _Pending:
    future: Any
    tmp: Path
    final: Path
    iteration: int
    optimizer: str = "none"


class CheckpointManager:
    """Saves ``ROOT/iter_XXXXXXX`` checkpoints atomically, keeps the last ``keep_last`` (0: all).

    With ``async_save`` the tensors are staged to CPU memory and written by a background thread
    (``dcp.async_save`` on a dedicated gloo group); the checkpoint is finalised (marked complete,
    ``latest`` updated, old ones pruned) by the next ``save``/``wait``/``close`` on every rank.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, async_save: bool = False):
        if keep_last < 0:
            raise UserError(f"checkpoint.keep_last: {keep_last} must be >= 0 (0 keeps all)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: _Pending | None = None
        self._async_pg = None
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()

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
        import torch.distributed.checkpoint as dcp

        self.wait()
        models, optimizers, offsets = _normalize(model, optimizer, layer_offset)
        final = self.root / iteration_dirname(iteration)
        tmp = final.with_name(final.name + ".tmp")
        err = None
        if _rank() == 0:
            try:
                self._remove_stale_tmp()
                tmp.mkdir(parents=True)
                (tmp / "rank_extra").mkdir()
            except OSError as e:
                err = UserError(f"checkpoint: cannot create {tmp}: {e}")
        _broadcast_error(err)

        # an optimizer that never stepped has no state; asking torch for its state dict would initialise it
        # with a zero-gradient step (AdamW: step=1), changing the training run: save "empty" instead
        has_state = any(len(o.state) for o in optimizers)
        rank_json, bad = None, None
        try:
            rank_json = None if rank_extra is None else to_jsonable(rank_extra, f"rank_extra (rank {_rank()})")
        except UserError as e:
            bad = e
        if _dist():  # agree on both before anything else is collective
            flags: list = [None] * _world()
            dist.all_gather_object(flags, (has_state, None if bad is None else str(bad)))
            has_state = any(f[0] for f in flags)
            msgs = [f[1] for f in flags if f[1]]
            if msgs and bad is None:
                bad = UserError(msgs[0])
        if bad is not None:
            raise bad
        optim_kind = "none" if not optimizers else ("saved" if has_state else "empty")
        items = _state_items(models, optimizers if has_state else [], offsets)
        tensors = {k: v for k, v, _, _ in items if _is_tensor(v)}
        objects = {k: to_jsonable(v, k) for k, v, _, _ in items if not _is_tensor(v)}
        if _dist():  # optimizer hyper-parameters of other pipeline stages: gather them all on rank 0
            gathered: list = [None] * _world()
            dist.all_gather_object(gathered, objects)
            for g in gathered:
                objects.update(g)
        if rank_json is not None:
            write_json_atomic(tmp / "rank_extra" / f"rank_{_rank():05d}.json", rank_json)
        err = None
        if _rank() == 0:
            try:
                write_json_atomic(tmp / "objects.json", objects)
                write_json_atomic(tmp / "extra.json", to_jsonable(extra or {}, "extra"))
                if model_config is not None:
                    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
                    write_json_atomic(tmp / MODEL_CONFIG, cfg)
                if run_config is not None:
                    write_json_atomic(tmp / "run_config.json", run_config)
                if tokenizer is not None:
                    copy_tokenizer(tokenizer, tmp / "tokenizer")
            except (OSError, UserError) as e:
                err = e if isinstance(e, UserError) else UserError(f"checkpoint: writing {tmp}: {e}")
        _broadcast_error(err)

        if self.async_save:
            if _dist() and self._async_pg is None:
                self._async_pg = dist.new_group(backend="gloo")  # the writer thread's own collectives
            with _quiet_single_process():
                fut = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._async_pg,
                                     no_dist=not _dist())
            fut = getattr(fut, "upload_completion", fut)
            self._pending = _Pending(fut, tmp, final, int(iteration), optim_kind)
        else:
            with _quiet_single_process():
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _dist())
            self._pending = _Pending(None, tmp, final, int(iteration), optim_kind)
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
        if _dist():  # every rank's shards are on disk before rank 0 marks the checkpoint complete
            flags = [None] * _world()
            dist.all_gather_object(flags, None if err is None else f"rank {_rank()}: {err}")
            bad = [f for f in flags if f is not None]
            if bad:
                raise RuntimeError(f"checkpoint: async save of {p.tmp} failed: {'; '.join(bad)}")
        elif err is not None:
            raise err
        err = None
        if _rank() == 0:
            try:
                self._finalize(p)
            except OSError as e:
                err = UserError(f"checkpoint: finalising {p.tmp}: {e}")
        _broadcast_error(err)

    def close(self) -> None:
        self.wait()
        if self._async_pg is not None:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self._async_pg)
            self._async_pg = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    # -- internals (rank 0) ----------------------------------------------------------------------------
    def _finalize(self, p: _Pending) -> None:
        write_json_atomic(p.tmp / COMPLETE, {
            "format": FORMAT, "iteration": p.iteration, "optimizer": p.optimizer, **_layout(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _fsync_dir(p.tmp)
        old = None
        if p.final.exists():  # saving the same iteration again (e.g. after a resume): swap, then drop
            old = p.final.with_name(p.final.name + ".old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(p.final, old)
        os.replace(p.tmp, p.final)
        _fsync_dir(self.root)
        with _atomic_text(self.root / LATEST) as f:
            f.write(p.final.name + "\n")
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=p.final)

    def _prune(self, keep: Path) -> None:
        if self.keep_last == 0:
            return
        done = list_checkpoints(self.root)
        for path in done[:-self.keep_last]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        for p in self.root.glob("iter_*.tmp"):  # killed saves: never complete, never pointed to
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _atomic_text(path: Path):
    from megacpt.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            yield f


def save_checkpoint(root: str | os.PathLike, iteration: int, model, optimizer=None, **kw) -> Path:
    """One synchronous save with keep-all (see ``CheckpointManager.save`` for the arguments)."""
    keep = kw.pop("keep_last", 0)
    return CheckpointManager(root, keep_last=keep).save(iteration, model, optimizer, **kw)


# files that make up an HF tokenizer (fast or slow) or a sentencepiece model; nothing else is copied
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def tokenizer_files(src: str | os.PathLike) -> list[Path]:
    """The tokenizer files of a dir (known names, plus ``*.model``), or ``[src]`` for a single file."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        return []
    return [p for p in sorted(src.iterdir())
            if p.is_file() and (p.name in TOKENIZER_FILES or p.suffix == ".model")]


def copy_tokenizer(src: str | os.PathLike, dst: Path) -> None:
    """Copy a tokenizer (dir or single file) into the dir ``dst``."""
    files = tokenizer_files(src)
    if not files:
        raise UserError(f"tokenizer {src}: not found (expected a tokenizer file or a dir with one of "
                        f"{', '.join(TOKENIZER_FILES[:2])}, *.model)")
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)


# ----------------------------------------------------------------------------------------------------
# find / load

def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _ITER_RE.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``ROOT/latest`` points to (None if there is none yet)."""
    root = Path(root)
    ptr = root / LATEST
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    path = root / name
    if _ITER_RE.match(name) and (path / COMPLETE).is_file():
        return path
    # e.g. killed between the two renames of re-saving the same iteration, or a dir deleted by hand
    done = list_checkpoints(root)
    if not done:
        raise UserError(f"{ptr}: points to {name!r}, which is not a complete checkpoint in {root}, "
                        "and there is no other")
    import logging

    logging.getLogger(__name__).warning("%s points to %r, which is not a complete checkpoint; using the newest "
                                        "complete one, %s", ptr, name, done[-1].name)
    return done[-1]


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / LATEST).is_file() or (path / COMPLETE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint root (with ``latest``) or one ``iter_XXXXXXX`` dir -> the complete iteration dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path}: not found")
    if path.name.endswith(".tmp"):  # a save in progress or killed: complete.json may be there, the rename is not
        raise UserError(f"checkpoint {path}: incomplete (a .tmp dir); the save did not finish")
    if (path / COMPLETE).is_file():
        info = _read_json(path / COMPLETE)
        if info.get("format") != FORMAT:
            raise UserError(f"{path / COMPLETE}: unknown checkpoint format {info.get('format')!r} "
                            f"(expected {FORMAT})")
        return path
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    if (path / ".metadata").exists():
        raise UserError(f"checkpoint {path}: incomplete (no {COMPLETE}); the save did not finish")
    raise UserError(f"checkpoint {path}: neither a checkpoint root (no '{LATEST}' file) nor a checkpoint "
                    f"dir (no {COMPLETE})")


def read_model_config(path: str | os.PathLike):
    from megacpt.config import ModelConfig

    ck = resolve_checkpoint(path)
    return ModelConfig.from_dict(_read_json(ck / MODEL_CONFIG)).validate()


def checkpoint_tensors(path: str | os.PathLike, prefix: str = "model.") -> dict[str, tuple[tuple, torch.dtype]]:
    """name (without prefix) -> (global shape, dtype) of the tensors stored in a checkpoint dir."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ck = resolve_checkpoint(path)
    if not (ck / ".metadata").is_file():
        raise UserError(f"checkpoint {ck}: no .metadata (not a DCP checkpoint, or damaged)")
    md = _safe_reader(ck).read_metadata()
    return {k[len(prefix):]: (tuple(v.size), v.properties.dtype)
            for k, v in md.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def read_tensors(path: str | os.PathLike, names: Sequence[str], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors ``names`` of a checkpoint, in one process, in their stored dtype.

    Reads only what is asked, so callers stream a large model in groups of tensors.
    """
    import torch.distributed.checkpoint as dcp

    ck = resolve_checkpoint(path)
    meta = checkpoint_tensors(ck, prefix)
    missing = [n for n in names if n not in meta]
    if missing:
        raise UserError(f"checkpoint {ck}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    sd = {prefix + n: torch.empty(meta[n][0], dtype=meta[n][1]) for n in names}
    with _quiet_single_process():
        dcp.load(sd, storage_reader=_safe_reader(ck), no_dist=True)
    return {n: sd[prefix + n] for n in names}


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
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

    ck = resolve_checkpoint(path)
    info = _read_json(ck / COMPLETE)
    models, optimizers, offsets = _normalize(model, optimizer, layer_offset)
    if optimizers and info.get("optimizer") == "none":
        raise UserError(f"checkpoint {ck}: holds weights only (no optimizer state); load it without an "
                        "optimizer (e.g. as checkpoint.init_from)")
    if info.get("optimizer") == "empty":  # saved before the first step: a fresh optimizer is the same state
        optimizers = []
    items = _state_items(models, optimizers, offsets)
    stored = checkpoint_tensors(ck, prefix="")
    objects = _read_json(ck / "objects.json") if optimizers else {}

    want, problems = {}, []
    for key, v, _, _ in items:
        if not _is_tensor(v):
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
        if not _is_tensor(v) and key.startswith("optim.") and key not in objects:
            problems.append(f"missing optimizer value {key!r} in objects.json")
    if problems:
        raise UserError(f"checkpoint {ck}: {len(problems)} problem(s): " + "; ".join(problems[:8])
                        + (" ..." if len(problems) > 8 else ""))

    # DCP writes into the tensors it is given (local shards of DTensors included), casting dtypes
    with _quiet_single_process():
        dcp.load(want, storage_reader=_safe_reader(ck), no_dist=not _dist())

    per_chunk_model: list[dict] = [dict() for _ in models]
    per_chunk_optim: list[dict] = [dict() for _ in optimizers]
    for key, v, i, local in items:
        if key.startswith("model."):
            if key in want:
                per_chunk_model[i][local] = want[key]
        else:
            per_chunk_optim[i][local] = want[key] if _is_tensor(v) else from_jsonable(objects[key])
    for i, m in enumerate(models):
        set_model_state_dict(m, per_chunk_model[i], options=StateDictOptions(strict=strict))
    shared = len(optimizers) == 1 and len(models) > 1
    for j, opt in enumerate(optimizers):
        set_optimizer_state_dict(nn.ModuleList(models) if shared else models[j], opt, per_chunk_optim[j],
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))

    extra = from_jsonable(_read_json(ck / "extra.json"))
    rfile = ck / "rank_extra" / f"rank_{_rank():05d}.json"
    rank_extra = from_jsonable(_read_json(rfile)) if rfile.is_file() else None
    return LoadedCheckpoint(ck, int(info["iteration"]), extra, rank_extra, info)
