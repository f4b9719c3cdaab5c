"""The plain GPT-NeoX model and its named presets."""
from megacpt.model.gpt_neox import GPTNeoX  # noqa: F401
from megacpt.model.presets import PRESETS, get_preset  # noqa: F401
