"""Readers of the four benchmarks' original files, in the variants people actually have, and
`megacpt eval convert-data` (original files -> ``DIR/<task>/{train,test}.jsonl``, docs/evaluation.md).

| task | variants read |
|---|---|
| FPB (Malo et al. 2014) | ``Sentences_{50,66,75,All}Agree.txt``: ``sentence@label`` per line, split at the last ``@``; UTF-8, Windows-1252 or ISO-8859-1 (the release); the Kaggle ``all-data.csv`` form (``label,sentence``, no header) |
| FiQA SA (task 1, 2018) | ``task1_{headline,post}_ABSA_*.json`` (``{id: {"sentence", "info": [{"target", "sentiment_score", ...}]}}``); CSV/TSV with a header (``_id,sentence,target,aspect,score,type`` as on the HF hub, or ``id,sentence,snippets,target,sentiment_score,aspects`` flattened from the JSON) |
| Headline (Sinha & Khandait 2020) | CSV with a news column and the 9 question columns under BloombergGPT's names (``price or not``, ``price up``, ``price stable``, ``past general``, ...), the Kaggle release's (``Price or Not``, ``Direction Up``, ``PastNews``, ``Asset Comparision``, ...), ``Price Direction Up`` forms, any case / snake_case |
| NER (Salinas Alvarado et al. 2015) | CoNLL: ``token [POS chunk] TAG`` (2 or more columns, space or tab separated, the same count on every line), with or without ``-DOCSTART-``, tags IOB1 (the release's ``I-ORG``), IOB2, IOBES/BILOU or plain IO (``ORG``) |

Everything else is refused with ``file:line`` and what was expected. Rows that cannot be used but do not
make the file unreadable (an empty headline cell) are skipped, counted and reported, never dropped
silently. Each conversion writes ``DIR/<task>/source.json``: the input files (SHA-256, format, encoding),
counts, skips and notes (e.g. IO-tagged entities that may hide a boundary).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from megacpt.errors import InputError, UserError
from megacpt.eval.data import NER_TYPES, SENTIMENT_LABELS, fiqa_bin, write_jsonl
from megacpt.io import sha256_file, write_json_atomic


@dataclass
class Parsed:
    """What a reader got out of one file: rows in our JSONL schema, plus what the user must hear about."""

    rows: list[dict]
    format: str
    encoding: str = "utf-8"
    skipped: list[str] = field(default_factory=list)   # "file:line: reason" per skipped row
    notes: list[str] = field(default_factory=list)     # things that are read but worth knowing


# --- text decoding ------------------------------------------------------------------------------------

def read_text(path: Path) -> tuple[str, str]:
    """(text, encoding). UTF-8 (BOM allowed) first; else Windows-1252 when the file has its 0x80-0x9F
    characters (curly quotes, dashes), else ISO-8859-1, which decodes any byte (FPB ships in it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    if any(0x80 <= b <= 0x9F for b in data):
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def _key(name: str) -> str:
    """Header matching: case, spaces, underscores and punctuation ignored ("Price or Not" == "price_or_not")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _csv_records(text: str, path: Path, delimiter: str = ","):
    """(line, fields) of every non-blank CSV record; a malformed record is a file:line error."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for rec in reader:
            if any(c.strip() for c in rec):
                yield reader.line_num, rec
    except csv.Error as e:
        raise InputError(path, reader.line_num, f"malformed CSV: {e}") from None


def _csv_rows(text: str, path: Path, delimiter: str | None = None) -> tuple[list[str], list[tuple[int, list[str]]], str]:
    """(header, [(line, fields)], delimiter) of a CSV/TSV text; the delimiter is the header line's tab, comma or
    semicolon. Blank rows are dropped; a row with a different field count is an error."""
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if delimiter is None:
        delimiter = "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")
    header: list[str] | None = None
    out = []
    for line, rec in _csv_records(text, path, delimiter):
        if header is None:
            header = [h.strip() for h in rec]
        elif len(rec) != len(header):
            raise InputError(path, line, f"{len(rec)} fields, the header has {len(header)} ({header})")
        else:
            out.append((line, rec))
    if header is None:
        raise InputError(path, 1, "empty file: expected a header line")
    return header, out, delimiter


