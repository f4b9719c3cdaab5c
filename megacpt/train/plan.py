"""`megacpt train --dry-run`: the resolved plan of a job, computed without starting one.

Everything is arithmetic on the config (and on the datasets' ``.idx`` files when they exist):

- **layout**: world = dp · pp · tp; micro-batches per step per dp rank = global_batch / (micro_batch · dp).
- **tokens**: one step trains on ``global_batch · seq_length`` tokens (Megatron samples are ``seq_length + 1``
  tokens that overlap by one, so each sample consumes ``seq_length`` tokens of the stream); the run on
  ``steps · global_batch`` samples.
- **blend**: component i gets ``ceil(samples · w_i)`` samples (megatron-core's
  ``_get_size_per_split_per_dataset``; weights normalised, or proportional to size when none are given).
  Its epoch holds ``(T_i - 1) // seq_length`` samples, T_i = tokens of its train split: megatron-core splits by
  document, ``[round(a·n), round(b·n))`` of the n documents, and sums their sequence lengths. ``epochs_i =
  samples_i / samples_per_epoch_i``. T_i is read from the dataset when it exists, else taken from a given
  token count (``--dataset-tokens``, or ``data.planned_tokens`` in the config) times the train fraction.
- **schedule**: ``megacpt.train.optim.LRSchedule`` at the first step, the end of warm-up, 25/50/75% of the decay
  and its end.
- **memory per GPU** (an estimate; not included: CUDA context ~0.5-1 GB, allocator fragmentation,
  communication buffers):
  * parameters P (GPT-NeoX): ``2·V_pad·H`` (untied in/out embeddings) ``+ L·(4H² + 2H·I + 9H + I) + 2H``
    (per layer: QKV 3H²+3H, attention out H²+H, MLP 2H·I+I+H, two LayerNorms 4H; final LayerNorm 2H);
  * model state 16 bytes per parameter held (fp32 weight 4, fp32 gradient 4, AdamW moments 8), for the
    parameters of the largest pipeline stage, divided by tp for the tensor-parallel matrices and by dp
    under FSDP (ZeRO-3 shards weights, gradients and optimizer state; DDP replicates them);
  * FSDP working set: two layers gathered at once (the current one and the prefetched next), in the
    all-gather dtype, plus their unsharded gradients in the reduce dtype;
  * activations per layer and micro-batch, the accounting of Korthikanti et al. 2022 (arXiv 2205.05198)
    applied to megacpt's layer under bf16 autocast (fp32 weights and residual stream, no dropout, an
    attention kernel that stores no s×s scores), in units of s·b·H bytes: the fp32 input both LayerNorms
    share (4; /tp under sequence parallelism) + their bf16 outputs as the first matmuls save them (2 + 2;
    under SP these are the all-gathered tensors, so not /tp) + sharded by tp 8 + 4·I/H = QKV (6),
    attention output (2), MLP input-to-GELU and GELU output (4·I/H);
    without recomputation also q and k after rotary and the attention output in head layout (+6, /tp);
    under full recomputation only the layer's fp32 input (4). Plus autocast's bf16 copies of the layer's
    weight matrices, saved for backward: ``2·(4H² + 2H·I)/tp`` bytes per layer (none under full
    recomputation). tests/train/test_plan.py measures these on the real layer (saved-tensor hooks, tp 1)
    and matches them within 1%; the tp/SP split follows from which tensors DTensor shards (not measured). A stage keeps its layers' activations for ``pp`` micro-batches in flight
    under 1F1B (all ``n_micro`` under GPipe). Under fp32 the bf16 terms double and there are no copies;
  * logits: without the fused loss, ``4·b·s·V_pad/t`` bytes for fp32 logits and as much for their gradient.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megacpt.config import ModelConfig
from megacpt.data.indexed import IndexedDataset, data_paths
from megacpt.errors import UserError
from megacpt.train.job import JobConfig

GIB = 1024 ** 3


@dataclass
class Component:
    prefix: str
    weight: float                   # normalised blend weight
    source: str                     # "dataset" | "given" | "unknown"
    train_tokens: int | None        # tokens of the train split (megatron-core's count)
    samples: int                    # samples the run draws from it
    samples_per_epoch: int | None
    epochs: float | None
    note: str = ""


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int
    dp_type: str
    sequence_parallel: bool
    micro_batch: int
    global_batch: int
    grad_accum: int                 # micro-batches per step per dp rank
    seq_length: int
    steps: int
    tokens_per_step: int
    total_tokens: int
    total_samples: int
    components: list[Component]
    lr: list[tuple[str, int, float]]  # (what, step, lr)
    params: int
    memory: dict[str, float]        # bytes per GPU by part, and "total"
    warnings: list[str] = field(default_factory=list)


def count_parameters(m: ModelConfig) -> int:
    """Exact parameter count of megacpt's GPT-NeoX (= HF ``GPTNeoXForCausalLM``) for ``m``."""
    h, i, n_layers, v = m.hidden_size, m.intermediate_size, m.num_layers, m.padded_vocab()
    per_layer = 4 * h * h + 2 * h * i + 9 * h + i
    embeddings = v * h * (1 if m.tie_word_embeddings else 2)
    return embeddings + n_layers * per_layer + 2 * h


