"""Pallas Triton block-sparse attention in interpret mode (CPU) against the XLA reference
and an explicit dense masked softmax.

Each case compiles once (layouts are jit arguments with fixed table widths) and runs on
fresh random inputs and several random layouts (empty rows, full rows, one block, random
blocks). Poisoning: interpret mode starts every output buffer as NaN
(``test_interpret_outputs_start_poisoned`` proves it), so a finite output proves every
element was written; rows with nothing visible must be exactly 0.

Tolerances (relative norm error against float64): float32 2e-5 forward / 1e-4 gradients;
bfloat16 1.5e-2 / 3e-2; float16 3e-3 (the kernel rounds p to the input dtype before P V, as
FlashAttention does).
"""

import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(__file__))  # kernel_reference.py lives beside this file
from kernel_reference import (  # noqa: E402
    block_sparse_allowed,
    dense_attention_jnp,
    dense_attention_np,
    key_weight_matrix,
    random_block_mask,
    rel_err,
)
from x64 import enable_x64  # noqa: E402

from sea_jax.kernels import BlockLayout, block_sparse_attention  # noqa: E402
from sea_jax.kernels.gpu_block_sparse import compiler_params  # noqa: E402
from sea_jax.kernels.layout import num_blocks  # noqa: E402

FWD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _inputs(rng, B, Sq, Skv, H, K, D, dtype, wmode, use_seg):
    q = jnp.asarray(rng.standard_normal((B, Sq, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, Skv, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Skv, K, D)), dtype)
    kw = None
    if wmode:
        kw = rng.uniform(0, 1.5, (B, Skv, K))
        kw[:, ::7] = 0.0  # exact zeros: the key drops out in log mode
        kw = jnp.asarray(kw, jnp.float32)
    seg = None
    if use_seg:
        seg = np.zeros((B, Sq), np.int32)
        for b in range(B):
            c = np.sort(rng.choice(np.arange(2, Sq - 3), 2, replace=False))
            seg[b, : c[0]], seg[b, c[0]: c[1]], seg[b, c[1]: Sq - 2] = 1, 2, 3
    return q, k, v, kw, seg


def _layout(rng, B, G, nq, nk, bq, bk, kinds):
    mask = random_block_mask(rng, B, G, nq, nk, kinds)
    # fixed table widths: every layout of a case has the same pytree shapes (one compile)
    return mask, BlockLayout.from_mask(mask, bq, bk, max_kv_blocks=nk, max_q_blocks=nq)


def test_interpret_outputs_start_poisoned():
    """The poison the tests rely on: an output element no kernel writes reads as NaN."""

    def kernel(x_ref, o_ref):
        o_ref[0:8] = x_ref[0:8]  # leaves o[8:16] unwritten

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), interpret=True,
        compiler_params=compiler_params(4, 2),
    )(jnp.ones((16,), jnp.float32))
    assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(np.asarray(out[8:])))


