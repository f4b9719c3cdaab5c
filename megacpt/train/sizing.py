"""Sizing a training run before it starts: per-GPU memory, communication time, days per token budget.

Three models, each stated here with its assumptions so a reader can check them against a measurement:

1. **Memory per GPU** (``memory_per_gpu``): the dry-run estimate of ``megacpt.train.plan.estimate_memory``
   (model states, FSDP working set, activations per layer as autograd saves them, autocast's bf16 weight
   copies, unfused logits; derivation and the test against the real layer's saved tensors there), plus the
   terms a *peak* adds on top of what is held for backward:
   - the output layer's bf16 copy (the fused loss casts ``embed_out`` under autocast and saves it);
   - under FSDP, the root (embeddings, final norm, output layer) gathered from forward to backward with its
     unsharded gradient, and every layer gathered when ``fsdp_reshard_after_forward`` is false;
   - the final LayerNorm's fp32 input and the loss's bf16 input (6 sbh bytes);
   - the loss's backward working set: fused, a [chunk, V] fp32 tile + its bf16 copy, the fp32 dW and dh
     accumulators; unfused, the bf16 logits and the fp32 incoming gradient beside plan's fp32 logits and
     logit gradient;
   - 1 GiB of cuBLAS/NCCL workspaces and allocator slack.
   Checked against measured peaks: Pythia-1B, micro 8 x 2048, bf16, one H100 (docs/benchmarks.md,
   2026-11-26): 38.5 GiB measured with the fused loss, 46.8 GiB with logits + cross-entropy
   (tests/train/test_sizing.py); ``benchmarks/train_throughput.py`` prints the prediction beside every GPU run.

2. **Communication** (``comm_seconds``): ring collectives, time = bytes x (factor) / bus bandwidth, with
   factor 2(n-1)/n for all-reduce and (n-1)/n for all-gather / reduce-scatter (NCCL's "bus bandwidth"
   definition, so nccl-tests' busbw numbers can be used directly).
   - TP over t ranks: per layer per micro-batch 2 all-reduces forward (attention dense, MLP fc2) and 2
     backward (inputs of QKV and fc1) of a [b, s, h] bf16 activation; sequence parallelism replaces each
     by a reduce-scatter + all-gather pair of the same total volume. Not overlapped with compute (DTensor
     TP issues them on the critical path).
   - FSDP over d ranks: per micro-batch an all-gather of the parameters (``parallel.mixed_precision_param``
     dtype) in the forward and again in the backward (unless ``parallel.fsdp_reshard_after_forward`` is
     false, which holds every gathered layer instead), and a reduce-scatter of the gradients (the trainer reduces every
     micro-batch; ``reduce_every_micro=False`` models gradient-sync skipping until the last one).
     Overlapped with compute by prefetching: exposed time lies between max(0, comm - compute) (perfect
     overlap) and comm (none); both bounds are reported.
   Bandwidths are assumptions (``Interconnect``), not measurements; the defaults are stated there.

3. **Time** (``plan``): measured one-GPU micro-step times of a layer-reduced model of the target shape
   (same hidden size, heads and vocab; ``benchmarks/train_throughput.py --sizing``) give a per-layer cost
   ``beta`` and a fixed cost ``alpha`` (embedding, output layer, loss) by a straight-line fit over the
   layer counts; the full model costs ``alpha + L * beta`` per micro-batch on one GPU. TP over t divides
   the compute by t (an ideal-scaling assumption: thinner GEMMs are somewhat slower in practice, so the
   result is a lower bound on time). Step time = micro-batches x (compute + TP comm + exposed FSDP comm)
   + optimizer step (measured seconds per parameter when the measurement has it, else memory-bound:
   ``OPT_BYTES_PER_PARAM`` bytes per local parameter at HBM bandwidth).
   Days per token budget = tokens / (tokens per second of the whole job) / 86,400.

Everything here is arithmetic on its inputs: it runs on CPU and is tested there; the measured inputs come
from a GPU run (``docs/benchmarks.md``, section "6.9B sizing").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megacpt.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from megacpt.errors import UserError
from megacpt.train.job import JobConfig
from megacpt.train.metrics import flops_per_token
from megacpt.train.plan import count_parameters, estimate_memory

GiB = 2 ** 30
FP32, BF16 = 4, 2
OPT_BYTES_PER_PARAM = 36        # fused AdamW: read w, g, m, v (16 B), write w, m, v (12 B), + grad zeroing 8 B
FIXED_OVERHEAD_BYTES = 1.0 * GiB  # cuBLAS/cuDNN workspaces, NCCL buffers, rotary tables, allocator slack
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """How a job is laid out over GPUs (pp = 1: the sizing covers TP x FSDP/DDP layouts)."""

    n_gpus: int
    tp: int = 1
    micro_batch: int = 1
    recompute: str = "none"           # none | selective | full
    sequence_parallel: bool = False
    fsdp: bool = True                 # shard model states over dp (False: DDP, replicated)
    param_dtype_bytes: int = FP32     # FSDP all-gather dtype (parallel.mixed_precision_param)
    reduce_dtype_bytes: int = FP32    # gradient reduce-scatter dtype (parallel.mixed_precision_reduce)
    reduce_every_micro: bool = True   # the trainer reduce-scatters after every micro-batch
    reshard_after_forward: bool = True  # parallel.fsdp_reshard_after_forward: False skips the backward gather
    fused_loss: bool = True
    loss_chunk: int = 4096            # tokens per fp32 [chunk, V] buffer of the fused loss (GPU default)

    @property
    def dp(self) -> int:
        return self.n_gpus // self.tp

    def check(self, cfg: ModelConfig) -> None:
        if self.n_gpus < 1 or self.tp < 1 or self.n_gpus % self.tp:
            raise UserError(f"layout: n_gpus={self.n_gpus} is not divisible by tp={self.tp}")
        if cfg.num_heads % self.tp or cfg.intermediate_size % self.tp:
            raise UserError(f"layout: tp={self.tp} does not divide heads {cfg.num_heads} / "
                            f"intermediate_size {cfg.intermediate_size}")
        if self.recompute not in RECOMPUTE:
            raise UserError(f"layout.recompute: {self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.micro_batch < 1:
            raise UserError("layout.micro_batch: must be >= 1")


@dataclass(frozen=True)
class Interconnect:
    """Assumed NCCL bus bandwidths (bytes/s) and GPU properties; none of these is measured here.

    Defaults: a DGX/HGX H100 node (8 GPUs, NVLink 4 through NVSwitch: 450 GB/s per direction per GPU;
    nccl-tests reach about 350 GB/s bus bandwidth for large messages without NVLink SHARP, the figure
    used here), nodes joined by one 400 Gb/s InfiniBand NDR NIC per GPU (50 GB/s; 40 GB/s assumed
    achieved), H100 SXM 80 GB (79.2 GiB visible to CUDA), 3.35 TB/s HBM3 of which ~2.8 TB/s is reached
    by streaming kernels, dense bf16 peak 989 TFLOP/s (datasheet).
    """

    name: str = "H100 SXM 80GB, NVLink 4 + 400G IB per GPU (assumed)"
    intra_node_busbw: float = 350e9
    inter_node_busbw: float = 40e9
    gpus_per_node: int = 8
    gpu_memory: float = 79.2 * GiB
    hbm_bandwidth: float = 2.8e12
    peak_flops: float = 989e12

    def busbw(self, group_size: int, stride: int) -> float:
        """Bus bandwidth of a group of ``group_size`` ranks ``stride`` apart (tp groups are contiguous,
        dp groups strided by tp): NVLink while the group stays inside one node, else the NICs."""
        span = (group_size - 1) * stride + 1
        return self.intra_node_busbw if span <= self.gpus_per_node else self.inter_node_busbw


INTERCONNECTS = {
    "h100": Interconnect(),
    "h200": dataclasses.replace(Interconnect(), name="H200 SXM 141GB, NVLink 4 + 400G IB per GPU (assumed)",
                                gpu_memory=139.8 * GiB, hbm_bandwidth=4.0e12),
}


# ------------------------------------------------------------------------------------------------ counts

def total_params(cfg: ModelConfig) -> int:
    return count_parameters(cfg)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer layer."""
    return count_parameters(dataclasses.replace(cfg, num_layers=1)) - count_parameters(dataclasses.replace(cfg, num_layers=0))


