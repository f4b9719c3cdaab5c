"""`megacpt demo`'s library entry point: run (or resume) the study's stages, then write the report."""
from __future__ import annotations

import os
import time
from pathlib import Path

from megacpt.demo.pipeline import DemoSettings, build_stages
from megacpt.demo.report import write_report
from megacpt.demo.results import collect_results
from megacpt.demo.stages import StageRunner


def run_demo(workdir: Path, s: DemoSettings, force: bool = False, echo=print) -> Path:
    """Run (or resume) every stage, then write the report; returns ``workdir``/report.md."""
    workdir.mkdir(parents=True, exist_ok=True)
    n = str(s.threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": str(s.seed)}
    if s.in_process:
        os.environ.update(env)
        import torch

        torch.set_num_threads(s.threads)
    runner = StageRunner(workdir, force=force, env=env, echo=echo, in_process=s.in_process, jobs=s.jobs,
                         threads=s.threads)
    t0 = time.perf_counter()
    summary = runner.run(build_stages(s, workdir))
    wall = time.perf_counter() - t0
    res = collect_results(workdir, s, summary, wall_s=wall, peak_rss_mb=runner.peak_rss_mb)
    md, _ = write_report(res, workdir)
    ran = [x for x in summary if not x["skipped"]]
    echo(f"demo finished in {wall:.1f}s ({len(ran)} stages ran, CPU {sum(x.get('cpu_s') or 0 for x in ran):.0f}s; "
         f"{len(summary) - len(ran)} cached from earlier runs); peak RSS of this invocation "
         f"{runner.peak_rss_mb:.0f} MB (all processes); report: {md}")
    for line in res.summary_lines():
        echo("  " + line)
    return md
