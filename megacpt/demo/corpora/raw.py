"""The raw records every corpus source is reduced to (fetched real text or the synthetic generator)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RawCorpora:
    """What the sources give, in a source-independent form (the synthetic generator fills the same)."""

    reuters_train: list[tuple[str, int]]   # (article, grain label 0/1)
    reuters_test: list[tuple[str, int]]
    headlines: list[tuple[str, str]]       # (headline, date)
    news: list[tuple[str, str]]            # (title, body)
    lexicon_pos: frozenset[str]
    lexicon_neg: frozenset[str]
    origin: str                            # "real" | "synthetic"
    provenance: list[str] = field(default_factory=list)
