"""The lm-eval-harness path end to end: megacpt checkpoint -> `convert megacpt-to-hf` -> lm-eval's `hf` model
(`megacpt eval lm-eval`) on a local custom task; its per-sample log-likelihoods must equal `eval finance`'s
scoring of the same prompts."""
import json

import pytest

from megacpt.cli import main
from megacpt.eval.data import Example
from megacpt.eval.lm import load_eval_lm
from megacpt.eval.lm_eval_adapter import export_classification_task, local_task_names
from megacpt.eval.prompts import Template
from megacpt.eval.tasks import classify

from ..conftest import requires_module
from .conftest import save_tiny_model

LABELS = ("negative", "neutral", "positive")


@requires_module("lm_eval")
@pytest.mark.integration
def test_lm_eval_on_exported_tiny_model_matches_our_scoring(tmp_path, tok_dir, capsys):
    hf0 = save_tiny_model(tmp_path / "hf0", tok_dir, padded_vocab=300, seed=3)
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    assert main(["convert", "hf-to-megacpt", "--hf", str(hf0), "--out", str(ckpt)]) == 0
    assert main(["convert", "megacpt-to-hf", "--ckpt", str(ckpt), "--out", str(export)]) == 0

    texts = ["Profits rose sharply this quarter.", "Shares fell after the warning.", "Revenue was flat.",
             "Gold climbed on Monday."]
    test = [Example(fields={"text": t}, label=LABELS[i % 3], where=f"test:{i}") for i, t in enumerate(texts)]
    verbal = {lab: lab for lab in LABELS}
    tasks_dir = tmp_path / "tasks"
    export_classification_task("megacpt_local_sa", test, LABELS, verbal, tasks_dir, prompt="{{text}}\nAnswer:")
    # a second task with a few-shot pool, inside a group: per-group shot counts reach its subtasks
    export_classification_task("megacpt_local_b", test, LABELS, verbal, tasks_dir, prompt="{{text}}\nAnswer:",
                               train=test, num_fewshot=1)
    (tasks_dir / "grp.yaml").write_text("group: megacpt_local_grp\ntask:\n  - megacpt_local_b\n")
    out = tmp_path / "lm_eval_out"
    assert main(["eval", "lm-eval", "--model", str(export), "--tasks", "megacpt_local_sa,megacpt_local_grp",
                 "--num-fewshot", "megacpt_local_grp=2", "--include-path", str(tasks_dir), "--micro-batch-size", "4",
                 "--out", str(out), "--log-samples"]) == 0
    printed = capsys.readouterr().out
    assert "[eval] lm-eval megacpt_local_sa (0-shot): acc,none=" in printed
    assert "[eval] lm-eval megacpt_local_b (2-shot): acc,none=" in printed
    res = json.loads((out / "results.json").read_text())
    import lm_eval

    rec = res["megacpt"]
    assert rec["lm_eval_version"] == lm_eval.__version__ and rec["tasks"] == ["megacpt_local_sa", "megacpt_local_grp"]
    assert rec["num_fewshot_requested"] == {"megacpt_local_grp": 2}
    assert rec["num_fewshot"]["megacpt_local_sa"] == 0 and rec["num_fewshot"]["megacpt_local_b"] == 2
    two_shot = json.loads(open(out / "samples_megacpt_local_b.jsonl").readline())
    assert json.dumps(two_shot["arguments"]).count("Answer:") == 3 * len(LABELS)  # 2 shots + the query, per choice
    samples = [json.loads(line) for line in open(out / "samples_megacpt_local_sa.jsonl")]
    samples.sort(key=lambda s: s["doc_id"])
    assert len(samples) == len(texts)

    # our scorer on the megacpt checkpoint (not the export): same prompts, same numbers
    lm = load_eval_lm(str(ckpt), batch_size=3)
    t = Template(example="{text}\nAnswer: {answer}")
    ours = lm.loglikelihood([(f"{x}\nAnswer:", f" {lab}") for x in texts for lab in LABELS])
    theirs = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    assert [o[0] for o in ours] == pytest.approx(theirs, abs=2e-4)
    preds = classify(lm, t, [e.fields for e in test], [[]] * len(test), verbal, "sum")
    acc = sum(p == e.label for p, e in zip(preds, test)) / len(test)
    assert res["results"]["megacpt_local_sa"]["acc,none"] == pytest.approx(acc)
    # only local tasks were asked for: lm-eval's ~15k built-in task files were not indexed
    assert local_task_names(tasks_dir) == {"megacpt_local_sa", "megacpt_local_b", "megacpt_local_grp"}


def test_num_fewshot_parsing_and_preset_checks(tmp_path):
    from megacpt.errors import UserError
    from megacpt.eval.lm_eval_adapter import PRESETS, parse_num_fewshot, run_lm_eval

    assert parse_num_fewshot(None) is None and parse_num_fewshot("5") == 5
    assert parse_num_fewshot("arc_challenge=25, hellaswag=10") == {"arc_challenge": 25, "hellaswag": 10}
    for bad in ("five", "arc=x", "arc=-1", "arc=1,2"):
        with pytest.raises(UserError, match="--num-fewshot"):
            parse_num_fewshot(bad)
    # Open LLM Leaderboard (v1) counts for the paper's four open-domain tasks
    assert PRESETS["finpythia-open-domain"] == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0}
    # argument errors come before anything is loaded (no model dir is needed to see them)
    with pytest.raises(UserError, match="contradicts --preset"):
        run_lm_eval(tmp_path, [], tmp_path / "o", preset="finpythia-open-domain", num_fewshot=3)
    with pytest.raises(UserError, match=r"names \['hellaswag'\], which are not among the tasks"):
        run_lm_eval(tmp_path, ["arc_easy"], tmp_path / "o", num_fewshot={"hellaswag": 10})
    with pytest.raises(UserError, match="no tasks"):
        run_lm_eval(tmp_path, [], tmp_path / "o")


@requires_module("lm_eval")
def test_zero_shot_config_is_not_overridden(tmp_path):
    from lm_eval.tasks import TaskManager

    from megacpt.errors import UserError
    from megacpt.eval.lm_eval_adapter import load_with_shots

    test = [Example(fields={"text": f"t{i}"}, label=LABELS[i % 3], where=f"t:{i}") for i in range(3)]
    export_classification_task("fixed_zero", test, LABELS, {lab: lab for lab in LABELS}, tmp_path)
    with open(tmp_path / "fixed_zero.yaml", "a") as f:
        f.write("num_fewshot: 0\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(UserError, match="fixes num_fewshot: 0"):
        load_with_shots(tm, ["fixed_zero"], {"fixed_zero": 5})
    assert load_with_shots(tm, ["fixed_zero"], {"fixed_zero": 0})[0].get_config("num_fewshot") == 0
