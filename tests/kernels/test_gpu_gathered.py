"""Pallas Triton gathered (token-level) attention in interpret mode (CPU) against the XLA
reference and an explicit dense masked softmax.

Index lists come from ``random_union``: empty rows, full rows, -1 holes in random places,
random counts, keys in random order. Both gather strategies ("kernel": index loads inside
the kernel; "xla": pre-gathered copies) and every backward strategy (dK/dV of the slots
reduced by the sorted per-key-tile kernel, an XLA scatter-add or atomics; float32 or
bfloat16 per-slot partials; the hybrid with pre-gathered copies in the backward only) are run. Interpret mode starts outputs as NaN (see
test_gpu_block_sparse.test_interpret_outputs_start_poisoned), so a finite output proves
every element was written; rows with nothing visible must be exactly 0.

Tolerances (relative norm error against float64): float32 2e-5 forward / 1e-4 gradients;
bfloat16 1.5e-2 / 3e-2; float16 3e-3.
"""

import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # kernel_reference.py lives beside this file
from kernel_reference import (  # noqa: E402
    dense_attention_jnp,
    dense_attention_np,
    gathered_allowed_weights,
    gathered_slots,
    random_union,
    rel_err,
)
from x64 import enable_x64  # noqa: E402

from sea_jax.kernels import gathered_attention  # noqa: E402
from sea_jax.kernels.layout import num_blocks  # noqa: E402

FWD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _inputs(rng, B, S, H, K, D, bq, U, dtype, use_mask, wmode, use_seg):
    q = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    union = random_union(rng, B, K, num_blocks(S, bq), U, S)
    sel = rng.random((B, K, S, U)) < 0.7 if use_mask else None
    wsel = None
    if wmode:
        w = rng.uniform(0, 1.5, (B, K, S, U))
        w[..., ::5] = 0.0
        wsel = jnp.asarray(w, jnp.float32)
    seg = None
    if use_seg:
        seg = np.zeros((B, S), np.int32)
        for b in range(B):
            c = np.sort(rng.choice(np.arange(2, S - 3), 2, replace=False))
            seg[b, : c[0]], seg[b, c[0]: c[1]], seg[b, c[1]: S - 2] = 1, 2, 3
    return q, k, v, union, sel, wsel, seg


FWD_CASES = [
    # name, B, S, H, K, D, bq, U, dtype, window, causal, mask, wmode, seg, options
    ("gqa2_d64_odd_upad", 1, 77, 4, 2, 64, 32, 24, jnp.float32, 0, True, False, None, False,
     dict(tu=16, tk=16)),
    ("gqa8_window_gate_subtiles_xla", 2, 100, 8, 1, 64, 32, 20, jnp.float32, 12, True, True, "gate", False,
     dict(tq=16, tu=16, tk=16, gather="xla")),
    ("gqa1_d128_noncausal_log", 1, 64, 4, 4, 128, 16, 16, jnp.float32, 0, False, True, "log", False,
     dict(tu=16, tk=16)),
    ("bf16_gqa4_window_segments", 1, 90, 4, 1, 64, 32, 24, jnp.bfloat16, 8, True, False, "gate", True,
     dict(tu=16, tk=32)),
    ("fp16", 1, 48, 2, 1, 64, 16, 16, jnp.float16, 5, True, False, None, False, dict(tu=16, tk=16)),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward(case):
    name, B, S, H, K, D, bq, U, dtype, W, causal, use_mask, wmode, use_seg, opts = case
    rng = _rng(name)
    common = dict(block_q=bq, window=W, weight_mode=wmode or "gate", causal=causal)
    kern = jax.jit(lambda q, k, v, u, m, w, s: gathered_attention(
        q, k, v, u, selection_mask=m, selection_weights=w, segment_ids=s, impl="pallas_gpu",
        interpret=True, kernel_options=opts, **common))
    xla = jax.jit(lambda q, k, v, u, m, w, s: gathered_attention(
        q, k, v, u, selection_mask=m, selection_weights=w, segment_ids=s, impl="xla", **common))
    for _ in range(2):  # fresh inputs and index lists, one compile
        q, k, v, union, sel, wsel, seg = _inputs(rng, B, S, H, K, D, bq, U, dtype, use_mask, wmode, use_seg)
        args = (q, k, v, jnp.asarray(union), None if sel is None else jnp.asarray(sel), wsel,
                None if seg is None else jnp.asarray(seg))
        out = kern(*args)
        assert out.dtype == dtype and out.shape == q.shape
        out64 = np.asarray(out, np.float64)
        assert np.isfinite(out64).all(), "unwritten (NaN-poisoned) or non-finite output"
        onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=causal, selection_mask=sel, segment_ids=seg)
        allowed, Wm = gathered_allowed_weights(onehot, win, wsel)
        ref = dense_attention_np(q, k, v, allowed, None if Wm is None else np.asarray(Wm), wmode or "gate")
        assert rel_err(out, ref) < FWD_TOL[dtype]
        assert rel_err(out, xla(*args)) < FWD_TOL[dtype]
        empty = np.moveaxis(~allowed.any(-1), 1, 2)
        assert np.all(out64[empty] == 0)


# Backward strategies (kernel_options; see kernels/gpu_gathered.py): every one appears below.
SORTED = dict(dkv_reduce="sorted")  # the default
SCATTER = dict(dkv_reduce="scatter")
ATOMIC = dict(dkv_reduce="atomic")
HYBRID = dict(gather="kernel", bwd_gather="xla", dkv_reduce="scatter")
XLA_SCATTER = dict(gather="xla", dkv_reduce="scatter")
XLA_SORTED = dict(gather="xla", dkv_reduce="sorted")

