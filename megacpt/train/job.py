"""The training job: every section of `megacpt train`'s config, read from YAML + dotted overrides.

``model_preset`` names a preset of ``megacpt.model.presets``; ``model`` overrides its fields. The sections'
dataclasses live in ``megacpt.config`` (the optimizer and scheduler read theirs directly).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from megacpt.config import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                            SchedulerConfig, TrainConfig, check, check_type, fields_from_dict)
from megacpt.errors import UserError
from megacpt.model.presets import PRESETS


@dataclass
class JobConfig:
    """Everything one `megacpt train` run needs. ``model_preset`` names a preset; ``model`` overrides it."""

    model_preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = ("parallel", "data", "optimizer", "scheduler", "checkpoint", "logging", "train")

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        d = dict(d or {})
        known = {"model_preset", "model", *cls.SECTIONS}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"config: unknown section(s) {sorted(unknown)}; known: {sorted(known)}")
        preset = d.get("model_preset")
        model_over = dict(d.get("model") or {})
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"model_preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
            base = dataclasses.asdict(PRESETS[preset])
            bad = set(model_over) - set(base)
            if bad:
                raise UserError(f"model: unknown field(s) {sorted(bad)}; known: {sorted(base)}")
            base.update(model_over)
            model_over = base
        try:
            model = ModelConfig.from_dict(model_over)
        except TypeError as e:
            raise UserError(f"model: {e}") from e
        sections = {name: fields_from_dict(typ, name, d.get(name)) for name, typ in (
            ("parallel", ParallelConfig), ("data", DataConfig), ("optimizer", OptimizerConfig),
            ("scheduler", SchedulerConfig), ("checkpoint", CheckpointConfig), ("logging", LoggingConfig),
            ("train", TrainConfig))}
        job = cls(model_preset=preset, model=model, **sections)
        for name in ("model", *cls.SECTIONS):
            check_type(getattr(job, name), name)
        return job

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("SECTIONS", None)
        return d

    def validate(self, world_size: int) -> "JobConfig":
        """Cheap checks needing no process group or data loading (paths/sidecars: `validate_data`)."""
        m, t, o, s, c, lg = self.model, self.train, self.optimizer, self.scheduler, self.checkpoint, self.logging
        if c.init_from is None:
            m.validate()
        par = self.parallel.resolve(world_size)
        par.validate_model(m)
        dp = par.data_parallel_size
        check(t.train_iters > 0, "train.train_iters", f"must be > 0, got {t.train_iters}")
        check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
        check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
               f"{t.global_batch_size} is not divisible by micro_batch_size*dp = {t.micro_batch_size}*{dp}")
        if par.pipeline_model_parallel_size > 1:
            n_micro = t.global_batch_size // (t.micro_batch_size * dp)
            check(n_micro >= par.pipeline_model_parallel_size, "train.global_batch_size",
                   f"gives {n_micro} micro-batches per pipeline, fewer than pp={par.pipeline_model_parallel_size}")
        check(t.precision in ("auto", "bf16", "fp32"), "train.precision", f"unknown {t.precision!r} (auto, bf16, fp32)")
        check(t.device in ("auto", "cpu", "cuda"), "train.device", f"unknown {t.device!r} (auto, cpu, cuda)")
        check(t.max_consecutive_nan_skips >= 1, "train.max_consecutive_nan_skips", "must be >= 1")
        check(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", "must be > 0")
        check(t.collective_timeout_s > 0, "train.collective_timeout_s", f"must be > 0, got {t.collective_timeout_s}")
        check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
        check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1/beta2", "must be in [0, 1)")
        check(o.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0 disables)")
        check(o.impl in ("auto", "fused", "foreach", "apex"), "optimizer.impl",
               f"unknown {o.impl!r} (auto, fused, foreach, apex)")
        check(s.decay_style in ("cosine", "linear", "constant"), "scheduler.decay_style",
               f"unknown {s.decay_style!r} (cosine, linear, constant)")
        check(s.warmup_iters >= 0, "scheduler.warmup_iters", "must be >= 0")
        check(0 <= s.min_lr <= o.lr, "scheduler.min_lr", f"{s.min_lr} must be in [0, optimizer.lr={o.lr}]")
        check(0 <= s.warmup_init_lr <= o.lr, "scheduler.warmup_init_lr", f"must be in [0, optimizer.lr={o.lr}]")
        decay = s.decay_iters if s.decay_iters is not None else t.train_iters
        check(decay >= s.warmup_iters, "scheduler.decay_iters",
               f"{decay} is smaller than scheduler.warmup_iters={s.warmup_iters}")
        check(c.save_interval >= 0, "checkpoint.save_interval", "must be >= 0")
        check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        check(c.save_interval == 0 or c.save is not None, "checkpoint.save", "save_interval > 0 needs a save dir")
        check(lg.log_interval >= 1, "logging.log_interval", "must be >= 1")
        check(lg.eval_interval >= 0 and lg.eval_iters >= 1, "logging.eval_interval/eval_iters",
               "eval_interval must be >= 0, eval_iters >= 1")
        d = self.data
        check(d.seq_length >= 2, "data.seq_length", "must be >= 2")
        check(len(d.blend) > 0, "data.blend", "no training data: give at least one indexed-dataset prefix")
        d.weights_and_prefixes()
        check(isinstance(d.eval_prefixes, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in d.eval_prefixes.items()),
               "data.eval_prefixes", f"expected {{name: prefix, ...}}, got {d.eval_prefixes!r}")
        check(isinstance(d.planned_tokens, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in d.planned_tokens.items()), "data.planned_tokens",
              f"expected {{prefix: tokens > 0, ...}}, got {d.planned_tokens!r}")
        parts = d.split.replace("/", ",").split(",")
        check(all(p.strip().replace(".", "", 1).isdigit() for p in parts) and 1 <= len(parts) <= 3
               and sum(float(p) for p in parts) > 0, "data.split", f"expected e.g. '969,30,1', got {d.split!r}")
        if c.init_from is None:
            check(d.seq_length <= m.max_position_embeddings, "data.seq_length",
                   f"{d.seq_length} > model.max_position_embeddings={m.max_position_embeddings}")
        self.parallel = par
        return self


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply dotted ``a.b=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override {ov!r}: expected key=value, e.g. train.train_iters=100")
        key, _, text = ov.partition("=")
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return d


def load_job_config(path: str | None, overrides: list[str] = ()) -> JobConfig:
    """YAML file (optional) + dotted overrides -> JobConfig (not yet validated against a world size)."""
    d: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
    apply_overrides(d, list(overrides))
    return JobConfig.from_dict(d)