def root_params(cfg: ModelConfig) -> int:
    """Embedding, final LayerNorm and output layer."""
    return count_parameters(dataclasses.replace(cfg, num_layers=0))


# ------------------------------------------------------------------------------------------------ memory

def job_for(cfg: ModelConfig, seq: int, layout: Layout) -> JobConfig:
    """The training job ``layout`` describes (bf16 on CUDA), for ``megacpt.train.plan``."""
    dtype = {FP32: "float32", BF16: "bfloat16"}
    par = ParallelConfig(tensor_model_parallel_size=layout.tp, data_parallel_size=layout.dp,
                         sequence_parallel=layout.sequence_parallel,
                         data_parallel_type="fsdp" if layout.fsdp else "ddp",
                         mixed_precision_param=dtype[layout.param_dtype_bytes],
                         mixed_precision_reduce=dtype[layout.reduce_dtype_bytes],
                         fsdp_reshard_after_forward=layout.reshard_after_forward)
    model = dataclasses.replace(cfg, recompute_granularity=None if layout.recompute == "none" else layout.recompute)
    train = TrainConfig(micro_batch_size=layout.micro_batch, global_batch_size=layout.micro_batch * layout.dp,
                        precision="bf16", device="cuda", fused_loss=layout.fused_loss)
    return JobConfig(model=model, parallel=par, data=DataConfig(seq_length=seq), train=train)