def split_bounds(split: str, n: int) -> tuple[int, int]:
    """megatron-core's train split of n documents: [round(a·n), round(b·n)) of the cumulative fractions."""
    w = [float(x) for x in split.replace("/", ",").split(",")]
    w += [0.0] * (3 - len(w))
    return 0, int(round(w[0] / sum(w) * n))


def train_fraction(split: str) -> float:
    w = [float(x) for x in split.replace("/", ",").split(",")]
    return w[0] / sum(w)


def dataset_train_tokens(prefix: str, split: str) -> int:
    """Tokens of ``prefix``'s train split as megatron-core counts them (``GPTDataset._get_num_tokens_per_epoch``)."""
    ds = IndexedDataset(prefix)
    beg, end = split_bounds(split, ds.num_documents)
    return int(ds.sequence_lengths[beg:end].sum(dtype="int64"))


def _lr_points(job: JobConfig) -> list[tuple[str, int, float]]:
    from megacpt.train.optim import LRSchedule

    s, t = job.scheduler, job.train
    sched = LRSchedule(job.optimizer, s, t.train_iters)
    w, d = s.warmup_iters, sched.decay_iters
    points = [("first step", 1)]
    if w > 0:
        points.append(("end of warm-up", w))
    if s.decay_style != "constant" and d > w:
        points += [(f"{q}% of decay", w + round(q / 100 * (d - w))) for q in (25, 50, 75)] + [("end of decay", d)]
    points.append(("last step", t.train_iters))
    seen, out = set(), []
    for what, step in points:
        if 1 <= step <= max(t.train_iters, 1) and step not in seen:
            seen.add(step)
            out.append((what, step, sched(step)))
    return out


def _bf16(job: JobConfig) -> bool:
    t = job.train
    return t.precision == "bf16" or (t.precision == "auto" and t.device != "cpu")


def activation_bytes_per_layer(job: JobConfig) -> float:
    """Bytes one transformer layer keeps for backward per micro-batch (module docstring; the breakdown is
    measured on megacpt's layer in tests/train/test_plan.py)."""
    m, p, t = job.model, job.parallel, job.train
    tp = p.tensor_model_parallel_size
    sbh = job.data.seq_length * t.micro_batch_size * m.hidden_size
    sp = p.sequence_parallel and tp > 1
    half = 2 if _bf16(job) else 4                       # bytes of a matmul input/output under autocast
    if m.recompute_granularity == "full":
        return 4 * sbh / (tp if sp else 1)              # the layer's fp32 input only
    residual = 4                                        # fp32 input both LayerNorms share (sequence-sharded under SP)
    ln_out = 2 * half                                   # the LayerNorm outputs the first matmuls save: gathered
    sharded = 4 * half + 2 * half * m.intermediate_size / m.hidden_size   # QKV (3), attention out (1), MLP in/GELU
    if m.recompute_granularity not in ("selective",):
        sharded += 3 * half                             # q, k after rotary + attention output (SDPA/flash saves)
    return sbh * (residual / (tp if sp else 1) + ln_out + sharded / tp)


