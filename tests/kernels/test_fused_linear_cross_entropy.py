"""fused_linear_cross_entropy vs the straightforward fp32 F.cross_entropy: NLL and every gradient."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megacpt.kernels.fused_linear_cross_entropy import (FusedLinearCrossEntropy, fused_linear_cross_entropy,
                                                        reference_cross_entropy)
from megacpt.testing import run_distributed
from tests.conftest import requires_gpu, requires_triton

N, H, V, V_REAL = 37, 72, 1003, 997  # odd on purpose; V_REAL < V exercises the padded-row mask
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(dtype=torch.float32, bias=True, seed=0, n=N, h=H, v=V, v_real=V_REAL):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v_real, (n,), generator=g)
    t[::7] = -100
    return hid, w, b, t


def _grads(fn, hid, w, b, t, **kw):
    leaves = [x.clone().requires_grad_() for x in (hid, w) + ((b,) if b is not None else ())]
    out = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kw)
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward() if out.dim() else out.backward()
    return out.detach(), [x.grad for x in leaves]


def _ref(hid, w, t, b=None, **kw):
    # reference runs in fp32 on fp32 copies (the op promises fp32 accumulation for bf16 inputs)
    kw.pop("impl", None), kw.pop("chunk_size", None)
    return reference_cross_entropy(hid.float(), w.float(), t, None if b is None else b.float(), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_path_matches_cross_entropy(dtype, bias, reduction):
    hid, w, b, t = _inputs(dtype, bias)
    kw = dict(reduction=reduction, vocab_size=V_REAL)
    # chunk_size=8: several token chunks, the last one ragged
    out, grads = _grads(fused_linear_cross_entropy, hid, w, b, t, impl="torch", chunk_size=8, **kw)
    ref, ref_grads = _grads(_ref, hid.float(), w.float(), None if b is None else b.float(), t, **kw)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), rg, **TOL[dtype])
    assert grads[1][V_REAL:].abs().max() == 0  # padded rows get no gradient


@pytest.mark.parametrize("vocab_block", [64, 200, 4096])  # many blocks / ragged last block / one block
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_16bit_vocab_blocks_exact(monkeypatch, vocab_block, bias):
    """16-bit weights on CPU: logits in vocab blocks + online log-sum-exp equal the one-shot math on the
    same 16-bit logits (rounded once, softmax in fp32), padded rows excluded, on every block layout."""
    from megacpt.kernels import fused_linear_cross_entropy as K

    monkeypatch.setattr(K, "CPU16_VOCAB_BLOCK", vocab_block)
    hid, w, b, t = _inputs(torch.bfloat16, bias)
    w[V_REAL:] = 30.0  # padded rows with huge logits must not count, even inside a block with real rows
    out = fused_linear_cross_entropy(hid, w, t, b, impl="torch", vocab_size=V_REAL, chunk_size=8)
    logits = torch.mm(hid, w.t()).float()[:, :V_REAL] + (0 if b is None else b[:V_REAL].float())
    keep = t != -100
    ref = torch.zeros(N)
    ref[keep] = logits[keep].logsumexp(1) - logits[keep].gather(1, t[keep, None]).squeeze(1)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)


def test_ignore_index_and_padded_rows():
    hid, w, b, t = _inputs()
    t[:] = -100
    t[5] = 3
    out = fused_linear_cross_entropy(hid, w, t, b, impl="torch", vocab_size=V_REAL)
    assert (out[t == -100] == 0).all() and out[5] > 0
    # huge logits on the padded rows must not change anything
    w2 = w.clone()
    w2[V_REAL:] = 100.0
    torch.testing.assert_close(fused_linear_cross_entropy(hid, w2, t, b, vocab_size=V_REAL), out)
    # a custom non-negative ignore index inside the vocab
    t2 = torch.full((N,), 7)
    t2[0] = 1
    out2 = fused_linear_cross_entropy(hid, w, t2, b, ignore_index=7, vocab_size=V_REAL)
    assert (out2[1:] == 0).all() and out2[0] > 0
    assert fused_linear_cross_entropy(hid, w, t2, b, ignore_index=7, reduction="mean").isfinite()


def test_module_and_empty_input():
    hid, w, b, t = _inputs(bias=False)
    loss = FusedLinearCrossEntropy(vocab_size=V_REAL)(hid, w, t)
    torch.testing.assert_close(loss, _ref(hid, w, t, reduction="mean", vocab_size=V_REAL))
    empty = fused_linear_cross_entropy(hid[:0], w, t[:0])
    assert empty.shape == (0,)


def test_bad_inputs_raise():
    hid, w, b, t = _inputs()
    t[2] = V_REAL  # a padded row is not a valid target
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(hid, w, t, vocab_size=V_REAL)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(hid, w[:, :5], t)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hid, w, t.clamp(0), reduction="avg")
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_cross_entropy(hid, w, t.clamp(0, 5), vocab_size=V + 1)


# -- Triton kernel under the CPU interpreter (a subprocess: TRITON_INTERPRET must be set before import) --
_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, reference_cross_entropy
    from tests.kernels.test_fused_linear_cross_entropy import _inputs
    # fp32 + bias + padded rows; then bf16 without bias; 37 tokens = 3 row blocks -> 2 vocab splits
    for dtype, bias, atol in ((torch.float32, True, 2e-5), (torch.bfloat16, False, 2e-2)):
        hid, w, b, t = _inputs(dtype, bias, n=37, h=72, v=203, v_real=197)
        out = fused_linear_cross_entropy(hid, w, t, b, impl="triton", vocab_size=197)
        ref = reference_cross_entropy(hid.float(), w.float(), t, None if b is None else b.float(), vocab_size=197)
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
        hh = hid.clone().requires_grad_()
        fused_linear_cross_entropy(hh, w, t, b, impl="triton", vocab_size=197, reduction="sum").backward()
        h2 = hid.float().clone().requires_grad_()
        reference_cross_entropy(h2, w.float(), t, None if b is None else b.float(), vocab_size=197,
                                reduction="sum").backward()
        torch.testing.assert_close(hh.grad.float(), h2.grad, atol=atol * 5, rtol=atol)
    print("TRITON-OK")
""")


