"""Financial tasks as data (``TaskSpec``) and the three ways they are scored.

- classification (FPB, FiQA SA, any custom JSONL task): each label's verbalisation is scored by its
  log-likelihood after the k-shot prompt; the prediction is the best-scoring label. ``label_scoring="sum"``
  (default, BloombergGPT's "regular" / lm-eval ``acc``) compares summed token log-probs, unnormalised;
  ``"mean"`` divides by the verbalisation's token count (BloombergGPT's "normalization").
- headline: 9 yes/no questions, each a binary classification with shots drawn for the same question;
  the metric is the mean of the 9 weighted F1s.
- ner: greedy generation after the k-shot prompt, parsed back into (span, type) pairs; entity-level F1
  under an explicit protocol (``NerProtocol``: kept entity types, whether entity-less sentences count).

A runner scores one *shot draw* (one seed) and returns a ``DrawResult``: predictions, label scores, the
metric, and the metric on bootstrap resamples of the test set, so draws can be averaged resample by
resample (``megacpt.eval.finance``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from megacpt.errors import UserError
from megacpt.eval.calibration import CALIBRATIONS, calibrate
from megacpt.eval.data import HEADLINE_QUESTIONS, NER_TYPES, SENTIMENT_LABELS, Example, load_examples
from megacpt.eval.metrics import (accuracy, confusion, encode, entity_counts_per_example, f1_from_counts, weighted_f1,
                                  weighted_f1_resampled)
from megacpt.eval.prompts import Template, build_prompt, example_rng, select_shots

KINDS = ("classification", "headline", "ner")

# BloombergGPT (arXiv 2303.17564, §5.3.1 and App. B): "As MISC cannot be defined on its own ... we drop all
# entities with type MISC. Additionally, as it is nontrivial to learn to predict empty output in the
# few-shot set-up, we drop sentences that do not contain any entity."
BLOOMBERGGPT_NER_TYPES = ("PER", "ORG", "LOC")


@dataclass(frozen=True)
class NerProtocol:
    """Which NER annotations are evaluated. Applied to the few-shot pool and the test set alike."""

    entity_types: tuple[str, ...] = BLOOMBERGGPT_NER_TYPES   # kept types; other entities are dropped
    include_empty: bool = False       # evaluate sentences with no (kept) entity too

    def validate(self, where: str) -> "NerProtocol":
        bad = [t for t in self.entity_types if t not in NER_TYPES]
        if not self.entity_types or bad or len(set(self.entity_types)) != len(self.entity_types):
            raise UserError(f"{where}: entity types {list(self.entity_types)} must be distinct and from {list(NER_TYPES)}")
        return self

    def as_dict(self) -> dict:
        return {"entity_types": list(self.entity_types),
                "sentences": "all" if self.include_empty else "with-entities"}


@dataclass
class TaskSpec:
    name: str
    kind: str = "classification"
    labels: tuple[str, ...] = ()      # label set (headline: question keys; ner: entity types a file may use)
    template: str = "classification"  # built-in name or path to a template YAML
    shots: int = 5
    verbalizers: dict[str, str] = field(default_factory=dict)  # overrides the template's
    text_field: str = "text"
    label_field: str = "label"
    score_binning: bool = False       # fiqa_sa: bin a numeric "score" to a label
    max_new_tokens: int = 64          # ner generation budget
    entity_types: tuple[str, ...] = BLOOMBERGGPT_NER_TYPES  # ner protocol (see NerProtocol)
    include_empty: bool = False

    def validate(self) -> "TaskSpec":
        if self.kind not in KINDS:
            raise UserError(f"task {self.name}: kind {self.kind!r} is not one of {list(KINDS)}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise UserError(f"task {self.name}: 'labels' must be a non-empty list of distinct labels")
        if self.shots < 0:
            raise UserError(f"task {self.name}: shots must be >= 0, got {self.shots}")
        if self.kind == "ner":
            self.ner_protocol().validate(f"task {self.name}")
        return self

    def ner_protocol(self) -> NerProtocol:
        return NerProtocol(tuple(self.entity_types), bool(self.include_empty))


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
        entity_types: [PER, ORG, LOC]   # ner: the protocol's kept types
        include_empty: false            # ner: evaluate entity-less sentences too
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
               "score_binning", "max_new_tokens", "entity_types", "include_empty"}
    if not isinstance(d, dict) or set(d) - allowed:
        raise UserError(f"{spec_file}: expected a mapping with keys from {sorted(allowed)}, got "
                        f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    for key in ("labels", "entity_types"):
        if key in d:
            d[key] = tuple(str(x) for x in d[key])
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


@dataclass
class DrawResult:
    """One task scored with one shot draw."""

    value: float
    preds: list                                  # per test example
    scores: list                                 # per test example: label -> score (ner: None)
    resampled: Callable[[np.ndarray], np.ndarray]  # [B, n] resample indices -> metric per resample [B]
    extra: dict = field(default_factory=dict)     # accuracy, confusion, per_question, NER counts, ...


# --- classification by label likelihood -------------------------------------------------------------

def score_labels(lm, template: Template, queries: Sequence[dict[str, str]], shots: Sequence[Sequence[tuple[dict, str]]],
                 verbal: dict[str, str], label_scoring: str = "sum") -> list[dict[str, float]]:
    """Per query, {label: score}: log p(verbalisation | prompt), summed over its tokens (``sum``) or divided
    by their number (``mean``), or the calibrated score (``contextual`` | ``pmi``: megacpt.eval.calibration)."""
    labels = list(verbal)
    requests = []
    for q, sh in zip(queries, shots):
        ctx, lead = build_prompt(template, sh, q)
        requests += [(ctx, lead + verbal[lab]) for lab in labels]
    ll = lm.loglikelihood(requests)
    scores = np.array([s / max(n, 1) if label_scoring == "mean" else s for s, n in ll],
                      dtype=np.float64).reshape(len(queries), len(labels))
    if label_scoring in CALIBRATIONS:  # docs/method.md §3: contextual calibration or domain-conditional PMI
        scores = calibrate(lm, label_scoring, scores, template, queries, shots, verbal)
    return [dict(zip(labels, map(float, row))) for row in scores]


def argmax_label(scores: dict[str, float]) -> str:
    """The best-scoring label; ties go to the first label in the label set."""
    labels = list(scores)
    return labels[int(np.argmax([scores[lab] for lab in labels]))]


def classify(lm, template: Template, queries: Sequence[dict[str, str]], shots: Sequence[Sequence[tuple[dict, str]]],
             verbal: dict[str, str], label_scoring: str = "sum") -> list[str]:
    """Predict one label per query: argmax over labels of the label score (ties: first label)."""
    return [argmax_label(s) for s in score_labels(lm, template, queries, shots, verbal, label_scoring)]


def _shots_for(spec: TaskSpec, train: Sequence[Example], test: Sequence[Example], k: int, seed: int,
               key: str = "") -> list[list[Example]]:
    return [select_shots(train, k, ex, example_rng(seed, spec.name + key, i)) for i, ex in enumerate(test)]


def run_classification(lm, spec, template, train, test, k, seed, label_scoring) -> DrawResult:
    verbal = verbalizers(spec, template, spec.labels)
    shots = _shots_for(spec, train, test, k, seed)
    scores = score_labels(lm, template, [e.fields for e in test],
                          [[(s.fields, verbal[s.label]) for s in sh] for sh in shots], verbal, label_scoring)
    preds = [argmax_label(s) for s in scores]
    gold = [e.label for e in test]
    g, p = encode(gold, spec.labels), encode(preds, spec.labels)
    return DrawResult(weighted_f1(gold, preds, spec.labels), preds, scores,
                      lambda idx: weighted_f1_resampled(g, p, len(spec.labels), idx),
                      {"accuracy": accuracy(gold, preds), "verbalizers": verbal,
                       "confusion": confusion(gold, preds, spec.labels)})


def run_headline(lm, spec, template, train, test, k, seed, label_scoring) -> DrawResult:
    questions = template.extra.get("questions") or {}
    missing = [q for q in spec.labels if q not in questions]
    if missing:
        raise UserError(f"template {template.source}: no question text for {missing}")
    verbal = verbalizers(spec, template, ("yes", "no"))
    scores_by_q, preds_by_q, gold_by_q = {}, {}, {}
    for q in spec.labels:
        fields = [{**e.fields, "question": questions[q]} for e in test]
        shots = _shots_for(spec, train, test, k, seed, key=f"/{q}")
        shot_text = [[({**s.fields, "question": questions[q]}, verbal[s.label[q]]) for s in sh] for sh in shots]
        scores_by_q[q] = score_labels(lm, template, fields, shot_text, verbal, label_scoring)
        preds_by_q[q] = [argmax_label(s) for s in scores_by_q[q]]
        gold_by_q[q] = [e.label[q] for e in test]
    per_q = {q: weighted_f1(gold_by_q[q], preds_by_q[q], ("yes", "no")) for q in spec.labels}
    codes = {q: (encode(gold_by_q[q], ("yes", "no")), encode(preds_by_q[q], ("yes", "no"))) for q in spec.labels}

    def resampled(idx):
        return np.mean([weighted_f1_resampled(g, p, 2, idx) for g, p in codes.values()], axis=0)

    n = len(test)
    return DrawResult(float(np.mean(list(per_q.values()))),
                      [{q: preds_by_q[q][i] for q in spec.labels} for i in range(n)],
                      [{q: scores_by_q[q][i] for q in spec.labels} for i in range(n)],
                      resampled, {"per_question": per_q})


# --- NER by generation --------------------------------------------------------------------------------

def format_entities(ents: Sequence[tuple[str, str]], template: Template) -> str:
    types = template.extra["types"]
    if not ents:
        return str(template.extra.get("none_answer", "none"))
    return str(template.extra.get("entity_separator", ", ")).join(f"{s} ({types[t]})" for s, t in ents)


_MARKER = re.compile(r"\(\s*([^()]*?)\s*\)")


def parse_entities(text: str, template: Template, types: Sequence[str] | None = None) -> tuple[list[tuple[str, str]], int]:
    """Inverse of ``format_entities``: (entities, number of items that did not parse).

    Each ``(type)`` marker naming a type (by tag or verbalisation, any case) ends one entity; its span is
    the text since the previous marker, separator stripped. Spans may therefore contain the separator or
    other parentheses ("Evergreen Solar , Inc (organization)", "Acme (UK) Ltd (organization)"). Text after
    the last marker, an empty span, or a marker of a type outside ``types`` (the NER protocol's kept
    types) counts as one unparsed item.
    """
    all_types = template.extra["types"]
    by_name = {str(v).casefold(): k for k, v in all_types.items()}
    by_name.update({str(k).casefold(): k for k in all_types})
    keep = set(types) if types is not None else set(all_types)
    sep = str(template.extra.get("entity_separator", ", ")).strip() or ","
    text = text.strip()
    if not text or text.casefold() == str(template.extra.get("none_answer", "none")).casefold():
        return [], 0

    def clean(s: str) -> str:
        s = s.strip()
        while s.startswith(sep):
            s = s[len(sep):].strip()
        while s.endswith(sep):
            s = s[: -len(sep)].strip()
        return s

    ents, bad, pos = [], 0, 0
    for m in _MARKER.finditer(text):
        typ = by_name.get(m.group(1).casefold())
        if typ is None:
            continue  # a parenthesis inside a span
        span = clean(text[pos:m.start()])
        pos = m.end()
        if not span or typ not in keep:
            bad += 1
        else:
            ents.append((span, typ))
    if clean(text[pos:]):
        bad += 1
    return ents, bad


def apply_ner_protocol(examples: Sequence[Example], protocol: NerProtocol) -> tuple[list[Example], int, int]:
    """(kept examples with only the kept entity types, #sentences dropped, #entities dropped)."""
    keep = set(protocol.entity_types)
    out, dropped_sent, dropped_ent = [], 0, 0
    for e in examples:
        ents = [x for x in e.label if x[1] in keep]
        dropped_ent += len(e.label) - len(ents)
        if not ents and not protocol.include_empty:
            dropped_sent += 1
            continue
        out.append(replace(e, label=ents))
    return out, dropped_sent, dropped_ent


def run_ner(lm, spec, template, train, test, k, seed, label_scoring) -> DrawResult:
    if "types" not in template.extra:
        raise UserError(f"template {template.source}: an NER template needs 'types' (type -> verbalisation)")
    missing = [t for t in spec.entity_types if t not in template.extra["types"]]
    if missing:
        raise UserError(f"template {template.source}: no verbalisation for entity type(s) {missing}")
    shots = _shots_for(spec, train, test, k, seed)
    prompts = []
    for ex, sh in zip(test, shots):
        ctx, lead = build_prompt(template, [(s.fields, format_entities(s.label, template)) for s in sh], ex.fields)
        prompts.append(ctx + lead)
    outs = lm.greedy_generate(prompts, spec.max_new_tokens, stop="\n")
    parsed = [parse_entities(o, template, spec.entity_types) for o in outs]
    preds = [p for p, _ in parsed]
    counts = entity_counts_per_example([e.label for e in test], preds)            # [n, 3]
    tp, n_g, n_p = (int(x) for x in counts.sum(0)) if len(test) else (0, 0, 0)

    def resampled(idx):
        c = counts[idx].sum(1)                                                     # [B, 3]
        return f1_from_counts(c[:, 0], c[:, 1], c[:, 2])

    extra = {"tp": tp, "n_gold_entities": n_g, "n_pred_entities": n_p,
             "precision": tp / n_p if n_p else 0.0, "recall": tp / n_g if n_g else 0.0,
             "unparsed_items": sum(b for _, b in parsed)}
    return DrawResult(f1_from_counts(tp, n_g, n_p), [{"generated": o, "entities": p} for o, p in zip(outs, preds)],
                      [None] * len(test), resampled, extra)


RUNNERS: dict[str, Callable[..., DrawResult]] = {
    "classification": run_classification, "headline": run_headline, "ner": run_ner}


def load_task_data(spec: TaskSpec, data_dir: str | Path, shots: int) -> tuple[list[Example], list[Example], dict]:
    """(few-shot pool, test set, notes). NER: the protocol is applied to both (``notes`` counts what it
    dropped)."""
    d = Path(data_dir) / spec.name
    test_path, train_path = d / "test.jsonl", d / "train.jsonl"
    if not test_path.is_file():
        raise UserError(f"task {spec.name}: missing {test_path} (see docs/evaluation.md for the schema; "
                        "`megacpt eval convert-data` converts the original files)")
    kw = dict(text_field=spec.text_field, label_field=spec.label_field, score_binning=spec.score_binning)
    test = load_examples(test_path, spec.kind, spec.labels, **kw)
    train: list[Example] = []
    if shots > 0:
        if not train_path.is_file():
            raise UserError(f"task {spec.name}: {shots}-shot prompts need {train_path} (or pass --shots 0)")
        train = load_examples(train_path, spec.kind, spec.labels, **kw)
    notes: dict[str, Any] = {}
    if spec.kind == "ner":
        protocol = spec.ner_protocol().validate(f"task {spec.name}")
        test, ds, de = apply_ner_protocol(test, protocol)
        train, ds_tr, de_tr = apply_ner_protocol(train, protocol)
        notes = {"protocol": protocol.as_dict(),
                 "dropped_sentences": {"train": ds_tr, "test": ds}, "dropped_entities": {"train": de_tr, "test": de}}
        if not test:
            raise UserError(f"task {spec.name}: no test sentence is left under the NER protocol "
                            f"{protocol.as_dict()} ({ds} dropped)")
    return train, test, notes