def memory_per_gpu(cfg: ModelConfig, seq: int, layout: Layout) -> dict[str, float]:
    """Estimated peak bytes per GPU by component, and ``total`` (module docstring, model 1)."""
    layout.check(cfg)
    t, d = layout.tp, layout.dp
    out = estimate_memory(job_for(cfg, seq, layout), d)
    out.pop("total")
    v_local, h = cfg.padded_vocab() // t, cfg.hidden_size
    n_layer, n_root = layer_params(cfg), root_params(cfg)
    if layout.param_dtype_bytes == FP32:  # autocast's copy of embed_out, saved by the loss
        out["output_layer_copy"] = BF16 * v_local * h
    if layout.fsdp and d > 1:
        out["fsdp_root"] = (layout.param_dtype_bytes + layout.reduce_dtype_bytes) * n_root / t
        if not layout.reshard_after_forward:  # every layer stays gathered, not two at a time
            out["fsdp_all_layers"] = layout.param_dtype_bytes * (cfg.num_layers - 2) * n_layer / t
        if not layout.reduce_every_micro:  # gradients accumulate unsharded until the last micro-batch
            out["fsdp_accumulated_grads"] = FP32 * cfg.num_layers * n_layer / t
    sbh = seq * layout.micro_batch * h
    out["final_norm_and_hidden"] = (FP32 + BF16) * sbh
    n_tok = seq * layout.micro_batch
    if layout.fused_loss:
        c = min(layout.loss_chunk, n_tok)
        out["loss"] = (FP32 + BF16) * c * v_local + FP32 * v_local * h + FP32 * n_tok * h
    else:
        out["loss"] = (BF16 + FP32) * n_tok * v_local
    out["fixed_overhead"] = FIXED_OVERHEAD_BYTES
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------ comm

def _ring(bytes_full: float, n: int, kind: str) -> float:
    """Bytes each rank moves over its bus for a collective over ``n`` ranks of a ``bytes_full`` tensor."""
    if n <= 1:
        return 0.0
    return bytes_full * (2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n)


def comm_seconds(cfg: ModelConfig, seq: int, layout: Layout, net: Interconnect) -> dict[str, float]:
    """Seconds per micro-batch on one GPU: ``tp`` (exposed), ``dp_gather`` and ``dp_reduce`` (overlappable;
    under DDP ``dp_reduce`` is the one gradient all-reduce per step)."""
    layout.check(cfg)
    t, d = layout.tp, layout.dp
    act = BF16 * seq * layout.micro_batch * cfg.hidden_size       # one [b, s, h] bf16 activation
    n_ar = 4 + (2 if layout.recompute == "full" else 0)          # full recompute redoes the forward's two
    out = {"tp": cfg.num_layers * n_ar * _ring(act, t, "all_reduce") / net.busbw(t, 1),
           "dp_gather": 0.0, "dp_reduce": 0.0}
    if d > 1:
        n_local = total_params(cfg) / t
        bw = net.busbw(d, t)
        if layout.fsdp:
            n_gather = 2 if layout.reshard_after_forward else 1  # forward (+ backward after a reshard)
            out["dp_gather"] = n_gather * _ring(layout.param_dtype_bytes * n_local, d, "all_gather") / bw
            out["dp_reduce"] = _ring(layout.reduce_dtype_bytes * n_local, d, "reduce_scatter") / bw
        else:
            out["dp_reduce"] = _ring(layout.reduce_dtype_bytes * n_local, d, "all_reduce") / bw
    return out