BWD_CASES = [
    # name, B, S, H, K, D, bq, U, dtype, window, causal, mask, wmode, seg, options
    ("gqa4_window_mask_gate_sorted", 1, 70, 4, 1, 64, 32, 20, jnp.float32, 10, True, True, "gate", False,
     dict(tq=16, tu=16, tk=16, reduce_chunk=16, **SORTED)),
    ("gqa1_log_segments_xla_scatter", 2, 48, 2, 2, 64, 16, 12, jnp.float32, 0, True, False, "log", True,
     dict(tu=16, tk=16, **XLA_SCATTER)),
    ("gqa8_d128_noncausal_atomic", 1, 40, 8, 1, 128, 16, 16, jnp.float32, 0, False, False, None, False,
     dict(tu=16, tk=16, **ATOMIC)),
    ("gqa2_odd_d48_window_log_hybrid", 1, 53, 4, 2, 48, 16, 10, jnp.float32, 7, True, True, "log", False,
     dict(tu=16, tk=16, **HYBRID)),
    ("gqa1_xla_sorted_tk32", 1, 45, 2, 2, 64, 16, 20, jnp.float32, 4, True, False, "gate", False,
     dict(tu=16, tk=32, reduce_chunk=32, **XLA_SORTED)),
    # bf16: partial_dtype "auto" keeps bfloat16 per-slot partial sums
    ("bf16_gate_window_sorted_bf16_partials", 1, 64, 4, 2, 64, 32, 16, jnp.bfloat16, 6, True, True, "gate",
     False, dict(tu=16, tk=16)),
    ("bf16_segments_scatter_fp32_partials", 1, 80, 2, 1, 64, 16, 24, jnp.bfloat16, 5, True, False, "gate",
     True, dict(tu=16, tk=16, partial_dtype="float32", **SCATTER)),
    # the slot dK/dV kernel's blocks in two query sub-tiles (the others: one tile of 32)
    ("slot_sub_tiles_log", 1, 70, 2, 1, 64, 32, 18, jnp.float32, 9, True, True, "log", False,
     dict(tu=16, tk=16, slot_tq=16)),
]


