"""The continual pre-training loop, readable top to bottom: `train(job)`.

One iteration = one optimizer step over the global batch (``train.global_batch_size`` samples): each
data-parallel rank runs ``global / (micro * dp)`` micro-batches (gradient accumulation, or the pipeline's
micro-batches under PP). Each micro-batch's NLL *sum* is scaled by ``dp / tokens_per_iteration``; the DP
wrapper (FSDP2/DDP) *averages* gradients over dp, so the result is exactly the gradient of the global mean
loss — the same step as one process with the whole batch, whatever the layout.

Precision: parameters, gradients, optimizer state and reductions stay fp32 ("master weights"); on GPU the
forward/backward runs under bf16 autocast. On CPU the default is plain fp32, which makes resume bitwise.

Exact resume: a checkpoint holds model, optimizer, the iteration (the LR schedule is a function of it),
consumed samples (the data position; sample k of a run is always ``train_dataset[k]``), the NaN counters and
every rank's RNG state. A damaged checkpoint to resume from (a file whose size or checksum differs from the
manifest its save recorded) stops the run before training, naming the file and the previous complete
checkpoint; ``checkpoint.load=ROOT/iter_N`` resumes from that one exactly as from ``latest``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from megacpt.checkpoint import (CheckpointManager, DamagedCheckpoint, is_checkpoint, latest_checkpoint,
                                load_checkpoint, previous_checkpoint, verify_checkpoint)
from megacpt.config import ModelConfig
from megacpt.convert import load_config, load_weights
from megacpt.convert.hf_gpt_neox import megacpt_to_hf
from megacpt.data.gpt_dataset import build_gpt_datasets, check_split
from megacpt.data.indexed import IndexedDataset, data_paths, read_sidecar
from megacpt.data.sampler import PretrainingSampler
from megacpt.data.tokenizer import load_tokenizer
from megacpt.errors import UserError
from megacpt.model.gpt_neox import GPTNeoX
from megacpt.optional import optional
from megacpt.parallel import parallelize
from megacpt.parallel.loss import fused_lm_nll_sum, tp_group_of, vocab_parallel_cross_entropy
from megacpt.parallel.faults import failure_reason, is_peer_failure
from megacpt.parallel.mesh import build_mesh
from megacpt.parallel.pipeline import broadcast_loss, build_pipeline
from megacpt.progress import duration
from megacpt.train.job import JobConfig
from megacpt.train.metrics import Throughput, flops_per_token, memory_stats, peak_flops
from megacpt.train.optim import LRSchedule, build_optimizer

log = logging.getLogger("megacpt.train")

# knobs of ModelConfig that are runtime choices of the job, not architecture of a loaded model
RUNTIME_MODEL_FIELDS = ("recompute_granularity", "attention_backend", "layernorm_backend", "impl", "fp8")
ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "rotary_pct",
               "use_parallel_residual", "vocab_size")


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


class PeerLost(UserError):
    """A collective failed or timed out: another rank's process or node died or hangs. Every surviving rank
    stops with this one line (no traceback) and a non-zero exit; relaunching all nodes resumes the run."""


@dataclass
class Runtime:
    """Where this process sits: ranks, device, compute dtype and the (pp, dp, tp) mesh (None: 1 process)."""

    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    dp_rank: int = 0
    dp_size: int = 1
    pp_size: int = 1
    mesh: Any = None
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None


@dataclass
class TrainResult:
    iteration: int
    losses: dict[int, float] = field(default_factory=dict)   # iteration -> global mean loss (finite steps)
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped_steps: int = 0
    stop_reason: str = "done"        # done | signal
    checkpoint: str | None = None    # last checkpoint written


# ----------------------------------------------------------------------------------------------- setup

def world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(job: JobConfig) -> Runtime:
    """Process group (gloo on CPU, nccl on GPU) only when launched with WORLD_SIZE > 1; then the mesh."""
    t = job.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is visible")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every collective waits at most train.collective_timeout_s for its peers (no endless hang on a
        # dead or stuck node); with nccl, TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (our launchers) enforces it
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=t.collective_timeout_s))
        owns = True
    precision = t.precision if t.precision != "auto" else ("bf16" if use_cuda else "fp32")
    rt = Runtime(rank=dist.get_rank() if dist.is_initialized() else 0,
                 world_size=dist.get_world_size() if dist.is_initialized() else 1, device=device,
                 autocast_dtype=torch.bfloat16 if precision == "bf16" else None, owns_process_group=owns)
    if rt.world_size > 1:
        rt.mesh = build_mesh(job.parallel, rt.world_size, device_type=device.type)
        rt.dp_rank, rt.dp_size = rt.mesh["dp"].get_local_rank(), rt.mesh["dp"].size()
        rt.pp_size = rt.mesh["pp"].size()
    return rt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """JSON-able (tensors allowed) RNG state of this process: python, numpy, torch (+ cuda)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos,
                                                 has_gauss, cached],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def resume_dir(job: JobConfig) -> str | None:
    """Where to resume from: ``checkpoint.load`` (must hold a checkpoint), else ``checkpoint.save`` if it has one."""
    if job.checkpoint.load:
        if not is_checkpoint(job.checkpoint.load):
            raise UserError(f"checkpoint.load: no complete checkpoint under {job.checkpoint.load}")
        return job.checkpoint.load
    if job.checkpoint.save and is_checkpoint(job.checkpoint.save):
        return job.checkpoint.save
    return None


