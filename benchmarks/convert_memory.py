"""Peak memory and time of HF <-> megacpt conversion beside the naive transformers path, in one run.

Each step runs in a fresh subprocess that reports its peak RSS (``ru_maxrss``) minus its RSS right after
imports, divided by the size of the weights (~1.0: one copy of the weights), and its private (anonymous)
memory at the end. Peak RSS includes mmapped safetensors pages (reclaimable page cache).

    python benchmarks/convert_memory.py [--preset pythia-160m] [--dtype float32]

Baseline: ``GPTNeoXForCausalLM.from_pretrained(dir)`` then ``save_pretrained`` (what a hand-written
conversion script does). megacpt: ``megacpt convert hf-to-megacpt``, ``megacpt convert megacpt-to-hf``,
``megacpt.convert.load_model`` (HF dir and checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, resource, sys, time
import torch, transformers  # both paths pay these imports; measured from here
import megacpt.convert, megacpt.convert.hf_gpt_neox, megacpt.checkpoint
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
base, base_anon = status_kb("VmRSS"), status_kb("RssAnon")
step, a, b = sys.argv[1:4]
t = time.perf_counter()
if step == "make":
    from megacpt.model.presets import get_preset
    from megacpt.model.hf_config import hf_config_from_model_config
    cfg = get_preset(os.environ["PRESET"])
    hf_cfg = hf_config_from_model_config(cfg)
    m = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf_cfg)).to(getattr(torch, os.environ["DTYPE"]))
    m.save_pretrained(b)
elif step == "hf_baseline":
    m = transformers.GPTNeoXForCausalLM.from_pretrained(a, dtype="auto")
    m.save_pretrained(b)
elif step == "hf-to-megacpt":
    megacpt.convert.hf_gpt_neox.hf_to_megacpt(a, b)
elif step == "megacpt-to-hf":
    megacpt.convert.hf_gpt_neox.megacpt_to_hf(a, b)
elif step == "load_model":
    model, _ = megacpt.convert.load_model(a, dtype=getattr(torch, os.environ["DTYPE"]))
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step": step, "seconds": dt, "peak_over_imports_mb": (peak - base) / 1024,
                  "anon_end_mb": (status_kb("RssAnon") - base_anon) / 1024}))
"""


def run(step: str, a: str, b: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, step, a, b], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="pythia-160m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    env = {**os.environ, "PRESET": args.preset, "DTYPE": args.dtype, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ck, back, base = (os.path.join(tmp, n) for n in ("hf", "ck", "back", "baseline"))
        run("make", "", hf, env)
        weights_mb = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf)
                         if f.endswith(".safetensors")) / 2**20
        rows = [run("hf_baseline", hf, base, env), run("hf-to-megacpt", hf, ck, env),
                run("megacpt-to-hf", ck, back, env), run("load_model", hf, "", env), run("load_model", ck, "", env)]
        rows[-2]["step"], rows[-1]["step"] = "load_model(HF dir)", "load_model(checkpoint)"
    print(f"# {args.preset} {args.dtype}: weights {weights_mb:.0f} MiB; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'step':<26} {'seconds':>8} {'peak RSS MiB':>13} {'x weights':>10} {'anon at end':>12}")
    for r in rows:
        print(f"{r['step']:<26} {r['seconds']:>8.2f} {r['peak_over_imports_mb']:>13.0f} "
              f"{r['peak_over_imports_mb'] / weights_mb:>10.2f} {r['anon_end_mb'] / weights_mb:>11.2f}x")
    print("peak RSS counts the safetensors files' mmapped pages (clean page cache) as well as private memory;"
          " 'anon at end' is the private memory still held when the step finishes (the model, for load_model).")


if __name__ == "__main__":
    main()
