"""Configuration dataclasses. Each is passed to the thing that needs it; validation names the field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megacpt.errors import UserError


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{field_name}: {msg}")


@dataclass
class ModelConfig:
    """A GPT-NeoX model (HF ``GPTNeoXConfig`` semantics, Megatron vocab padding)."""

    vocab_size: int = 50277            # real tokenizer vocab (HF config's vocab_size may already be padded)
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int | None = None  # default 4 * hidden_size
    rotary_pct: float = 0.25           # fraction of each head's dims that get rotary (Pythia: 0.25)
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    layernorm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: sequential residual
    attention_bias: bool = True
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None  # None: vocab_size rounded up to a multiple of divisible_by * tp

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def padded_vocab(self, tp: int = 1) -> int:
        """Megatron convention: pad to a multiple of make_vocab_size_divisible_by * tp."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        m = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // m) * m

    def validate(self) -> "ModelConfig":
        _check(self.hidden_size > 0 and self.num_layers > 0 and self.num_heads > 0, "model",
               "hidden_size, num_layers, num_heads must be positive")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
               f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        _check(0.0 <= self.rotary_pct <= 1.0, "model.rotary_pct", f"{self.rotary_pct} not in [0, 1]")
        _check(self.rotary_dim % 2 == 0, "model.rotary_pct",
               f"rotary dims per head = {self.rotary_dim} must be even")
        _check(self.padded_vocab() >= self.vocab_size, "model.padded_vocab_size",
               f"{self.padded_vocab_size} < vocab_size {self.vocab_size}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"model: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class ParallelConfig:
    """Sizes of the (dp, pp, tp) device mesh. dp = world_size / (pp * tp) when left as -1."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = -1
    virtual_pipeline_model_parallel_size: int | None = None
    pipeline_schedule: str = "1f1b"    # gpipe | 1f1b | interleaved_1f1b
    data_parallel_type: str = "fsdp"   # fsdp | ddp
    sequence_parallel: bool = False

    def resolve(self, world_size: int) -> "ParallelConfig":
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _check(tp >= 1, "parallel.tensor_model_parallel_size", "must be >= 1")
        _check(pp >= 1, "parallel.pipeline_model_parallel_size", "must be >= 1")
        _check(world_size % (tp * pp) == 0, "parallel",
               f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        dp = world_size // (tp * pp) if self.data_parallel_size == -1 else self.data_parallel_size
        _check(dp * tp * pp == world_size, "parallel.data_parallel_size",
               f"dp*pp*tp = {dp}*{pp}*{tp} != world size {world_size}")
        _check(self.pipeline_schedule in ("gpipe", "1f1b", "interleaved_1f1b"), "parallel.pipeline_schedule",
               f"unknown schedule {self.pipeline_schedule!r} (gpipe, 1f1b, interleaved_1f1b)")
        _check(self.data_parallel_type in ("fsdp", "ddp"), "parallel.data_parallel_type",
               f"unknown {self.data_parallel_type!r} (fsdp, ddp)")
        return dataclasses.replace(self, data_parallel_size=dp)

    def validate_model(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _check(model.num_heads % tp == 0, "parallel.tensor_model_parallel_size",
               f"model.num_heads={model.num_heads} is not divisible by tp={tp}")
        _check(model.intermediate_size % tp == 0, "parallel.tensor_model_parallel_size",
               f"model.intermediate_size={model.intermediate_size} is not divisible by tp={tp}")
        stages = pp * (self.virtual_pipeline_model_parallel_size or 1)
        _check(model.num_layers % stages == 0, "parallel.pipeline_model_parallel_size",
               f"model.num_layers={model.num_layers} is not divisible by {stages} pipeline stages")
