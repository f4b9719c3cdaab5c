"""Task data: the JSONL schemas `megacpt eval finance` reads, and converters from the original formats.

Layout of ``--data-dir``: ``DIR/<task>/test.jsonl`` (required) and ``DIR/<task>/train.jsonl`` (the pool
few-shot examples are drawn from; required when shots > 0). One JSON object per line, UTF-8:

- classification (``fpb``, ``fiqa_sa``, custom tasks): ``{"text": str, "label": str, "id"?: str|int, ...}``;
  ``label`` must be in the task's label set; other string fields (e.g. FiQA's ``target``) may be used by
  the prompt template. ``fiqa_sa`` may give ``"score": float in [-1, 1]`` instead of (or besides) a label;
  it is binned: < -0.1 negative, [-0.1, 0.1) neutral, >= 0.1 positive (docs/method.md §3).
- ``headline``: ``{"text": str, "labels": {<question key>: "yes"|"no"|0|1|true|false, ...}}`` with all 9 keys.
- ``ner``: ``{"text": str, "entities": [{"text": span, "type": PER|ORG|LOC|MISC}, ...]}``; every span must
  occur in ``text``.

Every error names ``file:line`` and what was expected.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from megacpt.errors import InputError, UserError
from megacpt.io import atomic_path

SENTIMENT_LABELS = ("negative", "neutral", "positive")
FIQA_THRESHOLDS = (-0.1, 0.1)  # docs/method.md §3: < -0.1 negative, -0.1 <= s < 0.1 neutral, >= 0.1 positive

# Headline (Sinha & Khandait, gold news): the 9 yes/no dimensions, key -> CSV column aliases.
HEADLINE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "price_or_not": ("price or not", "price"),
    "price_up": ("price direction up", "direction up", "price up"),
    "price_constant": ("price direction constant", "direction constant", "price constant"),
    "price_down": ("price direction down", "direction down", "price down"),
    "past_price": ("pastprice", "past price"),
    "future_price": ("futureprice", "future price"),
    "past_news": ("pastnews", "past news", "past general news"),
    "future_news": ("futurenews", "future news", "future general news"),
    "asset_comparison": ("asset comparision", "asset comparison"),
}
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


# --- converters from the distribution formats ------------------------------------------------------

def _read_text_any(path: Path) -> list[str]:
    """FPB ships in ISO-8859-1; accept UTF-8 first, fall back to Latin-1 (which cannot fail)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return data.decode("latin-1").splitlines()


def parse_fpb(path: str | os.PathLike) -> list[dict]:
    """Financial PhraseBank ``Sentences_*.txt``: one ``sentence@label`` per line (split at the last '@')."""
    p = Path(path)
    rows = []
    for n, line in enumerate(_read_text_any(p), 1):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("@")
        if not sep or not text.strip():
            raise InputError(p, n, "expected 'sentence@label'")
        label = label.strip().lower()
        if label not in SENTIMENT_LABELS:
            raise InputError(p, n, f"label {label!r} is not one of {list(SENTIMENT_LABELS)}")
        rows.append({"id": f"{p.stem}:{n}", "text": text.strip(), "label": label})
    return rows