def damaged_resume(e: DamagedCheckpoint) -> UserError:
    """The checkpoint to resume from is damaged: say so, and name the previous complete one to resume from."""
    prev = previous_checkpoint(e.checkpoint)
    if prev is None:
        return UserError(f"{e}; no earlier complete checkpoint is left in {e.checkpoint.parent}")
    return UserError(f"{e}; the previous complete checkpoint is {prev.name}: resume from it with "
                     f"checkpoint.load={prev}")


def resolve_model_config(job: JobConfig, resume: str | None) -> ModelConfig:
    """The architecture: the resumed checkpoint's, else ``init_from``'s, else the job's (preset + overrides).

    A loaded architecture keeps the job's runtime knobs (recompute, kernels); a ``model_preset`` given with
    ``init_from`` is a check that the weights are the expected model.
    """
    src = resume or job.checkpoint.init_from
    if src is None:
        return job.model
    cfg = load_config(src)
    if resume is None and job.model_preset is not None:
        bad = [f"{k}: {getattr(job.model, k)} vs {getattr(cfg, k)}" for k in ARCH_FIELDS
               if k != "vocab_size" and getattr(job.model, k) != getattr(cfg, k)]
        if bad:
            raise UserError(f"checkpoint.init_from: {src} is not a {job.model_preset} model ({'; '.join(bad)})")
    for k in RUNTIME_MODEL_FIELDS:
        setattr(cfg, k, getattr(job.model, k))
    return cfg.validate()


