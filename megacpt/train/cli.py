"""`megacpt train --config YAML [section.key=value ...]`: thin entry point over `megacpt.train.trainer.train`.

Single process without torchrun (world size 1), or under torchrun/srun (WORLD_SIZE, RANK, LOCAL_RANK set).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megacpt.checkpoint import is_checkpoint
from megacpt.errors import UserError
from megacpt.io import describe_interrupt
from megacpt.train.job import load_job_config
from megacpt.train.plan import build_plan, format_plan, parse_dataset_tokens
from megacpt.train.trainer import train, world_size_from_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  megacpt train --config examples/configs/tiny-cpu.yaml data.blend=[out/domain_text_document]\n"
                "  megacpt train --config examples/configs/finpythia-6.9b-dacp.yaml --dry-run --world-size 32\n"
                "  torchrun --nproc-per-node 8 -m megacpt train --config examples/configs/finpythia-6.9b-dacp.yaml \\\n"
                "      checkpoint.save=/ckpt/finpythia train.train_iters=1000\n"
                "overrides use dotted section.field names (sections: model_preset, model, parallel, data,\n"
                "optimizer, scheduler, checkpoint, logging, train); values are parsed as YAML.")
    p.add_argument("--config", help="YAML job config (see examples/configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.train_iters=50")
    p.add_argument("--print-config", action="store_true",
                   help="validate, print the resolved config as JSON and exit (no training)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan and exit (no training): layout, tokens per step, steps, total "
                        "tokens, epochs over each blend component, LR at key steps, memory per GPU")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size to plan/validate for with --dry-run/--print-config "
                        "(default: WORLD_SIZE, else 1)")
    p.add_argument("--dataset-tokens", action="append", default=[], metavar="PREFIX=N",
                   help="--dry-run: total tokens of a blend dataset that does not exist yet (repeatable; "
                        "overrides data.planned_tokens; e.g. /data/fin/full_text_document=24e9)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _setup_logging(level: str) -> None:
    rank = os.environ.get("RANK", "0")
    # every rank logs warnings (NaN skips, signals); only rank 0 logs progress
    lvl = getattr(logging, level) if rank == "0" else max(getattr(logging, level), logging.WARNING)
    logger = logging.getLogger("megacpt")
    for h in [h for h in logger.handlers if getattr(h, "_megacpt_train", False)]:
        logger.removeHandler(h)  # a second run in one process (tests, notebooks) replaces, not duplicates
    handler = logging.StreamHandler(sys.stdout)
    handler._megacpt_train = True
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    job = load_job_config(args.config, args.overrides)
    world = args.world_size if args.world_size is not None else world_size_from_env()
    if world < 1:
        raise UserError(f"--world-size {world} must be >= 1")
    if args.dry_run:
        try:
            plan = build_plan(job, world, parse_dataset_tokens(args.dataset_tokens))
        except UserError as e:
            if args.world_size is None and str(e).startswith("parallel"):
                raise UserError(f"{e} (planning for world size {world}; set the run's with --world-size N)") from None
            raise
        print(format_plan(plan, job, args.config), end="")
        return 0
    if args.dataset_tokens:
        raise UserError("--dataset-tokens is only used by --dry-run")
    if args.print_config:
        job.validate(world)
        print(json.dumps(job.to_dict(), indent=2, default=str))
        return 0
    at: list[int | None] = [None]  # the last iteration done, for the line of an interruption

    def note() -> str:
        save = job.checkpoint.save
        if save and is_checkpoint(save):
            how = f"re-run the same command: it resumes from the last checkpoint in {save}"
        else:
            how = ("no checkpoint was saved yet" if save else "checkpoint.save is not set, so nothing was kept") + \
                  "; re-run the same command to start over"
        return f"{'before its first step' if at[0] is None else f'at iteration {at[0]}'}; {how}"

    with describe_interrupt(note):
        result = train(job, on_step=lambda it, loss: at.__setitem__(0, it))
    logging.getLogger("megacpt.train").info(
        "finished: iteration %d, stop reason %s, skipped steps %d, last checkpoint %s", result.iteration,
        result.stop_reason, result.skipped_steps, result.checkpoint)
    return 0


# command name -> (add its arguments, run it); dispatched by megacpt.cli
COMMANDS = {"train": (add_arguments, run)}