@requires_triton
def test_triton_kernel_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "TRITON-OK" in r.stdout, r.stdout + r.stderr


@requires_gpu
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_cuda(dtype):
    hid, w, b, t = (x.cuda() if x is not None else None for x in _inputs(dtype, n=4099, h=256, v=50304,
                                                                          v_real=50277))
    out = fused_linear_cross_entropy(hid, w, t, b, impl="triton", vocab_size=50277)
    ref = _ref(hid, w, t, b, vocab_size=50277)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gpu_bf16_forward_and_backward(impl):
    """bf16 on a GPU: 16-bit matmuls with fp32 logits (torch path) or the Triton forward, and the
    chunked 16-bit backward, against fp32 F.cross_entropy on the same values."""
    if impl == "triton":
        pytest.importorskip("triton")
    hid, w, b, t = (x.cuda() for x in _inputs(torch.bfloat16, n=1031, h=256, v=50304, v_real=50277))
    leaves = [x.clone().requires_grad_() for x in (hid, w, b)]
    out = fused_linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], impl=impl, vocab_size=50277,
                                     chunk_size=256)
    ref_leaves = [x.float().clone().requires_grad_() for x in (hid, w, b)]
    ref = reference_cross_entropy(ref_leaves[0], ref_leaves[1], t, ref_leaves[2], vocab_size=50277)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)  # fp32 logits: only bf16 products differ
    weights = torch.linspace(0.5, 1.5, out.numel(), device="cuda")
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for g, rg in zip(leaves, ref_leaves):
        assert g.grad.dtype == torch.bfloat16
        torch.testing.assert_close(g.grad.float(), rg.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
def test_autocast_and_mixed_dtypes(device):
    """Under autocast the op computes like F.linear there (16-bit inputs) and fp32 master weights get
    fp32 gradients; outside autocast, mixed dtypes are promoted (bf16 hidden + fp32 weight -> fp32)."""
    hid, w, b, t = (x.to(device) for x in _inputs(torch.float32, n=67, v=1003, v_real=V_REAL))
    w_master = w.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(hid, w_master, t, b, vocab_size=V_REAL, reduction="sum")
    out.backward()
    assert w_master.grad.dtype == torch.float32
    w16 = w.to(torch.bfloat16).requires_grad_()
    ref = fused_linear_cross_entropy(hid.to(torch.bfloat16), w16, t, b.to(torch.bfloat16), vocab_size=V_REAL,
                                     reduction="sum")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w_master.grad, w16.grad.float())
    # no autocast: promotion to fp32 equals the fp32 computation
    mixed = fused_linear_cross_entropy(hid.to(torch.bfloat16), w, t, b, vocab_size=V_REAL)
    exact = reference_cross_entropy(hid.to(torch.bfloat16).float(), w, t, b, vocab_size=V_REAL)
    torch.testing.assert_close(mixed, exact, **TOL[torch.float32])


