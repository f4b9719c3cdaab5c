"""Configuration dataclasses. Each is passed to the thing that needs it; validation names the field.

The sections of a training job are here; ``megacpt.train.job.JobConfig`` assembles them (with a named
model preset from ``megacpt.model.presets``) from YAML and dotted overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megacpt.errors import UserError


# -- dtype names: one vocabulary for every command's --dtype -------------------------------------------------
# canonical name -> torch attribute; "auto" (where a command allows it) picks per device
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# the older spellings (torch's names, and what `eval`/`convert` took before) keep working
DTYPE_ALIASES: dict[str, str] = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                                 "half": "fp16"}


def dtype_name(name: str) -> str:
    """Any accepted spelling -> its canonical name (``fp32|bf16|fp16|auto``); unknown names are returned as
    they are, for the caller's choices check to refuse with the list of canonical names."""
    key = str(name).strip().lower()
    return DTYPE_ALIASES.get(key, key)


def torch_dtype_name(name: str) -> str:
    """``fp32``/``float32``/... -> the torch attribute (``float32``); UserError for anything else."""
    canonical = dtype_name(name)
    if canonical not in DTYPES:
        raise UserError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[canonical]


def add_dtype_argument(parser, default: str = "auto", choices: tuple[str, ...] = (*DTYPES, "auto"),
                       help: str = "") -> None:
    """``--dtype`` with the canonical choices shown and the aliases accepted (argparse stores the canonical
    name)."""
    aliases = [a for a, c in DTYPE_ALIASES.items() if c in choices]
    parser.add_argument("--dtype", type=dtype_name, choices=choices, default=default,
                        help=f"{help + '; ' if help else ''}default {default} (also accepted: {', '.join(aliases)})")


