"""Open-domain evaluation through lm-eval-harness (PyPI ``lm-eval``) on an HF export of a model.

Hub task data cannot be downloaded here, so this module turns a local classification task (our JSONL
schema) into an lm-eval *custom task*: a JSONL copy with an integer ``gold`` field plus a task YAML over it
(``dataset_path: json`` with local ``data_files``), then runs the harness's ``hf`` model on it (what
``lm_eval --model hf --include_path DIR`` does, called in-process through ``lm_eval.simple_evaluate``).
With hub access, the same ``run_lm_eval`` runs the standard tasks (``arc_easy``, ``hellaswag``, ``mmlu``,
``truthfulqa_mc2``) by name. See docs/evaluation.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import yaml

from megacpt.config import torch_dtype_name
from megacpt.errors import UserError
from megacpt.eval.data import Example, write_jsonl
from megacpt.io import atomic_path, write_json_atomic


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
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def local_task_names(include_path: str | Path | None) -> set[str]:
    """``task``/``group`` names defined by the YAML files under ``include_path``."""
    names: set[str] = set()
    if include_path is None:
        return names
    for f in Path(include_path).rglob("*.yaml"):
        try:
            d = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError):
            continue  # lm-eval's own loader reports broken task files
        if isinstance(d, dict):
            names.update(str(d[k]) for k in ("task", "group") if isinstance(d.get(k), str))
    return names


# The open-domain tasks FinPythia reports (ARC, MMLU, TruthfulQA, HellaSwag: docs/method.md §3) with the
# few-shot counts of the Open LLM Leaderboard (v1) convention (its documentation: AI2 Reasoning Challenge
# 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA 0-shot). Whether the FinPythia paper used these exact
# counts and task variants is not verified (docs/evaluation.md).
PRESETS: dict[str, dict[str, int]] = {
    "finpythia-open-domain": {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0},
}


def parse_num_fewshot(spec: str | int | None) -> int | dict[str, int] | None:
    """``--num-fewshot``: ``K`` (every task, lm-eval's own flag) or ``TASK=K[,TASK=K...]`` (per task)."""
    if spec is None or isinstance(spec, int):
        return spec
    text = str(spec).strip()
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--num-fewshot {spec!r}: expected K or TASK=K[,TASK=K...]") from None
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, eq, val = item.partition("=")
        try:
            out[name.strip()] = int(val)
        except ValueError:
            raise UserError(f"--num-fewshot {spec!r}: expected K or TASK=K[,TASK=K...]") from None
        if not eq or out[name.strip()] < 0:
            raise UserError(f"--num-fewshot {spec!r}: expected K >= 0 or TASK=K[,TASK=K...]")
    return out


def load_with_shots(task_manager, tasks: Sequence[str], shots: dict[str, int]) -> list:
    """lm-eval Task/Group objects for ``tasks`` with ``num_fewshot`` set per requested name (a group's value
    applies to all its subtasks). Like lm-eval's ``--num_fewshot``, a task whose config fixes 0 shots is
    not given more: that is an error here, not a silent override."""
    objs = []
    for name in tasks:
        loaded = task_manager.load([name])
        k = shots.get(name)
        for tname, task in loaded["tasks"].items():
            if k is None:
                continue
            if task.get_config("num_fewshot") == 0 and k > 0:
                raise UserError(f"--num-fewshot {name}={k}: lm-eval's task {tname} fixes num_fewshot: 0 in its "
                                "config (its prompt is built for zero-shot use)")
            task.set_config(key="num_fewshot", value=k)
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objs.append(loaded["tasks"][name])
        else:  # a tag: the tasks it expands to
            objs += list(loaded["tasks"].values())
    return objs


def run_lm_eval(model_dir: str | Path, tasks: Sequence[str], output_path: str | Path, *,
                include_path: str | Path | None = None, batch_size: int = 1, device: str = "cpu",
                dtype: str = "float32", limit: int | None = None, log_samples: bool = False,
                num_fewshot: int | dict[str, int] | None = None, preset: str | None = None) -> dict:
    """Run lm-eval-harness (``simple_evaluate(model="hf", ...)``, what ``lm_eval --model hf`` runs) on an HF
    model dir. Writes ``output_path/results.json`` (+ ``samples_<task>.jsonl`` with ``log_samples``) and
    returns lm-eval's results dict (with ``samples`` when logged).

    ``num_fewshot``: an int for every task (lm-eval's flag), or ``{task_or_group: k}``; unnamed tasks keep
    their configs' counts. ``preset`` (``PRESETS``) adds its tasks and counts (explicit values win). The
    results record, under ``megacpt``, the lm-eval version, the tasks, the requested and the effective
    few-shot counts (lm-eval's own ``n-shot``).

    When every requested task is defined under ``include_path``, lm-eval's ~15k built-in task YAMLs are not
    indexed (``include_defaults=False``), which saves most of its start-up time.
    """
    tasks = list(tasks)
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r}: known presets {sorted(PRESETS)}")
        tasks += [t for t in PRESETS[preset] if t not in tasks]
        if isinstance(num_fewshot, int):
            raise UserError("--num-fewshot K (one count for all) contradicts --preset's per-task counts; "
                            "use TASK=K to change one")
        num_fewshot = {**PRESETS[preset], **(num_fewshot or {})}
    if not tasks:
        raise UserError("no tasks: pass --tasks and/or --preset")
    if isinstance(num_fewshot, dict):
        unknown = sorted(set(num_fewshot) - set(tasks))
        if unknown:
            raise UserError(f"--num-fewshot names {unknown}, which are not among the tasks {tasks}")
    if not lm_eval_available():
        raise UserError("lm-eval is not installed: pip install 'megacpt[eval]'")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"{model_dir}: not an HF model dir (no config.json); export with `megacpt convert megacpt-to-hf`")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path}: no such directory")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks: never reach for the hub
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megacpt import __version__

    only_local = bool(tasks) and set(tasks) <= local_task_names(include_path)
    tm = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=not only_local)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task(s) {unknown}" + ("" if include_path else " (custom tasks need --include-path)"))
    task_arg: list = list(tasks)
    if isinstance(num_fewshot, dict):
        task_arg, num_fewshot_arg = load_with_shots(tm, tasks, num_fewshot), None
    else:
        num_fewshot_arg = num_fewshot
    dtype = torch_dtype_name(dtype)  # fp32/bf16/fp16 or an alias -> the torch name HF's loader takes
    res = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={dtype}", tasks=task_arg,
                          task_manager=tm, batch_size=batch_size, device=device, limit=limit, log_samples=log_samples,
                          num_fewshot=num_fewshot_arg)
    if res is None:  # non-zero ranks under multi-process runs
        return {}
    res["megacpt"] = {"lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "megacpt_version": __version__,
                      "tasks": tasks, "preset": preset, "num_fewshot_requested": num_fewshot,
                      "num_fewshot": dict(res.get("n-shot") or {}), "model": str(model_dir), "dtype": dtype,
                      "limit": limit}
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    samples = res.pop("samples", None) or {}
    write_json_atomic(out / "results.json", res)
    for task, rows in samples.items():
        with atomic_path(out / f"samples_{task}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
    if samples:
        res["samples"] = samples
    return res
