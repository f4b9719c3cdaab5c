"""The files of a checkpoint: their names, ``complete.json``/``model_config.json``, resolving ``latest``,
and the tokenizer shipped inside (see the package docstring for the layout)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from megacpt.checkpoint.checksum import FileRecords, check_bytes, copy_file, manifest_of
from megacpt.config import ModelConfig
from megacpt.errors import UserError
from megacpt.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = "megacpt-dcp-v1"
LATEST = "latest"
COMPLETE = "complete.json"
MODEL_CONFIG = "model_config.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dirname(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def iteration_of(path: str | os.PathLike) -> int | None:
    """``iter_0000100`` -> 100 (None for any other name)."""
    m = _ITER_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def read_json(path: Path, checkpoint: Path | None = None, manifest: dict | None = None) -> Any:
    """A JSON file; with the ``manifest`` of ``checkpoint``, its bytes are checked as they are read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    if checkpoint is not None:
        check_bytes(checkpoint, path.relative_to(checkpoint).as_posix(), data, manifest)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_text(path: Path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            yield f


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


def copy_tokenizer(src: str | os.PathLike, dst: Path, records: FileRecords | None = None) -> None:
    """Copy a tokenizer (dir or single file) into the dir ``dst`` (checksummed into ``records`` if given)."""
    files = tokenizer_files(src)
    if not files:
        raise UserError(f"tokenizer {src}: not found (expected a tokenizer file or a dir with one of "
                        f"{', '.join(TOKENIZER_FILES[:2])}, *.model)")
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        if records is None:
            shutil.copyfile(f, dst / f.name)
        else:
            copy_file(f, dst / f.name, records)


# ----------------------------------------------------------------------------------------------------
# find: list, `latest`, resolve

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
    log.warning("%s points to %r, which is not a complete checkpoint; using the newest "
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
        info = read_json(path / COMPLETE)
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


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint was saved with (records ``padded_vocab_size``)."""
    ck = resolve_checkpoint(path)
    cfg = read_json(ck / MODEL_CONFIG, ck, manifest_of(ck, read_json(ck / COMPLETE)))
    return ModelConfig.from_dict(cfg).validate()