def check(cond: bool, field_name: str, msg: str) -> None:
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
    # runtime choices (not architecture; never exported to HF configs)
    recompute_granularity: str | None = None  # activation checkpointing: None | "full" | "selective"
    attention_backend: str = "auto"    # auto (flash-attn if installed, else SDPA) | sdpa | sdpa_flash | cudnn | flash
    layernorm_backend: str = "torch"   # torch | apex | te
    # which implementation runs the layers (same parameters, same checkpoints; see megacpt/model/fast_paths.py):
    impl: str = "torch"                # torch | te (transformer-engine fused layers, CUDA only)
    fp8: bool = False                  # impl=te: fp8 GEMMs under TE's delayed scaling (E4M3 fwd / E5M2 bwd)

    # How the model is run, not what it is: never written with the config (to_dict), so a checkpoint
    # saved from either implementation loads into both
    IMPL_FIELDS = ("impl", "fp8")

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
        check(self.hidden_size > 0 and self.num_layers > 0 and self.num_heads > 0, "model",
               "hidden_size, num_layers, num_heads must be positive")
        check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
               f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        check(0.0 <= self.rotary_pct <= 1.0, "model.rotary_pct", f"{self.rotary_pct} not in [0, 1]")
        check(self.rotary_dim % 2 == 0, "model.rotary_pct",
               f"rotary dims per head = {self.rotary_dim} must be even")
        check(self.padded_vocab() >= self.vocab_size, "model.padded_vocab_size",
               f"{self.padded_vocab_size} < vocab_size {self.vocab_size}")
        check(self.recompute_granularity in (None, "none", "full", "selective"), "model.recompute_granularity",
               f"{self.recompute_granularity!r} is not one of none, full, selective")
        check(self.attention_backend in ("auto", "sdpa", "sdpa_flash", "cudnn", "flash"), "model.attention_backend",
               f"{self.attention_backend!r} is not one of auto, sdpa, sdpa_flash, cudnn, flash")
        check(self.impl in ("torch", "te"), "model.impl", f"{self.impl!r} is not one of torch, te")
        check(not self.fp8 or self.impl == "te", "model.fp8", "fp8 needs model.impl=te (transformer-engine)")
        check(not (self.fp8 and self.recompute_granularity == "full"), "model.fp8",
               "fp8 with full recompute is not supported (the recomputed forward would run outside TE's fp8 "
               "scaling context); use recompute_granularity=selective or none")
        check(self.layernorm_backend in ("torch", "auto", "apex", "te"), "model.layernorm_backend",
               f"{self.layernorm_backend!r} is not one of torch, auto, apex, te")
        return self

    def to_dict(self) -> dict:
        """The config without ``IMPL_FIELDS`` (what is stored with checkpoints and score files)."""
        d = dataclasses.asdict(self)
        for k in self.IMPL_FIELDS:
            d.pop(k, None)
        return d

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
    # FSDP2 MixedPrecisionPolicy: compute/all-gather dtype of params, dtype of the gradient reduce-scatter
    mixed_precision_param: str = "float32"   # float32 | bfloat16 | float16 (fp32 | bf16 | fp16 accepted)
    mixed_precision_reduce: str = "float32"  # float32 | bfloat16
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) vs ZeRO-2-like (False); always False under PP

    def __post_init__(self) -> None:
        # FSDP's policy is given torch's names; the one dtype vocabulary (bf16, ...) is accepted as well
        for name in ("mixed_precision_param", "mixed_precision_reduce"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, DTYPES.get(dtype_name(value), value))

    def resolve(self, world_size: int) -> "ParallelConfig":
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        check(tp >= 1, "parallel.tensor_model_parallel_size", "must be >= 1")
        check(pp >= 1, "parallel.pipeline_model_parallel_size", "must be >= 1")
        check(world_size % (tp * pp) == 0, "parallel",
               f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        dp = world_size // (tp * pp) if self.data_parallel_size == -1 else self.data_parallel_size
        check(dp * tp * pp == world_size, "parallel.data_parallel_size",
               f"dp*pp*tp = {dp}*{pp}*{tp} != world size {world_size}")
        check(self.pipeline_schedule in ("gpipe", "1f1b", "interleaved_1f1b"), "parallel.pipeline_schedule",
               f"unknown schedule {self.pipeline_schedule!r} (gpipe, 1f1b, interleaved_1f1b)")
        check(self.data_parallel_type in ("fsdp", "ddp"), "parallel.data_parallel_type",
               f"unknown {self.data_parallel_type!r} (fsdp, ddp)")
        check(not (self.data_parallel_type == "ddp" and tp > 1 and dp > 1), "parallel.data_parallel_type",
               "ddp does not compose with tensor parallelism (DTensor params); use fsdp")
        vpp = self.virtual_pipeline_model_parallel_size or 1
        check(vpp >= 1, "parallel.virtual_pipeline_model_parallel_size", "must be >= 1")
        check((vpp > 1) == (self.pipeline_schedule == "interleaved_1f1b") or pp == 1,
               "parallel.virtual_pipeline_model_parallel_size",
               f"{vpp} virtual stages with pipeline_schedule={self.pipeline_schedule!r}: interleaved_1f1b "
               "needs virtual_pipeline_model_parallel_size >= 2, gpipe/1f1b need 1")
        for name in ("mixed_precision_param", "mixed_precision_reduce"):
            check(getattr(self, name) in ("float32", "bfloat16", "float16"), f"parallel.{name}",
                   f"unknown dtype {getattr(self, name)!r} (float32, bfloat16, float16)")
        return dataclasses.replace(self, data_parallel_size=dp)

    def validate_model(self, model: ModelConfig) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        check(model.num_heads % tp == 0, "parallel.tensor_model_parallel_size",
               f"model.num_heads={model.num_heads} is not divisible by tp={tp}")
        check(model.intermediate_size % tp == 0, "parallel.tensor_model_parallel_size",
               f"model.intermediate_size={model.intermediate_size} is not divisible by tp={tp}")
        stages = pp * (self.virtual_pipeline_model_parallel_size or 1)
        check(model.num_layers % stages == 0, "parallel.pipeline_model_parallel_size",
               f"model.num_layers={model.num_layers} is not divisible by {stages} pipeline stages")
        check(model.padded_vocab() % tp == 0, "parallel.tensor_model_parallel_size",
               f"padded vocab {model.padded_vocab()} is not divisible by tp={tp} "
               "(set model.make_vocab_size_divisible_by or model.padded_vocab_size)")
        check(not (model.tie_word_embeddings and (tp > 1 or pp > 1)), "model.tie_word_embeddings",
               "tied input/output embeddings are not supported with tensor or pipeline parallelism")
        check(not (model.impl == "te" and tp > 1), "model.impl",
               "impl=te runs tp=1 only (the DTensor tensor-parallel plan shards nn.Linear modules, not TE's "
               "fused ones); use FSDP for data parallelism, or impl=torch with TP")


# --------------------------------------------------------------------------------------------
# Training job configuration (owner: trainer). YAML -> these dataclasses; dotted `key=value`
# overrides; `JobConfig.validate(world_size)` runs before any process-group work.
# --------------------------------------------------------------------------------------------

def fields_from_dict(cls, section: str, d: dict | None):
    """Build dataclass ``cls`` from a dict, naming the section and the unknown keys on error."""
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"{section}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise UserError(f"{section}: {e}") from e


def check_type(obj, section: str) -> None:
    """YAML gives untyped scalars: check each field against its annotation (int/float/bool/str)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        ann = str(f.type)
        name = f"{section}.{f.name}"
        if v is None:
            check("None" in ann, name, "must be set (got null)")
            continue
        base = ann.split("|")[0].strip()
        if base == "bool":
            check(isinstance(v, bool), name, f"expected true/false, got {v!r}")
        elif base == "int":
            check(isinstance(v, int) and not isinstance(v, bool), name, f"expected an integer, got {v!r}")
        elif base == "float":
            if isinstance(v, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            check(isinstance(v, (int, float)) and not isinstance(v, bool), name, f"expected a number, got {v!r}")
            setattr(obj, f.name, float(v))
        elif base == "str":
            check(isinstance(v, str), name, f"expected a string, got {v!r}")


@dataclass
class DataConfig:
    """Training data: a Megatron-style weighted blend of indexed-dataset prefixes + held-out sets.

    ``blend`` is either ``[prefix, ...]`` (weights proportional to size) or ``[w1, prefix1, w2, prefix2, ...]``
    (Megatron's ``--data-path`` form), e.g. selected domain data with a small general replay set.
    """

    blend: list = field(default_factory=list)
    # train/valid/test split of each prefix by documents (Megatron --split). Default: all for training, as
    # held-out sets are separate prefixes (eval_prefixes); "969,30,1" reproduces Megatron's default.
    split: str = "1,0,0"
    eval_prefixes: dict = field(default_factory=dict)  # name -> prefix of a held-out set (domain, general)
    seq_length: int = 2048
    tokenizer: str | None = None      # optional: checked against the datasets' sidecars
    cache_dir: str | None = None      # where the dataset's shuffled index caches go (default: beside data)
    reset_attention_mask: bool = False  # document-aware attention inside packed sequences
    num_workers: int = 0
    # {prefix: total tokens} of blend datasets that may not exist yet: used only by `train --dry-run` to
    # plan epochs (an existing dataset's real size always wins); the trainer ignores it
    planned_tokens: dict = field(default_factory=dict)

    def weights_and_prefixes(self) -> tuple[list[float] | None, list[str]]:
        b = list(self.blend)
        if all(isinstance(x, str) for x in b):
            return None, b
        check(len(b) % 2 == 0 and all(isinstance(w, (int, float)) and isinstance(p, str)
                                       for w, p in zip(b[::2], b[1::2])), "data.blend",
               "expected [prefix, ...] or [weight, prefix, weight, prefix, ...]")
        weights = [float(w) for w in b[::2]]
        check(all(w > 0 for w in weights), "data.blend", f"weights must be > 0, got {weights}")
        return weights, list(b[1::2])


@dataclass
class OptimizerConfig:
    """AdamW (Megatron/Pythia defaults). Norm weights and biases are excluded from weight decay."""

    lr: float = 1.0e-4                # peak LR after warm-up
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    clip_grad: float = 1.0            # global grad-norm clip; 0 disables
    impl: str = "auto"                # auto | fused | foreach | apex (apex.optimizers.FusedAdam)


@dataclass
class SchedulerConfig:
    """Linear warm-up from ``warmup_init_lr`` to optimizer.lr, then decay to ``min_lr``."""

    warmup_iters: int = 0
    warmup_init_lr: float = 0.0       # CPT re-warm-up starts from a small LR
    decay_style: str = "cosine"       # cosine | linear | constant
    decay_iters: int | None = None    # default: train.train_iters
    min_lr: float = 0.0


@dataclass
class CheckpointConfig:
    save: str | None = None           # checkpoint root (iter_XXXXXXX dirs + `latest`)
    save_interval: int = 0            # 0: only at the end (and on SIGTERM)
    load: str | None = None           # resume from here; default: `save` when it has a checkpoint
    init_from: str | None = None      # HF GPT-NeoX dir or megacpt checkpoint: weights only, fresh optimizer
    keep_last: int = 2                # keep-last-k (0 keeps all)
    async_save: bool = False
    export_hf: str | None = None      # write the final model as an HF GPT-NeoX dir here


@dataclass
class LoggingConfig:
    log_interval: int = 10
    jsonl: str | None = None          # default: <checkpoint.save>/metrics.jsonl
    tensorboard_dir: str | None = None  # written only if tensorboard is installed
    eval_interval: int = 0            # 0: eval only at the end (if eval_prefixes)
    eval_iters: int = 10              # micro-batches per held-out set per eval


@dataclass
class TrainConfig:
    train_iters: int = 100
    micro_batch_size: int = 1         # per data-parallel rank, per micro-step
    global_batch_size: int = 8        # = micro_batch_size * dp * grad-accumulation steps
    seed: int = 1234
    precision: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 (or an alias: bfloat16, ...)
    device: str = "auto"              # auto | cpu | cuda
    fused_loss: bool = True           # fused linear + cross-entropy (never materialises [tokens, vocab])
    compile: bool = False             # torch.compile each transformer layer (torchtitan-style, per block)
    # activation checkpointing is model.recompute_granularity (none | full | selective)
    max_consecutive_nan_skips: int = 5  # stop after K non-finite steps in a row
    peak_flops: float | None = None   # per-device peak FLOP/s for MFU; default: table by device name
    exit_signal_save: bool = True     # SIGTERM/SIGUSR1 -> checkpoint + clean exit
    # a collective that waits longer for a peer fails: a dead or hung node ends the job with a clear error
    # instead of a hang. Generous, because some ranks legitimately wait on others (rank 0 building the
    # dataset's index caches or exporting the model); gloo's own default is 30 min, NCCL's 10 min
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if isinstance(self.precision, str):
            self.precision = dtype_name(self.precision)   # the one dtype vocabulary: float32 -> fp32
