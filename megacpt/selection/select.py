"""`megacpt select`: choose documents to a budget and write them as a new indexed dataset + manifest.

Library entry points: ``compute_selection`` (ids only, no I/O beyond reading), ``select`` (also
writes ``OUT.bin/.idx``, ``OUT.meta.json`` with the source tokenizer identity, ``OUT.manifest.json``)
and ``replay`` (re-run a manifest, checking every input hash, and verify the same ids come out).
Documents with no tokens are never selected (they cost nothing and teach nothing); the manifest
counts them. Selected documents are written in ascending doc_id order.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megacpt import __version__
from megacpt.data.identity import dataset_identity, same_dataset
from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, data_paths, sidecar_path, write_sidecar
from megacpt.errors import UserError
from megacpt.io import check_writable_dir, claim_output, describe_interrupt, pause_for_test, sha256_file, write_json_atomic
from megacpt.selection.combine import STRATEGIES, combined_score, load_metrics, metric_of, strategy_weights
from megacpt.selection.sample import (DEFAULT_SOFT_WEIGHTING, SOFT_WEIGHTINGS, Budget, hard_order, random_order,
                                      soft_order, take_budget)
from megacpt.score.files import read_scores

MANIFEST_FORMAT = 1


@dataclass
class SelectConfig:
    data: str
    output_prefix: str
    strategy: str
    scores: list[str] = field(default_factory=list)
    weights: dict[str, float] | None = None
    sampling: str = "hard"          # hard | soft (random/full ignore it)
    temperature: float | None = None  # soft sampling; None: the weighting's default (docs/method.md §2.6)
    soft_weighting: str = DEFAULT_SOFT_WEIGHTING
    budget: Budget | None = None
    seed: int = 1234
    overwrite: bool = False

    def validate(self) -> "SelectConfig":
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.sampling not in ("hard", "soft"):
            raise UserError(f"--sampling must be hard or soft, got {self.sampling!r}")
        if self.strategy == "full":
            if self.budget is not None and not (self.budget.kind == "fraction" and self.budget.value == 1):
                raise UserError("--strategy full takes the whole corpus; drop the budget option")
        elif self.budget is None:
            raise UserError("a budget is needed: --budget-fraction, --budget-tokens or --budget-docs")
        if self.budget is not None:
            self.budget.validate()
        if self.soft_weighting not in SOFT_WEIGHTINGS:
            raise UserError(f"--soft-weighting {self.soft_weighting!r}: expected one of {', '.join(SOFT_WEIGHTINGS)}")
        if self.temperature is None:
            self.temperature = SOFT_WEIGHTINGS[self.soft_weighting][1]
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        return self


def output_paths(prefix: str) -> list[Path]:
    return [*data_paths(prefix), sidecar_path(prefix), manifest_path(prefix)]


def manifest_path(prefix: str) -> Path:
    return Path(str(prefix) + ".manifest.json")


def compute_selection(cfg: SelectConfig, ds: IndexedDataset | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Selected doc ids (ascending) and the manifest fields describing how they were chosen."""
    cfg.validate()
    ds = (ds or IndexedDataset(cfg.data)).require_documents()
    ident = dataset_identity(cfg.data, ds)
    files = [read_scores(p) for p in cfg.scores]
    metrics = load_metrics(files, ident)
    lengths = ds.document_lengths()
    eligible = np.flatnonzero(lengths > 0)
    total_tokens = int(lengths.sum())

    weights: dict[str, float] = {}
    if cfg.strategy in ("random", "full"):
        if cfg.weights is not None:
            raise UserError(f"--weights applies to --strategy combined only, not {cfg.strategy}")
        order = eligible if cfg.strategy == "full" else eligible[random_order(eligible.size, cfg.seed)]
        sampling = "all" if cfg.strategy == "full" else "uniform"
    else:
        weights = strategy_weights(cfg.strategy, metrics, cfg.weights)
        score = combined_score(metrics, weights)[eligible]
        local = hard_order(score) if cfg.sampling == "hard" else soft_order(score, cfg.temperature, cfg.seed,
                                                                                  weighting=cfg.soft_weighting)
        order, sampling = eligible[local], cfg.sampling

    if cfg.strategy == "full":
        chosen, resolved = order, {"kind": "tokens", "n": total_tokens}
    else:
        kind, n = cfg.budget.resolve(total_tokens, ds.num_documents)
        chosen, resolved = take_budget(order, lengths, kind, n), {"kind": kind, "n": n}
    ids = np.sort(chosen)
    achieved = int(lengths[ids].sum())
    info = {
        "data": ident,
        "scores": [{"path": str(Path(sf.path).resolve()), "sha256": sha256_file(sf.path), "metric": metric_of(sf),
                    "scorer": sf.meta.get("scorer"), "config": sf.meta.get("config")} for sf in files],
        "strategy": cfg.strategy, "weights": weights, "sampling": sampling,
        "temperature": cfg.temperature if sampling == "soft" else None,
        "soft_weighting": cfg.soft_weighting if sampling == "soft" else None, "seed": cfg.seed,
        "budget": {
            "asked": asdict(cfg.budget) if cfg.budget else None, "resolved": resolved,
            "achieved_tokens": achieved, "achieved_documents": int(ids.size),
            "fraction_of_tokens": achieved / total_tokens if total_tokens else 0.0,
            "fraction_of_documents": ids.size / ds.num_documents if ds.num_documents else 0.0,
            "corpus_tokens": total_tokens, "corpus_documents": ds.num_documents,
            "overshoot_tokens": max(0, achieved - resolved["n"]) if resolved["kind"] == "tokens" else 0,
        },
        "excluded_empty_documents": int(ds.num_documents - eligible.size),
    }
    return ids, info


