"""The continual pre-training loop, readable top to bottom: `train(job)`.

One iteration = one optimizer step over the global batch (``train.global_batch_size`` samples):
each data-parallel rank runs ``global / (micro * dp)`` micro-batches (gradient accumulation), each
micro-batch loss is the NLL *sum* divided by the global batch's token count, so the summed gradients
(accumulated locally, summed over DP ranks) are exactly the gradient of the global mean loss — the same
numbers as one process with the whole batch, whatever the layout.

Precision: parameters, gradients, optimizer state and reductions stay fp32 ("master weights"); on GPU the
forward/backward runs under bf16 autocast. On CPU the default is plain fp32, which makes resume bitwise.

Exact resume: a checkpoint holds model, optimizer, the iteration (the LR schedule is a function of it),
consumed samples (the data position), the NaN counters and every RNG state. Sample k of a run is always
``dataset[k]`` and the batch of iteration i is samples [i*G, (i+1)*G), so a resumed run sees the same data.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacpt.config import JobConfig, ModelConfig
from megacpt.errors import UserError
from megacpt.train.metrics import Throughput, flops_per_token, memory_stats, peak_flops
from megacpt.train.optim import LRSchedule, build_optimizer

log = logging.getLogger("megacpt.train")


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


@dataclass
class Runtime:
    """Where this process sits: ranks, device, the compute dtype and the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    dp_rank: int
    dp_size: int
    dp_group: Any = None
    mesh: Any = None
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    """Process group (gloo on CPU, nccl on GPU) only when launched by torchrun with WORLD_SIZE > 1."""
    t = job.train
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    precision = t.precision if t.precision != "auto" else ("bf16" if use_cuda else "fp32")
    par = job.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = world // (tp * pp)
    mesh, dp_group, dp_rank = None, None, rank
    if world > 1:
        if tp > 1 or pp > 1:
            from megacpt.parallel.mesh import build_mesh

            mesh = build_mesh(par, world)
            dp_group = mesh.get_group("dp")
            dp_rank = mesh.get_local_rank("dp")
        else:
            dp_group = dist.group.WORLD
    return Runtime(rank, world, local_rank, device, torch.bfloat16 if precision == "bf16" else None,
                   dp_rank, dp, dp_group, mesh, owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def build_model(job: JobConfig, rt: Runtime) -> tuple[torch.nn.Module, ModelConfig]:
    """A fresh model (seeded init) or the weights of ``checkpoint.init_from`` (HF dir or megacpt ckpt)."""
    if job.checkpoint.init_from:
        from megacpt.convert import load_model

        model, cfg = load_model(job.checkpoint.init_from, dtype=torch.float32, device="cpu")
        # runtime knobs of the job (recompute, kernels) apply to the loaded architecture
        for k in ("recompute_granularity", "attention_backend", "layernorm_backend"):
            if hasattr(cfg, k):
                setattr(cfg, k, getattr(job.model, k))
        if hasattr(model, "set_recompute"):
            model.set_recompute(cfg.recompute_granularity)
        job.model = cfg
    else:
        from megacpt.model.gpt_neox import GPTNeoX

        torch.manual_seed(job.train.seed)  # same init on every rank and every layout
        model = GPTNeoX(job.model)
        cfg = job.model
    model.to(rt.device)
    return model, cfg


def parallelize_model(model: torch.nn.Module, job: JobConfig, rt: Runtime) -> torch.nn.Module:
    """TP/PP/FSDP through the parallel module; plain DP needs no wrapper (gradients are all-reduced)."""
    if rt.mesh is not None:
        from megacpt.parallel import parallelize

        return parallelize(model, rt.mesh, job.parallel)
    return model


# ------------------------------------------------------------------------------------------------ data

def validate_data(job: JobConfig) -> None:
    """Paths exist and the datasets' tokenizer (sidecar) agrees with each other, the model and data.tokenizer."""
    from megacpt.data.indexed import data_paths, read_sidecar

    _, prefixes = job.data.weights_and_prefixes()
    named = [(f"data.blend[{p}]", p) for p in prefixes] + \
            [(f"data.eval_prefixes.{k}", p) for k, p in job.data.eval_prefixes.items()]
    identity, first = None, None
    expect = None
    if job.data.tokenizer:
        from megacpt.data.tokenizer import load_tokenizer

        expect = load_tokenizer(job.data.tokenizer).identity()
        identity, first = expect, "data.tokenizer"
    for name, prefix in named:
        for p in data_paths(prefix):
            if not p.exists():
                raise UserError(f"{name}: {p} does not exist")
        meta = read_sidecar(prefix)
        tok = (meta or {}).get("tokenizer")
        if not tok:
            log.warning("%s: %s has no tokenizer in its sidecar; vocab not checked", name, prefix)
            continue
        if tok.get("vocab_size") is not None and tok["vocab_size"] > job.model.vocab_size:
            raise UserError(f"{name}: tokenizer vocab_size {tok['vocab_size']} (from {prefix}.meta.json) "
                            f"> model.vocab_size {job.model.vocab_size}")
        if identity is None:
            identity, first = tok, name
        elif tok.get("sha256") != identity.get("sha256"):
            raise UserError(f"{name}: tokenizer {tok.get('path')} (sha256 {str(tok.get('sha256'))[:12]}) differs "
                            f"from {first}'s ({str(identity.get('sha256'))[:12]})")


class SampleSource:
    """Sample k of the run is ``dataset[k]`` (the dataset is already shuffled/blended). Micro-batch m of
    iteration i on DP rank r holds samples  i*G + m*(mb*dp) + r*mb + [0, mb)  (Megatron's sampler order)."""

    def __init__(self, dataset, micro_batch: int, dp_size: int, dp_rank: int):
        self.dataset, self.mb, self.dp, self.r = dataset, micro_batch, dp_size, dp_rank

    def micro_batch(self, consumed: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [mb, seq_length + 1] and doc_ids [mb, seq_length] (None without document masking)."""
        start = consumed + m * self.mb * self.dp + self.r * self.mb
        samples = [self.dataset[k] for k in range(start, start + self.mb)]
        tokens = torch.from_numpy(np.stack([np.asarray(x["tokens"], dtype=np.int64) for x in samples]))
        doc_ids = None
        if "doc_ids" in samples[0]:
            doc_ids = torch.from_numpy(np.stack([np.asarray(x["doc_ids"], dtype=np.int64)[:-1] for x in samples]))
            doc_ids = doc_ids.to(device)
        return tokens.to(device), doc_ids


# ------------------------------------------------------------------------------------------------ loss

_fused_warned = False


def loss_sum(model: torch.nn.Module, tokens: torch.Tensor, cfg: ModelConfig, fused: bool,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token NLL over a micro-batch ``tokens`` [b, s+1] (padded vocab rows excluded)."""
    global _fused_warned
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if fused:
        try:
            from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
        except ImportError:
            if not _fused_warned:
                log.warning("train.fused_loss: megacpt.kernels.fused_linear_cross_entropy is not available; "
                            "using logits + F.cross_entropy")
                _fused_warned = True
            fused = False
    if fused:
        h = model.hidden_states(inputs, doc_ids=doc_ids)  # [b, s, H]
        return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.embed_out.weight,
                                          targets.reshape(-1), reduction="sum", vocab_size=cfg.vocab_size)
    logits = model(inputs, doc_ids=doc_ids)[..., : cfg.vocab_size]  # [b, s, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _autocast(rt: Runtime):
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.autocast_dtype)


