"""Shared test setup: capability markers, small fixtures."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not _has("triton"), reason="needs triton (TRITON_INTERPRET=1 on CPU)")
requires_megatron = pytest.mark.skipif(not _has("megatron.core"), reason="needs megatron-core")


def requires_module(name: str):
    return pytest.mark.skipif(not _has(name), reason=f"needs {name} (pip install the matching extra)")


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2-core CI machines: keep torch from oversubscribing."""
    try:
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(min(n, 2))
        yield
        torch.set_num_threads(n)
    except ImportError:
        yield