# -- vocab parallel on 2 gloo ranks -------------------------------------------------------------------
def _vocab_parallel_worker(rank, world, dtype_name):
    import torch.distributed as dist

    dtype = getattr(torch, dtype_name)
    hid, w, b, t = _inputs(dtype, bias=True, v=1004, v_real=V_REAL)  # 1004 = 2 x 502; rank 1 has padding
    rows = slice(rank * 502, (rank + 1) * 502)
    out, (dh, dw, db) = _grads(fused_linear_cross_entropy, hid, w[rows].contiguous(), b[rows].contiguous(), t,
                               impl="torch", vocab_size=V_REAL, process_group=dist.group.WORLD, chunk_size=16)
    full, (rdh, rdw, rdb) = _grads(fused_linear_cross_entropy, hid, w, b, t, impl="torch", vocab_size=V_REAL,
                                   chunk_size=16)
    tol = TOL[dtype]
    torch.testing.assert_close(out, full, **tol)
    torch.testing.assert_close(dh, rdh, **tol)
    torch.testing.assert_close(dw, rdw[rows], **tol)
    torch.testing.assert_close(db, rdb[rows], **tol)
    return float((out - full).abs().max())


@pytest.mark.distributed
def test_vocab_parallel_two_ranks_exact():
    diffs = run_distributed(_vocab_parallel_worker, 2, "float32", timeout=120)
    assert max(diffs) < 1e-5


def test_backward_in_bf16_compute():
    """The GPU backward (16-bit matmuls, fp32 softmax/accumulation), run on CPU: grads close to fp32."""
    from megacpt.kernels.fused_linear_cross_entropy import _torch_backward

    hid, w, b, t = _inputs(torch.bfloat16)
    nll, lse = fused_linear_cross_entropy(hid, w, t, b, vocab_size=V_REAL, return_lse=True)
    g = torch.linspace(0.5, 1.5, N)
    got = _torch_backward(hid, w, b, t, lse, g, V_REAL, 0, -100, True, True, True, chunk_size=8,
                          compute_dtype=torch.bfloat16)
    ref = _torch_backward(hid, w, b, t, lse, g, V_REAL, 0, -100, True, True, True, chunk_size=8,
                          compute_dtype=torch.float32)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=3e-2, rtol=3e-2)
    assert got[1][V_REAL:].abs().max() == 0