def estimate_memory(job: JobConfig, dp: int) -> dict[str, float]:
    """Bytes per GPU by part (module docstring), for the largest pipeline stage."""
    m, p, t = job.model, job.parallel, job.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    h, i, s, b, v = m.hidden_size, m.intermediate_size, job.data.seq_length, t.micro_batch_size, m.padded_vocab(tp)
    layers_per_stage = m.num_layers // pp
    layer_matrices = 4 * h * h + 2 * h * i + 3 * h + i   # sharded by tp (QKV/MLP-in columns and biases, out rows)
    layer_replicated = 6 * h                             # LayerNorms + the two output biases
    embed = v * h
    # the largest stage: the first holds the input embedding, the last the output layer + final norm
    stage_extra = embed if pp > 1 else embed * (1 if m.tie_word_embeddings else 2)
    stage_params = layers_per_stage * (layer_matrices / tp + layer_replicated) + stage_extra / tp + (2 * h if pp == 1 else 0)
    shard = dp if p.data_parallel_type == "fsdp" else 1
    out = {"model_state": 16 * stage_params / shard}
    if p.data_parallel_type == "fsdp" and dp > 1:
        nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}
        layer = layer_matrices / tp + layer_replicated
        out["fsdp_gathered"] = 2 * layer * (nbytes[p.mixed_precision_param] + nbytes[p.mixed_precision_reduce])
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    in_flight = 1 if pp == 1 else (n_micro if p.pipeline_schedule == "gpipe" else min(pp, n_micro))
    out["activations"] = activation_bytes_per_layer(job) * layers_per_stage * in_flight
    if _bf16(job) and m.recompute_granularity != "full":
        # autocast's bf16 copies of each layer's weight matrices are saved for backward
        out["weight_copies"] = 2 * (4 * h * h + 2 * h * i) / tp * layers_per_stage * in_flight
    if not t.fused_loss:
        out["logits"] = 2 * 4 * b * s * v / tp
    out["total"] = sum(out.values())
    return out


def _given_tokens(job: JobConfig, dataset_tokens: dict[str, int]) -> dict[str, int]:
    given = {str(k): int(v) for k, v in (job.data.planned_tokens or {}).items()}
    given.update(dataset_tokens)
    return given


