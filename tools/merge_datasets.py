#!/usr/bin/env python
"""Megatron-style entry point: `--input DIR_OR_PREFIXES --output-prefix OUT` (see `megacpt merge`)."""
import sys

from megacpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
