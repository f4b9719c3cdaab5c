"""Fused output projection + cross-entropy: per-token NLL from hidden states, never the [N, V] logits.

    nll[n] = logsumexp_v(h[n] . W[v] + b[v]) - (h[n] . W[t[n]] + b[t[n]])      for v < vocab_size

Layout of this file (Liger-Kernel structure, one op per file):
  1. ``_flce_fwd_kernel``   Triton: a program owns BLOCK_N tokens x one slice of the vocab tiles and runs
                             an online log-sum-exp over BLOCK_V-wide tiles (fp32 accumulators), so the
                             logits exist only one [BLOCK_N, BLOCK_V] tile at a time in registers.
  2. ``_triton_lse_target`` launcher: grid (token blocks, vocab splits); partial (lse, target logit) per
                             split are merged in torch (a [N, splits] tensor: tiny).
  3. ``_torch_lse_target``  pure-torch chunked reference / CPU path: token chunks of ``chunk_size`` rows,
                             fp32 matmul into one reused [chunk, V] buffer, in-place max/exp/sum
                             (or a ``torch.compile``d two-pass log-sum-exp with ``compile_lse``);
                             16-bit weights on CPU: ``_cpu16_lse_target``, vocab blocks of a chunk in
                             reused cache-sized buffers folded into an online log-sum-exp.
  4. ``FusedLinearCrossEntropyFunction`` autograd: forward = (2) or (3); backward per token chunk,
                             from the saved lse: ``dlogits = (softmax - onehot) * grad``, then
                             ``dh = dlogits @ W``, ``dW += dlogits^T @ h`` (and ``db``). Memory
                             O(chunk x V), never O(N x V). Triton (``_flce_bwd_kernel`` +
                             ``_triton_backward``): the kernel recomputes each logits tile in fp32
                             registers and writes only the finished dlogits tile, in the matmul dtype;
                             cuBLAS does the two gradient GEMMs, accumulating dW in fp32. Torch
                             (``_torch_backward``, the reference): fp32 [chunk, V] logits from cuBLAS,
                             softmax/onehot/scale as in-place passes. The matmuls take bf16/fp16
                             inputs on GPU (tensor cores) and fp32 elsewhere.
  5. ``fused_linear_cross_entropy`` functional API and ``FusedLinearCrossEntropy`` module.

Vocab parallel (``process_group``): each rank holds rows [r*V/tp, (r+1)*V/tp) of W (and b); targets are
global ids. Ranks compute a local (lse, target logit), then all-reduce MAX of lse, SUM of exp(lse - max)
and SUM of the target logit (0 off-shard) -> the exact unsharded NLL. Backward: each rank's dW/db is its
shard of the unsharded gradient; dh is all-reduced (SUM) since h is replicated over the group, so the
returned dh equals the unsharded one (like Megatron's copy-to-TP-region backward).

Padded vocab rows (index >= ``vocab_size``, Megatron pads V to a multiple of 128*tp) are excluded from the
softmax and get zero gradient. Targets must be in [0, vocab_size) or equal ``ignore_index`` (NLL 0, no
gradient, not counted in the mean).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.distributed as dist

# Triton is optional (the torch path covers CPU and machines without it) and this module imports it on first
# use of the Triton path only (~0.2 s and ~75 MB of shared-library pages; torch._dynamo, which some torch
# paths import, may still load it)
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton = tl = _logits_tile = None  # set by _triton_kernel()

__all__ = ["fused_linear_cross_entropy", "FusedLinearCrossEntropy", "FusedLinearCrossEntropyFunction",
           "reference_cross_entropy", "HAS_TRITON"]

_REDUCTIONS = ("none", "mean", "sum")
_IMPLS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ----------------------------------------------------------------------------------------------------
_KERNEL: list = []  # [(forward kernel, backward kernel)] once defined


def _triton_kernel(which: str = "fwd"):
    """Import triton and define the kernels on first use (module globals ``triton``/``tl``, which the JIT
    resolves names from); ``which``: "fwd" or "bwd"."""
    if not _KERNEL:
        global triton, tl, _logits_tile  # the JIT resolves names in this module's globals
        import triton
        import triton.language as tl

        @triton.jit
        def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
            """h[rows] @ W[cols]^T, fp32 accumulation over H in BLOCK_H steps (both kernels' GEMM)."""
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k in range(0, H, BLOCK_H):
                ks = k + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)            # [BLOCK_N, BLOCK_H]
                w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None],
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)            # [BLOCK_H, BLOCK_V]
                if UPCAST:  # Triton 3.9's CPU interpreter computes bf16 tl.dot wrongly; fp32 is exact
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE:  # fp32 inputs: no TF32 rounding, so fp32 results match torch's fp32 matmul
                    acc = tl.dot(h, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(h, w, acc)
            return acc

        @triton.jit
        def _flce_fwd_kernel(
            h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, tgt_ptr,
            N, H, V_valid, v_offset, ignore_index,
            stride_hn, stride_wv, n_tiles, tiles_per_split, n_splits,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        ):
            pid_n = tl.program_id(0)
            pid_s = tl.program_id(1)
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
            # target column inside this shard's [0, V_valid); -1 (never a column) for ignored rows
            local_tgt = tl.where(tgt == ignore_index, -1, tgt - v_offset)

            m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max          [BLOCK_N]
            s = tl.zeros([BLOCK_N], tl.float32)                 # running sum of exp  [BLOCK_N]
            t_logit = tl.zeros([BLOCK_N], tl.float32)           # target logit (0 when off this slice)

            tile_lo = pid_s * tiles_per_split
            tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
            for vt in range(tile_lo, tile_hi):
                cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
                col_ok = cols < V_valid
                acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                                   IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)  # [BLOCK_N, BLOCK_V] fp32
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                acc = tl.where(col_ok[None, :], acc, float("-inf"))
                m_new = tl.maximum(m, tl.max(acc, axis=1))  # finite: every tile has >= 1 valid column
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
                m = m_new
                t_logit += tl.sum(tl.where(cols[None, :] == local_tgt[:, None], acc, 0.0), axis=1)

            lse = m + tl.log(s)  # -inf for a split without tiles (s = 0)
            out = rows * n_splits + pid_s
            tl.store(lse_ptr + out, lse, mask=row_ok)
            tl.store(tgt_ptr + out, t_logit, mask=row_ok)

        @triton.jit
        def _flce_bwd_kernel(
            h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dl_ptr,
            N, H, V_valid, V_rows, v_offset, ignore_index,
            stride_hn, stride_wv, stride_dn,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        ):
            # one [BLOCK_N, BLOCK_V] tile of dlogits = (softmax - onehot(target)) * grad, the logits
            # recomputed in fp32 from h and W and normalised by the saved (global) log-sum-exp
            pid_n = tl.program_id(0)
            pid_v = tl.program_id(1)
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V_valid      # real vocab rows of this shard
            col_in = cols < V_rows       # rows of W (padded ones get dlogits 0)
            acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_in, H, stride_hn, stride_wv,
                               IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)      # [BLOCK_N, BLOCK_V] fp32
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
            g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
            g = tl.where(tgt == ignore_index, 0.0, g)                   # ignored rows: no gradient
            local_tgt = tl.where(tgt == ignore_index, -1, tgt - v_offset)
            p = tl.where(col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
            p = p - tl.where((cols[None, :] == local_tgt[:, None]) & col_ok[None, :], 1.0, 0.0)
            p = p * g[:, None]
            tl.store(dl_ptr + rows[:, None] * stride_dn + cols[None, :], p.to(dl_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_in[None, :])

        _KERNEL.append((_flce_fwd_kernel, _flce_bwd_kernel))
    return _KERNEL[0][0 if which == "fwd" else 1]

# ----------------------------------------------------------------------------------------------------
# 2. launcher
# ----------------------------------------------------------------------------------------------------
def _triton_config(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, target #programs). The interpreter gets tiny tiles.

    Each row block streams all of W once, so W traffic is (N / BLOCK_N) * V * H; programs of one vocab
    split run side by side and share W tiles through L2. fp32 (IEEE dot, no tensor-core TF32) uses
    smaller tiles for register pressure. ``MEGACPT_FLCE_TRITON_CONFIG``
    ("BN,BV,BH,warps,stages,programs_per_sm") overrides it; ``benchmarks/kernel_tune.py`` sweeps it.
    """
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU: correctness only, keep tiles small
        return 16, 32, 16, 1, 1, 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    env = os.environ.get("MEGACPT_FLCE_TRITON_CONFIG")
    if env:
        bn, bv, bh, warps, stages, per_sm = (int(x) for x in env.split(","))
        return bn, bv, bh, warps, stages, per_sm * sms
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2, 4 * sms
    # H100, bf16, N=16k, V=50k (benchmarks/kernel_tune.py, 2026-11-26): 490-510 TFLOP/s at H=2048/4096,
    # against 294-300 for (128, 128, 64, 8, 3) and 211-369 for the other shapes tried
    return 128, 256, 64, 8, 3, 2 * sms


def _triton_lse_target(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                       v_valid: int, v_offset: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (lse [N], target logit [N]) in fp32 over rows [0, v_valid) of w."""
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package")
    kernel = _triton_kernel()
    n, hdim = h.shape
    h = h.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    b = None if b is None else b.contiguous()
    block_n, block_v, block_h, warps, stages, target_programs = _triton_config(h.device, h.dtype)
    n_tiles = triton.cdiv(max(v_valid, 0), block_v)
    row_blocks = triton.cdiv(n, block_n)
    # split the vocab loop over programs when there are too few token blocks to fill the GPU
    n_splits = max(1, min(n_tiles, triton.cdiv(target_programs, max(row_blocks, 1))))
    tiles_per_split = triton.cdiv(n_tiles, n_splits) if n_tiles else 0
    n_splits = triton.cdiv(n_tiles, tiles_per_split) if n_tiles else 1
    lse = torch.empty(n, n_splits, device=h.device, dtype=torch.float32)
    tgt = torch.empty(n, n_splits, device=h.device, dtype=torch.float32)
    if n:
        kernel[(row_blocks, n_splits)](
            h, w, b if b is not None else h, t.contiguous(), lse, tgt,
            n, hdim, v_valid, v_offset, ignore_index,
            h.stride(0), w.stride(0), n_tiles, tiles_per_split, n_splits,
            HAS_BIAS=b is not None, IEEE=h.dtype == torch.float32, UPCAST=h.device.type != "cuda",
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps, num_stages=stages,
        )
    if n_splits == 1:
        return lse[:, 0], tgt[:, 0]
    return _merge_lse(lse, dim=1), tgt.sum(1)


def _triton_bwd_config(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of the dlogits kernel: the forward's tile (the
    same GEMM, no online reduction); ``MEGACPT_FLCE_TRITON_BWD_CONFIG`` ("BN,BV,BH,warps,stages")
    overrides it (``benchmarks/kernel_tune.py --backward`` sweeps it)."""
    if device.type != "cuda":
        return 16, 32, 16, 1, 1
    env = os.environ.get("MEGACPT_FLCE_TRITON_BWD_CONFIG")
    if env:
        bn, bv, bh, warps, stages = (int(x) for x in env.split(","))
        return bn, bv, bh, warps, stages
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 128, 256, 64, 8, 3


def _triton_dlogits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                    lse: torch.Tensor, g: torch.Tensor, v_valid: int, v_offset: int, ignore_index: int,
                    out: torch.Tensor) -> torch.Tensor:
    """dlogits [n, V_rows] of a token chunk into ``out`` (the compute dtype: 16-bit on GPU, else fp32)."""
    kernel = _triton_kernel("bwd")
    n, hdim = h.shape
    bn, bv, bh, warps, stages = _triton_bwd_config(h.device, h.dtype)
    if n:
        kernel[(triton.cdiv(n, bn), triton.cdiv(w.shape[0], bv))](
            h, w, b if b is not None else h, t, lse, g, out,
            n, hdim, v_valid, w.shape[0], v_offset, ignore_index,
            h.stride(0), w.stride(0), out.stride(0),
            HAS_BIAS=b is not None, IEEE=h.dtype == torch.float32, UPCAST=h.device.type != "cuda",
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages,
        )
    return out


_ADDMM_OUT_DTYPE: list = []  # [True/False] once probed: does torch.addmm take out_dtype=float32 here?


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc`` and 16-bit CUDA ``a``/``b``: cuBLAS accumulates into the fp32
    buffer itself (beta = 1) where torch has ``addmm(out_dtype=)``, else one fp32 product and an add."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, out=acc)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE != [False]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            if not _ADDMM_OUT_DTYPE:
                _ADDMM_OUT_DTYPE.append(True)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[:] = [False]
    acc += _mm_fp32(a, b)


def _triton_backward(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                     lse: torch.Tensor, grad_nll: torch.Tensor, v_valid: int, v_offset: int,
                     ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool, chunk_size: int,
                     compute_dtype: Optional[torch.dtype] = None):
    """The backward with the dlogits tiles made by the Triton kernel, a token chunk at a time.

    Per chunk of ``chunk_size`` tokens: the kernel recomputes the fp32 logits tile by tile (tl.dot, fp32
    accumulation), turns them into ``(exp(logit - lse) - onehot) * grad`` and writes them once, in the
    compute dtype (bf16/fp16 on GPU, as the torch path's matmul inputs; fp32 elsewhere), into a reused
    [chunk, V] buffer; cuBLAS then adds ``dlogits @ W`` into dh and ``dlogits^T @ h`` into the fp32 dW
    (and the column sums into db). No fp32 [chunk, V] logits, no elementwise passes over them, no
    [N, V] buffer. Same arguments and results as ``_torch_backward`` (its reference).
    """
    n, hdim = h.shape
    cdt = compute_dtype or _backward_compute_dtype(w)
    dh = torch.zeros(n, hdim, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_db else None
    if n == 0 or v_valid <= 0:
        return dh, dw, db
    hc_all = h.to(cdt).contiguous()
    wc = w.to(cdt)
    wc = wc if wc.stride(1) == 1 else wc.contiguous()
    bc = None if b is None else b.contiguous()
    tc = t.contiguous()
    g = grad_nll.float().contiguous()  # the kernel zeroes ignored rows
    lse = lse.float().contiguous()
    c = max(1, min(chunk_size, n))
    buf = torch.empty(c, w.shape[0], dtype=cdt, device=h.device)
    for s in range(0, n, c):
        e = min(s + c, n)
        hc = hc_all[s:e]
        dl = _triton_dlogits(hc, wc, bc, tc[s:e], lse[s:e], g[s:e], v_valid, v_offset, ignore_index,
                             buf[: e - s])                                   # [c, V] compute dtype
        if db is not None:
            db += dl.float().sum(0)
        if dh is not None:
            if cdt == torch.float32:
                torch.mm(dl, wc, out=dh[s:e])
            else:
                dh[s:e] = _mm_fp32(dl, wc)
        if dw is not None:
            _addmm_fp32_(dw, dl.t(), hc)
    return dh, dw, db


def _merge_lse(lse: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(lse))) along ``dim``, where -inf entries (empty partitions) contribute nothing."""
    m = lse.amax(dim, keepdim=True)
    return ((lse - m).exp().sum(dim, keepdim=True).log() + m).squeeze(dim)


# ----------------------------------------------------------------------------------------------------
# 3. pure-torch chunked path (CPU, reference)
# ----------------------------------------------------------------------------------------------------
# backward="auto": the chunked torch backward (measured on an H100, 2026-11) until the Triton backward has
# been timed on a GPU against it and Liger (benchmarks/gpu_checks.sh, issue 18); then "triton" here.
# MEGACPT_FLCE_BACKWARD=triton selects it for whole runs meanwhile.
DEFAULT_BACKWARD = os.environ.get("MEGACPT_FLCE_BACKWARD", "torch")
DEFAULT_CHUNK = int(os.environ.get("MEGACPT_FLCE_CHUNK", "1024"))  # tokens per [chunk, V] fp32 buffer
# GPU: bigger chunks keep the backward's three matmuls per chunk large (measured on an H100, bf16,
# Pythia-6.9B output layer: fwd+bwd 76 ms at 1024 vs 58 ms at 4096); [4096, 50k] fp32 is 0.8 GB
DEFAULT_GPU_CHUNK = int(os.environ.get("MEGACPT_FLCE_GPU_CHUNK", "4096"))


def _resolve_chunk(chunk_size: Optional[int], device: torch.device) -> int:
    if chunk_size is None:
        return DEFAULT_GPU_CHUNK if device.type == "cuda" else DEFAULT_CHUNK
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _as_fp32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.float()  # no copy for fp32 tensors


_MM_OUT_DTYPE: list = []  # [True/False] once probed: does torch.mm take out_dtype=float32 here?


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` of 16-bit CUDA inputs: fp32 accumulation AND fp32 output (no bf16 rounding of the
    logits) where torch.mm has ``out_dtype`` (torch >= 2.8), else the 16-bit product upcast. CPU torch has
    no such mm (only the bf16-backward tests get here on CPU): upcast, and leave the CUDA probe alone."""
    if not a.is_cuda:
        return torch.mm(a, b).float()
    if _MM_OUT_DTYPE != [False]:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            if not _MM_OUT_DTYPE:
                _MM_OUT_DTYPE.append(True)
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[:] = [False]
    return torch.mm(a, b).float()


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b32: Optional[torch.Tensor],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits [c, V] of one token chunk. ``w`` is fp32 (then ``h`` is upcast and the result is
    written into ``out`` when given: no fresh allocation) or 16-bit on a GPU: 16-bit inputs, fp32
    accumulation and fp32 logits (``out_dtype``). 16-bit weights on CPU take ``_cpu16_lse_target``."""
    if w.dtype != torch.float32:  # 16-bit W: 16-bit inputs, fp32 accumulation
        logits = _mm_fp32(h.to(w.dtype), w.t())
        return logits if b32 is None else logits.add_(b32)
    h32 = h.float()
    if b32 is None:
        return torch.mm(h32, w.t(), out=out) if out is not None else torch.mm(h32, w.t())
    if out is not None:
        return torch.addmm(b32, h32, w.t(), out=out)
    return torch.addmm(b32, h32, w.t())


def _row_lse_inplace(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 of fp32 [c, V], overwriting ``x`` (max, sub+exp, sum: no 2nd buffer)."""
    m = x.amax(1, keepdim=True)                                            # [c, 1]
    x.sub_(m).exp_()
    return x.sum(1).log_().add_(m.squeeze(1))


def _row_lse_fused(x: torch.Tensor) -> torch.Tensor:
    """The same, for torch.compile: Inductor fuses it into two read-only passes over ``x``."""
    m = x.amax(1, keepdim=True)
    return (x - m).exp().sum(1).log() + m.squeeze(1)


class _CompiledOrEager:
    """``fused`` through ``torch.compile`` when asked (built once per process), else ``eager``; if compiling
    or running the compiled function fails here (no C++ compiler ...), one warning and eager from then on
    (``fused`` never writes its inputs, so eager can always redo the call)."""

    def __init__(self, fused, eager):
        self.fused, self.eager, self.compiled = fused, eager, None  # compiled: None = not built, False = failed

    def __call__(self, use_compiled: bool, *args):
        if not use_compiled or self.compiled is False:
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fused, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any Inductor/compiler failure: eager is always correct
            import warnings

            warnings.warn(f"fused_linear_cross_entropy: torch.compile of the log-sum-exp failed ({e}); "
                          "using the eager path", RuntimeWarning)
            self.compiled = False
            return self.eager(*args)


_ROW_LSE = _CompiledOrEager(_row_lse_fused, _row_lse_inplace)


def _torch_lse_target(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                      v_valid: int, v_offset: int, ignore_index: int,
                      chunk_size: int = DEFAULT_CHUNK, compile_lse: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (lse [N], target logit [N]) in fp32, ``chunk_size`` tokens at a time.

    ``compile_lse``: the row log-sum-exp through ``torch.compile`` (CPU: ~40% less time than the
    in-place eager version on [1024, 50k] blocks, one compile of ~5-20 s per process); falls back to
    eager with a warning if compilation fails.
    """
    n = h.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=h.device)
    if n == 0 or v_valid <= 0:
        return lse, tgt
    # every row of W, padded ones masked to -inf below: a GEMM over an odd row count (50,277) falls on
    # slow unaligned cuBLAS kernels (3x slower on an H100). 16-bit inputs stay 16-bit: tensor cores / AVX512-BF16
    # with fp32 accumulation (see _chunk_logits for the logits' precision on GPU and CPU)
    wc = w if w.dtype in (torch.bfloat16, torch.float16) else _as_fp32(w)
    b32 = _as_fp32(b)
    v_rows = w.shape[0]
    local = t - v_offset
    on_shard = (t != ignore_index) & (local >= 0) & (local < v_valid)
    local = torch.where(on_shard, local, torch.zeros_like(local))
    c = max(1, min(chunk_size, n))
    if wc.dtype != torch.float32 and not wc.is_cuda:
        _cpu16_lse_target(h, wc, b32, local, v_valid, c, compile_lse, lse, tgt)
        tgt.masked_fill_(~on_shard, 0.0)
        return lse, tgt
    # fp32 weights: one fp32 [chunk, V] buffer reused by every chunk (16-bit: a fresh fp32 result per chunk)
    buf = None if wc.dtype != torch.float32 else torch.empty(c, v_rows, dtype=torch.float32, device=h.device)
    for s in range(0, n, c):
        e = min(s + c, n)
        logits = _chunk_logits(h[s:e], wc, b32, out=None if buf is None else buf[: e - s])  # [c, V] fp32
        if v_valid < v_rows:
            logits[:, v_valid:] = float("-inf")                            # padded rows: no probability
        tgt[s:e] = logits.gather(1, local[s:e, None]).squeeze(1)
        lse[s:e] = _ROW_LSE(compile_lse, logits)
    tgt.masked_fill_(~on_shard, 0.0)
    return lse, tgt


CPU16_VOCAB_BLOCK = int(os.environ.get("MEGACPT_FLCE_CPU16_VOCAB_BLOCK", "8192"))


def _block_max_sumexp(x: torch.Tensor, b32: Optional[torch.Tensor], x32: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit logits block [c, vb] (+ fp32 bias [vb]) -> fp32 (row max [c], row sum of exp(x - max) [c]).
    Eager: upcast into the reused fp32 buffer ``x32``, then in-place sub/exp (it is overwritten)."""
    x32.copy_(x)
    if b32 is not None:
        x32.add_(b32)
    m = x32.amax(1)
    return m, x32.sub_(m[:, None]).exp_().sum(1)


def _block_max_sumexp_fused(x: torch.Tensor, b32: Optional[torch.Tensor], x32: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for torch.compile: two read-only passes over the 16-bit block, fp32 math, no buffer."""
    xf = x.float() if b32 is None else x.float() + b32
    m = xf.amax(1)
    return m, (xf - m[:, None]).exp().sum(1)


_BLOCK_MAX_SUMEXP = _CompiledOrEager(_block_max_sumexp_fused, _block_max_sumexp)


def _cpu16_lse_target(h: torch.Tensor, w16: torch.Tensor, b32: Optional[torch.Tensor], local: torch.Tensor,
                      v_valid: int, c: int, compile_lse: bool, lse: torch.Tensor, tgt: torch.Tensor) -> None:
    """16-bit weights on CPU: fills ``lse`` / ``tgt`` (off-shard rows are masked by the caller).

    Each [c, V] chunk of logits is computed CPU16_VOCAB_BLOCK columns at a time into one reused 16-bit
    buffer (16-bit GEMM, fp32 accumulation: AVX512-BF16/AMX; the logits are rounded to 16 bits once, as
    in an HF bf16 forward), upcast into one reused fp32 buffer and folded into an online log-sum-exp
    (running row max and rescaled sum, all fp32). Block buffers of a few MB stay in the last-level cache,
    so the softmax passes never stream [c, V] arrays through memory: measured 0.80 s vs 1.13 s for the
    whole-row version (4,096 tokens, H 512, V 50,304, bf16, 2-core AVX512-BF16 EPYC).
    """
    n = h.shape[0]
    vb = max(1, min(CPU16_VOCAB_BLOCK, w16.shape[0]))
    x16 = torch.empty(c, vb, dtype=w16.dtype)
    x32 = torch.empty(c, vb, dtype=torch.float32)
    for s in range(0, n, c):
        e = min(s + c, n)
        hc = h[s:e].to(w16.dtype)
        lc = local[s:e]
        m = torch.full((e - s,), float("-inf"))
        acc = torch.zeros(e - s)
        tg = torch.zeros(e - s)
        for a in range(0, v_valid, vb):  # blocks past the valid rows are all padding: skipped
            b = min(a + vb, w16.shape[0])
            x = x16[: e - s, : b - a]
            torch.mm(hc, w16[a:b].t(), out=x)
            if b > v_valid:
                x[:, v_valid - a:] = float("-inf")                         # padded rows: no probability
            bb = None if b32 is None else b32[a:b]
            inb = (lc >= a) & (lc < b)
            j = (lc - a).clamp_(0, b - a - 1)
            g = x.gather(1, j[:, None]).squeeze(1).float()                  # the target's 16-bit logit
            tg = torch.where(inb, g if bb is None else g + bb[j], tg)
            mb, sb = _BLOCK_MAX_SUMEXP(compile_lse, x, bb, x32[: e - s, : b - a])
            mn = torch.maximum(m, mb)
            acc = acc * (m - mn).exp() + sb * (mb - mn).exp()
            m = mn
        lse[s:e] = acc.log() + m
        tgt[s:e] = tg


def _backward_compute_dtype(w: torch.Tensor) -> torch.dtype:
    """Backward matmuls run in bf16/fp16 on GPUs (tensor cores, fp32 accumulation; Liger does the same);
    everywhere else, and for fp32 inputs, in fp32."""
    return w.dtype if (w.is_cuda and w.dtype in (torch.bfloat16, torch.float16)) else torch.float32


def _torch_backward(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor,
                    lse: torch.Tensor, grad_nll: torch.Tensor, v_valid: int, v_offset: int,
                    ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool,
                    chunk_size: int = DEFAULT_CHUNK, compute_dtype: Optional[torch.dtype] = None):
    """Chunked recompute: dlogits = (exp(logits - lse) - onehot(t)) * grad_nll, per token chunk.

    Softmax and dlogits are fp32; dh, dW, db accumulate in fp32. With a 16-bit ``compute_dtype`` the
    logits recompute and the two grad matmuls take 16-bit inputs (their products are added in fp32).
    """
    n, hdim = h.shape
    cdt = compute_dtype or _backward_compute_dtype(w)
    dh = torch.zeros(n, hdim, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_db else None
    if n == 0 or v_valid <= 0:
        return dh, dw, db
    wc = w.to(cdt)  # [V, H] all rows (aligned GEMMs, see _torch_lse_target); padded columns masked
    b32 = _as_fp32(b)
    v_rows = w.shape[0]
    local = t - v_offset
    on_shard = (t != ignore_index) & (local >= 0) & (local < v_valid)
    g = torch.where(t == ignore_index, torch.zeros_like(grad_nll), grad_nll).float()  # [N]
    c = max(1, min(chunk_size, n))
    buf = torch.empty(c, v_rows, dtype=torch.float32, device=h.device) if cdt == torch.float32 else None
    for s in range(0, n, c):
        e = min(s + c, n)
        hc = h[s:e].to(cdt)                                                     # [c, H]
        p = _chunk_logits(hc, wc, b32, out=None if buf is None else buf[: e - s])  # [c, V] fp32
        if v_valid < v_rows:
            p[:, v_valid:] = float("-inf")                                     # padded: softmax 0
        p.sub_(lse[s:e, None]).exp_()                                          # softmax [c, V]
        rows = torch.nonzero(on_shard[s:e]).squeeze(1)
        p[rows, local[s:e][rows]] -= 1.0
        p.mul_(g[s:e, None])                                                    # dlogits [c, V] fp32
        if db is not None:
            db += p.sum(0)
        if cdt == torch.float32:
            if dh is not None:
                dh[s:e] = p @ wc
            if dw is not None:
                dw.addmm_(p.t(), hc)
        else:
            p16 = p.to(cdt)
            if dh is not None:
                dh[s:e] = p16 @ wc
            if dw is not None:
                dw += p16.t() @ hc
    return dh, dw, db


# ----------------------------------------------------------------------------------------------------
# 4. autograd function
# ----------------------------------------------------------------------------------------------------
def _shard_range(v_local: int, vocab_size: Optional[int], group) -> tuple[int, int]:
    """(v_offset, number of valid rows of this rank's shard)."""
    rank = dist.get_rank(group) if group is not None else 0
    offset = rank * v_local
    total = vocab_size if vocab_size is not None else v_local * (dist.get_world_size(group) if group else 1)
    return offset, max(0, min(v_local, total - offset))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """nll [N] (fp32) = CE(h @ W^T + b, t); see the module docstring for sharding and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, vocab_size, impl, group, chunk_size,
                compile_lse=False, backward_impl=None):
        v_offset, v_valid = _shard_range(weight.shape[0], vocab_size, group)
        if impl == "triton":
            lse, tgt = _triton_lse_target(hidden, weight, bias, targets, v_valid, v_offset, ignore_index)
        else:
            lse, tgt = _torch_lse_target(hidden, weight, bias, targets, v_valid, v_offset, ignore_index,
                                         chunk_size, compile_lse)
        if group is not None and dist.get_world_size(group) > 1:
            m = lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)              # global max of lse
            se = (lse - m).exp()
            dist.all_reduce(se, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)            # only one rank had it
            lse = se.log() + m
        ignored = targets == ignore_index
        nll = (lse - tgt).masked_fill(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.cfg = (ignore_index, v_offset, v_valid, group, chunk_size, backward_impl or impl)
        ctx.mark_non_differentiable(lse)
        return nll, lse

    @staticmethod
    def backward(ctx, grad_nll, _grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, v_offset, v_valid, group, chunk_size, bwd = ctx.cfg
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        backward = _triton_backward if bwd == "triton" else _torch_backward
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = backward(hidden, weight, bias, targets, lse, grad_nll, v_valid, v_offset,
                                  ignore_index, need_dh, need_dw, need_db, chunk_size)
        if dh is not None and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)  # h is replicated over the TP group
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# 5. functional API and module
# ----------------------------------------------------------------------------------------------------
def _pick_impl(impl: str, device: torch.device) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not installed")
    return impl


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                               reduction: str = "none", impl: str = "auto", vocab_size: Optional[int] = None,
                               process_group=None, chunk_size: Optional[int] = None,
                               return_lse: bool = False, compile_lse: bool = False, backward: str = "auto"):
    """Per-token NLL of ``targets`` under ``softmax(hidden @ weight.T + bias)[:, :vocab_size]``.

    hidden [N, H] (fp32/bf16/fp16), weight [V_local, H] (same dtype; V_local = V / tp with a
    ``process_group``), bias [V_local] or None, targets [N] int (global ids). Returns fp32 NLL: [N] for
    ``reduction="none"`` (0 at ignored positions), else a scalar (mean over non-ignored tokens; NaN if
    there are none, like ``F.cross_entropy``). With ``return_lse`` also the fp32 log-partition [N].
    ``impl``: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" (also under TRITON_INTERPRET=1
    on CPU, for tests) or "torch". ``backward``: "auto" (``DEFAULT_BACKWARD`` when the forward is Triton,
    else torch), "triton" (dlogits tiles
    recomputed by the Triton kernel, cuBLAS for dh/dW) or "torch" (chunked recompute in torch, the
    reference). Differentiable wrt hidden, weight and bias. Torch path knobs:
    ``chunk_size`` tokens per fp32 [chunk, V] buffer (default 1024 on CPU, 4096 on GPU; the backward
    uses it on both paths); ``compile_lse`` compiles its log-sum-exp.

    Under ``torch.autocast`` the op behaves like ``F.linear`` there: hidden, weight and bias are cast to
    the autocast dtype (gradients flow back to fp32 master weights in their own dtype). Outside autocast,
    inputs of different dtypes are promoted to the wider one.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden's N={hidden.shape[0]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight rows {weight.shape[0]}")
    group = process_group if (process_group is not None and dist.get_world_size(process_group) > 1) else None
    v_total = weight.shape[0] * (dist.get_world_size(group) if group is not None else 1)
    if vocab_size is not None and not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {v_total}] (rows of the full weight)")
    limit = vocab_size if vocab_size is not None else v_total
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= limit))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"target {int(targets[i])} at position {i} is outside [0, {limit}) and is not "
                             f"ignore_index={ignore_index}")
    impl = _pick_impl(impl, hidden.device)
    if backward == "auto":
        backward = "triton" if (impl == "triton" and DEFAULT_BACKWARD == "triton") else "torch"
    else:
        backward = _pick_impl(backward, hidden.device)
    hidden, weight, bias = _common_dtype(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):  # the op picks its own precisions
        nll, lse = FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, targets.long(), ignore_index,
                                                         vocab_size, impl, group,
                                                         _resolve_chunk(chunk_size, hidden.device), compile_lse,
                                                         backward)
    if reduction == "sum":
        nll = nll.sum()
    elif reduction == "mean":
        nll = nll.sum() / (targets != ignore_index).sum()
    return (nll, lse) if return_lse else nll


def _common_dtype(hidden, weight, bias):
    """The dtype the matmul runs in: the autocast dtype inside autocast (as F.linear), else the promoted
    dtype of the inputs. The casts are differentiable, so fp32 master weights get fp32 gradients."""
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        if bias is not None:
            dt = torch.promote_types(dt, bias.dtype)
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


class FusedLinearCrossEntropy(torch.nn.Module):
    """Module form: ``loss = FusedLinearCrossEntropy()(hidden, lm_head_weight, targets)``."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", impl: str = "auto",
                 vocab_size: Optional[int] = None, process_group=None, chunk_size: Optional[int] = None):
        super().__init__()
        self.ignore_index, self.reduction, self.impl = ignore_index, reduction, impl
        self.vocab_size, self.process_group, self.chunk_size = vocab_size, process_group, chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, bias, self.ignore_index, self.reduction,
                                          self.impl, self.vocab_size, self.process_group, self.chunk_size)


def reference_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, reduction="none",
                            vocab_size=None):
    """The straightforward fp32 computation (full logits + F.cross_entropy): tests and benchmarks."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    return torch.nn.functional.cross_entropy(logits, targets.long(), ignore_index=ignore_index,
                                             reduction=reduction)
