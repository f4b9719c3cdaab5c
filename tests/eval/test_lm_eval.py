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
    out = tmp_path / "lm_eval_out"
    assert main(["eval", "lm-eval", "--model", str(export), "--tasks", "megacpt_local_sa", "--include-path",
                 str(tasks_dir), "--micro-batch-size", "4", "--out", str(out), "--log-samples"]) == 0
    assert "[eval] lm-eval megacpt_local_sa: acc,none=" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
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
    assert local_task_names(tasks_dir) == {"megacpt_local_sa"}