def write_subset(ds: IndexedDataset, ids: np.ndarray, prefix: str, batch_tokens: int = 1 << 24) -> IndexedDatasetWriter:
    """Copy documents ``ids`` (ascending) of ``ds``, sequence structure kept, in bulk batches."""
    w = IndexedDatasetWriter(prefix, ds.dtype)
    try:
        bufs, lens, ends, n_tok = [], [], [], 0

        def flush():
            nonlocal bufs, lens, ends, n_tok
            if lens:
                w.add_raw(b"".join(bufs), np.concatenate(lens), np.asarray(ends))
            bufs, lens, ends, n_tok = [], [], [], 0

        for d in ids.tolist():
            a, b = ds.document_span(d)
            toks = ds.document(d)
            bufs.append(np.ascontiguousarray(toks).tobytes())
            lens.append(np.asarray(ds.sequence_lengths[a:b], dtype=np.int32))
            ends.append((ends[-1] if ends else 0) + (b - a))
            n_tok += toks.size
            if n_tok >= batch_tokens:
                flush()
        flush()
        pause_for_test("select-write")
        w.finalize()
    except BaseException:
        w.abort()
        raise
    return w


def select(cfg: SelectConfig, command: list[str] | None = None) -> dict[str, Any]:
    """Compute the selection and write OUT.{bin,idx,meta.json,manifest.json}; returns the manifest."""
    cfg.validate()
    out = str(cfg.output_prefix)
    if Path(out).resolve() == Path(cfg.data).resolve():
        raise UserError("--output-prefix must differ from --data")
    existing = [str(p) for p in output_paths(out) if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace the selection")
    check_writable_dir(out)
    with claim_output(out, output_paths(out)), describe_interrupt(
            lambda: f"; nothing was written to {out}: re-run the same command"):
        return _select(cfg, out, command)


def _select(cfg: SelectConfig, out: str, command: list[str] | None) -> dict[str, Any]:
    ds = IndexedDataset(cfg.data)
    ids, info = compute_selection(cfg, ds)   # every input check happens before anything is written
    src_meta = ds.meta or {}
    try:
        w = write_subset(ds, ids, out)
        meta = {**src_meta, "num_documents": w.n_documents, "num_sequences": len(IndexedDataset(out)),
                "num_tokens": w.n_tokens, "dtype": np.dtype(ds.dtype).name,
                "selection": {"source": info["data"]["prefix"], "manifest": str(manifest_path(out).resolve()),
                              "strategy": cfg.strategy}}
        write_sidecar(out, meta)
        manifest = {
            "format": MANIFEST_FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "megacpt_version": __version__, "numpy_version": np.__version__, "command": command,
            **info,
            "output": {"prefix": str(Path(out).resolve()), "idx_sha256": sha256_file(out + ".idx"),
                       "num_tokens": w.n_tokens},
            "selected_doc_ids": ids.tolist(),
        }
        write_json_atomic(manifest_path(out), manifest)
    except BaseException:
        for p in output_paths(out):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    try:
        m = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"manifest {path} does not exist") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or "selected_doc_ids" not in m:
        raise UserError(f"{path}: not a megacpt selection manifest (format {MANIFEST_FORMAT})")
    return m


def config_from_manifest(m: dict[str, Any], output_prefix: str, data: str | None = None,
                         overwrite: bool = False) -> SelectConfig:
    """The SelectConfig that produced manifest ``m``; inputs are checked against the recorded hashes."""
    data = data or m["data"]["prefix"]
    if not same_dataset(dataset_identity(data), m["data"]):
        raise UserError(f"{data}: not the dataset the manifest was made from (index hash differs)")
    for s in m["scores"]:
        if not Path(s["path"]).exists() or sha256_file(s["path"]) != s["sha256"]:
            raise UserError(f"score file {s['path']} is missing or changed since the selection was made")
    asked = m["budget"]["asked"]
    return SelectConfig(
        data=data, output_prefix=output_prefix, strategy=m["strategy"], scores=[s["path"] for s in m["scores"]],
        weights=m["weights"] if m["strategy"] == "combined" else None,
        sampling=m["sampling"] if m["sampling"] in ("hard", "soft") else "hard",
        # manifests written before the soft-weighting choice existed used w = score^(1/T)
        temperature=m["temperature"], soft_weighting=m.get("soft_weighting") or "power", budget=Budget(**asked) if asked else None, seed=m["seed"],
        overwrite=overwrite)


def replay(manifest: str, output_prefix: str, data: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    m = read_manifest(manifest)
    cfg = config_from_manifest(m, output_prefix, data, overwrite)
    new = select(cfg, command=["--from-manifest", str(manifest)])
    if new["selected_doc_ids"] != m["selected_doc_ids"]:
        for p in output_paths(output_prefix):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise UserError(f"{manifest}: replay selected different documents (numpy {np.__version__} vs "
                        f"{m.get('numpy_version')}?)")
    return new
