"""`python -m megacpt ...` (used under torchrun: `torchrun ... -m megacpt train ...`)."""
from megacpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