def build_plan(job: JobConfig, world_size: int, dataset_tokens: dict[str, int] | None = None) -> Plan:
    """The plan of ``job`` on ``world_size`` ranks. ``dataset_tokens``: total tokens of blend prefixes that do
    not exist yet (over ``data.planned_tokens``); an existing dataset's own size always wins."""
    job.validate(world_size)   # layout, batch divisibility, schedule: the same checks a real launch runs
    p, t, d = job.parallel, job.train, job.data
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    weights, prefixes = d.weights_and_prefixes()
    given = _given_tokens(job, dataset_tokens or {})
    unknown_given = sorted(set(dataset_tokens or {}) - set(prefixes))
    if unknown_given:
        raise UserError(f"--dataset-tokens names {unknown_given}, which are not in data.blend {prefixes}")
    total_samples = t.train_iters * t.global_batch_size
    warnings: list[str] = []
    sizes: list[tuple[str, int | None]] = []
    for prefix in prefixes:
        exists = all(x.exists() for x in data_paths(prefix))
        if exists:
            n = dataset_train_tokens(prefix, d.split)
            src = "dataset"
            if prefix in given:
                planned = given[prefix] * train_fraction(d.split)
                if abs(planned - n) > 0.05 * max(n, 1):
                    warnings.append(f"{prefix}: the dataset's train split has {n:,} tokens, the given count "
                                    f"implies {planned:,.0f} ({(planned - n) / max(n, 1):+.0%}); the dataset's is used")
        elif prefix in given:
            n, src = int(given[prefix] * train_fraction(d.split)), "given"
        else:
            n, src = None, "unknown"
        sizes.append((src, n))
    if weights is None:  # Megatron: proportional to size
        if any(n is None for _, n in sizes):
            norm = [None] * len(prefixes)
            warnings.append("data.blend has no weights (proportional to size) and some sizes are unknown: pass "
                            "--dataset-tokens PREFIX=N for each")
        else:
            tot = sum(n for _, n in sizes)
            norm = [n / tot for _, n in sizes]
    else:
        norm = [w / sum(weights) for w in weights]
    comps = []
    for prefix, (src, n), w in zip(prefixes, sizes, norm):
        samples = total_samples if (len(prefixes) == 1) else (math.ceil(total_samples * w) if w is not None else 0)
        per_epoch = (n - 1) // d.seq_length if n else None
        epochs = samples / per_epoch if per_epoch else None
        note = "" if src != "unknown" else "size unknown: pass --dataset-tokens PREFIX=N or set data.planned_tokens"
        if per_epoch == 0:
            note = f"fewer than {d.seq_length + 1} tokens: no sample fits"
        comps.append(Component(prefix, 1.0 if len(prefixes) == 1 else (w if w is not None else float("nan")),
                               src, n, samples, per_epoch, epochs, note))
    if weights is None and len(prefixes) > 1 and all(c.samples_per_epoch for c in comps):
        if total_samples > sum(c.samples_per_epoch for c in comps):
            warnings.append("data.blend without weights builds one epoch of each dataset "
                            f"({sum(c.samples_per_epoch for c in comps):,} samples) but the run needs "
                            f"{total_samples:,}: give weights")
    return Plan(world_size=world_size, tp=tp, pp=pp, dp=dp, vpp=p.virtual_pipeline_model_parallel_size or 1,
                dp_type=p.data_parallel_type, sequence_parallel=p.sequence_parallel,
                micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                grad_accum=t.global_batch_size // (t.micro_batch_size * dp), seq_length=d.seq_length,
                steps=t.train_iters, tokens_per_step=t.global_batch_size * d.seq_length,
                total_tokens=total_samples * d.seq_length, total_samples=total_samples, components=comps,
                lr=_lr_points(job), params=count_parameters(job.model), memory=estimate_memory(job, dp),
                warnings=warnings)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def format_plan(plan: Plan, job: JobConfig, config_path: str | None = None) -> str:
    """The plan as text (what `megacpt train --dry-run` prints)."""
    m = job.model
    lines = [f"plan for {config_path or 'the job'} (dry run: nothing is started)", "",
             "layout",
             f"  world size          {plan.world_size} = dp {plan.dp} x pp {plan.pp} x tp {plan.tp}"
             + (f" (virtual pp {plan.vpp})" if plan.vpp > 1 else ""),
             f"  data parallel       {plan.dp_type}" + (", sequence parallel" if plan.sequence_parallel else ""),
             f"  batch               global {plan.global_batch} = micro {plan.micro_batch} x dp {plan.dp} x "
             f"{plan.grad_accum} micro-batches per step",
             f"  model               {job.model_preset or 'custom'}: {m.num_layers} layers, hidden {m.hidden_size}, "
             f"{m.num_heads} heads, vocab {m.padded_vocab(plan.tp):,} rows, {plan.params:,} parameters",
             "", "tokens",
             f"  tokens per step     {plan.tokens_per_step:,} ({plan.global_batch} x {plan.seq_length})",
             f"  steps               {plan.steps:,}",
             f"  total               {plan.total_tokens:,} tokens ({plan.total_samples:,} samples)",
             "", "blend (train split)"]
    for c in plan.components:
        size = f"{c.train_tokens:,} tokens ({c.source})" if c.train_tokens is not None else "size unknown"
        ep = f"{c.epochs:.5f} epochs" if c.epochs is not None else "epochs unknown"
        per = f", {c.samples_per_epoch:,} samples/epoch" if c.samples_per_epoch else ""
        lines.append(f"  {c.prefix}")
        lines.append(f"      weight {c.weight:.4f}, {size}{per}: draws {c.samples:,} samples = {ep}"
                     + (f"  [{c.note}]" if c.note else ""))
    lines += ["", "learning rate"]
    lines += [f"  step {step:>9,}  {lr:.4g}  ({what})" for what, step, lr in plan.lr]
    lines += ["", "memory per GPU (estimate; formula in megacpt/train/plan.py)"]
    labels = {"model_state": "weights+grads+AdamW (fp32, 16 B/param)", "fsdp_gathered": "FSDP gathered layers",
              "activations": "activations", "weight_copies": "bf16 weight copies (autocast)",
              "logits": "logits + their gradient (fp32)"}
    for k, v in plan.memory.items():
        if k != "total":
            lines.append(f"  {labels[k]:<40}{_gib(v):>10}")
    lines.append(f"  {'total (+ CUDA context, fragmentation)':<40}{_gib(plan.memory['total']):>10}")
    if plan.warnings:
        lines += ["", "warnings"] + [f"  - {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n"


def plan_dict(plan: Plan) -> dict:
    return dataclasses.asdict(plan)


def parse_dataset_tokens(items: list[str]) -> dict[str, int]:
    """``PREFIX=N`` items (N may use ``_`` or scientific notation, e.g. ``24e9``)."""
    out = {}
    for item in items:
        prefix, eq, n = item.rpartition("=")
        try:
            value = int(float(n.replace("_", ""))) if eq else -1
        except ValueError:
            value = -1
        if not prefix or value < 0:
            raise UserError(f"--dataset-tokens {item!r}: expected PREFIX=TOKENS, e.g. /data/fin/full_text_document=24e9")
        out[prefix.strip()] = value
    return out