def _all_reduce(t: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _allreduce_grads(model: torch.nn.Module, rt: Runtime) -> None:
    """Sum gradients over data-parallel ranks, one flat bucket per dtype (plain DP without a wrapper)."""
    if rt.dp_size == 1 or rt.mesh is not None:  # parallelize() (FSDP/DDP) reduces its own gradients
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=rt.dp_group)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off: off + n].view_as(g))
        off += n


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of all gradients (DTensor-aware through clip_grad_norm_'s internals)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)


# ------------------------------------------------------------------------------------------ checkpoint

def checkpoint_extra(it: int, consumed: int, nan_total: int, nan_streak: int, sched: LRSchedule) -> dict:
    """Rank-independent resume state (the per-rank RNG goes to ``rank_extra``)."""
    return {"iteration": it, "consumed_samples": consumed, "skipped_steps": nan_total,
            "nan_streak": nan_streak, "lr_schedule": sched.state_dict()}


def rng_to_json(st: dict) -> dict:
    name, keys, pos, has_gauss, cached = st["numpy"]
    return {**st, "numpy": [name, torch.from_numpy(np.asarray(keys)), pos, has_gauss, cached]}


def rng_from_json(st: dict) -> dict:
    name, keys, pos, has_gauss, cached = st["numpy"]
    py = st["python"]
    return {**st, "numpy": (name, keys.numpy(), pos, has_gauss, cached),
            "python": (py[0], tuple(py[1]), py[2])}


def resume_dir(job: JobConfig) -> str | None:
    """Where to resume from: ``checkpoint.load`` (must hold a checkpoint), else ``checkpoint.save`` if it has one."""
    from megacpt.train.checkpoint import is_checkpoint

    if job.checkpoint.load:
        if not is_checkpoint(job.checkpoint.load):
            raise UserError(f"checkpoint.load: no complete checkpoint under {job.checkpoint.load}")
        return job.checkpoint.load
    if job.checkpoint.save and is_checkpoint(job.checkpoint.save):
        return job.checkpoint.save
    return None


# ------------------------------------------------------------------------------------------------ loop

class _StopFlag:
    """SIGTERM/SIGUSR1 (Slurm pre-emption) set a flag; the loop checks it between steps on every rank."""

    def __init__(self, enabled: bool):
        self.set = False
        self._old = {}
        if enabled:
            for s in (signal.SIGTERM, signal.SIGUSR1):
                with contextlib.suppress(ValueError):  # not the main thread
                    self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.set = True
        log.warning("received signal %d: will save a checkpoint after this step and exit", signum)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsLogger:
    """Console line + JSONL (+ TensorBoard if installed), rank 0 only."""

    def __init__(self, job: JobConfig, rt: Runtime):
        self.enabled = rt.is_main
        self.jsonl = None
        self.tb = None
        if not self.enabled:
            return
        path = job.logging.jsonl or (str(Path(job.checkpoint.save) / "metrics.jsonl") if job.checkpoint.save else None)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(path, "a", buffering=1)
        if job.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(job.logging.tensorboard_dir)
            except ImportError:
                log.warning("logging.tensorboard_dir: tensorboard is not installed; JSONL only")

    def write(self, rec: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        if console:
            log.info(console)
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "iteration" and v is not None:
                    self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["iteration"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


@torch.no_grad()
def evaluate(model, evals: dict, job: JobConfig, rt: Runtime, cfg: ModelConfig) -> dict[str, dict]:
    """Mean NLL and perplexity over the first ``eval_iters`` global batches of each held-out set.

    The samples are the same whatever the layout (a multiple of the global batch, split over DP ranks like
    training batches), so eval numbers compare across runs at different DP/TP/PP sizes.
    """
    out = {}
    t = job.train
    model.eval()
    for name, ds in evals.items():
        src = SampleSource(ds, t.micro_batch_size, rt.dp_size, rt.dp_rank)
        n_batches = min(job.logging.eval_iters, len(ds) // t.global_batch_size)
        if n_batches == 0:
            log.warning("eval %s: %d samples, fewer than one global batch (%d); skipped", name, len(ds),
                        t.global_batch_size)
            continue
        n_micro = t.global_batch_size // (t.micro_batch_size * rt.dp_size)
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        for i in range(n_batches):
            for m in range(n_micro):
                tokens, doc_ids = src.micro_batch(i * t.global_batch_size, m, rt.device)
                with _autocast(rt):
                    s = loss_sum(model, tokens, cfg, t.fused_loss, doc_ids)
                tot[0] += s.double()
                tot[1] += tokens[:, 1:].numel()
        _all_reduce(tot, rt)
        loss = (tot[0] / tot[1]).item()
        out[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tot[1].item())}
    model.train()
    return out


def train(job: JobConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or resume) a training job. ``job`` is validated here before any process-group work."""
    job.validate(world_size_from_env())
    if job.checkpoint.init_from is None:
        validate_data(job)
    rt = init_runtime(job)
    t, lg = job.train, job.logging
    seed_everything(t.seed)
    model, cfg = build_model(job, rt)
    if job.checkpoint.init_from is not None:
        job.validate(rt.world_size)
        validate_data(job)
    model = parallelize_model(model, job, rt)
    model.train()
    optimizer = build_optimizer(model, job.optimizer)
    sched = LRSchedule(job.optimizer, job.scheduler, t.train_iters)
    from megacpt.train.data import build_datasets

    train_ds, eval_ds = build_datasets(job)
    source = SampleSource(train_ds, t.micro_batch_size, rt.dp_size, rt.dp_rank)
    n_micro = t.global_batch_size // (t.micro_batch_size * rt.dp_size)
    tokens_per_iter = t.global_batch_size * job.data.seq_length

    it, consumed, nan_total, nan_streak = 0, 0, 0, 0
    root = resume_dir(job)
    if root is not None:
        from megacpt.train.checkpoint import load_checkpoint

        ck = load_checkpoint(root, model, optimizer)
        extra = ck.extra
        it, consumed = int(extra["iteration"]), int(extra["consumed_samples"])
        nan_total, nan_streak = int(extra.get("skipped_steps", 0)), int(extra.get("nan_streak", 0))
        for d in sched.differences(extra.get("lr_schedule", {})):
            log.warning("LR schedule changed since the checkpoint (%s); the config is used", d)
        if ck.rank_extra is not None:
            set_rng_state(rng_from_json(ck.rank_extra["rng"]))
        else:  # a rank that did not exist in the saved layout: a distinct, reproducible stream
            seed_everything(t.seed + 1000 * rt.rank + it)
        log.info("resumed from %s at iteration %d (%d samples consumed)", ck.path, it, consumed)
    ckpt = None
    if job.checkpoint.save:
        from megacpt.train.checkpoint import CheckpointManager

        ckpt = CheckpointManager(job.checkpoint.save, keep_last=job.checkpoint.keep_last,
                                 async_save=job.checkpoint.async_save)

    logger = MetricsLogger(job, rt)
    stop = _StopFlag(t.exit_signal_save)
    peak = peak_flops(torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
                      "bf16" if rt.autocast_dtype is not None else "fp32", t.peak_flops)
    meter = Throughput(flops_per_token(cfg, job.data.seq_length), rt.world_size, peak)
    result = TrainResult(iteration=it, skipped_steps=nan_total)
    if rt.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("training %s params, %d iterations from %d, global batch %d x %d tokens, %d micro-batches/rank, "
                 "dp=%d tp=%d pp=%d, %s", f"{n_params:,}", t.train_iters, it, t.global_batch_size,
                 job.data.seq_length, n_micro, rt.dp_size, job.parallel.tensor_model_parallel_size,
                 job.parallel.pipeline_model_parallel_size,
                 "bf16 autocast" if rt.autocast_dtype is not None else "fp32")
    window_loss, window_n = 0.0, 0
    try:
        while it < t.train_iters:
            lr = sched.apply(optimizer, it + 1)
            optimizer.zero_grad(set_to_none=True)
            local = torch.zeros((), dtype=torch.float64, device=rt.device)
            for m in range(n_micro):
                tokens, doc_ids = source.micro_batch(consumed, m, rt.device)
                with _autocast(rt):
                    s = micro_loss(model, tokens, cfg, t.fused_loss, it, doc_ids)
                (s / tokens_per_iter).backward()
                local += s.detach().double()
            _allreduce_grads(model, rt)
            loss = (_all_reduce(local, rt) / tokens_per_iter).item()
            gnorm = grad_norm(model)
            finite = math.isfinite(loss) and bool(torch.isfinite(gnorm))
            if finite:
                if job.optimizer.clip_grad > 0:
                    torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), job.optimizer.clip_grad, gnorm)
                optimizer.step()
                nan_streak = 0
                result.losses[it + 1] = loss
                window_loss, window_n = window_loss + loss, window_n + 1
            else:
                nan_total, nan_streak = nan_total + 1, nan_streak + 1
                log.warning("iteration %d: non-finite loss/grad norm (loss=%s, grad_norm=%s); step skipped "
                            "(%d in a row, %d total)", it + 1, loss, gnorm.item(), nan_streak, nan_total)
                if nan_streak >= t.max_consecutive_nan_skips:
                    raise TrainingDiverged(
                        f"train.max_consecutive_nan_skips: {nan_streak} non-finite steps in a row at iteration "
                        f"{it + 1} (lr={lr:.3g}); stopping. Lower optimizer.lr or check the data; the last "
                        f"checkpoint is untouched")
            it += 1
            consumed += t.global_batch_size
            meter.add(tokens_per_iter)
            if on_step is not None:
                on_step(it, loss)
            if it % lg.log_interval == 0 or it == t.train_iters:
                perf = meter.report()
                rec = {"kind": "train", "iteration": it, "consumed_samples": consumed,
                       "loss": (window_loss / window_n) if window_n else None, "lr": lr,
                       "grad_norm": gnorm.item(), "skipped_steps": nan_total, **perf, **memory_stats(rt.device)}
                mfu = f" | MFU {100 * perf['mfu']:.1f}%" if perf["mfu"] is not None else ""
                loss_txt = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
                logger.write(rec, f"iter {it}/{t.train_iters} | loss {loss_txt} "
                                  f"| lr {lr:.3e} | grad_norm {gnorm.item():.3f} | {perf['tokens_per_s']:,.0f} tok/s "
                                  f"| {perf['tflops_per_device']:.3g} TFLOP/s/dev{mfu} | skipped {nan_total}")
                window_loss, window_n = 0.0, 0
            if evals_due(it, job) and eval_ds:
                result.eval = evaluate(model, eval_ds, job, rt, cfg)
                for name, r in result.eval.items():
                    logger.write({"kind": f"eval/{name}", "iteration": it, **r},
                                 f"eval {name} @ {it}: loss {r['loss']:.4f} ppl {r['ppl']:.2f}")
            want_stop = torch.tensor(float(stop.set), device=rt.device)
            _all_reduce(want_stop, rt, dist.ReduceOp.MAX if rt.world_size > 1 else None)
            periodic = job.checkpoint.save_interval and it % job.checkpoint.save_interval == 0
            if ckpt is not None and (periodic or it == t.train_iters or want_stop.item() > 0):
                result.checkpoint = str(ckpt.save(
                    it, model, optimizer, extra=checkpoint_extra(it, consumed, nan_total, nan_streak, sched),
                    rank_extra={"rng": rng_to_json(rng_state())}, model_config=cfg,
                    tokenizer=job.data.tokenizer, run_config=job.to_dict()))
            if want_stop.item() > 0:
                result.stop_reason = "signal"
                log.warning("stopping at iteration %d after a termination signal%s", it,
                            f"; checkpoint {result.checkpoint}" if job.checkpoint.save else " (no checkpoint.save)")
                break
        result.iteration, result.skipped_steps = it, nan_total
        if result.stop_reason == "done" and job.checkpoint.export_hf:
            export_hf(model, cfg, job, rt)
    finally:
        if ckpt is not None:
            ckpt.close()
        stop.restore()
        logger.close()
        if rt.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
    return result


def micro_loss(model, tokens, cfg, fused, iteration, doc_ids=None):  # tests inject non-finite losses here
    return loss_sum(model, tokens, cfg, fused, doc_ids)


def evals_due(it: int, job: JobConfig) -> bool:
    iv = job.logging.eval_interval
    return (iv > 0 and it % iv == 0) or it == job.train.train_iters


def export_hf(model, cfg: ModelConfig, job: JobConfig, rt: Runtime) -> None:
    """Final model -> HF GPT-NeoX dir through the convert library (full weights gathered on rank 0)."""
    from megacpt.convert import export_hf as _export

    _export(model, cfg, job.checkpoint.export_hf, tokenizer=job.data.tokenizer)
    log.info("exported the final model to %s", job.checkpoint.export_hf)
