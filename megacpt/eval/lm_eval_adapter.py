"""Open-domain evaluation through lm-eval-harness (PyPI ``lm-eval``) on an HF export of a model.

Hub task data cannot be downloaded here, so this module turns a local classification task (our JSONL
schema) into an lm-eval *custom task*: a JSONL copy with an integer ``gold`` field plus a task YAML over it
(``dataset_path: json`` with local ``data_files``), then runs ``lm_eval --model hf`` with ``--include_path``.
With hub access, the same ``run_lm_eval`` runs the standard tasks (``arc_easy``, ``hellaswag``, ``mmlu``,
``truthfulqa_mc2``) by name. See docs/evaluation.md.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from megacpt.errors import UserError
from megacpt.eval.data import Example
from megacpt.eval.data import write_jsonl


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def export_classification_task(name: str, test: Sequence[Example], labels: Sequence[str], verbal: dict[str, str],
                               out_dir: str | Path, *, train: Sequence[Example] = (), prompt: str = "{{text}}\nAnswer:",
                               num_fewshot: int = 0) -> Path:
    """Write ``out_dir/<name>.jsonl`` (+ ``<name>_train.jsonl``) and ``out_dir/<name>.yaml``; returns the YAML.

    ``prompt`` is a Jinja template over the example's string fields; choices are the verbalisations (lm-eval
    prefixes each with its ``target_delimiter``, a space), and ``acc`` compares summed log-likelihoods like
    `megacpt eval finance` with ``--label-scoring sum``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def rows(exs):
        return ({**e.fields, "gold": list(labels).index(e.label)} for e in exs)

    data_files = {"test": str((out / f"{name}.jsonl").resolve())}
    write_jsonl(data_files["test"], rows(test))
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": prompt,
        "doc_to_choice": [verbal[lab] for lab in labels],
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if num_fewshot:
        data_files["train"] = str((out / f"{name}_train.jsonl").resolve())
        write_jsonl(data_files["train"], rows(train))
        cfg.update(fewshot_split="train", num_fewshot=num_fewshot)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_lm_eval(model_dir: str | Path, tasks: Sequence[str], output_path: str | Path, *,
                include_path: str | Path | None = None, batch_size: int = 1, device: str = "cpu",
                dtype: str = "float32", limit: int | None = None, log_samples: bool = False,
                timeout: float | None = None) -> dict:
    """Run ``python -m lm_eval --model hf`` on an HF model dir; return lm-eval's results JSON (parsed)."""
    if not lm_eval_available():
        raise UserError("lm-eval is not installed: pip install 'megacpt[eval]'")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"{model_dir}: not an HF model dir (no config.json); export with `megacpt convert megacpt-to-hf`")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype={dtype}",
           "--tasks", ",".join(tasks), "--device", device, "--batch_size", str(batch_size),
           "--output_path", str(output_path)]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    if limit:
        cmd += ["--limit", str(limit)]
    if log_samples:
        cmd += ["--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise UserError(f"lm_eval failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    found = sorted(glob.glob(str(Path(output_path) / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise UserError(f"lm_eval wrote no results_*.json under {output_path}")
    return json.loads(Path(found[-1]).read_text(encoding="utf-8"))
