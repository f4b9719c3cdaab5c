"""Reading DCP metadata without unpickling arbitrary objects: the restricted unpickler.

Stock DCP ``pickle.load``s ``.metadata``: a crafted checkpoint would run code on load. ``safe_reader``
lets that pickle build only DCP's metadata classes; tensor data is read by DCP with
``torch.load(weights_only=True)``, and non-tensor (pickled) items are never requested.
"""
from __future__ import annotations

import io
import os
import pickle

import torch

from megacpt.errors import UserError


def safe_reader(path: str | os.PathLike):
    """A DCP ``FileSystemReader`` whose ``.metadata`` (a pickle) may only build DCP's metadata classes."""
    # torch.distributed.checkpoint is imported where it is used, in every module of this package: importing
    # it costs ~0.7-1 s (it pulls in torch.distributed's tensor and FSDP stack; `python -X importtime`), which
    # commands that only read HF dirs or checkpoint metadata files never need
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