def parse_fiqa(path: str | os.PathLike) -> list[dict]:
    """FiQA task 1 ABSA JSON: ``{id: {"sentence": s, "info": [{"target", "sentiment_score", "aspects", ...}]}}``.
    One example per (sentence, target); the score is binned to a 3-class label."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise InputError(p, e.lineno, f"malformed JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise InputError(p, 1, "expected a JSON object {id: {sentence, info: [...]}}")
    rows = []
    for key, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("sentence"), str) or not isinstance(item.get("info"), list):
            raise InputError(p, None, f"entry {key!r}: expected {{'sentence': str, 'info': [...]}}")
        for j, info in enumerate(item["info"]):
            try:
                score = float(info["sentiment_score"])
                target = str(info["target"])
            except (KeyError, TypeError, ValueError):
                raise InputError(p, None, f"entry {key!r} info[{j}]: need 'target' and a numeric 'sentiment_score'") from None
            if not -1.0 <= score <= 1.0:
                raise InputError(p, None, f"entry {key!r} info[{j}]: sentiment_score {score} not in [-1, 1]")
            rows.append({"id": f"{key}:{j}", "text": item["sentence"].strip(), "target": target,
                         "score": score, "label": fiqa_bin(score)})
    return rows


def _norm_header(h: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", h.lower()).split())


def parse_headline(path: str | os.PathLike) -> list[dict]:
    """Gold-news headline CSV (a ``News`` column plus one 0/1 column per question; header names as in the
    Kaggle release, matched case- and punctuation-insensitively)."""
    p = Path(path)
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(p, 1, "empty CSV") from None
        cols = {_norm_header(h): i for i, h in enumerate(header)}
        text_col = cols.get("news", cols.get("headline"))
        if text_col is None:
            raise InputError(p, 1, f"no 'News' (or 'Headline') column in header {header}")
        qcols = {}
        for key, aliases in HEADLINE_QUESTIONS.items():
            hit = next((cols[a] for a in aliases if a in cols), None)
            if hit is None:
                raise InputError(p, 1, f"no column for question {key!r} (tried {list(aliases)}) in header {header}")
            qcols[key] = hit
        rows = []
        for n, rec in enumerate(reader, 2):
            if not any(c.strip() for c in rec):
                continue
            if len(rec) != len(header):
                raise InputError(p, n, f"{len(rec)} fields, header has {len(header)}")
            labels = {}
            for key, i in qcols.items():
                v = rec[i].strip()
                if v not in ("0", "1"):
                    raise InputError(p, n, f"column {header[i]!r}: expected 0 or 1, got {v!r}")
                labels[key] = "yes" if v == "1" else "no"
            rows.append({"id": f"{p.stem}:{n}", "text": rec[text_col].strip(), "labels": labels})
    return rows


def parse_conll(path: str | os.PathLike, types: Sequence[str] = NER_TYPES) -> list[dict]:
    """CoNLL NER (FiNER ``FIN5.txt``/``FIN3.txt``): ``token ... TAG`` per line (tag = last column, BIO or IO),
    blank line between sentences, ``-DOCSTART-`` lines ignored. One example per sentence; text = tokens
    joined by single spaces, entities = maximal tagged spans."""
    p = Path(path)
    rows: list[dict] = []
    toks: list[str] = []
    tags: list[str] = []
    start_line = 1

    def flush():
        if toks:
            rows.append(_conll_sentence(p, start_line, toks, tags, types))
        toks.clear()
        tags.clear()

    for n, line in enumerate(_read_text_any(p), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            flush()
            start_line = n + 1
            continue
        if len(parts) < 2:
            raise InputError(p, n, f"expected 'token ... TAG', got {line!r}")
        tag = parts[-1]
        if tag != "O":
            prefix, _, typ = tag.partition("-")
            if prefix not in ("B", "I") or typ not in types:
                raise InputError(p, n, f"tag {tag!r}: expected O or B-/I- + one of {list(types)}")
        if not toks:
            start_line = n
        toks.append(parts[0])
        tags.append(tag)
    flush()
    return rows


def _conll_sentence(p: Path, line: int, toks: list[str], tags: list[str], types: Sequence[str]) -> dict:
    ents, cur, cur_type = [], [], None
    for tok, tag in zip(toks + ["<end>"], tags + ["O"]):
        prefix, _, typ = tag.partition("-")
        if cur and (tag == "O" or prefix == "B" or typ != cur_type):
            ents.append({"text": " ".join(cur), "type": cur_type})
            cur, cur_type = [], None
        if tag != "O":
            cur.append(tok)
            cur_type = typ
    return {"id": f"{p.stem}:{line}", "text": " ".join(toks), "entities": ents}


PARSERS = {"fpb": parse_fpb, "fiqa_sa": parse_fiqa, "headline": parse_headline, "ner": parse_conll}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def convert(task: str, inputs: Sequence[str], out_dir: str | os.PathLike, *, test_inputs: Sequence[str] = (),
            test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Convert original files of ``task`` to ``out_dir/<task>/{train,test}.jsonl``; returns example counts.

    With ``test_inputs`` the split is the files' own; otherwise examples are shuffled with ``seed`` and the
    last ``test_fraction`` becomes the test split (FPB, FiQA and Headline ship without an official split).
    Exact duplicate texts are kept out of the other split, so no test text can reappear among its shots.
    """
    if task not in PARSERS:
        raise UserError(f"--task {task!r}: converters exist for {sorted(PARSERS)}")
    if not 0.0 < test_fraction < 1.0 and not test_inputs:
        raise UserError(f"--test-fraction {test_fraction} must be in (0, 1)")
    parse = PARSERS[task]
    rows = [r for path in inputs for r in parse(path)]
    if test_inputs:
        test = [r for path in test_inputs for r in parse(path)]
        test_texts = {r["text"] for r in test}
        train = [r for r in rows if r["text"] not in test_texts]
    else:
        rng = random.Random(seed)
        by_text: dict[str, list[dict]] = {}
        for r in rows:  # split by distinct text so duplicates land on the same side
            by_text.setdefault(r["text"], []).append(r)
        groups = list(by_text.values())
        rng.shuffle(groups)
        n_test = max(1, round(len(groups) * test_fraction))
        test = [r for g in groups[len(groups) - n_test:] for r in g]
        train = [r for g in groups[:len(groups) - n_test] for r in g]
    out = Path(out_dir) / task
    return {"train": write_jsonl(out / "train.jsonl", train), "test": write_jsonl(out / "test.jsonl", test)}
