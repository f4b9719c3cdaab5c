"""megacpt: Megatron-style domain-adaptive continual pre-training of GPT-NeoX/Pythia models."""

__version__ = "0.1.0"
