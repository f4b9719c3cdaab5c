"""Attention backends of the torch path: SDPA held to one kernel is that kernel or a clear error."""
import dataclasses

import pytest
import torch

from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.model.presets import get_preset


def test_sdpa_flash_equals_sdpa_and_cudnn_is_a_clear_error_on_cpu():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    ref = GPTNeoX(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    flash = GPTNeoX(dataclasses.replace(cfg, attention_backend="sdpa_flash"))
    flash.load_state_dict(ref.state_dict())
    torch.testing.assert_close(flash(ids), ref(ids), atol=1e-5, rtol=1e-5)  # torch's CPU flash kernel
    cudnn = GPTNeoX(dataclasses.replace(cfg, attention_backend="cudnn"))
    with pytest.raises(UserError, match="attention_backend=cudnn.*cannot run here"):
        cudnn(ids)
    doc_ids = torch.tensor([[0] * 20 + [1] * 17] * 2)
    fa = GPTNeoX(dataclasses.replace(cfg, attention_backend="flash"))
    with pytest.raises(UserError, match="document mask"):
        fa(ids, doc_ids=doc_ids)
