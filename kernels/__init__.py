"""Fused kernels, installed as ``megacpt.kernels`` (one fused op per file)."""
