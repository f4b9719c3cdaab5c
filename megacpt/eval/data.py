"""Task data: the JSONL schemas `megacpt eval finance` reads (converters from the original files:
`megacpt.eval.originals`).

Layout of ``--data-dir``: ``DIR/<task>/test.jsonl`` (required) and ``DIR/<task>/train.jsonl`` (the pool
few-shot examples are drawn from; required when shots > 0). One JSON object per line, UTF-8:

- classification (``fpb``, ``fiqa_sa``, custom tasks): ``{"text": str, "label": str, "id"?: str|int, ...}``;
  ``label`` must be in the task's label set; other string fields (e.g. FiQA's ``target``) may be used by
  the prompt template. ``fiqa_sa`` may give ``"score": float in [-1, 1]`` instead of (or besides) a label;
  it is binned as BloombergGPT does (arXiv 2303.17564, App. B): < -0.1 negative, [-0.1, 0.1) neutral,
  >= 0.1 positive (docs/method.md §3).
- ``headline``: ``{"text": str, "labels": {<question key>: "yes"|"no"|0|1|true|false, ...}}`` with all 9 keys.
- ``ner``: ``{"text": str, "entities": [{"text": span, "type": PER|ORG|LOC|MISC}, ...]}``; every span must
  occur in ``text``.

Every error names ``file:line`` and what was expected.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from megacpt.errors import InputError, UserError
from megacpt.io import atomic_path

SENTIMENT_LABELS = ("negative", "neutral", "positive")
FIQA_THRESHOLDS = (-0.1, 0.1)  # BloombergGPT App. B: [-1, -0.1) negative, [-0.1, 0.1) neutral, [0.1, 1] positive

# Headline (Sinha & Khandait 2020, gold news): the 9 yes/no questions, in BloombergGPT's Table 18 order
# (price or not, price up, price stable, price down, past price, future price, past general, future general,
# asset comparison). Column names of the original CSVs: megacpt/eval/originals.py.
HEADLINE_QUESTIONS: tuple[str, ...] = ("price_or_not", "price_up", "price_constant", "price_down", "past_price",
                                       "future_price", "past_news", "future_news", "asset_comparison")
NER_TYPES = ("PER", "ORG", "LOC", "MISC")


@dataclass
class Example:
    """One validated example. ``fields``: the strings a template may use (text, target, ...)."""

    fields: dict[str, str]
    label: Any = None            # str (classification), dict[str, str] (headline), list[(span, type)] (ner)
    id: str | None = None
    where: str = ""              # "file:line", for messages

    @property
    def text(self) -> str:
        return self.fields["text"]


def fiqa_bin(score: float) -> str:
    lo, hi = FIQA_THRESHOLDS
    return "negative" if score < lo else ("neutral" if score < hi else "positive")


def _yes_no(v: Any, path: str, line: int, key: str) -> str:
    if isinstance(v, bool) or v in (0, 1):
        return "yes" if int(v) == 1 else "no"
    if isinstance(v, str) and v.strip().lower() in ("yes", "no", "1", "0", "true", "false"):
        return "yes" if v.strip().lower() in ("yes", "1", "true") else "no"
    raise InputError(path, line, f"labels.{key}: expected yes/no/0/1/true/false, got {v!r}")


def read_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    """(line number, object) per non-blank line; malformed JSON or a non-object is a file:line error."""
    p = Path(path)
    try:
        f = open(p, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(p, n, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(p, n, f"expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _str_field(obj: dict, key: str, path: str, line: int, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise InputError(path, line, f"missing field {key!r} (have {sorted(obj)})")
        return None
    if not isinstance(v, str) or (required and not v.strip()):
        raise InputError(path, line, f"field {key!r} must be a non-empty string, got {v!r}")
    return v


def load_examples(path: str | os.PathLike, kind: str, labels: Sequence[str] = (), *, text_field: str = "text",
                  label_field: str = "label", score_binning: bool = False) -> list[Example]:
    """Read and validate one split. ``kind``: classification | headline | ner."""
    out: list[Example] = []
    path = str(path)
    label_set = set(labels)
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        text = _str_field(obj, text_field, path, n)
        fields = {k: v for k, v in obj.items() if isinstance(v, str)}
        fields["text"] = text
        ex_id = obj.get("id")
        ex = Example(fields=fields, id=None if ex_id is None else str(ex_id), where=where)
        if kind == "classification":
            label = obj.get(label_field)
            if score_binning and "score" in obj:
                s = obj["score"]
                if isinstance(s, str):
                    try:
                        s = float(s)
                    except ValueError:
                        s = None
                if not isinstance(s, (int, float)) or isinstance(s, bool) or not -1.0 <= s <= 1.0:
                    raise InputError(path, n, f"score must be a number in [-1, 1], got {obj['score']!r}")
                binned = fiqa_bin(float(s))
                if label is not None and label != binned:
                    raise InputError(path, n, f"label {label!r} disagrees with score {s} (bins to {binned!r})")
                label = binned
            if label is None:
                raise InputError(path, n, f"missing field {label_field!r}" + (" (or 'score')" if score_binning else ""))
            if isinstance(label, int) and not isinstance(label, bool) and str(label) in label_set:
                label = str(label)  # integer class ids (labels: [0, 1] in task.yaml are read as strings)
            if not isinstance(label, str) or label not in label_set:
                raise InputError(path, n, f"label {label!r} is not in the task's label set {sorted(label_set)}")
            ex.label = label
        elif kind == "headline":
            raw = obj.get("labels")
            if not isinstance(raw, dict):
                raise InputError(path, n, "missing object field 'labels' (question key -> yes/no)")
            missing = [k for k in labels if k not in raw]
            extra = [k for k in raw if k not in label_set]
            if missing or extra:
                raise InputError(path, n, f"labels: missing {missing} / unknown {extra}; expected keys {list(labels)}")
            ex.label = {k: _yes_no(raw[k], path, n, k) for k in labels}
        elif kind == "ner":
            ents = obj.get("entities")
            if not isinstance(ents, list):
                raise InputError(path, n, "missing list field 'entities' ([] when the sentence has none)")
            parsed = []
            for j, e in enumerate(ents):
                if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not e["text"].strip():
                    raise InputError(path, n, f"entities[{j}]: expected {{'text': span, 'type': T}}, got {e!r}")
                if e.get("type") not in label_set:
                    raise InputError(path, n, f"entities[{j}]: type {e.get('type')!r} not in {sorted(label_set)}")
                if e["text"] not in text:
                    raise InputError(path, n, f"entities[{j}]: span {e['text']!r} does not occur in the text")
                parsed.append((e["text"], e["type"]))
            ex.label = parsed
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        out.append(ex)
    if not out:
        raise InputError(path, None, "no examples (the file is empty)")
    return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