@dataclass
class Model:
    """This rank's model: ``parts`` (the whole model, or its pipeline stages) and the pipeline if PP."""

    parts: list[torch.nn.Module]
    cfg: ModelConfig
    pipeline: Any = None

    @property
    def module(self) -> torch.nn.Module:  # the whole (maybe TP/FSDP-wrapped) model when not pipelined
        return self.parts[0]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def build_model(job: JobConfig, rt: Runtime, cfg: ModelConfig, weights_from: str | None) -> Model:
    """Build, parallelise (TP/FSDP/DDP/PP from the mesh) and initialise the model.

    A fresh model is initialised in full from the seed on every rank before sharding, so every layout
    starts from the same weights. With ``weights_from`` (init_from / resume) the model is built on the meta
    device, sharded, materialised and then loaded, so no rank ever holds a full fp32 copy it does not need.
    """
    meta = weights_from is not None and job.parallel.pipeline_model_parallel_size == 1
    torch.manual_seed(job.train.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = GPTNeoX(cfg)
    if not meta:
        model.to(rt.device)
    pipeline = None
    if rt.mesh is None:
        parts = [model]
    elif job.parallel.pipeline_model_parallel_size > 1:
        n_micro = job.train.global_batch_size // (job.train.micro_batch_size * rt.dp_size)
        pipeline = build_pipeline(model, rt.mesh, job.parallel, n_micro, vocab_size=cfg.vocab_size,
                                  fused_loss=job.train.fused_loss)
        parts = list(pipeline.parts)
    else:
        parts = [parallelize(model, rt.mesh, job.parallel)]
    if meta:
        for part in parts:
            part.to_empty(device=rt.device)
            if cfg.tie_word_embeddings and part.embed_in is not None and part.embed_out is not None:
                part.embed_out.weight = part.embed_in.weight
            part.init_weights()  # deterministic values for anything the load does not cover
    if job.train.compile:  # after sharding and materialising: only each layer's forward is swapped
        for part in parts:
            part.compile_layers()
    return Model(parts, cfg, pipeline)


# ------------------------------------------------------------------------------------------------ data

def validate_data(job: JobConfig, model_cfg: ModelConfig) -> None:
    """Paths exist; the datasets' tokenizer (sidecars) agree with each other, ``data.tokenizer`` and the model."""
    _, prefixes = job.data.weights_and_prefixes()
    named = [(f"data.blend[{p}]", p) for p in prefixes] + \
            [(f"data.eval_prefixes.{k}", p) for k, p in job.data.eval_prefixes.items()]
    identity, first = None, None
    if job.data.tokenizer:
        identity, first = load_tokenizer(job.data.tokenizer).identity(), "data.tokenizer"
        if identity["vocab_size"] > model_cfg.vocab_size:
            raise UserError(f"data.tokenizer: vocab_size {identity['vocab_size']} > model.vocab_size "
                            f"{model_cfg.vocab_size}")
    for name, prefix in named:
        for p in data_paths(prefix):
            if not p.exists():
                raise UserError(f"{name}: {p} does not exist")
        try:
            IndexedDataset(prefix).require_documents()
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
        tok = (read_sidecar(prefix) or {}).get("tokenizer")
        if not tok:
            log.warning("%s: %s has no tokenizer in its sidecar; vocab not checked", name, prefix)
            continue
        if tok.get("vocab_size") is not None and tok["vocab_size"] > model_cfg.vocab_size:
            raise UserError(f"{name}: tokenizer vocab_size {tok['vocab_size']} (from {prefix}.meta.json) "
                            f"> model.vocab_size {model_cfg.vocab_size}")
        if identity is None:
            identity, first = tok, name
        elif tok.get("sha256") != identity.get("sha256"):
            raise UserError(f"{name}: tokenizer {tok.get('path')} (sha256 {str(tok.get('sha256'))[:12]}) differs "
                            f"from {first}'s ({str(identity.get('sha256'))[:12]})")


def build_datasets(job: JobConfig) -> tuple[Any, dict[str, Any]]:
    """Train samples (blend, train split, train_iters * global batch of them) and held-out sets.

    A held-out set is read whole (split 1,0,0), ``eval_iters`` global batches of it at most, never more than
    one epoch (whole global batches only, so every layout evaluates the same samples).
    """
    d, t = job.data, job.train
    n = t.train_iters * t.global_batch_size
    check_split(d.split, d.weights_and_prefixes()[1])  # before any rank waits on a barrier
    train = build_gpt_datasets(d.blend, d.split, d.seq_length, (n, 0, 0), seed=t.seed, cache_dir=d.cache_dir,
                               return_doc_ids=d.reset_attention_mask)[0]
    if train is None:
        raise UserError(f"data.split: {d.split!r} leaves no training split")
    evals = {}
    for name, prefix in d.eval_prefixes.items():
        per_epoch = max(IndexedDataset(prefix).num_tokens - 1, 0) // d.seq_length
        n_eval = min(job.logging.eval_iters, per_epoch // t.global_batch_size) * t.global_batch_size
        if n_eval == 0:
            log.warning("data.eval_prefixes.%s: %s holds fewer than one global batch (%d x %d tokens); "
                        "not evaluated", name, prefix, t.global_batch_size, d.seq_length)
            continue
        evals[name] = build_gpt_datasets(prefix, "1,0,0", d.seq_length, (n_eval, 0, 0), seed=t.seed,
                                         cache_dir=d.cache_dir, return_doc_ids=d.reset_attention_mask)[0]
    return train, evals


def local_batches(dataset, consumed: int, job: JobConfig, rt: Runtime, device) -> list[tuple]:
    """This DP rank's micro-batches of the global batch starting at sample ``consumed``:
    [(tokens [mb, s+1], doc_ids [mb, s] or None)] (Megatron's sampler order)."""
    t = job.train
    n_micro = t.global_batch_size // (t.micro_batch_size * rt.dp_size)
    sampler = PretrainingSampler(consumed + t.global_batch_size, consumed, t.micro_batch_size,
                                 rt.dp_rank, rt.dp_size)
    out = []
    for idx in sampler:
        samples = [dataset[k] for k in idx]
        tokens = torch.stack([torch.as_tensor(x["tokens"], dtype=torch.long) for x in samples]).to(device)
        doc_ids = None
        if "doc_ids" in samples[0]:
            doc_ids = torch.stack([torch.as_tensor(x["doc_ids"], dtype=torch.long)[:-1] for x in samples]).to(device)
        out.append((tokens, doc_ids))
    assert len(out) == n_micro, (len(out), n_micro)
    return out


# ------------------------------------------------------------------------------------------------ loss

def loss_sum(module: torch.nn.Module, tokens: torch.Tensor, cfg: ModelConfig, fused: bool,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token NLL over ``tokens`` [b, s+1]; padded vocab rows never get probability.

    ``fused``: the fused linear + cross-entropy on the final hidden states (no [tokens, V] logits). Else
    the (vocab-parallel under TP) cross-entropy on the model's logits.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if fused:
        h = module.hidden_states(inputs, doc_ids=doc_ids)  # [b, s, H] (full H under TP)
        return fused_lm_nll_sum(h, module.embed_out.weight, targets, group=tp_group_of(module),
                                vocab_size=cfg.vocab_size)
    logits = module(inputs, doc_ids=doc_ids)  # [b, s, V_pad] or local [b, s, V_pad/tp]
    return vocab_parallel_cross_entropy(logits.flatten(0, -2), targets.flatten(), group=tp_group_of(module),
                                        vocab_size=cfg.vocab_size).sum()


def micro_loss(module, tokens, cfg, fused, iteration, doc_ids=None):  # tests inject non-finite losses here
    return loss_sum(module, tokens, cfg, fused, doc_ids)


def _autocast(rt: Runtime):
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.autocast_dtype)


def _dp_sum(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.mesh is not None and rt.dp_size > 1:
        dist.all_reduce(x, group=rt.dp_group)
    return x


def forward_backward(model: Model, batches: list[tuple], job: JobConfig, rt: Runtime, it: int,
                     fused: bool, tokens_per_iter: int) -> float:
    """All micro-batches of this rank, gradients accumulated; returns the global mean loss."""
    if model.pipeline is not None:
        tokens = torch.cat([b[0] for b in batches])
        doc_ids = torch.cat([b[1] for b in batches]) if batches[0][1] is not None else None
        with _autocast(rt):
            local = model.pipeline.step(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), doc_ids=doc_ids)
        mean = broadcast_loss(local, rt.mesh).double()  # this dp rank's mean (equal token counts)
        return (_dp_sum(mean, rt) / rt.dp_size).item()
    scale = rt.dp_size / tokens_per_iter  # DP wrappers average over dp: see the module docstring
    local = torch.zeros((), dtype=torch.float64, device=rt.device)
    for tokens, doc_ids in batches:
        with _autocast(rt):
            s = micro_loss(model.module, tokens, model.cfg, fused, it, doc_ids)
        (s * scale).backward()
        local += s.detach().double()
    return (_dp_sum(local, rt) / tokens_per_iter).item()


@torch.no_grad()
def grad_norm(params: list[torch.nn.Parameter], rt: Runtime) -> float:
    """Global L2 norm of the gradients over every rank, each element counted once.

    A DTensor shard is replicated on ``world / (pp * n_shards)`` ranks (plain tensors: n_shards = 1); every
    rank adds its squared norms divided by that count, then one all-reduce sums over the world.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[float, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        n_shards = 1
        if isinstance(g, DTensor):
            for dim, pl in enumerate(g.placements):
                if pl.is_shard():
                    n_shards *= g.device_mesh.size(dim)
            g = g.to_local()
        groups.setdefault(n_shards * rt.pp_size / rt.world_size, []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=rt.device)
    for weight, grads in groups.items():
        norms = torch._foreach_norm(grads)  # one fp32 norm per tensor, one kernel per dtype/device
        sq += torch.stack(norms).double().pow(2).sum() * weight
    if rt.world_size > 1:
        dist.all_reduce(sq)
    total = sq.item()
    return math.sqrt(total) if math.isfinite(total) else float("nan")


@torch.no_grad()
def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


@torch.no_grad()
def evaluate(model: Model, evals: dict, job: JobConfig, rt: Runtime, fused: bool) -> dict[str, dict]:
    """Mean NLL and perplexity over each held-out set (the same samples whatever the layout)."""
    out = {}
    t = job.train
    tokens_per_batch = t.global_batch_size * job.data.seq_length
    model.train(False)
    for name, ds in evals.items():
        total = 0.0
        n_batches = len(ds) // t.global_batch_size
        for i in range(n_batches):
            batches = local_batches(ds, i * t.global_batch_size, job, rt, rt.device)
            if model.pipeline is not None:
                tokens = torch.cat([b[0] for b in batches])
                doc_ids = torch.cat([b[1] for b in batches]) if batches[0][1] is not None else None
                with _autocast(rt):
                    local = model.pipeline.eval_step(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                                                     doc_ids=doc_ids)
                mean = _dp_sum(broadcast_loss(local, rt.mesh).double(), rt) / rt.dp_size
                total += mean.item() * tokens_per_batch
            else:
                s = torch.zeros((), dtype=torch.float64, device=rt.device)
                for tokens, doc_ids in batches:
                    with _autocast(rt):
                        s += loss_sum(model.module, tokens, model.cfg, fused, doc_ids).double()
                total += _dp_sum(s, rt).item()
        loss = total / (n_batches * tokens_per_batch)
        out[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": n_batches * tokens_per_batch}
    model.train(True)
    return out


# ------------------------------------------------------------------------------------------------ loop

class _StopFlag:
    """SIGTERM/SIGUSR1 (Slurm pre-emption) set a flag; the loop checks it between steps on every rank.

    The same signal a second time chains to the handler it replaced: under `megacpt train` that is
    ``megacpt.io.handle_signals``' (stop now, remove temporaries, one line, exit 128 + signal)."""

    def __init__(self, enabled: bool):
        self.set = False
        self._old = {}
        self._seen: set[int] = set()
        if enabled:
            for s in (signal.SIGTERM, signal.SIGUSR1):
                with contextlib.suppress(ValueError):  # not the main thread
                    self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        if signum in self._seen and callable(self._old.get(signum)):
            self._old[signum](signum, frame)
            return
        self._seen.add(signum)
        self.set = True
        log.warning("received signal %d: will save a checkpoint after this step and exit", signum)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsLogger:
    """Console line + JSONL (+ TensorBoard if installed), rank 0 only."""

    def __init__(self, job: JobConfig, rt: Runtime):
        self.enabled = rt.is_main
        self.jsonl = self.tb = None
        self._window_loss, self._window_n = 0.0, 0  # losses of the applied steps since the last record
        if not self.enabled:
            return
        path = job.logging.jsonl or (str(Path(job.checkpoint.save) / "metrics.jsonl") if job.checkpoint.save else None)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(path, "a", buffering=1)
        if job.logging.tensorboard_dir:
            tb = optional("torch.utils.tensorboard", "logging.tensorboard_dir")
            if tb is None:  # torch.utils.tensorboard raises ModuleNotFoundError naming 'tensorboard'
                log.warning("logging.tensorboard_dir: tensorboard is not installed; JSONL only")
            else:
                self.tb = tb.SummaryWriter(job.logging.tensorboard_dir)

    def add_loss(self, loss: float) -> None:
        self._window_loss, self._window_n = self._window_loss + loss, self._window_n + 1

    def window_mean(self) -> float | None:
        """Mean loss of the applied steps since the last call (None if every one was skipped); resets."""
        mean = self._window_loss / self._window_n if self._window_n else None
        self._window_loss, self._window_n = 0.0, 0
        return mean

    def write(self, rec: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        if console:
            log.info(console)
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["iteration"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


# ------------------------------------------------------------------------------------------ the run

@dataclass
class TrainState:
    """Where the run stands between steps; a checkpoint's ``extra`` records it (with the LR schedule)."""

    iteration: int = 0          # optimizer steps taken (skipped non-finite ones included)
    consumed_samples: int = 0   # the data position: the next step reads train_dataset[consumed_samples:]
    skipped_steps: int = 0      # non-finite steps, in total
    nan_streak: int = 0         # ... in a row up to now

    def extra(self, sched: LRSchedule) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "skipped_steps": self.skipped_steps, "nan_streak": self.nan_streak,
                "lr_schedule": sched.state_dict()}


@dataclass
class StepResult:
    loss: float          # global mean loss (non-finite when the step was skipped)
    grad_norm: float
    lr: float
    applied: bool        # False: non-finite loss or gradient norm, the optimizer did not step


def prepare_job(job: JobConfig) -> str | None:
    """Every check that needs no process group: config, resume source, architecture, data, export.
    Sets ``job.model`` to the architecture the run trains; returns the checkpoint to resume from (or None)."""
    job.validate(world_size_from_env())
    resume = resume_dir(job)
    try:
        if resume is not None:
            # sizes only (a stat per file, on every rank); `restore` checks checksums, shared out over the ranks
            verify_checkpoint(resume, checksums=False)
        cfg = resolve_model_config(job, resume)
    except DamagedCheckpoint as e:
        if resume is None:  # checkpoint.init_from's
            raise
        raise damaged_resume(e) from None
    job.model = cfg
    job.validate(world_size_from_env())  # again: divisibility against the loaded architecture
    if job.data.seq_length > cfg.max_position_embeddings:
        raise UserError(f"data.seq_length: {job.data.seq_length} > the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    validate_data(job, cfg)
    if job.checkpoint.export_hf and not job.checkpoint.save:
        raise UserError("checkpoint.export_hf: needs checkpoint.save (the export reads the final checkpoint)")
    return resume


def init_from_weights(model: Model, path: str) -> None:
    """``checkpoint.init_from``: the weights (HF dir or megacpt checkpoint) of a fresh run, at this layout."""
    for part in model.parts:
        load_weights(part, path)
    log.info("initialised from %s", path)


def restore(resume: str, model: Model, optimizers: list, sched: LRSchedule, job: JobConfig,
            rt: Runtime) -> TrainState:
    """Model, optimizer, position and this rank's RNG state from the checkpoint at ``resume``."""
    try:
        ck = load_checkpoint(resume, model.parts, optimizers)
    except DamagedCheckpoint as e:
        raise damaged_resume(e) from None
    extra = ck.extra
    state = TrainState(int(extra["iteration"]), int(extra["consumed_samples"]), int(extra.get("skipped_steps", 0)),
                       int(extra.get("nan_streak", 0)))
    for d in sched.differences(extra.get("lr_schedule", {})):
        log.warning("LR schedule changed since the checkpoint (%s); the config is used", d)
    if ck.rank_extra is not None:
        set_rng_state(ck.rank_extra["rng"])
    else:  # a rank that did not exist in the saved layout: a distinct, reproducible stream
        seed_everything(job.train.seed + 1000 * rt.rank + state.iteration)
    log.info("resumed from %s at iteration %d (%d samples consumed)", ck.path, state.iteration,
             state.consumed_samples)
    return state


def train_step(model: Model, optimizers: list, sched: LRSchedule, train_ds, state: TrainState, job: JobConfig,
               rt: Runtime, fused: bool) -> StepResult:
    """One optimizer step over the global batch at ``state``: LR, forward/backward of this rank's
    micro-batches, global gradient norm, clip and step, or a skip when the loss or norm is not finite
    (``TrainingDiverged`` after too many in a row). Advances ``state``."""
    t = job.train
    lr = 0.0
    for opt in optimizers:
        lr = sched.apply(opt, state.iteration + 1)
        opt.zero_grad(set_to_none=True)
    batches = local_batches(train_ds, state.consumed_samples, job, rt, rt.device)
    loss = forward_backward(model, batches, job, rt, state.iteration, fused, t.global_batch_size * job.data.seq_length)
    params = model.parameters()
    gnorm = grad_norm(params, rt)
    applied = math.isfinite(loss) and math.isfinite(gnorm)
    if applied:
        if job.optimizer.clip_grad > 0:
            clip_gradients(params, job.optimizer.clip_grad, gnorm)
        for opt in optimizers:
            opt.step()
        state.nan_streak = 0
    else:
        state.skipped_steps, state.nan_streak = state.skipped_steps + 1, state.nan_streak + 1
        log.warning("iteration %d: non-finite loss/grad norm (loss=%s, grad_norm=%s); step skipped "
                    "(%d in a row, %d total)", state.iteration + 1, loss, gnorm, state.nan_streak,
                    state.skipped_steps)
        if state.nan_streak >= t.max_consecutive_nan_skips:
            raise TrainingDiverged(
                f"train.max_consecutive_nan_skips: {state.nan_streak} non-finite steps in a row at iteration "
                f"{state.iteration + 1} (lr={lr:.3g}); stopping. Lower optimizer.lr or check the data; the last "
                f"checkpoint is untouched")
    state.iteration += 1
    state.consumed_samples += t.global_batch_size
    return StepResult(loss, gnorm, lr, applied)


def log_step(logger: MetricsLogger, meter: Throughput, state: TrainState, step: StepResult, job: JobConfig,
             rt: Runtime) -> None:
    """The step's console line and JSONL/TensorBoard record; the loss is the mean over the window."""
    perf = meter.report()
    rec = {"kind": "train", "iteration": state.iteration, "consumed_samples": state.consumed_samples,
           "loss": logger.window_mean(), "lr": step.lr, "grad_norm": step.grad_norm,
           "skipped_steps": state.skipped_steps, **perf, **memory_stats(rt.device),
           "eta_s": meter.eta_s(job.train.train_iters - state.iteration)}
    loss_txt = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
    mfu = f" | MFU {100 * perf['mfu']:.1f}%" if perf["mfu"] is not None else ""
    logger.write(rec, f"iter {state.iteration}/{job.train.train_iters} | loss {loss_txt} | lr {step.lr:.3e} | "
                      f"grad_norm {step.grad_norm:.3f} | {perf['tokens_per_s']:,.0f} tok/s | "
                      f"{perf['tflops_per_device']:.3g} TFLOP/s/dev{mfu} | skipped {state.skipped_steps}"
                      + ("" if rec["eta_s"] is None else f" | ETA {duration(rec['eta_s'])}"))


def log_eval(logger: MetricsLogger, iteration: int, results: dict[str, dict]) -> None:
    for name, r in results.items():
        logger.write({"kind": f"eval/{name}", "iteration": iteration, **r},
                     f"eval {name} @ {iteration}: loss {r['loss']:.4f} ppl {r['ppl']:.2f}")


def agree_to_stop(stop: "_StopFlag", rt: Runtime) -> bool:
    """True on every rank if any rank got a termination signal (or the savers would wait forever)."""
    if rt.world_size == 1:
        return stop.set
    flag = torch.tensor(float(stop.set), device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def peer_lost(e: BaseException, job: JobConfig, rt: Runtime, iteration: int) -> PeerLost:
    """The one line a surviving rank ends with: what happened, and where a relaunch resumes."""
    reason = failure_reason(e)
    src = job.checkpoint.load or job.checkpoint.save
    try:
        last = (latest_checkpoint(src) or Path(src)) if src and is_checkpoint(src) else None
    except UserError:  # a broken `latest`: say where to look, the relaunch will say more
        last = Path(src)
    resume = (f"Relaunch every node with the same command to resume from the last complete checkpoint, {last}"
              if last is not None else "No checkpoint yet: relaunching every node starts from the beginning")
    return PeerLost(f"rank {rt.rank}: lost a peer after iteration {iteration} ({reason}): another rank's process "
                    f"or node died or stopped answering (collectives give up after train.collective_timeout_s="
                    f"{job.train.collective_timeout_s:g} s). {resume}")


def log_start(job: JobConfig, rt: Runtime, model: Model, state: TrainState, fused: bool) -> None:
    if not rt.is_main:
        return
    t = job.train
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
    log.info("training %s params for %d iterations from %d: global batch %d x %d tokens, dp=%d tp=%d pp=%d, "
             "%s, %s loss", f"{n_params:,}", t.train_iters, state.iteration, t.global_batch_size,
             job.data.seq_length, rt.dp_size, job.parallel.tensor_model_parallel_size, rt.pp_size,
             "bf16 autocast" if rt.autocast_dtype is not None else "fp32", "fused" if fused else "plain")


def train(job: JobConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or resume) a training job. All validation happens before any process-group work."""
    resume = prepare_job(job)
    rt = init_runtime(job)
    ckpt, lost = None, False
    try:
        if job.checkpoint.save:  # the save root is this job's until the end: a second live job there is refused
            ckpt = CheckpointManager(job.checkpoint.save, keep_last=job.checkpoint.keep_last,
                                     async_save=job.checkpoint.async_save,
                                     collective_timeout_s=job.train.collective_timeout_s)
        return run_loop(job, rt, resume, ckpt, on_step)
    except PeerLost:
        lost = True
        raise
    finally:
        if ckpt is not None and not lost:  # finishing a pending save is collective: not without the peer
            ckpt.close()  # (after a lost peer the process exits: its locks go with it)
        if rt.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def run_loop(job: JobConfig, rt: Runtime, resume: str | None, ckpt: CheckpointManager | None,
             on_step: Callable[[int, float], None] | None) -> TrainResult:
    """Build model, optimizer and data, restore ``resume``, train, save into ``ckpt`` (None: no checkpoints)."""
    cfg, t, lg = job.model, job.train, job.logging
    seed_everything(t.seed)
    model = build_model(job, rt, cfg, resume or job.checkpoint.init_from)
    if resume is None and job.checkpoint.init_from:
        init_from_weights(model, job.checkpoint.init_from)
    model.train(True)
    optimizers = [build_optimizer(part, job.optimizer) for part in model.parts]
    sched = LRSchedule(job.optimizer, job.scheduler, t.train_iters)
    train_ds, eval_ds = build_datasets(job)
    # the fused linear + cross-entropy runs on the final hidden states in every layout: single process, TP
    # (over the local embed_out shard, reduced over the tp group inside the op), FSDP (the root's embed_out
    # stays gathered after hidden_states) and PP (the last stage's loss function applies it)
    fused = t.fused_loss
    state = restore(resume, model, optimizers, sched, job, rt) if resume is not None else TrainState()

    logger = MetricsLogger(job, rt)
    stop = _StopFlag(t.exit_signal_save)
    peak = peak_flops(torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                      "bf16" if rt.autocast_dtype is not None else "fp32", t.peak_flops)
    meter = Throughput(flops_per_token(cfg, job.data.seq_length), rt.world_size, peak)
    result = TrainResult(iteration=state.iteration, skipped_steps=state.skipped_steps)
    log_start(job, rt, model, state, fused)
    lost: PeerLost | None = None
    try:
        while state.iteration < t.train_iters:
            step = train_step(model, optimizers, sched, train_ds, state, job, rt, fused)
            if step.applied:
                result.losses[state.iteration] = step.loss
                logger.add_loss(step.loss)
            meter.add(t.global_batch_size * job.data.seq_length)
            if on_step is not None:
                on_step(state.iteration, step.loss)
            if state.iteration % lg.log_interval == 0 or state.iteration == t.train_iters:
                log_step(logger, meter, state, step, job, rt)
            if eval_ds and ((lg.eval_interval and state.iteration % lg.eval_interval == 0)
                            or state.iteration == t.train_iters):
                result.eval = evaluate(model, eval_ds, job, rt, fused)
                log_eval(logger, state.iteration, result.eval)
            want_stop = agree_to_stop(stop, rt)
            periodic = job.checkpoint.save_interval and state.iteration % job.checkpoint.save_interval == 0
            if ckpt is not None and (periodic or state.iteration == t.train_iters or want_stop):
                result.checkpoint = str(ckpt.save(
                    state.iteration, model.parts, optimizers, extra=state.extra(sched),
                    rank_extra={"rng": rng_state()}, model_config=cfg, tokenizer=job.data.tokenizer,
                    run_config=job.to_dict()))
            if want_stop:
                result.stop_reason = "signal"
                log.warning("stopping at iteration %d after a termination signal%s", state.iteration,
                            f"; checkpoint {result.checkpoint}" if ckpt is not None else " (no checkpoint.save)")
                break
        result.iteration, result.skipped_steps = state.iteration, state.skipped_steps
        if ckpt is not None:
            ckpt.wait()  # an async save must be complete before export / exit
        if result.stop_reason == "done" and job.checkpoint.export_hf:
            export_hf(job, rt)
    except RuntimeError as e:  # a dead or hung peer: one clear line on every surviving rank, no traceback
        if rt.world_size > 1 and is_peer_failure(e):
            lost = peer_lost(e, job, rt, state.iteration)
            raise lost from e
        raise
    finally:
        stop.restore()
        logger.close()
    return result


def export_hf(job: JobConfig, rt: Runtime) -> None:
    """The final checkpoint -> an HF GPT-NeoX dir, through the convert library (rank 0; streams tensors)."""
    if rt.is_main:
        megacpt_to_hf(job.checkpoint.save, job.checkpoint.export_hf)
        log.info("exported the final model to %s (HF GPT-NeoX)", job.checkpoint.export_hf)
    if rt.world_size > 1:
        dist.barrier()