@pytest.mark.slow  # one torch.compile (~10-20 s); the eager path of the same math is tested above
def test_compiled_lse_matches_eager():
    hid, w, b, t = _inputs()
    eager = fused_linear_cross_entropy(hid, w, t, b, vocab_size=V_REAL, chunk_size=8)
    comp = fused_linear_cross_entropy(hid, w, t, b, vocab_size=V_REAL, chunk_size=8, compile_lse=True)
    torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
    hid, w, b, t = _inputs(torch.bfloat16)  # the 16-bit CPU path's compiled block function
    eager = fused_linear_cross_entropy(hid, w, t, b, vocab_size=V_REAL, chunk_size=8)
    comp = fused_linear_cross_entropy(hid, w, t, b, vocab_size=V_REAL, chunk_size=8, compile_lse=True)
    torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    """No C++ compiler (or any Inductor failure): one warning, the eager result, eager from then on."""
    from megacpt.kernels import fused_linear_cross_entropy as K

    calls = []

    def broken_compile(fn, **kw):
        def run(*a):
            calls.append(1)
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(K.torch, "compile", broken_compile)
    op = K._CompiledOrEager(K._block_max_sumexp_fused, K._block_max_sumexp)
    x = torch.randn(5, 9).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="compile of the log-sum-exp failed"):
        m, s = op(True, x, None, torch.empty(5, 9))
    ref = x.float().logsumexp(1)
    torch.testing.assert_close(s.log() + m, ref)
    m2, s2 = op(True, x, None, torch.empty(5, 9))  # no second attempt
    assert len(calls) == 1 and torch.equal(m2, m) and torch.equal(s2, s)


