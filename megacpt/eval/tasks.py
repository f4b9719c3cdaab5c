"""Financial tasks as data (``TaskSpec``) and the three ways they are scored.

- classification (FPB, FiQA SA, any custom JSONL task): each label's verbalisation is scored by its
  log-likelihood after the k-shot prompt; the prediction is the best-scoring label. ``label_scoring="sum"``
  (default, BloombergGPT / lm-eval ``acc``) compares summed token log-probs, unnormalised; ``"mean"``
  divides by the verbalisation's token count (useful when verbalisations differ a lot in length).
- headline: 9 yes/no questions, each a binary classification with shots drawn for the same question;
  the metric is the mean of the 9 weighted F1s.
- ner: greedy generation after the k-shot prompt, parsed back into (span, type) pairs; entity-level F1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from megacpt.errors import UserError
from megacpt.eval.data import HEADLINE_QUESTIONS, NER_TYPES, SENTIMENT_LABELS, Example, load_examples
from megacpt.eval.metrics import bootstrap_ci, entity_counts, entity_f1, weighted_f1
from megacpt.eval.prompts import Template, build_prompt, example_rng, load_template, select_shots

KINDS = ("classification", "headline", "ner")


@dataclass
class TaskSpec:
    name: str
    kind: str = "classification"
    labels: tuple[str, ...] = ()      # label set (headline: question keys; ner: entity types)
    template: str = "classification"  # built-in name or path to a template YAML
    shots: int = 5
    verbalizers: dict[str, str] = field(default_factory=dict)  # overrides the template's
    text_field: str = "text"
    label_field: str = "label"
    score_binning: bool = False       # fiqa_sa: bin a numeric "score" to a label
    max_new_tokens: int = 64          # ner generation budget

    def validate(self) -> "TaskSpec":
        if self.kind not in KINDS:
            raise UserError(f"task {self.name}: kind {self.kind!r} is not one of {list(KINDS)}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise UserError(f"task {self.name}: 'labels' must be a non-empty list of distinct labels")
        if self.shots < 0:
            raise UserError(f"task {self.name}: shots must be >= 0, got {self.shots}")
        return self


# BloombergGPT's setup as used for FinPythia (docs/method.md §3): shots and metrics per task.
BUILTIN_TASKS: dict[str, TaskSpec] = {
    "fpb": TaskSpec("fpb", labels=SENTIMENT_LABELS, template="fpb", shots=5),
    "fiqa_sa": TaskSpec("fiqa_sa", labels=SENTIMENT_LABELS, template="fiqa_sa", shots=5, score_binning=True),
    "headline": TaskSpec("headline", kind="headline", labels=tuple(HEADLINE_QUESTIONS), template="headline", shots=5),
    "ner": TaskSpec("ner", kind="ner", labels=NER_TYPES, template="ner", shots=20),
}
METRIC_NAMES = {"classification": "weighted_f1", "headline": "avg_weighted_f1", "ner": "entity_f1"}


def resolve_task(name: str, data_dir: str | Path) -> TaskSpec:
    """A built-in task, or one defined (or overridden) by ``DATA_DIR/<name>/task.yaml``::

        kind: classification           # classification | headline | ner
        labels: [bullish, bearish]      # the label set every example's label must be in
        verbalizers: {bullish: up}      # optional; default: the label itself
        template: classification        # built-in template name, or a YAML path relative to task.yaml
        shots: 5
        text_field: text
        label_field: label
    """
    spec_file = Path(data_dir) / name / "task.yaml"
    base = BUILTIN_TASKS.get(name)
    if not spec_file.is_file():
        if base is None:
            raise UserError(f"task {name!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no {spec_file}")
        return replace(base)
    try:
        d = yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{spec_file}: invalid YAML: {e}") from None
    allowed = {"kind", "labels", "template", "shots", "verbalizers", "text_field", "label_field",
               "score_binning", "max_new_tokens"}
    if not isinstance(d, dict) or set(d) - allowed:
        raise UserError(f"{spec_file}: expected a mapping with keys from {sorted(allowed)}, got "
                        f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    if "labels" in d:
        d["labels"] = tuple(str(x) for x in d["labels"])
    if "verbalizers" in d:
        d["verbalizers"] = {str(k): str(v) for k, v in d["verbalizers"].items()}
    t = d.get("template")
    if t and (spec_file.parent / t).is_file():
        d["template"] = str(spec_file.parent / t)
    return (replace(base, **d) if base else TaskSpec(name=name, **d)).validate()


def verbalizers(spec: TaskSpec, template: Template, labels: Sequence[str]) -> dict[str, str]:
    v = {str(k): str(x) for k, x in (template.extra.get("verbalizers") or {}).items()}
    v.update(spec.verbalizers)
    out = {lab: v.get(lab, lab) for lab in labels}
    if len(set(out.values())) != len(out):
        raise UserError(f"task {spec.name}: verbalizers must be distinct, got {out}")
    return out


# --- classification by label likelihood -------------------------------------------------------------

def classify(lm, template: Template, queries: Sequence[dict[str, str]], shots: Sequence[Sequence[tuple[dict, str]]],
             verbal: dict[str, str], label_scoring: str = "sum") -> list[str]:
    """Predict one label per query: argmax over labels of log p(verbalisation | prompt) (ties: first label)."""
    labels = list(verbal)
    requests = []
    for q, sh in zip(queries, shots):
        ctx, lead = build_prompt(template, sh, q)
        requests += [(ctx, lead + verbal[lab]) for lab in labels]
    ll = lm.loglikelihood(requests)
    preds = []
    for i in range(len(queries)):
        scores = []
        for j in range(len(labels)):
            s, n = ll[i * len(labels) + j]
            scores.append(s / max(n, 1) if label_scoring == "mean" else s)
        preds.append(labels[int(np.argmax(scores))])
    return preds


def _shots_for(spec: TaskSpec, train: Sequence[Example], test: Sequence[Example], k: int, seed: int,
               key: str = "") -> list[list[Example]]:
    return [select_shots(train, k, ex, example_rng(seed, spec.name + key, i)) for i, ex in enumerate(test)]


def run_classification(lm, spec, template, train, test, k, seed, n_boot, label_scoring):
    verbal = verbalizers(spec, template, spec.labels)
    shots = _shots_for(spec, train, test, k, seed)
    preds = classify(lm, template, [e.fields for e in test],
                     [[(s.fields, verbal[s.label]) for s in sh] for sh in shots], verbal, label_scoring)
    gold = [e.label for e in test]
    g, p = np.array(gold, dtype=object), np.array(preds, dtype=object)
    value = weighted_f1(gold, preds, spec.labels)
    ci = bootstrap_ci(lambda idx: weighted_f1(list(g[idx]), list(p[idx]), spec.labels), len(test), n_boot=n_boot, seed=seed)
    return value, ci, {"accuracy": float(np.mean(g == p)), "verbalizers": verbal,
                       "confusion": _confusion(gold, preds, spec.labels)}, preds


def _confusion(gold, pred, labels) -> dict[str, dict[str, int]]:
    m = {g: {p: 0 for p in labels} for g in labels}
    for a, b in zip(gold, pred):
        m[a][b] += 1
    return m


def run_headline(lm, spec, template, train, test, k, seed, n_boot, label_scoring):
    questions = template.extra.get("questions") or {}
    missing = [q for q in spec.labels if q not in questions]
    if missing:
        raise UserError(f"template {template.source}: no question text for {missing}")
    verbal = verbalizers(spec, template, ("yes", "no"))
    per_q, preds_by_q = {}, {}
    for q in spec.labels:
        fields = [{**e.fields, "question": questions[q]} for e in test]
        shots = _shots_for(spec, train, test, k, seed, key=f"/{q}")
        shot_text = [[({**s.fields, "question": questions[q]}, verbal[s.label[q]]) for s in sh] for sh in shots]
        preds_by_q[q] = np.array(classify(lm, template, fields, shot_text, verbal, label_scoring), dtype=object)
    gold_by_q = {q: np.array([e.label[q] for e in test], dtype=object) for q in spec.labels}

    def avg(idx):
        return float(np.mean([weighted_f1(list(gold_by_q[q][idx]), list(preds_by_q[q][idx]), ("yes", "no"))
                              for q in spec.labels]))

    for q in spec.labels:
        per_q[q] = weighted_f1(list(gold_by_q[q]), list(preds_by_q[q]), ("yes", "no"))
    all_idx = np.arange(len(test))
    preds = [{q: preds_by_q[q][i] for q in spec.labels} for i in range(len(test))]
    return avg(all_idx), bootstrap_ci(avg, len(test), n_boot=n_boot, seed=seed), {"per_question": per_q}, preds


# --- NER by generation --------------------------------------------------------------------------------

def format_entities(ents: Sequence[tuple[str, str]], template: Template) -> str:
    types = template.extra["types"]
    if not ents:
        return str(template.extra.get("none_answer", "none"))
    return str(template.extra.get("entity_separator", "; ")).join(f"{s} ({types[t]})" for s, t in ents)


_ENTITY = re.compile(r"^(.*?\S)\s*\(([^()]+)\)$")


def parse_entities(text: str, template: Template) -> tuple[list[tuple[str, str]], int]:
    """Inverse of ``format_entities``; returns (entities, number of items that did not parse)."""
    by_name = {str(v).casefold(): k for k, v in template.extra["types"].items()}
    by_name.update({str(k).casefold(): k for k in template.extra["types"]})
    text = text.strip()
    if not text or text.casefold() == str(template.extra.get("none_answer", "none")).casefold():
        return [], 0
    ents, bad = [], 0
    sep = str(template.extra.get("entity_separator", "; ")).strip() or ";"
    for item in (x.strip() for x in text.split(sep)):
        if not item:
            continue
        m = _ENTITY.match(item)
        typ = by_name.get(m.group(2).strip().casefold()) if m else None
        if typ is None:
            bad += 1
        else:
            ents.append((m.group(1).strip(), typ))
    return ents, bad


def run_ner(lm, spec, template, train, test, k, seed, n_boot, label_scoring):
    if "types" not in template.extra:
        raise UserError(f"template {template.source}: an NER template needs 'types' (type -> verbalisation)")
    shots = _shots_for(spec, train, test, k, seed)
    prompts = []
    for ex, sh in zip(test, shots):
        ctx, lead = build_prompt(template, [(s.fields, format_entities(s.label, template)) for s in sh], ex.fields)
        prompts.append(ctx + lead)
    outs = lm.greedy_generate(prompts, spec.max_new_tokens, stop="\n")
    parsed = [parse_entities(o, template) for o in outs]
    preds = [p for p, _ in parsed]
    gold = [e.label for e in test]
    tp, n_g, n_p = entity_counts(gold, preds)
    ci = bootstrap_ci(lambda idx: entity_f1([gold[i] for i in idx], [preds[i] for i in idx]), len(test),
                      n_boot=n_boot, seed=seed)
    extra = {"tp": tp, "n_gold_entities": n_g, "n_pred_entities": n_p,
             "precision": tp / n_p if n_p else 0.0, "recall": tp / n_g if n_g else 0.0,
             "unparsed_items": sum(b for _, b in parsed)}
    return entity_f1(gold, preds), ci, extra, [{"generated": o, "entities": p} for o, p in zip(outs, preds)]


RUNNERS: dict[str, Callable] = {"classification": run_classification, "headline": run_headline, "ner": run_ner}


def load_task_data(spec: TaskSpec, data_dir: str | Path, shots: int) -> tuple[list[Example], list[Example]]:
    d = Path(data_dir) / spec.name
    test_path, train_path = d / "test.jsonl", d / "train.jsonl"
    if not test_path.is_file():
        raise UserError(f"task {spec.name}: missing {test_path} (see docs/evaluation.md for the schema; "
                        "`megacpt eval convert-data` converts the original files)")
    kw = dict(text_field=spec.text_field, label_field=spec.label_field, score_binning=spec.score_binning)
    test = load_examples(test_path, spec.kind, spec.labels, **kw)
    if shots == 0:
        return [], test
    if not train_path.is_file():
        raise UserError(f"task {spec.name}: {shots}-shot prompts need {train_path} (or pass --shots 0)")
    return load_examples(train_path, spec.kind, spec.labels, **kw), test