# --- FPB ----------------------------------------------------------------------------------------------

def parse_fpb(path: str | os.PathLike) -> Parsed:
    """Financial PhraseBank. ``Sentences_*Agree.txt``: ``sentence@label`` per line, split at the *last*
    ``@`` (sentences may contain ``@``). A ``.csv`` file is the Kaggle ``all-data.csv`` form:
    ``label,sentence`` rows (either column order), no header or a header naming the two columns."""
    p = Path(path)
    text, enc = read_text(p)
    if p.suffix.lower() == ".csv":
        return _parse_fpb_csv(p, text, enc)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("@")
        if not sep or not sentence.strip():
            raise InputError(p, n, f"expected 'sentence@label' with label one of {list(SENTIMENT_LABELS)}, got {line[:80]!r}")
        label = label.strip().lower()
        if label not in SENTIMENT_LABELS:
            raise InputError(p, n, f"label {label!r} after the last '@' is not one of {list(SENTIMENT_LABELS)}")
        rows.append({"id": f"{p.stem}:{n}", "text": sentence.strip(), "label": label})
    if not rows:
        raise InputError(p, None, "no 'sentence@label' lines (the file is empty)")
    return Parsed(rows, "fpb-sentences", enc)


def _parse_fpb_csv(p: Path, text: str, enc: str) -> Parsed:
    rows = []
    for n, rec in _csv_records(text, p):
        if len(rec) != 2:
            raise InputError(p, n, f"expected 2 fields (label, sentence), got {len(rec)}")
        a, b = (c.strip() for c in rec)
        if a.lower() in SENTIMENT_LABELS:
            label, sentence = a.lower(), b
        elif b.lower() in SENTIMENT_LABELS:
            label, sentence = b.lower(), a
        elif not rows and all(re.fullmatch(r"[A-Za-z_ ]{1,30}", c) for c in (a, b)):
            continue  # a header such as "sentiment,text"
        else:
            raise InputError(p, n, f"neither field is a label {list(SENTIMENT_LABELS)}: {rec!r:.100}")
        if not sentence:
            raise InputError(p, n, "empty sentence")
        rows.append({"id": f"{p.stem}:{n}", "text": sentence, "label": label})
    if not rows:
        raise InputError(p, None, "no labelled sentences")
    return Parsed(rows, "fpb-csv", enc)


# --- FiQA SA ------------------------------------------------------------------------------------------

def _score(v, where: Path, line: int | None, what: str) -> float:
    try:
        s = float(v)
    except (TypeError, ValueError):
        raise InputError(where, line, f"{what}: sentiment score {v!r} is not a number") from None
    if not -1.0 <= s <= 1.0:
        raise InputError(where, line, f"{what}: sentiment score {s} is not in [-1, 1]")
    return s


def parse_fiqa(path: str | os.PathLike) -> Parsed:
    """FiQA 2018 task 1 (aspect sentiment). JSON ``{id: {"sentence": s, "info": [{"target", "sentiment_score",
    "snippets", "aspects"}]}}`` (headline and post files alike) or a CSV/TSV with a header. One example per
    (sentence, target); the score in [-1, 1] is binned to 3 classes (docs/method.md §3)."""
    p = Path(path)
    text, enc = read_text(p)
    if text.lstrip().startswith("{"):
        return _parse_fiqa_json(p, text, enc)
    return _parse_fiqa_table(p, text, enc)


def _key_lines(text: str) -> dict[str, int]:
    """Line of each top-level key of a JSON object (first occurrence of ``"key":``), for messages."""
    out: dict[str, int] = {}
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', text):
        try:
            k = json.loads(f'"{m.group(1)}"')
        except json.JSONDecodeError:
            continue
        out.setdefault(k, text.count("\n", 0, m.start()) + 1)
    return out


