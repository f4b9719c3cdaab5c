"""Continual pre-training: the loop (trainer.py), optimizer and LR schedule (optim.py), tokens/s and MFU
(metrics.py), DCP checkpoints (checkpoint.py) and the `megacpt train` command (cli.py)."""