# ------------------------------------------------------------------------------------------------ time

@dataclass
class Measurement:
    """One-GPU micro-step times (fwd + bwd, seconds) of a layer-reduced model of the target's shape.

    ``step_seconds[L]`` = time of one micro-batch of ``micro_batch`` x ``seq`` tokens with L layers under
    ``recompute``; at least two layer counts. ``source``: where the numbers come from (log, date, GPU).
    """

    micro_batch: int
    seq: int
    recompute: str
    step_seconds: dict[int, float]
    source: str = "unmeasured"
    device: str = ""
    opt_seconds_per_param: float | None = None  # measured fused AdamW step time per parameter, if any

    def fit(self) -> tuple[float, float]:
        """(alpha, beta): least-squares line ``t(L) = alpha + beta * L``."""
        pts = sorted(self.step_seconds.items())
        if len(pts) < 2:
            raise UserError("sizing: need micro-step times at two or more layer counts to fit a per-layer cost")
        n = len(pts)
        mx = sum(p[0] for p in pts) / n
        my = sum(p[1] for p in pts) / n
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        beta = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
        alpha = my - beta * mx
        if beta <= 0:
            raise UserError(f"sizing: micro-step time does not grow with the layer count ({pts}): "
                            "remeasure on an idle GPU")
        return alpha, beta


# FLOP ratio of recompute variants to "none", per layer (forward = 1/3 of fwd+bwd): full redoes the whole
# layer forward; selective redoes rotary + core attention, whose FLOPs are the 4*s*h attention term
def _recompute_factor(cfg: ModelConfig, seq: int, mode: str) -> float:
    h, f = cfg.hidden_size, cfg.intermediate_size
    dense = 8 * h * h + 4 * h * f       # forward FLOPs per token of the layer's matmuls
    attn = 4 * seq * h                  # forward FLOPs per token of QK^T and AV
    fwd = dense + attn
    return {"none": 1.0, "selective": (3 * fwd + attn) / (3 * fwd), "full": 4.0 / 3.0}[mode]


def micro_step_compute(cfg: ModelConfig, layout: Layout, meas: Measurement) -> float:
    """Seconds of compute for one micro-batch of the full model on one GPU of ``layout``.

    Scales the measured line by tokens (micro-batch), by the recompute FLOP ratio when the layout's mode
    differs from the measured one, and divides by tp (ideal TP scaling: see the module docstring)."""
    alpha, beta = meas.fit()
    layer_s = beta * (_recompute_factor(cfg, meas.seq, layout.recompute)
                      / _recompute_factor(cfg, meas.seq, meas.recompute))
    per_micro = alpha + cfg.num_layers * layer_s
    return per_micro * (layout.micro_batch / meas.micro_batch) / layout.tp


@dataclass
class Plan:
    layout: Layout
    memory: dict[str, float]
    fits: bool
    step_seconds: tuple[float, float]       # (perfect FSDP overlap, no overlap)
    tokens_per_s: tuple[float, float]       # whole job
    mfu: tuple[float, float]
    days: dict[str, tuple[float, float]] = field(default_factory=dict)

    def row(self) -> dict:
        lo, hi = self.step_seconds
        lay = self.layout
        return {"n_gpus": lay.n_gpus, "tp": lay.tp, "dp": lay.dp, "micro_batch": lay.micro_batch,
                "recompute": lay.recompute, "sequence_parallel": lay.sequence_parallel,
                "fsdp_param_dtype": "float32" if lay.param_dtype_bytes == FP32 else "bfloat16",
                "fsdp_reshard_after_forward": lay.reshard_after_forward,
                "mem_gib": self.memory["total"] / GiB, "fits": self.fits,
                "step_s": [lo, hi], "tokens_per_s_per_gpu": [x / lay.n_gpus for x in self.tokens_per_s],
                "mfu": list(self.mfu), "days": {k: list(v) for k, v in self.days.items()}}


