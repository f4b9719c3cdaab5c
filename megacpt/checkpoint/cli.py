"""`megacpt checkpoint verify PATH [--all] [--json]`: thin entry point over ``megacpt.checkpoint.integrity``.

Checks the files of a checkpoint against the manifest its save recorded (sizes, then CRC-32 of whole files)
without loading a tensor. One line per checkpoint: ``OK``, ``DAMAGED`` (the first damaged file, expected vs
found) or ``UNVERIFIED`` (saved before megacpt recorded checksums: only the shards' sizes against
``.metadata`` can be checked). Exit status: 0 all OK, 1 any damaged, 3 none damaged but some unverified.
"""
from __future__ import annotations

import argparse
import json

from megacpt.checkpoint.checksum import DamagedCheckpoint
from megacpt.checkpoint.files import list_checkpoints, resolve_checkpoint
from megacpt.checkpoint.integrity import verify
from megacpt.errors import UserError

EXIT_DAMAGED, EXIT_UNVERIFIED = 1, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check files against the checkpoint's manifest (sizes, crc32); no tensors loaded",
                       description="Check every file of a checkpoint against the sizes and CRC-32 checksums its "
                                   "save recorded, without loading tensors. Exit 0: all OK; 1: some checkpoint "
                                   "is damaged; 3: none damaged, but some has no manifest (an older megacpt).")
    v.add_argument("path", metavar="PATH", help="a checkpoint dir (iter_XXXXXXX) or a run dir with 'latest'")
    v.add_argument("--all", action="store_true",
                   help="every complete checkpoint under the run dir PATH, oldest first (default: PATH's latest)")
    v.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a line")


def run(args: argparse.Namespace) -> int:
    if args.all:
        paths = list_checkpoints(args.path)
        if not paths:
            raise UserError(f"{args.path}: no complete checkpoint (iter_XXXXXXX dir with complete.json) under it")
    else:
        paths = [resolve_checkpoint(args.path)]
    seen = set()
    for ck in paths:
        rec: dict = {"path": str(ck)}
        try:
            v = verify(ck, note=False)
            rec.update(status="ok" if v.manifest else "unverified", files=v.files, bytes=v.bytes)
            line = v.line()
        except DamagedCheckpoint as e:
            rec.update(status="damaged", problems=[dict(zip(("file", "expected", "found"), p)) for p in e.problems])
            file, expected, found = e.problems[0]
            more = f"; {len(e.problems) - 1} more damaged file(s)" if len(e.problems) > 1 else ""
            line = f"DAMAGED {ck}: {file}: expected {expected}, found {found}{more}"
        except UserError as e:  # e.g. an unreadable complete.json or .metadata: damaged too
            rec.update(status="damaged", problems=[{"error": str(e)}])
            line = f"DAMAGED {ck}: {e}"
        seen.add(rec["status"])
        print(json.dumps(rec) if args.json else line, flush=True)
    return EXIT_DAMAGED if "damaged" in seen else EXIT_UNVERIFIED if "unverified" in seen else 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"checkpoint": (add_arguments, run)}
