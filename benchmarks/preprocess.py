#!/usr/bin/env python
"""Preprocessing throughput: megacpt vs a same-run baseline (and Megatron-LM's own script if given).

    python benchmarks/preprocess.py [--size-mb 100] [--workdir /tmp/megacpt-bench]
                                    [--megatron-lm PATH_TO_MEGATRON_LM_CHECKOUT]

Corpus: ``--size-mb`` of English prose as JSONL, built from the docstrings of Python's standard
library (real sentences, recombined into ~2.3 kB documents; deterministic). Tokenizer: a GPT-NeoX-style
byte-level BPE trained here (50,254 merges-vocab + 23 added whitespace tokens = 50,277, uint16 output,
like Pythia's). Every run is a separate process tree; wall clock of the whole command; peak PSS of the
tree sampled every 0.1 s. Rows:

- ``megacpt wN``: ``megacpt preprocess --workers N`` (first row: the others must be byte-identical to it),
- ``megatron-lm wN`` (with ``--megatron-lm``): Megatron-LM's ``tools/preprocess_data.py --workers N``,
- ``baseline`` (last, slowest): single process, HF ``AutoTokenizer(text).input_ids`` + megatron-core's
  ``IndexedDatasetBuilder`` (Megatron's encoder logic without its multiprocessing).

Wall clock depends on the machine's load (shared CI boxes): each row also prints CPU seconds of its
process tree and the load average; ratios are only meaningful within one run.
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

NEOX_WHITESPACE = [" " * k for k in range(2, 25)]  # GPT-NeoX adds runs of 2..24 spaces as tokens


def stdlib_sentences(max_files: int = 1200) -> list[str]:
    out = []
    files = [f for f in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))
             if "/test" not in f and "site-packages" not in f][:max_files]
    for f in files:
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for para in doc.split("\n\n"):
                        para = " ".join(para.split())
                        out += [s.strip() + "." for s in para.split(". ") if len(s.split()) >= 4]
    return out


def build_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    sents = stdlib_sentences()
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    n = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while n < target:
            paras = []
            for _ in range(rng.randint(1, 6)):
                paras.append(" ".join(rng.choice(sents) for _ in range(rng.randint(2, 7))))
            line = json.dumps({"text": "\n\n".join(paras)}, ensure_ascii=False) + "\n"
            f.write(line)
            n += len(line.encode("utf-8"))
    os.replace(tmp, path)


def build_tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    from megacpt.data.tokenizer import train_bpe

    texts = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 8000:
                break
            texts.append(json.loads(line)["text"])
    train_bpe(texts, 50254, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_tokens([AddedToken(w, normalized=True) for w in NEOX_WHITESPACE])
    tok.save(str(out / "tokenizer.json"))


def baseline(corpus: str, tok_dir: str, prefix: str) -> None:
    """Megatron's Encoder.encode + IndexedDatasetBuilder, one process."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(hf)))
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = hf(json.loads(line)["text"]).input_ids
            lens = [len(ids)] if ids else []
            if ids:
                ids.append(hf.eos_token_id)
                lens[-1] += 1
            builder.add_document(torch.tensor(ids, dtype=torch.int64), lens)
    builder.finalize(prefix + ".idx")


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, float]:
    """(wall seconds, peak PSS bytes of the process tree, CPU seconds of the tree: user + sys)."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        total = 0
        try:
            for q in [root] + root.children(recursive=True):
                try:
                    total += q.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            pass
        peak = max(peak, total)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr.read().decode()[-3000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, peak, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--workdir", default="/tmp/megacpt-bench")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--megatron-lm", default=None, help="a Megatron-LM checkout to run tools/preprocess_data.py")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--_baseline", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._baseline:
        baseline(*args._baseline)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{args.size_mb}mb.jsonl"
    if not corpus.exists():
        t = time.perf_counter()
        build_corpus(corpus, args.size_mb)
        print(f"built {corpus} in {time.perf_counter() - t:.0f}s", flush=True)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        t = time.perf_counter()
        build_tokenizer(corpus, tok)
        print(f"trained tokenizer in {time.perf_counter() - t:.0f}s", flush=True)
    nbytes = corpus.stat().st_size
    with open(corpus, "rb") as f:
        ndocs = sum(1 for _ in f)  # also pulls the corpus into the page cache
    runs: list[tuple[str, list[str], dict | None, str]] = []
    for w in args.workers:
        runs.append((f"megacpt --workers {w}",
                     [sys.executable, "-m", "megacpt", "preprocess", "--input", str(corpus), "--tokenizer-model",
                      str(tok), "--output-prefix", str(work / f"ours{w}"), "--workers", str(w), "--append-eod",
                      "--quiet"], None, str(work / f"ours{w}_text_document")))
    if args.megatron_lm:
        # Megatron-LM main imports typing.override (3.12+); on older Pythons give it typing_extensions'
        shim = work / "py311_shim"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(
            "import typing\nif not hasattr(typing, 'override'):\n"
            "    import typing_extensions\n    typing.override = typing_extensions.override\n")
        path = [str(shim), args.megatron_lm, os.environ.get("PYTHONPATH")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
        for w in args.workers:
            runs.append((f"Megatron-LM tools/preprocess_data.py --workers {w}",
                         [sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), "--input",
                          str(corpus), "--output-prefix", str(work / f"mlm{w}"), "--tokenizer-type",
                          "HuggingFaceTokenizer", "--tokenizer-model", str(tok), "--workers", str(w), "--append-eod"],
                         env, str(work / f"mlm{w}_text_document")))
    if not args.skip_baseline:
        runs.append(("baseline (HF + IndexedDatasetBuilder, 1 proc)",
                     [sys.executable, __file__, "--_baseline", str(corpus), str(tok), str(work / "base_text_document")],
                     None, str(work / "base_text_document")))
    from megacpt.data.indexed import IndexedDataset

    results = []
    print(f"load average before: {os.getloadavg()}", flush=True)
    for name, cmd, env, prefix in runs:
        wall, pss, cpu = measure(cmd, env)
        ntok = IndexedDataset(prefix).num_tokens
        results.append((name, wall, pss, ntok, prefix, cpu))
        print(f"{name:<52} {wall:7.1f}s {ndocs / wall:8.0f} docs/s {nbytes / wall / 1e6:6.2f} MB/s "
              f"{ntok / wall / 1e3:7.0f}k tok/s  peak PSS {pss / 2**30:.2f} GiB  CPU {cpu:6.1f}s "
              f"({ndocs / cpu:6.0f} docs per CPU-s)  load {os.getloadavg()[0]:.1f}", flush=True)
    ref = results[0][4]
    for name, _, _, _, prefix, _ in results[1:]:
        same = all(Path(prefix + e).read_bytes() == Path(ref + e).read_bytes() for e in (".bin", ".idx"))
        print(f"byte-identical to {results[0][0]}: {name}: {same}")
    by_name = {r[0]: r for r in results}
    base = next((r for r in results if r[0].startswith("baseline")), None)
    from megacpt.data.tokenizer import load_tokenizer

    print(f"\ntokenizer vocab {load_tokenizer(tok).vocab_size}; corpus {nbytes / 1e6:.0f} MB, {ndocs} docs, "
          f"{results[0][3]} tokens; host {os.cpu_count()} CPUs; "
          f"load average after: {os.getloadavg()}")
    for w in args.workers:
        ours = by_name.get(f"megacpt --workers {w}")
        if base:
            print(f"megacpt w{w} / baseline: docs/s {base[1] / ours[1]:.2f}x, "
                  f"docs per CPU-s {base[5] / ours[5]:.2f}x")
        mlm = by_name.get(f"Megatron-LM tools/preprocess_data.py --workers {w}")
        if mlm:
            print(f"megacpt w{w} / Megatron-LM w{w}: docs/s {mlm[1] / ours[1]:.2f}x, "
                  f"docs per CPU-s {mlm[5] / ours[5]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