def plan(cfg: ModelConfig, seq: int, global_batch: int, layout: Layout, meas: Measurement,
         net: Interconnect, token_budgets: dict[str, float], headroom: float = 0.9) -> Plan:
    """Time, memory and days of ``layout`` for a job of ``global_batch`` sequences of ``seq`` tokens."""
    layout.check(cfg)
    if seq != meas.seq:
        raise UserError(f"sizing: measured at seq {meas.seq}, asked for seq {seq}; measure at the target length")
    if global_batch % (layout.micro_batch * layout.dp):
        raise UserError(f"sizing: global batch {global_batch} is not divisible by micro_batch*dp = "
                        f"{layout.micro_batch}*{layout.dp}")
    n_micro = global_batch // (layout.micro_batch * layout.dp)
    compute = micro_step_compute(cfg, layout, meas)
    comm = comm_seconds(cfg, seq, layout, net)
    n_reduce = n_micro if (layout.fsdp and layout.reduce_every_micro) else 1
    dp_total = (n_micro * comm["dp_gather"] if layout.fsdp else 0.0) + n_reduce * comm["dp_reduce"]
    local = total_params(cfg) / (layout.tp * (layout.dp if layout.fsdp else 1))
    opt = local * (meas.opt_seconds_per_param if meas.opt_seconds_per_param
                   else OPT_BYTES_PER_PARAM / net.hbm_bandwidth)
    busy = n_micro * (compute + comm["tp"])
    step_lo = busy + max(0.0, dp_total - n_micro * compute) + opt
    step_hi = busy + dp_total + opt
    tokens = global_batch * seq
    tps = (tokens / step_lo, tokens / step_hi)
    fpt = flops_per_token(cfg, seq)
    mfu = tuple(x * fpt / layout.n_gpus / net.peak_flops for x in tps)
    mem = memory_per_gpu(cfg, seq, layout)
    p = Plan(layout, mem, mem["total"] <= headroom * net.gpu_memory, (step_lo, step_hi), tps, mfu)
    p.days = {name: (n / tps[0] / 86400, n / tps[1] / 86400) for name, n in token_budgets.items()}
    return p


def candidate_layouts(cfg: ModelConfig, n_gpus: int, global_batch: int, base: Layout | None = None,
                      tps=(1, 2, 4, 8), micro_batches=(1, 2, 4, 8), max_tp: int = 8) -> list[Layout]:
    """Every layout the trainer can run for the model and the batch: TP (inside a node, ``max_tp``, with
    sequence parallelism) x micro-batch x recompute x FSDP all-gather dtype (fp32 | bf16) x reshard after
    forward (yes | no). Other fields come from ``base``."""
    base = base or Layout(n_gpus=n_gpus)
    out = []
    for tp in tps:
        if tp > max_tp or n_gpus % tp or cfg.num_heads % tp or cfg.intermediate_size % tp:
            continue
        for mb in micro_batches:
            if global_batch % (mb * (n_gpus // tp)):
                continue
            for rc in RECOMPUTE:
                for pdt in (FP32, BF16):
                    for reshard in (True, False):
                        out.append(dataclasses.replace(
                            base, n_gpus=n_gpus, tp=tp, micro_batch=mb, recompute=rc, sequence_parallel=tp > 1,
                            param_dtype_bytes=pdt, reshard_after_forward=reshard))
    return out


def recommend(plans: list[Plan]) -> Plan | None:
    """The fitting plan with the shortest step under the no-overlap bound (the conservative one), ties
    broken by the overlap bound and then by less memory."""
    ok = [p for p in plans if p.fits]
    if not ok:
        return None
    return min(ok, key=lambda p: (round(p.step_seconds[1], 6), round(p.step_seconds[0], 6), p.memory["total"]))


def format_days(x: tuple[float, float]) -> str:
    lo, hi = x
    return f"{lo:.2f}" if math.isclose(lo, hi, rel_tol=0.005) else f"{lo:.2f}–{hi:.2f}"