def _parse_fiqa_json(p: Path, text: str, enc: str) -> Parsed:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(p, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise InputError(p, 1, "expected a JSON object {id: {\"sentence\": ..., \"info\": [...]}}")
    lines = _key_lines(text)
    rows = []
    for key, item in data.items():
        line = lines.get(key)
        if not isinstance(item, dict) or not isinstance(item.get("sentence"), str) or not isinstance(item.get("info"), list):
            raise InputError(p, line, f"entry {key!r}: expected {{'sentence': str, 'info': [{{'target', 'sentiment_score', ...}}]}}")
        if not item["sentence"].strip():
            raise InputError(p, line, f"entry {key!r}: empty sentence")
        if not item["info"]:
            raise InputError(p, line, f"entry {key!r}: 'info' is empty (no target with a sentiment score)")
        for j, info in enumerate(item["info"]):
            if not isinstance(info, dict) or not isinstance(info.get("target"), str) or "sentiment_score" not in info:
                raise InputError(p, line, f"entry {key!r} info[{j}]: need 'target' and a numeric 'sentiment_score' "
                                          "(an unlabelled file has no scores)")
            score = _score(info["sentiment_score"], p, line, f"entry {key!r} info[{j}]")
            rows.append({"id": f"{key}:{j}", "text": item["sentence"].strip(), "target": info["target"].strip(),
                         "score": score, "label": fiqa_bin(score)})
    if not rows:
        raise InputError(p, None, "no entries")
    return Parsed(rows, "fiqa-json", enc)


FIQA_COLUMNS = {"text": ("sentence", "text", "headline", "post"), "target": ("target",),
                "score": ("sentimentscore", "score"), "label": ("label", "sentiment", "polarity"),
                "id": ("id",)}  # "_id" keys to "id"


def _parse_fiqa_table(p: Path, text: str, enc: str) -> Parsed:
    header, recs, delim = _csv_rows(text, p, "\t" if p.suffix.lower() == ".tsv" else None)
    keys = [_key(h) for h in header]
    col = {name: next((keys.index(a) for a in aliases if a in keys), None) for name, aliases in FIQA_COLUMNS.items()}
    missing = [n for n in ("text", "target") if col[n] is None]
    if col["score"] is None and col["label"] is None:
        missing.append("score (or a negative/neutral/positive label)")
    if missing:
        raise InputError(p, 1, f"FiQA table: found columns {header}, missing {missing}; expected e.g. "
                               "'_id,sentence,target,aspect,score,type' or 'id,sentence,snippets,target,sentiment_score,aspects'")
    notes = []
    if col["score"] is not None and col["label"] is not None:
        notes.append(f"{p}: labels come from the '{header[col['score']]}' column binned (docs/method.md §3); "
                     f"the '{header[col['label']]}' column is not used")
    rows = []
    for n, rec in recs:
        sent, target = rec[col["text"]].strip(), rec[col["target"]].strip()
        if not sent or not target:
            raise InputError(p, n, f"empty {'sentence' if not sent else 'target'}")
        row = {"id": rec[col["id"]].strip() if col["id"] is not None else f"{p.stem}:{n}", "text": sent, "target": target}
        if col["score"] is not None:
            row["score"] = _score(rec[col["score"]].strip(), p, n, "column " + header[col["score"]])
            row["label"] = fiqa_bin(row["score"])
        else:
            lab = rec[col["label"]].strip().lower()
            if lab not in SENTIMENT_LABELS:
                raise InputError(p, n, f"label {lab!r} is not one of {list(SENTIMENT_LABELS)}")
            row["label"] = lab
        rows.append(row)
    if not rows:
        raise InputError(p, None, "no rows after the header")
    return Parsed(rows, "fiqa-tsv" if delim == "\t" else "fiqa-csv", enc, notes=notes)


# --- Headline -----------------------------------------------------------------------------------------

# question key -> accepted column names (compared by _key): BloombergGPT Table 18 / Appendix B names, the
# Kaggle release's (daittan/gold-commodity-news-and-dimensions, its "Asset Comparision" spelling), the
# "Price Direction Up" forms of other copies, and our own snake_case keys.
HEADLINE_COLUMNS: dict[str, tuple[str, ...]] = {
    "price_or_not": ("Price or Not", "price_or_not", "Price"),
    "price_up": ("Price Up", "Direction Up", "Price Direction Up"),
    "price_constant": ("Price Stable", "Price Constant", "Direction Constant", "Price Direction Constant",
                       "Direction Stable"),
    "price_down": ("Price Down", "Direction Down", "Price Direction Down"),
    "past_price": ("Past Price", "PastPrice"),
    "future_price": ("Future Price", "FuturePrice"),
    "past_news": ("Past General", "PastNews", "Past News", "Past General News"),
    "future_news": ("Future General", "FutureNews", "Future News", "Future General News"),
    "asset_comparison": ("Asset Comparison", "Asset Comparision"),
}
HEADLINE_TEXT_COLUMNS = ("News", "Headline", "Title", "Text", "Sentence")
_YES, _NO = {"1", "1.0", "true", "yes", "y"}, {"0", "0.0", "false", "no", "n"}


def parse_headline(path: str | os.PathLike) -> Parsed:
    """Gold-news headlines: a CSV/TSV with a news column and one 0/1 column per question, under any of the
    names in ``HEADLINE_COLUMNS``. An empty label or news cell skips the row (counted and reported)."""
    p = Path(path)
    text, enc = read_text(p)
    header, recs, _ = _csv_rows(text, p)
    keys = [_key(h) for h in header]
    found, missing = {}, []
    for q, names in HEADLINE_COLUMNS.items():
        hits = sorted({i for i, k in enumerate(keys) if k in {_key(n) for n in names} | {_key(q)}})
        if len(hits) > 1:
            raise InputError(p, 1, f"question {q!r}: several columns match ({[header[i] for i in hits]}); keep one")
        if hits:
            found[q] = hits[0]
        else:
            missing.append(q)
    text_col = next((keys.index(_key(n)) for n in HEADLINE_TEXT_COLUMNS if _key(n) in keys), None)
    if missing or text_col is None:
        got = ", ".join(f"{q}={header[i]!r}" for q, i in found.items()) or "none"
        need = "; ".join(f"{q}: one of {list(HEADLINE_COLUMNS[q])}" for q in missing)
        raise InputError(p, 1, "headline CSV: " + ("" if text_col is not None else
                         f"no news column (one of {list(HEADLINE_TEXT_COLUMNS)}); ") +
                         f"question columns found: {got}" + (f"; missing: {need}" if missing else "") +
                         f" (header: {header})")
    rows, skipped = [], []
    for n, rec in recs:
        news = rec[text_col].strip()
        labels, empty = {}, []
        for q, i in found.items():
            v = rec[i].strip().lower()
            if v in _YES:
                labels[q] = "yes"
            elif v in _NO:
                labels[q] = "no"
            elif not v:
                empty.append(header[i])
            else:
                raise InputError(p, n, f"column {header[i]!r}: expected 0 or 1, got {rec[i]!r}")
        if not news or empty:
            skipped.append(f"{p}:{n}: " + ("empty news text" if not news else f"no value in {empty}"))
            continue
        rows.append({"id": f"{p.stem}:{n}", "text": news, "labels": labels})
    if not rows:
        raise InputError(p, None, "no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return Parsed(rows, "headline-csv", enc, skipped=skipped)


# --- NER (CoNLL) --------------------------------------------------------------------------------------

_PREFIXES = {"B", "I", "E", "S", "L", "U"}  # IOB1/IOB2 + IOBES/BILOU


@dataclass
class _Tok:
    token: str
    prefix: str | None   # None: O; "" : IO tag without prefix
    type: str | None
    line: int


def _split_conll(line: str) -> list[str]:
    return line.rstrip("\r\n").split("\t") if "\t" in line else line.split()


def parse_conll(path: str | os.PathLike, types: Sequence[str] = NER_TYPES) -> Parsed:
    """CoNLL NER: one ``token ... TAG`` line per token (the tag in the last column), a blank line between
    sentences, ``-DOCSTART-`` lines as document breaks. One example per sentence: text = tokens joined by
    single spaces, entities = decoded spans (every type kept; which types and sentences are evaluated is
    the NER protocol, docs/evaluation.md). Decoding handles IOB1, IOB2, IOBES/BILOU and IO in one rule: a
    span starts at B-/S-/U-, or at an I-/E-/L- (or IO) tag whose type differs from the open span's; it ends
    at O, at E-/S-/L-/U-, or where the next span starts. IOB1 and IOB2 mark where two adjacent spans of one
    type meet (B-); IO cannot, so in an IO file such spans merge, and the notes say how many spans that may
    affect."""
    p = Path(path)
    text, enc = read_text(p)
    sentences: list[list[_Tok]] = []
    cur: list[_Tok] = []
    ncols, ncols_line, scheme_seen = None, 0, {}
    allowed = set(types)

    def flush():
        if cur:
            sentences.append(cur.copy())
            cur.clear()

    for n, raw in enumerate(text.splitlines(), 1):
        parts = _split_conll(raw)
        if not parts or not raw.strip():
            flush()
            continue
        if parts[0] == "-DOCSTART-":
            flush()
            continue
        if len(parts) < 2:
            raise InputError(p, n, f"expected 'token ... TAG' (2 or more columns), got {raw!r}")
        if ncols is None:
            ncols, ncols_line = len(parts), n
        elif len(parts) != ncols:
            raise InputError(p, n, f"{len(parts)} columns, line {ncols_line} has {ncols} (expected the same "
                                   f"column count on every token line), got {raw!r}")
        tag = parts[-1].strip()
        if tag == "O":
            cur.append(_Tok(parts[0], None, None, n))
            continue
        m = re.fullmatch(r"([A-Z])-(.+)", tag)
        prefix, typ = (m.group(1), m.group(2)) if m and m.group(1) in _PREFIXES else ("", tag)
        if typ not in allowed:
            raise InputError(p, n, f"tag {tag!r}: expected O, or [B-|I-|E-|S-|L-|U-] + one of {sorted(allowed)}")
        kind = "prefixed" if prefix else "io"
        scheme_seen.setdefault(kind, n)
        if len(scheme_seen) > 1:
            other = "prefixed" if kind == "io" else "io"
            raise InputError(p, n, f"tag {tag!r} mixes tag schemes: line {scheme_seen[other]} has "
                                   f"{'B-/I- prefixed' if other == 'prefixed' else 'unprefixed (IO)'} tags")
        cur.append(_Tok(parts[0], prefix, typ, n))
    flush()
    if not sentences:
        raise InputError(p, None, "no token lines")
    rows, starts_b, starts_i_after_o, io_multi = [], 0, 0, []
    for sent in sentences:
        ents, span, span_type, prev = [], [], None, None
        for t in sent + [_Tok("", None, None, 0)]:
            starts = t.prefix is not None and (t.prefix in ("B", "S", "U") or span_type != t.type or not span)
            if span and (t.prefix is None or starts):
                ents.append({"text": " ".join(x.token for x in span), "type": span_type})
                if not span[0].prefix and len(span) > 1:
                    io_multi.append(f"{p}:{span[0].line}")
                span, span_type = [], None
            if t.prefix is not None:
                if starts:
                    starts_b += t.prefix in ("B", "S", "U")
                    starts_i_after_o += t.prefix in ("I", "E", "L") and (prev is None or prev.prefix is None)
                span.append(t)
                span_type = t.type
                if t.prefix in ("E", "S", "L", "U"):
                    ents.append({"text": " ".join(x.token for x in span), "type": span_type})
                    span, span_type = [], None
            prev = t
        rows.append({"id": f"{p.stem}:{sent[0].line}", "text": " ".join(t.token for t in sent), "entities": ents})
    notes = []
    if "io" in scheme_seen:
        fmt = "conll-io"
        if io_multi:
            notes.append(f"{p}: IO tags (no B-/I- prefixes) cannot mark where two adjacent entities of one type "
                         f"meet: {len(io_multi)} multi-token spans were read as one entity each (first at "
                         f"{', '.join(io_multi[:3])}); convert to IOB to recover such boundaries")
    elif starts_i_after_o and not starts_b:
        fmt = "conll-iob1"
    else:
        fmt = "conll-iob1" if starts_i_after_o else "conll-iob2"
    return Parsed(rows, f"{fmt}-{ncols}col", enc, notes=notes)


# --- conversion ---------------------------------------------------------------------------------------

PARSERS: dict[str, Callable[[str], Parsed]] = {
    "fpb": parse_fpb, "fiqa_sa": parse_fiqa, "headline": parse_headline, "ner": parse_conll}


def _label_key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True, ensure_ascii=False)


def _read_all(task: str, paths: Sequence[str], report: dict, seen: dict[str, str]) -> list[dict]:
    """Rows of every file; an identical row (same text and labels) already read from an *earlier file*
    is dropped and counted (FPB's agreement levels are nested subsets of each other); duplicates inside
    one file are kept, as released."""
    out = []
    for path in paths:
        parsed = PARSERS[task](path)
        kept = dropped = 0
        this_file: set[str] = set()
        for r in parsed.rows:
            k = _label_key(r)
            if k in seen and seen[k] != path:
                dropped += 1
                continue
            this_file.add(k)
            out.append(r)
            kept += 1
        for k in this_file:
            seen.setdefault(k, path)
        report["inputs"].append({"path": str(Path(path).resolve()), "sha256": sha256_file(path),
                                 "format": parsed.format, "encoding": parsed.encoding, "rows": len(parsed.rows),
                                 "kept": kept, "duplicates_of_earlier_files": dropped,
                                 "skipped_rows": len(parsed.skipped)})
        report["skipped"] += parsed.skipped
        report["notes"] += parsed.notes
    return out


def convert(task: str, inputs: Sequence[str], out_dir: str | os.PathLike, *, test_inputs: Sequence[str] = (),
            test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Convert original files of ``task`` to ``out_dir/<task>/{train,test}.jsonl`` (+ ``source.json``).

    With ``test_inputs`` the split is the files' own (NER: FIN5 train, FIN3 test, as BloombergGPT);
    otherwise distinct texts are shuffled with ``seed`` and ``test_fraction`` of them (BloombergGPT: 20%)
    become the test split, so a text never sits on both sides and cannot reappear among its own shots.
    Returns the report (also written to ``source.json``): counts, inputs, skipped rows, notes.
    """
    if task not in PARSERS:
        raise UserError(f"--task {task!r}: converters exist for {sorted(PARSERS)}")
    if not test_inputs and not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction} must be in (0, 1)")
    report: dict = {"task": task, "inputs": [], "skipped": [], "notes": [], "seed": seed,
                    "test_fraction": None if test_inputs else test_fraction}
    seen: dict[str, str] = {}
    rows = _read_all(task, inputs, report, seen)
    if test_inputs:
        test = _read_all(task, test_inputs, report, seen)
        test_texts = {r["text"] for r in test}
        train = [r for r in rows if r["text"] not in test_texts]
        if len(train) < len(rows):
            report["notes"].append(f"{len(rows) - len(train)} training rows share their text with a test row "
                                   "and were left out of train")
    else:
        by_text: dict[str, list[dict]] = {}
        for r in rows:
            by_text.setdefault(r["text"], []).append(r)
        groups = list(by_text.values())
        random.Random(seed).shuffle(groups)
        n_test = max(1, round(len(groups) * test_fraction))
        if n_test >= len(groups):
            raise UserError(f"{task}: {len(groups)} distinct texts cannot be split with --test-fraction "
                            f"{test_fraction} (nothing would be left for training)")
        test = [r for g in groups[len(groups) - n_test:] for r in g]
        train = [r for g in groups[:len(groups) - n_test] for r in g]
    out = Path(out_dir) / task
    report["train"] = write_jsonl(out / "train.jsonl", train)
    report["test"] = write_jsonl(out / "test.jsonl", test)
    write_json_atomic(out / "source.json", report)
    return report