def test_cpu_path_does_not_import_triton():
    """This module imports triton on first use of the Triton path only, not for the torch path."""
    code = ("import sys, torch\n"
            "from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy\n"
            "h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))\n"
            "fused_linear_cross_entropy(h, w, t)\n"
            "fused_linear_cross_entropy(h.bfloat16(), w.bfloat16(), t)\n"
            "print('triton' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


# -- the Triton backward (dlogits tiles recomputed from the saved lse) -----------------------------------
_TRITON_BWD_SCRIPT = textwrap.dedent("""
import itertools, math, torch
from megacpt.kernels import fused_linear_cross_entropy as K
from megacpt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, reference_cross_entropy

def inputs(dtype, n, h, v, v_real, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, v_real, (n,), generator=g)
    t[1::5] = -100
    if n > 3:
        t[-1] = v_real - 1          # the last real vocab row, next to the padding
    return hid, w, b, t

def grads(impl, hid, w, b, t, v_real, chunk, backward):
    leaves = [x.clone().requires_grad_() for x in (hid, w) + ((b,) if b is not None else ())]
    out = fused_linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None else None,
                                     impl=impl, backward=backward, vocab_size=v_real, chunk_size=chunk)
    (out * torch.linspace(0.5, 1.5, out.numel())).sum().backward()
    return out.detach(), [x.grad for x in leaves]

def ref_grads(hid, w, b, t, v_real):
    leaves = [x.float().clone().requires_grad_() for x in (hid, w) + ((b,) if b is not None else ())]
    out = reference_cross_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None else None,
                                  vocab_size=v_real)
    (out * torch.linspace(0.5, 1.5, out.numel())).sum().backward()
    return [x.grad for x in leaves]

# odd shapes: a single token, fewer tokens than a tile, ragged tiles in every dim; vocab with and without
# padded rows; several token chunks with a ragged last one
shapes = [(1, 8, 33, 33), (37, 72, 203, 197), (130, 100, 96, 91)]
n_checked = 0
cases = [(shape, dtype, bias, 7 if bias else 4096)
         for shape, dtype, bias in itertools.product(shapes, (torch.float32, torch.bfloat16), (True, False))]
cases.append(((37, 72, 203, 197), torch.float16, True, 16))
for (n, h, v, v_real), dtype, bias, chunk in cases:
    hid, w, b, t = inputs(dtype, n, h, v, v_real, bias, seed=n + h)
    out, got = grads("triton", hid, w, b, t, v_real, chunk, "triton")
    ref = ref_grads(hid, w, b, t, v_real)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for name, gg, rr in zip(("dh", "dW", "db"), got, ref):
        assert gg.dtype == dtype, (name, gg.dtype)
        torch.testing.assert_close(gg.float(), rr, **tol, msg=lambda m: f"{name} {n, h, v, v_real, dtype, bias, chunk}: {m}")
    assert got[1][v_real:].abs().sum() == 0 and (b is None or got[2][v_real:].abs().sum() == 0)
    # the chunked torch backward (the reference path) gives the same gradients from the same lse (the
    # torch forward rounds 16-bit CPU logits to 16 bits, so 16-bit inputs keep the Triton forward)
    _, tg = grads("torch" if dtype == torch.float32 else "triton", hid, w, b, t, v_real, chunk, "torch")
    for gg, rr in zip(got, tg):
        torch.testing.assert_close(gg.float(), rr.float(), **tol)
    n_checked += 1

# 16-bit compute (the GPU policy: bf16 dlogits, 16-bit GEMMs, fp32 dW) against the torch path's
hid, w, b, t = inputs(torch.bfloat16, 37, 72, 203, 197, True, seed=5)
nll, lse = fused_linear_cross_entropy(hid, w, t, b, impl="triton", vocab_size=197, return_lse=True)
g = torch.linspace(0.5, 1.5, 37)
a = K._triton_backward(hid, w, b, t, lse, g, 197, 0, -100, True, True, True, chunk_size=9,
                       compute_dtype=torch.bfloat16)
r = K._torch_backward(hid, w, b, t, lse, g, 197, 0, -100, True, True, True, chunk_size=9,
                      compute_dtype=torch.float32)
for x, y in zip(a, r):
    torch.testing.assert_close(x, y, atol=3e-2, rtol=3e-2)

# a vocab shard: rows [offset, offset + valid) of the global vocab, global lse, off-shard targets
hid, w, b, t = inputs(torch.float32, 37, 72, 203, 197, True, seed=9)
_, lse = fused_linear_cross_entropy(hid, w, t, b, impl="torch", vocab_size=197, return_lse=True)
for lo, hi in ((0, 102), (102, 203)):
    valid = min(hi, 197) - lo
    a = K._triton_backward(hid, w[lo:hi], b[lo:hi], t, lse, g, valid, lo, -100, True, True, True, chunk_size=16)
    r = K._torch_backward(hid, w[lo:hi], b[lo:hi], t, lse, g, valid, lo, -100, True, True, True, chunk_size=16)
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)

# every element of the dlogits buffer is written (poisoned first), padded columns exactly 0
hid, w, b, t = inputs(torch.float32, 37, 72, 203, 197, False, seed=3)
out = torch.full((37, 203), float("nan"))
K._triton_dlogits(hid, w, None, t, lse[:37] * 0 + 10.0, torch.ones(37), 197, 0, -100, out)
assert not out.isnan().any() and out[:, 197:].abs().max() == 0
assert (out[t == -100] == 0).all()
print("TRITON-BWD-OK", n_checked)
""")


@requires_triton
def test_triton_backward_interpreted():
    """The Triton backward under TRITON_INTERPRET=1 over odd shapes, fp32/bf16/fp16, bias or not, ignored
    targets, padded vocab rows, ragged token chunks and vocab shards: dh, dW and db against the fp32
    autograd reference (the forward's tolerance for fp32) and against the chunked torch backward."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _TRITON_BWD_SCRIPT], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "TRITON-BWD-OK 13" in r.stdout, r.stdout + r.stderr[-4000:]


@requires_gpu
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_cuda(dtype):
    """Compiled for real at Pythia's vocab (50,304 rows, 27 padded): every gradient against the fp32
    reference and against the chunked torch backward."""
    hid, w, b, t = (x.cuda() for x in _inputs(dtype, n=2053, h=256, v=50304, v_real=50277))
    got = _grads(fused_linear_cross_entropy, hid, w, b, t, impl="triton", backward="triton", vocab_size=50277)[1]
    tor = _grads(fused_linear_cross_entropy, hid, w, b, t, impl="triton", backward="torch", vocab_size=50277)[1]
    ref = _grads(_ref, hid.float(), w.float(), b.float(), t, vocab_size=50277)[1]
    tol = TOL[dtype]
    for g, tg, rg in zip(got, tor, ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), rg, **tol)
        torch.testing.assert_close(g.float(), tg.float(), **tol)