FWD_CASES = [
    # name, B, Sq, Skv, H, K, G, D, bq, bk, dtype, causal, window, wmode, seg, options
    ("gqa1_d64_odd", 2, 77, 77, 4, 4, 4, 64, 32, 32, jnp.float32, True, None, None, False, {}),
    ("gqa4_d128_window_gate_subtiles_branch", 1, 100, 100, 8, 2, 2, 128, 64, 32, jnp.float32, True, 40, "gate",
     False, dict(fwd_tiles=(32, 16), always_mask=False)),
    ("gqa8_noncausal_log", 1, 64, 96, 8, 1, 1, 64, 32, 16, jnp.float32, False, None, "log", False, {}),
    ("bf16_segments_gate", 2, 90, 90, 4, 2, 1, 64, 32, 32, jnp.bfloat16, True, None, "gate", True, {}),
    ("fp16_d128", 1, 64, 64, 2, 1, 2, 128, 16, 32, jnp.float16, True, None, None, False, {}),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward(case):
    name, B, Sq, Skv, H, K, G, D, bq, bk, dtype, causal, window, wmode, use_seg, opts = case
    rng = _rng(name)
    nq, nk = num_blocks(Sq, bq), num_blocks(Skv, bk)
    common = dict(weight_mode=wmode or "gate", causal=causal, window=window)
    kern = jax.jit(lambda q, k, v, lay, w, s: block_sparse_attention(
        q, k, v, lay, key_weights=w, segment_ids=s, impl="pallas_gpu", interpret=True,
        kernel_options=opts, **common))
    xla = jax.jit(lambda q, k, v, lay, w, s: block_sparse_attention(
        q, k, v, lay, key_weights=w, segment_ids=s, impl="xla", **common))
    for kinds in [("empty", "full", "one", "random"), ("random", "one", "full")]:
        q, k, v, kw, seg = _inputs(rng, B, Sq, Skv, H, K, D, dtype, wmode, use_seg)
        mask, lay = _layout(rng, B, G, nq, nk, bq, bk, kinds)
        segj = None if seg is None else jnp.asarray(seg)
        out = kern(q, k, v, lay, kw, segj)
        assert out.dtype == dtype and out.shape == q.shape
        out64 = np.asarray(out, np.float64)
        assert np.isfinite(out64).all(), "unwritten (NaN-poisoned) or non-finite output"
        allowed = block_sparse_allowed(mask, bq, bk, B, H, Sq, Skv, causal=causal, window=window, segment_ids=seg)
        W = None if kw is None else np.asarray(key_weight_matrix(kw, H, Sq))
        ref = dense_attention_np(q, k, v, allowed, W, wmode or "gate")
        assert rel_err(out, ref) < FWD_TOL[dtype]
        assert rel_err(out, xla(q, k, v, lay, kw, segj)) < FWD_TOL[dtype]
        empty = np.moveaxis(~allowed.any(-1), 1, 2)  # [B, Sq, H]
        assert np.all(out64[empty] == 0)


BWD_CASES = [
    # name, B, Sq, Skv, H, K, G, D, bq, bk, dtype, causal, window, wmode, seg, options
    ("gqa4_window_gate_subtiles_branch", 1, 70, 70, 4, 1, 1, 64, 32, 32, jnp.float32, True, 24, "gate", False,
     dict(dq_tiles=(16, 16), dkv_tiles=(16, 32), always_mask=False)),
    ("gqa1_segments_log_queries_major", 2, 45, 45, 2, 2, 2, 64, 16, 16, jnp.float32, True, None, "log", True,
     dict(dkv_major="queries")),
    ("gqa8_d128_noncausal", 1, 48, 80, 8, 1, 8, 128, 16, 32, jnp.float32, False, None, None, False, {}),
    ("bf16_gate_queries_major", 1, 64, 64, 4, 2, 2, 64, 32, 16, jnp.bfloat16, True, None, "gate", True,
     dict(dkv_major="queries")),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_gradients(case):
    """dQ, dK, dV and the key-weight gradient against autodiff of the dense reference in
    float64 (first case also against the XLA reference's autodiff)."""
    name, B, Sq, Skv, H, K, G, D, bq, bk, dtype, causal, window, wmode, use_seg, opts = case
    rng = _rng(name, "bwd")
    nq, nk = num_blocks(Sq, bq), num_blocks(Skv, bk)
    q, k, v, kw, seg = _inputs(rng, B, Sq, Skv, H, K, D, dtype, wmode, use_seg)
    if kw is None:
        kw = jnp.ones((B, Skv, K), jnp.float32)  # unweighted: dw still checked (gate: o = sum p w v)
    wm = wmode or "gate"
    mask, lay = _layout(rng, B, G, nq, nk, bq, bk, ("empty", "full", "random", "one"))
    segj = None if seg is None else jnp.asarray(seg)
    ct = jnp.asarray(rng.standard_normal((B, Sq, H, D)), dtype)
    common = dict(weight_mode=wm, causal=causal, window=window, segment_ids=segj)

    def grads(impl, **extra):
        f = lambda q, k, v, w: block_sparse_attention(q, k, v, lay, key_weights=w, impl=impl, **common, **extra)
        out, vjp = jax.vjp(jax.jit(f), q, k, v, kw)
        return out, vjp(ct)

    out, g = grads("pallas_gpu", interpret=True, kernel_options=opts)
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in (out,) + g)
    allowed = block_sparse_allowed(mask, bq, bk, B, H, Sq, Skv, causal=causal, window=window, segment_ids=seg)
    with enable_x64():
        up = lambda x: jnp.asarray(np.asarray(x, np.float64))
        f64 = lambda q, k, v, w: dense_attention_jnp(q, k, v, allowed, key_weight_matrix(w, H, Sq), wm)
        _, vjp64 = jax.vjp(f64, up(q), up(k), up(v), up(kw))
        g64 = [np.asarray(x) for x in vjp64(up(ct))]
    for name_, a, r in zip("qkvw", g, g64):
        assert a.shape == r.shape and a.dtype == (jnp.float32 if name_ == "w" else dtype)
        assert rel_err(a, r) < GRAD_TOL[dtype], name_
    if name == BWD_CASES[0][0]:
        _, gx = grads("xla")
        for a, r in zip(g, gx):
            assert rel_err(a, r) < GRAD_TOL[dtype]


def test_gradient_of_empty_rows_is_zero():
    """A layout with nothing visible anywhere: zero output, zero (not NaN) gradients."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 2, 64)), jnp.float32)
    lay = BlockLayout.from_mask(np.zeros((2, 2), bool), 16, 16)
    f = lambda q: block_sparse_attention(q, q[:, :, :1], q[:, :, :1], lay, impl="pallas_gpu", interpret=True)
    out, vjp = jax.vjp(f, q)
    (dq,) = vjp(jnp.ones_like(out))
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(dq) == 0)


@pytest.mark.parametrize("opts,match", [
    (dict(fwd_tiles=(64, 16)), "fwd tq"),
    (dict(dkv_tiles=(16, 24)), "dkv tk"),
    (dict(dq_tiles=(8, 16)), "dq tq"),
    (dict(dkv_major="rows"), "dkv_major must be"),
])
def test_bad_kernel_options(opts, match):
    q = jnp.ones((1, 32, 2, 16), jnp.float32)
    lay = BlockLayout.causal(32, 32, 32, 16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, q, q, lay, impl="pallas_gpu", interpret=True, kernel_options=opts)


def test_row_scaled_tile():
    """Default tiles keep their bytes: 256-byte rows (bfloat16 at D = 128) as measured, fewer
    rows for wider ones, never below 16."""
    from sea_jax.kernels.gpu_block_sparse import row_scaled_tile

    cases = [(128, 128, jnp.bfloat16, 128), (128, 64, jnp.float32, 128), (128, 128, jnp.float32, 64),
             (64, 96, jnp.float32, 32), (64, 256, jnp.bfloat16, 32), (64, 256, jnp.float32, 16),
             (16, 128, jnp.float32, 16), (64, 32, jnp.float16, 64)]
    for tile, head_dim, dtype, want in cases:
        assert row_scaled_tile(tile, head_dim, dtype) == want, (tile, head_dim, dtype)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernels need a GPU (interpret mode covers them on CPU)")
@pytest.mark.parametrize("dtype,D,H,K", [(jnp.bfloat16, 128, 4, 2), (jnp.float32, 128, 4, 2), (jnp.float32, 64, 2, 2),
                                         (jnp.float16, 64, 4, 1), (jnp.bfloat16, 256, 2, 1)])
def test_compiled_defaults_on_gpu(dtype, D, H, K):
    """The compiled kernels with their default tiles and stages (which must fit in shared memory
    for every dtype and head dim) against the XLA path: forward and gradients of q, k, v and
    the key weights, causal with a window, 1000 tokens (padding), 128-query / 64-key blocks."""
    rng = _rng("compiled_defaults", D, str(jnp.dtype(dtype)))
    B, S, bq, bk = 1, 1000, 128, 64
    q, k, v, kw, _ = _inputs(rng, B, S, S, H, K, D, dtype, "gate", False)
    mask, lay = _layout(rng, B, 1, num_blocks(S, bq), num_blocks(S, bk), bq, bk, ("random", "full", "one"))
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)

    def run(impl, q, k, v, kw):
        def f(q, k, v, kw):
            return block_sparse_attention(q, k, v, lay, key_weights=kw, window=300, impl=impl)

        out, vjp = jax.vjp(jax.jit(f), q, k, v, kw)
        return out, vjp(ct.astype(q.dtype))

    out, g = run("pallas_gpu", q, k, v, kw)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out_x, gx = run("xla", f32(q), f32(k), f32(v), kw)
    # float32 inputs: the Triton dots run in TF32 on the GPU (10-bit mantissa products)
    fwd_tol, grad_tol = (3e-3, 1e-2) if dtype == jnp.float32 else (FWD_TOL[dtype], 3e-2)
    assert rel_err(out, out_x) < fwd_tol
    for name, a, r in zip(["q", "k", "v", "key_weights"], g, gx):
        assert rel_err(a, r) < grad_tol, (name, rel_err(a, r))
