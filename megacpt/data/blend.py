"""Dataset blends: which indexed datasets, with which weights.

Accepted forms (all normalised to ``Blend(prefixes, weights)``):
- ``"PREFIX"`` or ``["PREFIX", ...]`` (equal weights = Megatron's "by size" only when weights are None),
- ``[(weight, "PREFIX"), ...]`` or ``{"PREFIX": weight}``,
- Megatron's flat ``--data-path`` list ``["0.7", "A", "0.3", "B"]``.
Every dataset must exist and, where sidecars record it, share one tokenizer (mixing token spaces is
silent corruption otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from megacpt.data.indexed import data_paths, read_sidecar
from megacpt.errors import UserError


@dataclass(frozen=True)
class Blend:
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: every dataset contributes by its size (Megatron)

    def to_megatron(self) -> tuple[list[str], list[float] | None]:
        return list(self.prefixes), None if self.weights is None else list(self.weights)


def _is_number(x: Any) -> bool:
    try:
        float(x)
        return not isinstance(x, bool)
    except (TypeError, ValueError):
        return False


def parse_blend(spec: Any) -> Blend:
    if isinstance(spec, Blend):
        blend = spec
    elif isinstance(spec, str):
        blend = Blend((spec,), None)
    elif isinstance(spec, dict):
        blend = Blend(tuple(map(str, spec)), tuple(float(w) for w in spec.values()))
    elif isinstance(spec, Sequence) and spec and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in spec):
        blend = Blend(tuple(str(p) for _, p in spec), tuple(float(w) for w, _ in spec))
    elif isinstance(spec, Sequence) and spec and len(spec) % 2 == 0 and _is_number(spec[0]) \
            and all(_is_number(w) for w in spec[0::2]):
        blend = Blend(tuple(str(p) for p in spec[1::2]), tuple(float(w) for w in spec[0::2]))
    elif isinstance(spec, Sequence) and spec and all(isinstance(x, str) for x in spec):
        blend = Blend(tuple(spec), None)
    else:
        raise UserError(f"cannot read data blend {spec!r}: expected PREFIX, [PREFIX, ...], "
                        "[(weight, PREFIX), ...], {PREFIX: weight} or ['w1', 'P1', 'w2', 'P2', ...]")
    validate_blend(blend)
    return blend


def validate_blend(blend: Blend) -> None:
    if blend.weights is not None and any(not w > 0 for w in blend.weights):
        raise UserError(f"data blend weights must be > 0, got {list(blend.weights)}")
    identities = {}
    for p in blend.prefixes:
        for path in data_paths(p):
            if not path.exists():
                raise UserError(f"data blend: dataset {p} has no {path.name} ({path})")
        meta = read_sidecar(p) or {}
        if "tokenizer" in meta:
            identities[p] = meta["tokenizer"].get("sha256")
    if len(set(identities.values())) > 1:
        detail = ", ".join(f"{p}: {h[:12]}" for p, h in identities.items())
        raise UserError(f"data blend mixes datasets made with different tokenizers ({detail})")


def blend_tokenizer_identity(blend: Blend) -> dict[str, Any] | None:
    for p in blend.prefixes:
        meta = read_sidecar(p) or {}
        if "tokenizer" in meta:
            return meta["tokenizer"]
    return None