def _check_gradients(name, B, S, H, K, D, bq, U, dtype, W, causal, use_mask, wmode, use_seg, opts, union=None):
    rng = _rng(name, "bwd")
    q, k, v, union_r, sel, wsel, seg = _inputs(rng, B, S, H, K, D, bq, U, dtype, use_mask, wmode, use_seg)
    union = union_r if union is None else union
    if wsel is None:
        wsel = jnp.ones((B, K, S, U), jnp.float32)
    wm = wmode or "gate"
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    common = dict(block_q=bq, window=W, weight_mode=wm, causal=causal,
                  selection_mask=None if sel is None else jnp.asarray(sel),
                  segment_ids=None if seg is None else jnp.asarray(seg))
    uj = jnp.asarray(union)

    def grads(impl, q, k, v, ct, **extra):
        f = lambda q, k, v, w: gathered_attention(q, k, v, uj, selection_weights=w, impl=impl, **common, **extra)
        out, vjp = jax.vjp(jax.jit(f), q, k, v, wsel)
        return out, vjp(ct)

    out, g = grads("pallas_gpu", q, k, v, ct, interpret=True, kernel_options=opts)
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in (out,) + g)
    onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=causal, selection_mask=sel, segment_ids=seg)
    with enable_x64():
        up = lambda x: jnp.asarray(np.asarray(x, np.float64))

        def f64(q, k, v, w):
            allowed, Wm = gathered_allowed_weights(onehot, win, w)
            return dense_attention_jnp(q, k, v, allowed, Wm, wm)

        _, vjp64 = jax.vjp(f64, up(q), up(k), up(v), up(wsel))
        g64 = [np.asarray(x) for x in vjp64(up(ct))]
    for name_, a, r in zip("qkvw", g, g64):
        assert a.shape == r.shape and a.dtype == (jnp.float32 if name_ == "w" else dtype)
        assert rel_err(a, r) < GRAD_TOL[dtype], name_
    # the weight gradient of slots that no query uses is exactly zero
    used = (onehot.sum(-1) > 0).reshape(B, K, H // K, S, U).any(2)  # [B, K, S, U]
    assert np.all(np.asarray(g[3])[~used] == 0)
    # and against autodiff of the XLA reference (float32 inputs: the more accurate one)
    f32 = lambda x: x.astype(jnp.float32)
    _, gx = grads("xla", f32(q), f32(k), f32(v), f32(ct))
    for name_, a, r in zip("qkvw", g, gx):
        assert rel_err(a, r) < GRAD_TOL[dtype], name_


@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_gradients(case):
    """dQ, dK, dV and the selection-weight gradient of each backward strategy against
    autodiff of the dense masked softmax in float64 and of the XLA reference."""
    _check_gradients(*case)


def test_sorted_reduction_many_repeats():
    """Every query block selects the same keys (one key tile gets nQ * U slots: many reduction
    chunks, chunks straddling key tiles), in random order with holes; the sorted and scatter
    reductions against the references."""
    rng = np.random.default_rng(7)
    B, S, H, K, bq, U = 1, 112, 2, 1, 16, 16
    nq = num_blocks(S, bq)
    keys = rng.choice(40, size=12, replace=False)
    union = np.full((B, K, nq, U), -1, np.int32)
    for i in range(nq):
        union[0, 0, i, rng.choice(U, size=keys.size, replace=False)] = rng.permutation(keys)
    for opts in (dict(tu=16, tk=16, reduce_chunk=16, **SORTED), dict(tu=16, tk=32, **SCATTER)):
        _check_gradients("repeats", B, S, H, K, 64, bq, U, jnp.float32, 3, True, True, "gate", False, opts,
                         union=union)


def test_empty_union_gives_zero_and_zero_grads():
    """No slots and no window: zero output and zero (not NaN) gradients."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 32, 2, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 32, 1, 64)), jnp.float32)
    union = jnp.full((1, 1, 2, 16), -1, jnp.int32)
    f = lambda q, k: gathered_attention(q, k, k, union, block_q=16, impl="pallas_gpu", interpret=True,
                                        kernel_options=dict(tu=16, tk=16))
    out, vjp = jax.vjp(f, q, k)
    dq, dk = vjp(jnp.ones_like(out))
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(dq) == 0) and np.all(np.asarray(dk) == 0)


@pytest.mark.parametrize("opts,match", [
    (dict(gather="tma"), "gather"),
    (dict(bwd_gather="gpu"), "bwd_gather"),
    (dict(dkv_reduce="sum"), "dkv_reduce"),
    (dict(reduce_chunk=24), "reduce_chunk"),
    (dict(partial_dtype="float16"), "partial_dtype"),
    (dict(num_warps=(4, 4, 4)), "num_warps"),
    (dict(num_stages=(2, 2, 2, 2, 0)), "num_stages"),
    (dict(tq=64), "tq"),
    (dict(tu=24), "tu"),
    (dict(range_branch=1), "range_branch"),
    (dict(slot_tq=64), "slot_tq"),
    (dict(slot_tq=12), "slot_tq"),
    (dict(tk=8), "tk"),
])
def test_bad_kernel_options(opts, match):
    q = jnp.ones((1, 32, 2, 16), jnp.float32)
    union = jnp.zeros((1, 2, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match=match):
        gathered_attention(q, q, q, union, block_q=32, impl="pallas_gpu", interpret=True, kernel_options=opts)


# ------------------------------------------------------------ factored (SlotSelection) form
def _random_slot_selection(rng, B, K, S, bq, U):
    """Slot scores around a per-query threshold (weights 0, fractional and 1 all occur),
    -inf thresholds (weight 1), empty, full and random slot ranges."""
    nq = num_blocks(S, bq)
    z = rng.normal(0.0, 1.0, (B, K, nq, U))
    thr = rng.normal(0.0, 0.5, (B, K, S))
    thr[rng.random((B, K, S)) < 0.2] = -np.inf
    lo = rng.integers(0, U // 2, (B, K, S))
    hi = lo + rng.integers(0, U, (B, K, S))
    hi = np.minimum(hi, U)
    lo[..., ::7], hi[..., ::7] = 0, U  # full ranges
    hi[..., 3::11] = lo[..., 3::11]  # empty ranges
    return z.astype(np.float32), lo.astype(np.int32), hi.astype(np.int32), thr.astype(np.float32)


def _expand_slot_selection(z, lo, hi, thr, bq, xp=np):
    """mask / weights [B, K, S, U] by explicit loops over queries and slots (NumPy), weights
    by the formula in xp (differentiable when xp is jax.numpy)."""
    B, K, S = thr.shape
    U = z.shape[-1]
    mask = np.zeros((B, K, S, U), bool)
    for b in range(B):
        for kh in range(K):
            for t in range(S):
                for u in range(U):
                    mask[b, kh, t, u] = lo[b, kh, t] <= u < hi[b, kh, t]
    blk = np.arange(S) // bq
    x = z[:, :, blk, :] - thr[..., None]
    w = xp.where(x >= 1, 1.0, xp.where(x > 0, x, 0.0))
    return mask, xp.where(xp.asarray(mask), w, 0.0)


def _float64_check(weights, onehot, win, wm, inputs, ct, out, g, dtype, names):
    """out and the gradients g of (q, k, v, scores, thresholds) against float64 autodiff of the
    dense masked softmax (tests/kernels/kernel_reference.py) whose slot weights [B, K, S, U] are
    ``weights(scores, thresholds)``; relative-norm tolerances FWD_TOL / GRAD_TOL."""
    with enable_x64():
        up = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731

        def f64(q, k, v, z, thr):
            allowed, Wm = gathered_allowed_weights(onehot, win, weights(z, thr))
            return dense_attention_jnp(q, k, v, allowed, Wm, wm)

        out64, vjp64 = jax.vjp(f64, *(up(x) for x in inputs))
        g64 = [np.asarray(x) for x in vjp64(up(ct))]
    assert rel_err(out, out64) < FWD_TOL[dtype]
    for name_, a, r in zip(names, g, g64):
        assert a.shape == r.shape, name_
        assert rel_err(a, r) < GRAD_TOL[dtype], (name_, rel_err(a, r))


SLOT_CASES = [
    # name, B, S, H, K, D, bq, U, dtype, window, wmode, seg, options
    ("gqa4_window_gate", 1, 70, 4, 1, 64, 32, 20, jnp.float32, 10, "gate", False,
     dict(tq=16, tu=16, tk=16, reduce_chunk=16)),
    ("gqa1_log_segments_scatter", 2, 48, 2, 2, 64, 16, 12, jnp.float32, 0, "log", True,
     dict(tu=16, tk=16, dkv_reduce="scatter")),
    ("gqa2_odd_d48_xla_gather", 1, 53, 4, 2, 48, 16, 10, jnp.float32, 7, "gate", False,
     dict(tu=16, tk=16, gather="xla")),
    ("bf16_gqa2_window", 1, 64, 4, 2, 64, 32, 16, jnp.bfloat16, 6, "gate", False, dict(tu=16, tk=16)),
    # the slot dK/dV kernel on whole blocks (one query sub-tile) while the others use tq = 16
    ("gqa2_window_slot_tq", 1, 75, 4, 2, 64, 32, 16, jnp.float32, 6, "gate", False,
     dict(tq=16, tu=16, tk=16, slot_tq=32)),
]


@pytest.mark.parametrize("case", SLOT_CASES, ids=[c[0] for c in SLOT_CASES])
def test_slot_selection(case):
    """The factored selection (mask and weights generated in the kernel from slot scores,
    slot ranges and thresholds): output and the gradients of q, k, v, the slot scores and
    the thresholds against float64 autodiff of a dense masked softmax whose mask and weights
    are expanded by explicit loops, and against the XLA path; poisoned outputs are written."""
    from sea_jax.kernels import SlotSelection

    name, B, S, H, K, D, bq, U, dtype, W, wm, use_seg, opts = case
    rng = _rng(name, "slots")
    q, k, v, union, _, _, seg = _inputs(rng, B, S, H, K, D, bq, U, dtype, False, None, use_seg)
    z, lo, hi, thr = _random_slot_selection(rng, B, K, S, bq, U)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    segj = None if seg is None else jnp.asarray(seg)
    common = dict(block_q=bq, window=W, weight_mode=wm, causal=True, segment_ids=segj)
    lo_j, hi_j, uj = jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(union)

    def run(impl, q, k, v, z, thr, **extra):
        f = lambda q, k, v, z, thr: gathered_attention(  # noqa: E731
            q, k, v, uj, selection=SlotSelection(z, lo_j, hi_j, thr), impl=impl, **common, **extra)
        out, vjp = jax.vjp(jax.jit(f), q, k, v, z, thr)
        return out, vjp(ct.astype(q.dtype))

    out, g = run("pallas_gpu", q, k, v, jnp.asarray(z), jnp.asarray(thr), interpret=True, kernel_options=opts)
    assert out.dtype == dtype and all(np.isfinite(np.asarray(x, np.float64)).all() for x in (out,) + g)
    mask, _ = _expand_slot_selection(z, lo, hi, thr, bq)
    onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=True, selection_mask=mask, segment_ids=seg)
    _float64_check(lambda z, thr: _expand_slot_selection(z, lo, hi, thr, bq, xp=jnp)[1], onehot, win, wm,
                   (q, k, v, z, thr), ct, out, g, dtype, ["q", "k", "v", "slot_scores", "threshold"])
    # -inf thresholds (weight 1) get exactly zero gradient, and so do slots nobody can use
    assert np.all(np.asarray(g[4])[np.isinf(thr)] == 0)
    # against the XLA path (SlotSelection.dense + the reference), float32
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out_x, gx = run("xla", f32(q), f32(k), f32(v), jnp.asarray(z), jnp.asarray(thr))
    assert rel_err(out, out_x) < FWD_TOL[dtype]
    for name_, a, r in zip(["q", "k", "v", "slot_scores", "threshold"], g, gx):
        assert rel_err(a, r) < GRAD_TOL[dtype], name_


@pytest.mark.parametrize("window", [0, 6])
def test_slot_tiles_inside_every_range_skip_the_range_test(window):
    """Slot ranges that hold the middle slot tiles for every query of a tile (and end inside a
    tile, start after the first for some query tiles, or are empty for a few queries): with
    ``range_branch`` (default) the forward skips the range test on those tiles; output and
    gradients are bitwise those of testing every element, and match float64 autodiff of the
    dense masked softmax."""
    from sea_jax.kernels import SlotSelection

    B, S, H, K, D, bq, U, dtype = 1, 128, 4, 2, 32, 32, 64, jnp.float32
    rng = _rng("covered_slot_tiles", window)
    q, k, v, _, _, _, _ = _inputs(rng, B, S, H, K, D, bq, U, dtype, False, None, False)
    # block i's slots: distinct keys every query of the block may see (so that the causal test
    # leaves whole slot tiles unmasked), -1 past them
    union = np.full((B, K, S // bq, U), -1, np.int32)
    for kh in range(K):
        for i in range(1, S // bq):
            n = min(U, i * bq - window)
            union[0, kh, i, :n] = rng.permutation(i * bq - window)[:n]
    z, _, _, thr = _random_slot_selection(rng, B, K, S, bq, U)
    lo = rng.integers(0, 3, (B, K, S))
    lo[..., 96:112] += 16  # a query tile whose ranges start after the first slot tile
    hi = U - rng.integers(0, 6, (B, K, S))  # (ends inside the last slot tile)
    hi[..., 70:72] = lo[..., 70:72]  # queries that select nothing
    lo, hi = lo.astype(np.int32), hi.astype(np.int32)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    uj, lo_j, hi_j = jnp.asarray(union), jnp.asarray(lo), jnp.asarray(hi)

    def run(**opts):
        f = lambda q, k, v, z, thr: gathered_attention(  # noqa: E731
            q, k, v, uj, selection=SlotSelection(z, lo_j, hi_j, thr), block_q=bq, window=window,
            impl="pallas_gpu", interpret=True, kernel_options=dict(tq=16, tu=16, tk=16, **opts))
        out, vjp = jax.vjp(jax.jit(f), q, k, v, jnp.asarray(z), jnp.asarray(thr))
        return out, vjp(ct)

    out, g = run()
    out_all, g_all = run(range_branch=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_all))
    for a, r in zip(g, g_all):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    mask, _ = _expand_slot_selection(z, lo, hi, thr, bq)
    onehot, win = gathered_slots(union, bq, H, S, S, window=window, causal=True, selection_mask=mask)
    _float64_check(lambda z, thr: _expand_slot_selection(z, lo, hi, thr, bq, xp=jnp)[1], onehot, win, "gate",
                   (q, k, v, z, thr), ct, out, g, dtype, ["q", "k", "v", "slot_scores", "threshold"])


def test_fully_visible_slot_tiles():
    """Slot tiles whose keys every query of the tile can see (no empty slot, no key later than
    the causal / window rule allows) skip the per-element visibility mask in the forward and
    dQ kernels; the selection's ranges still apply there. Unions of early keys only, partial
    ranges: output and gradients against float64 autodiff of the dense masked softmax."""
    from sea_jax.kernels import SlotSelection

    B, S, H, K, D, bq, U, W = 1, 96, 4, 2, 32, 32, 16, 8
    opts = dict(tq=16, tu=16, tk=16)
    rng = _rng("fully_visible", "slots")
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, n, D)), jnp.float32) for n in (H, K, K))
    nq = S // bq
    union = np.full((B, K, nq, U), -1, np.int32)  # block 0: no earlier keys, empty slots (masked path)
    for kh in range(K):
        for i in range(1, nq):
            union[0, kh, i] = np.sort(rng.choice(i * bq - W, size=U, replace=False))
    union[..., 1, U - 5:] = -1  # block 1: empty slots inside a visited tile (masked path)
    # the plain path is taken: in blocks >= 2 every slot tile is full and visible to all queries
    assert all(union[0, kh, i].max() <= i * bq - W for kh in range(K) for i in range(1, nq))
    z, lo, hi, thr = _random_slot_selection(rng, B, K, S, bq, U)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
    lo_j, hi_j, uj = jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(union)

    def f(q, k, v, z, thr):
        return gathered_attention(q, k, v, uj, selection=SlotSelection(z, lo_j, hi_j, thr), impl="pallas_gpu",
                                  block_q=bq, window=W, causal=True, interpret=True, kernel_options=opts)

    out, vjp = jax.vjp(jax.jit(f), q, k, v, jnp.asarray(z), jnp.asarray(thr))
    g = vjp(ct)
    mask, _ = _expand_slot_selection(z, lo, hi, thr, bq)
    assert mask[:, :, bq:].any() and not mask[:, :, bq:].all()  # partial ranges in the plain tiles
    onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=True, selection_mask=mask)
    _float64_check(lambda z, thr: _expand_slot_selection(z, lo, hi, thr, bq, xp=jnp)[1], onehot, win, "gate",
                   (q, k, v, z, thr), ct, out, g, jnp.float32, ["q", "k", "v", "slot_scores", "threshold"])


def _random_key_intervals(rng, B, K, S, bq, W, long=0.0):
    """A key-interval selection and the same selection in slot form, by explicit loops.

    Key p is used by the queries [p + W, end[p]) (ends random: before the start = never used,
    inside the sequence, or past its end); a block's union holds the keys whose range meets
    the block, sorted by end, latest first, so that the queries using a slot form a prefix of
    it: lo = 0, hi = the number of the block's keys whose range ends after the query.
    Returns (union, lo, hi, end, key scores, thresholds) as NumPy arrays."""
    nq = num_blocks(S, bq)
    start = np.arange(S) + W
    end = start + rng.integers(-20, S, (B, K, S))
    end[rng.random((B, K, S)) < long] = S + 5  # used up to the end (key tiles without a mask)
    end[..., ::9] = start[::9]  # never used
    end = np.clip(end, 0, S + 5)
    rows = []
    for b in range(B):
        for kh in range(K):
            for i in range(nq):
                q0, q1 = i * bq, min((i + 1) * bq, S)
                keys = [p for p in range(S) if start[p] < q1 and end[b, kh, p] > q0 and end[b, kh, p] > start[p]]
                rows.append(sorted(keys, key=lambda p: -end[b, kh, p]))
    U = max(1, max(len(r) for r in rows))
    union = np.full((B, K, nq, U), -1, np.int32)
    lo = np.zeros((B, K, S), np.int32)
    hi = np.zeros((B, K, S), np.int32)
    for n, r in enumerate(rows):
        b, kh, i = n // (K * nq), (n // nq) % K, n % nq
        union[b, kh, i, : len(r)] = r
        for t in range(i * bq, min((i + 1) * bq, S)):
            hi[b, kh, t] = sum(end[b, kh, p] > t for p in r)
    z = rng.normal(0.0, 1.0, (B, K, S)).astype(np.float32)
    thr = rng.normal(0.0, 0.5, (B, K, S)).astype(np.float32)
    thr[rng.random((B, K, S)) < 0.2] = -np.inf
    return union, lo, hi, end.astype(np.int32), z, thr


def _keyed_selection(z, union, lo, hi, thr, end):
    """SlotSelection with key intervals whose slot scores are the key scores gathered by slot
    (so that every path's total score gradient reaches z)."""
    from sea_jax.kernels import SlotSelection

    zslot = jnp.take_along_axis(jnp.repeat(z[:, :, None], union.shape[2], 2), jnp.maximum(union, 0), -1)
    return SlotSelection(zslot, lo, hi, thr, key_scores=z, key_end=end)


def _compiled_vs_xla(run, q, k, v, z, thr, dtype, names):
    """The compiled kernels (run("pallas_gpu", ...)) against the XLA path at float32 / highest
    precision: output and the gradients ``names``. float32 inputs: the Triton dots run in TF32
    on the GPU (10-bit mantissa products), hence the wider float32 tolerances."""
    out, g = run("pallas_gpu", q, k, v, jnp.asarray(z), jnp.asarray(thr))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out_x, gx = run("xla", f32(q), f32(k), f32(v), jnp.asarray(z), jnp.asarray(thr))
    fwd_tol, grad_tol = (FWD_TOL[dtype], GRAD_TOL[dtype]) if dtype != jnp.float32 else (3e-3, 1e-2)
    assert rel_err(out, out_x) < fwd_tol
    for name_, a, r in zip(names, g, gx):
        assert rel_err(a, r) < grad_tol, (name_, rel_err(a, r))


KEY_CASES = [
    # name, B, S, H, K, D, bq, dtype, window, wmode, seg, options
    ("gqa2_window_gate", 1, 70, 4, 2, 64, 32, jnp.float32, 10, "gate", False, dict(tq=16, tu=16, tk=16)),
    ("gqa4_log_segments", 2, 48, 4, 1, 32, 16, jnp.float32, 0, "log", True, dict(tu=16, tk=16, key_group=1, key_tiles=(32, 16))),
    ("bf16_gqa1_window_default_tiles", 1, 90, 2, 2, 64, 32, jnp.bfloat16, 6, "gate", False, {}),
    # most keys used to the end: whole query tiles inside every key's range (no mask)
    ("long_ranges_gqa2_gate", 1, 96, 4, 2, 32, 32, jnp.float32, 4, "gate", False,
     dict(tq=16, tu=16, tk=16, key_tiles=(16, 16), key_group=1, key_split=1)),
    # the key-major kernel's programs split the group's query heads (the default splits every
    # GQA case above but this one: K * key_split <= 8), here in 2 parts of 2 heads
    ("gqa4_split2_window", 1, 64, 4, 1, 32, 16, jnp.float32, 8, "gate", False,
     dict(tq=16, tu=16, tk=16, key_tiles=(16, 16), key_split=2)),
]


@pytest.mark.parametrize("case", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_key_interval_selection(case):
    """SlotSelection with key intervals (the GPU backward's key-major dK/dV: slot_dkv="keys",
    the default for such selections): output and the gradients of q, k, v, the per-key scores
    (the only ones the key-major path returns; the test's slot scores are a gather of them, so
    every path's total is compared) and the thresholds, against float64 autodiff of a dense
    masked softmax built from the intervals by explicit loops, and against the per-slot path."""

    name, B, S, H, K, D, bq, dtype, W, wm, use_seg, opts = case
    rng = _rng(name, "keys")
    q = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    seg = _inputs(rng, B, S, H, K, D, bq, 4, dtype, False, None, True)[-1] if use_seg else None
    union, lo, hi, end, z, thr = _random_key_intervals(rng, B, K, S, bq, W, long=0.95 if "long" in name else 0.0)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    segj = None if seg is None else jnp.asarray(seg)
    uj, lo_j, hi_j, end_j = (jnp.asarray(a) for a in (union, lo, hi, end))

    def run(impl, q, k, v, z, thr, **extra):
        def f(q, k, v, z, thr):
            return gathered_attention(q, k, v, uj, selection=_keyed_selection(z, uj, lo_j, hi_j, thr, end_j),
                                      impl=impl, block_q=bq, window=W, weight_mode=wm, segment_ids=segj, **extra)

        out, vjp = jax.vjp(jax.jit(f), q, k, v, z, thr)
        return out, vjp(ct.astype(q.dtype))

    zj, thrj = jnp.asarray(z), jnp.asarray(thr)
    out, g = run("pallas_gpu", q, k, v, zj, thrj, interpret=True, kernel_options=opts)
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in (out,) + g)
    # the dense definition: key p used by query t iff p + W <= t < end[p] (and visible)
    nq = union.shape[2]
    mask = np.zeros((B, K, S, union.shape[-1]), bool)
    for b in range(B):
        for kh in range(K):
            for t in range(S):
                for u, p in enumerate(union[b, kh, t // bq]):
                    mask[b, kh, t, u] = p >= 0 and p + W <= t < end[b, kh, p]
    # the slot form (lo <= u < hi, and the kernel's causal check) is the same selection
    pos = np.repeat(union, bq, axis=2)[:, :, :S]
    u = np.arange(union.shape[-1])
    slot_form = (u >= lo[..., None]) & (u < hi[..., None]) & (pos >= 0) & (pos + W <= np.arange(S)[:, None])
    np.testing.assert_array_equal(slot_form, mask)
    onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=True, selection_mask=mask, segment_ids=seg)

    def weights(z, thr):  # clip(z_p - tau_t, 0, 1) on the selected slots, differentiable in z and tau
        zs = jnp.take_along_axis(jnp.repeat(z[:, :, None], nq, 2), jnp.asarray(np.maximum(union, 0)), -1)
        x = jnp.repeat(zs, bq, axis=2)[:, :, :S] - thr[..., None]
        return jnp.where(jnp.asarray(mask), jnp.where(x >= 1, 1.0, jnp.where(x > 0, x, 0.0)), 0.0)

    _float64_check(weights, onehot, win, wm, (q, k, v, z, thr), ct, out, g, dtype,
                   ["q", "k", "v", "key_scores", "threshold"])
    # the per-slot path (slot kernel + sorted reduction) on the same selection
    out_s, gs = run("pallas_gpu", q, k, v, zj, thrj, interpret=True, kernel_options={**opts, "slot_dkv": "slots"})
    assert rel_err(out_s, out) == 0.0  # the same forward kernel
    for name_, a, r in zip(["q", "k", "v", "key_scores", "threshold"], g, gs):
        assert rel_err(a, r) < GRAD_TOL[dtype], (name_, rel_err(a, r))


def test_key_tiles(monkeypatch):
    """_key_tiles against explicit loops: every key in exactly one tile; a tile's query tiles
    cover the ranges of all its selected keys (and no more); selected keys come first, in
    groups of key_group tiles by where their ranges end (latest first), by position inside a
    group; tiles of never-selected keys visit nothing; the packed-key sorts and the batched
    fallback (and the 1-D pair sort between them) give the same tiles."""
    from sea_jax.kernels.gpu_gathered import _key_tiles

    rng = np.random.default_rng(5)
    B, K, S, W, tk, tq = 2, 3, 256, 8, 16, 16
    start = np.arange(S) + W
    end = np.clip(start + rng.integers(-40, 120, (B, K, S)), 0, S)
    end[0, 0, :20] = S  # long ranges
    cfg = type("Cfg", (), dict(key_tk=tk, key_tq=tq, w=W, seq_q=S, key_group=2))()
    perm, first, count = (np.asarray(a) for a in _key_tiles(cfg, jnp.asarray(end, jnp.int32)))
    for b in range(B):
        for kh in range(K):
            assert sorted(perm[b, kh]) == list(range(S))
            live = end[b, kh] > start
            n_live = int(live.sum())
            assert live[perm[b, kh, :n_live]].all() and not live[perm[b, kh, n_live:]].any()
            # groups of 2 tiles in order of the range ends, latest first
            ends = [np.sort(end[b, kh, perm[b, kh, g:min(g + 2 * tk, n_live)]]) for g in range(0, n_live, 2 * tk)]
            assert all(x[0] >= y[-1] for x, y in zip(ends, ends[1:]))
            for t in range(S // tk):
                keys = perm[b, kh, t * tk:(t + 1) * tk]
                keys = keys[live[keys]]
                if keys.size == 0:
                    assert count[b, kh, t] == 0
                    continue
                q_lo, q_hi = first[b, kh, t] * tq, (first[b, kh, t] + count[b, kh, t]) * tq
                if t % 2 == 1 and (t + 1) * tk <= n_live:  # inside a group of 2: by position
                    assert (np.diff(perm[b, kh, (t - 1) * tk:(t + 1) * tk]) > 0).all()
                assert q_lo <= start[keys].min() and end[b, kh, keys].max() <= q_hi
                assert q_lo > start[keys].min() - tq and end[b, kh, keys].max() > q_hi - tq  # no extra tile
    groups3 = type("Cfg", (), dict(key_tk=tk, key_tq=tq, w=W, seq_q=S, key_group=3))()
    packed = [np.asarray(a) for a in _key_tiles(groups3, jnp.asarray(end, jnp.int32))]
    # by end: rows * span = 6 * 258 fits, rows * span * S = 6 * 258 * 256 does not: the pair sort;
    # by group (6 * 7 * 256) still packed
    monkeypatch.setattr("sea_jax.kernels.gpu_gathered._PACKED_SORT_LIMIT", 20000)
    pairs = [np.asarray(a) for a in jax.jit(lambda e: _key_tiles(groups3, e))(jnp.asarray(end, jnp.int32))]
    monkeypatch.setattr("sea_jax.kernels.gpu_gathered._PACKED_SORT_LIMIT", 0)  # force the batched sorts
    batched = [np.asarray(a) for a in jax.jit(lambda e: _key_tiles(groups3, e))(jnp.asarray(end, jnp.int32))]
    for a, b_, c_ in zip(packed, pairs, batched):
        np.testing.assert_array_equal(a, b_)
        np.testing.assert_array_equal(a, c_)


def test_slot_selection_bad_arguments():
    from sea_jax.kernels import SlotSelection

    B, S, K, bq, U = 1, 32, 1, 16, 8
    q = jnp.ones((B, S, 2, 16), jnp.float32)
    union = jnp.full((B, K, 2, U), -1, jnp.int32)
    good = SlotSelection(jnp.zeros((B, K, 2, U)), jnp.zeros((B, K, S), jnp.int32),
                         jnp.zeros((B, K, S), jnp.int32), jnp.zeros((B, K, S)))
    call = lambda **kw: gathered_attention(q, q[:, :, :1], q[:, :, :1], union, block_q=bq, impl="xla", **kw)  # noqa: E731
    call(selection=good)
    with pytest.raises(ValueError, match="not both"):
        call(selection=good, selection_mask=jnp.ones((B, K, S, U), bool))
    with pytest.raises(ValueError, match=r"selection.slot_scores must have shape \(1, 1, 2, 8\)"):
        call(selection=good._replace(slot_scores=jnp.zeros((B, K, 3, U))))
    with pytest.raises(ValueError, match="selection.select_lo must be integer"):
        call(selection=good._replace(select_lo=jnp.zeros((B, K, S))))
    with pytest.raises(ValueError, match="selection.threshold must be floating"):
        call(selection=good._replace(threshold=jnp.zeros((B, K, S), jnp.int32)))
    with pytest.raises(ValueError, match="must be a SlotSelection"):
        call(selection=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="key_scores and selection.key_end go together"):
        call(selection=good._replace(key_scores=jnp.zeros((B, K, S))))
    keyed = good._replace(key_scores=jnp.zeros((B, K, S)), key_end=jnp.zeros((B, K, S), jnp.int32))
    call(selection=keyed)
    with pytest.raises(ValueError, match=r"selection.key_end must have shape \(1, 1, 32\)"):
        call(selection=keyed._replace(key_end=jnp.zeros((B, K, S + 1), jnp.int32)))
    with pytest.raises(ValueError, match="selection.key_end must be integer"):
        call(selection=keyed._replace(key_end=jnp.zeros((B, K, S))))
    gpu = lambda sel, **o: gathered_attention(  # noqa: E731
        q, q[:, :, :1], q[:, :, :1], union, block_q=bq, impl="pallas_gpu", interpret=True, selection=sel,
        kernel_options=o)
    with pytest.raises(ValueError, match="slot_dkv='keys' needs a selection with key intervals"):
        gpu(good, slot_dkv="keys")
    with pytest.raises(ValueError, match="slot_dkv must be 'auto', 'slots' or 'keys'"):
        gpu(keyed, slot_dkv="key")
    with pytest.raises(ValueError, match="key_group must be an int >= 1"):
        gpu(keyed, key_group=0)
    for bad in (0, 3, 1.0):
        with pytest.raises(ValueError, match="key_split must be an int >= 1 dividing the 2 query heads per KV head"):
            gpu(keyed, key_split=bad)
    with pytest.raises(ValueError, match=r"key_tiles\[1\] must be a power-of-two"):
        gpu(keyed, key_tiles=(16, 24))
    with pytest.raises(ValueError, match=r"key_tiles\[1\]=32 \(the key-major kernel's query tile\) must divide block_q=16"):
        gpu(keyed, key_tiles=(16, 32))


def test_slot_kernel_defaults():
    """Whole 128-query blocks as the slot kernel's sub-tile where the q / dO tiles fit in an
    H100's shared memory (rows of <= 256 bytes; measured: float32 128 x 128 did not), 2 stages
    under GQA (3 stages of 128 x 128 bfloat16 did not fit); dense selections keep tq."""
    from sea_jax.kernels.gpu_gathered import default_reduce_stages, default_slot_stages, default_slot_tq

    bf, f32 = jnp.bfloat16, jnp.float32
    assert default_slot_tq(128, 64, 128, bf, factored=True) == 128
    assert default_slot_tq(128, 32, 128, f32, factored=True) == 32  # 512-byte rows: tq
    assert default_slot_tq(128, 64, 64, f32, factored=True) == 128
    assert default_slot_tq(128, 64, 128, f32, factored=True) == 64  # 512-byte rows
    assert default_slot_tq(128, 64, 96, f32, factored=True) == 64  # D rounds up to 128
    assert default_slot_tq(128, 64, 128, bf, factored=False) == 64
    assert default_slot_tq(256, 64, 128, bf, factored=True) == 64
    assert default_slot_tq(64, 64, 128, bf, factored=True) == 64
    assert [default_slot_stages(t, h, kv) for t, h, kv in ((128, 16, 4), (128, 16, 16), (64, 16, 4))] == [2, 3, 3]
    # the sorted reduction: 3 stages for bfloat16 partials at D <= 128 (measured), else 2
    assert [default_reduce_stages(d, dt) for d, dt in ((128, "bfloat16"), (64, "bfloat16"), (64, "float32"),
                                                       (128, "float32"), (256, "bfloat16"))] == [3, 3, 2, 2, 2]


@pytest.mark.parametrize("bq,opts,keyed", [(64, None, False), (128, dict(slot_tq=128, num_warps=(4, 4, 4, 8, 4)), False),
                                           (128, None, False), (128, None, True)])
def test_slot_selection_lowers_to_triton_for_an_h100(bq, opts, keyed):
    """Forward and backward of the factored form go through the Pallas -> Triton lowering on
    the CPU machine (a construct Triton cannot take fails here, not first on the GPU)."""
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    from sea_jax.kernels import SlotSelection

    sds = jax.ShapeDtypeStruct
    B, S, H, K, D, U = 1, 512, 4, 2, 128, 128
    nq = S // bq

    def loss(q, k, v, union, z, lo, hi, thr):
        keys = dict(key_scores=z[:, :, 0, :1].repeat(S, -1), key_end=lo) if keyed else {}
        o = gathered_attention(q, k, v, union, block_q=bq, window=64, impl="pallas_gpu",
                               selection=SlotSelection(z, lo, hi, thr, **keys), kernel_options=opts)
        return jnp.sum(o.astype(jnp.float32))

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 7))).trace(
            sds((B, S, H, D), jnp.bfloat16), sds((B, S, K, D), jnp.bfloat16), sds((B, S, K, D), jnp.bfloat16),
            sds((B, K, nq, U), jnp.int32), sds((B, K, nq, U), jnp.float32), sds((B, K, S), jnp.int32),
            sds((B, K, S), jnp.int32), sds((B, K, S), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(\w+)", text)
    assert calls and set(calls) == {"__gpu"}
    for name in ("gathered_fwd", "gathered_dq", "gathered_dkv_window",
                 "gathered_dkv_keys" if keyed else "gathered_dkv_slots"):
        assert name in text, name


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernels need a GPU (interpret mode covers them on CPU)")
@pytest.mark.parametrize("dtype,D,H,K,W,bq", [
    (jnp.bfloat16, 128, 4, 2, 100, 64), (jnp.float32, 64, 2, 2, 0, 64), (jnp.float32, 128, 4, 2, 100, 64),
    (jnp.bfloat16, 128, 2, 2, 100, 128), (jnp.bfloat16, 128, 8, 2, 100, 128), (jnp.float32, 64, 4, 2, 0, 128),
    (jnp.float32, 128, 4, 2, 100, 128), (jnp.float32, 128, 2, 2, 100, 128), (jnp.float16, 64, 4, 1, 30, 128)])
def test_slot_selection_compiled_on_gpu(dtype, D, H, K, W, bq):
    """The compiled factored kernels (forward, dQ + thresholds, slot dK/dV + slot scores)
    against the XLA path on the GPU: 1000 tokens (padding), blocks of 64 or 128 (the slot
    kernel then on whole 128-query blocks, 8 warps, with GQA on 2 stages; float32 at D = 128
    takes 32-row tiles and sub-tiles, row_scaled_tile), U = 192.
    The default tiles and stages of every dtype / head dim / GQA layout must compile."""
    from sea_jax.kernels import SlotSelection

    B, S, U = 1, 1000, 192
    rng = _rng("compiled", D)
    q, k, v, union, _, _, _ = _inputs(rng, B, S, H, K, D, bq, U, dtype, False, None, False)
    z, lo, hi, thr = _random_slot_selection(rng, B, K, S, bq, U)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    lo_j, hi_j, uj = jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(union)

    def run(impl, q, k, v, z, thr):
        f = lambda q, k, v, z, thr: gathered_attention(  # noqa: E731
            q, k, v, uj, block_q=bq, window=W, selection=SlotSelection(z, lo_j, hi_j, thr), impl=impl)
        out, vjp = jax.vjp(jax.jit(f), q, k, v, z, thr)
        return out, vjp(ct.astype(q.dtype))

    _compiled_vs_xla(run, q, k, v, z, thr, dtype, ["q", "k", "v", "slot_scores", "threshold"])


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernels need a GPU (interpret mode covers them on CPU)")
@pytest.mark.parametrize("dtype,D,H,K,W,bq", [
    (jnp.bfloat16, 128, 2, 2, 100, 128), (jnp.bfloat16, 128, 8, 2, 100, 128), (jnp.float32, 128, 4, 2, 100, 128),
    (jnp.float32, 64, 2, 2, 0, 64), (jnp.float16, 64, 4, 1, 30, 128)])
def test_key_interval_selection_compiled_on_gpu(dtype, D, H, K, W, bq):
    """The compiled key-major dK/dV kernel (selections with key intervals, default tiles)
    against the XLA path on the GPU: 600 tokens (padding), random key intervals."""

    B, S = 1, 600
    rng = _rng("compiled_keys", D, H)
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, h, D)), dtype) for h in (H, K, K))
    union, lo, hi, end, z, thr = _random_key_intervals(rng, B, K, S, bq, W)
    ct = jnp.asarray(rng.standard_normal((B, S, H, D)), dtype)
    uj, lo_j, hi_j, end_j = (jnp.asarray(a) for a in (union, lo, hi, end))

    def run(impl, q, k, v, z, thr):
        def f(q, k, v, z, thr):
            return gathered_attention(q, k, v, uj, block_q=bq, window=W, impl=impl,
                                      selection=_keyed_selection(z, uj, lo_j, hi_j, thr, end_j))

        out, vjp = jax.vjp(jax.jit(f), q, k, v, z, thr)
        return out, vjp(ct.astype(q.dtype))

    _compiled_vs_xla(run, q, k, v, z, thr, dtype, ["q", "k", "v", "key_scores", "threshold"])


def test_slot_grouping_by_key_tile():
    """_sorted_slots (the sorted reduction's slot list) against explicit loops: per row, every
    slot appears once, grouped by key tile in ascending order, with the tile starts; empty
    slots last."""
    from sea_jax.kernels.gpu_gathered import _sorted_slots

    rng = np.random.default_rng(3)
    B, K, nq, U, S, tk, chunk, Skv_pad = 2, 3, 5, 24, 200, 16, 16, 208
    union = random_union(rng, B, K, nq, U, S)
    keys, pos, starts = (np.asarray(a) for a in _sorted_slots(jnp.asarray(union), Skv_pad, tk, chunk))
    n = nq * U
    for b in range(B):
        for h in range(K):
            flat = union[b, h].reshape(-1)
            assert sorted(pos[b, h, :n].tolist()) == list(range(n))
            for j in range(n):
                want = flat[pos[b, h, j]]
                assert keys[b, h, j] == (want if want >= 0 else Skv_pad)
            tiles = keys[b, h, :n] // tk
            assert (np.diff(tiles) >= 0).all()
            for t in range(Skv_pad // tk + 1):
                assert starts[b, h, t] == np.sum(keys[b, h, :n] < t * tk)
            assert (keys[b, h, n:] == Skv_pad).all()
