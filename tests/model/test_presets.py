"""Presets reproduce the published Pythia parameter counts (Biderman et al. 2023, Table 1 / model cards)."""
from __future__ import annotations

import pytest
import torch

from megacpt.errors import UserError
from megacpt.model import GPTNeoX, PRESETS, get_preset

# total parameters of the released checkpoints (EleutherAI model cards)
PYTHIA_PARAMS = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
                 "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960,
                 "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320}


@pytest.mark.parametrize("name", sorted(PYTHIA_PARAMS))
def test_pythia_param_counts(name):
    with torch.device("meta"):  # no memory: shapes only
        model = GPTNeoX(PRESETS[name])
    assert model.num_params() == PYTHIA_PARAMS[name]
    assert PRESETS[name].vocab_size == 50277 and PRESETS[name].rotary_dim == PRESETS[name].head_dim // 4


def test_get_preset_overrides_and_errors():
    cfg = get_preset("tiny", vocab_size=1234)
    assert cfg.vocab_size == 1234 and cfg.padded_vocab() % cfg.make_vocab_size_divisible_by == 0
    assert PRESETS["tiny"].vocab_size == 1000  # the preset itself is untouched
    with pytest.raises(UserError, match="unknown 'nope'"):
        get_preset("nope")
    with pytest.raises(UserError, match="hidden_size"):
        get_preset("tiny", hidden_size=66)  # not divisible by 4 heads
