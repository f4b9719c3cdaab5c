"""Prompt templates (YAML files under ``megacpt/eval/templates/``) and seeded k-shot prompt construction.

A template has ``instruction`` (prepended once), ``example`` (one example; ``{answer}`` must be its last
placeholder, every other ``{field}`` is filled from the example), ``separator`` (between examples) and
task-specific keys (``verbalizers``, ``questions``, ``types``, ...). A k-shot prompt is::

    instruction + shot_1 + separator + ... + shot_k + separator + query-up-to-{answer}

Whitespace right before ``{answer}`` belongs to the answer (``"Answer: {answer}"`` scores ``" positive"``),
as in lm-eval-harness, so BPE merges of the space with the label word are scored on the label side.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from megacpt.errors import UserError
from megacpt.eval.data import Example
from megacpt.eval.metrics import normalize_span

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass
class Template:
    example: str
    instruction: str = ""
    separator: str = "\n\n"
    extra: dict[str, Any] = field(default_factory=dict)  # verbalizers, questions, types, ...
    source: str = ""

    def __post_init__(self) -> None:
        names = [f for _, f, _, _ in string.Formatter().parse(self.example) if f is not None]
        if names.count("answer") != 1 or names[-1] != "answer" or not self.example.rstrip().endswith("{answer}"):
            raise UserError(f"template {self.source}: 'example' must end with exactly one {{answer}}, got {self.example!r}")
        self.fields = [n for n in names if n != "answer"]

    def fill(self, values: dict[str, str], answer: str | None) -> str:
        """The example text; with ``answer=None`` the text up to ``{answer}`` (whitespace before it kept)."""
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise UserError(f"template {self.source}: example has no field(s) {missing} (has {sorted(values)})")
        text = self.example.format_map({**values, "answer": "\x00"})
        head = text[: text.index("\x00")]
        return head if answer is None else head + answer

    def split_query(self, values: dict[str, str]) -> tuple[str, str]:
        """(context up to the answer without trailing spaces, the whitespace that prefixes the answer)."""
        head = self.fill(values, None)
        stripped = head.rstrip(" ")
        return stripped, head[len(stripped):]


def load_template(name_or_path: str | Path) -> Template:
    """A built-in template name (``fpb``, ``ner``, ...) or a path to a YAML template file."""
    p = Path(name_or_path)
    if not p.suffix:
        p = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise UserError(f"template {name_or_path}: no such file (built-ins: "
                        f"{sorted(q.stem for q in TEMPLATE_DIR.glob('*.yaml'))})")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"template {p}: invalid YAML: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("example"), str):
        raise UserError(f"template {p}: needs a string field 'example'")
    core = {k: d.pop(k) for k in ("example", "instruction", "separator") if k in d}
    return Template(**{k: str(v) for k, v in core.items()}, extra=d, source=str(p))


def select_shots(pool: Sequence[Example], k: int, query: Example, rng: random.Random) -> list[Example]:
    """k distinct pool examples, never the query itself: the query's own record (same file:line) and any
    example with the same text (after whitespace/case normalisation) are excluded, so a test item cannot
    leak into its own prompt even when train and test overlap."""
    if k <= 0:
        return []
    qtext = normalize_span(query.text)
    cand = [e for e in pool if e.where != query.where and normalize_span(e.text) != qtext]
    if len(cand) < k:
        raise UserError(f"{k}-shot prompt for {query.where}: only {len(cand)} usable train examples")
    return rng.sample(cand, k)


def example_rng(seed: int, task: str, index: int) -> random.Random:
    """Independent, reproducible shot draw per (seed, task, test example): batching/order do not matter."""
    return random.Random(f"{seed}/{task}/{index}")


def build_prompt(template: Template, shots: Sequence[tuple[dict[str, str], str]], query: dict[str, str]) -> tuple[str, str]:
    """(context, answer prefix) for a query after ``shots`` = [(fields, answer text), ...]."""
    parts = [template.fill(f, a) for f, a in shots]
    ctx, lead = template.split_query(query)
    return template.instruction + "".join(p + template.separator for p in parts) + ctx, lead
