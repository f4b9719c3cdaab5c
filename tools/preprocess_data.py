#!/usr/bin/env python
"""Megatron-style entry point: same flags as Megatron-LM's tools/preprocess_data.py (see `megacpt preprocess`)."""
import sys

from megacpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
