"""XLA reference (impl="xla") against an explicit dense masked softmax; float64 finite
differences for its gradients; the public entry points' input validation.

Tolerances: float64 inputs 1e-10 (relative norm); float32 2e-5.
"""

import contextlib
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

sys.path.insert(0, os.path.dirname(__file__))  # kernel_reference.py lives beside this file
from kernel_reference import (  # noqa: E402
    block_sparse_allowed,
    dense_attention_np,
    gathered_allowed_weights,
    gathered_slots,
    key_weight_matrix,
    random_block_mask,
    random_union,
    rel_err,
)
from x64 import enable_x64  # noqa: E402

from sea_jax.kernels import (  # noqa: E402
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_reference,
    gathered_attention,
    gathered_attention_reference,
)
from sea_jax.kernels.layout import num_blocks  # noqa: E402


def _qkv(seed, B, Sq, Skv, H, K, D, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, Sq, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, Skv, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, Skv, K, D), jnp.float32).astype(dtype)
    return q, k, v


def _segments(rng, B, S):
    """Random segment ids with a padded tail (0)."""
    seg = np.zeros((B, S), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, S - 4), 2, replace=False))
        seg[b, : cuts[0]], seg[b, cuts[0]: cuts[1]], seg[b, cuts[1]: S - 3] = 1, 2, 3
    return seg


BS_CASES = [
    # B, Sq, Skv, H, K, G, D, bq, bk, causal, window, weights, segments
    (2, 37, 37, 4, 4, 4, 8, 16, 16, True, None, None, False),
    (1, 50, 50, 8, 2, 2, 16, 16, 32, True, 20, "gate", False),
    (1, 40, 70, 8, 1, 1, 8, 32, 16, False, None, "log", False),
    (2, 45, 45, 4, 2, 1, 8, 16, 16, True, None, "gate", True),
]


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in BS_CASES] + [(BS_CASES[3], jnp.float64)])
def test_block_sparse_reference_vs_dense(case, dtype):
    B, Sq, Skv, H, K, G, D, bq, bk, causal, window, wmode, use_seg = case
    rng = np.random.default_rng(zlib.crc32(repr((case, dtype)).encode()))
    with enable_x64() if dtype == jnp.float64 else contextlib.nullcontext():
        q, k, v = _qkv(int(rng.integers(1 << 30)), B, Sq, Skv, H, K, D, dtype)
        mask = random_block_mask(rng, B, G, num_blocks(Sq, bq), num_blocks(Skv, bk))
        lay = BlockLayout.from_mask(mask, bq, bk)
        kw = jnp.asarray(rng.uniform(0, 1.5, (B, Skv, K)), dtype) if wmode else None
        kw = kw.at[:, ::5].set(0.0) if wmode else None  # exact zeros (log mode drops them)
        seg = _segments(rng, B, Sq) if use_seg else None
        out = block_sparse_attention_reference(
            q, k, v, lay, key_weights=kw, weight_mode=wmode or "gate", causal=causal,
            window=window, segment_ids=None if seg is None else jnp.asarray(seg))
        allowed = block_sparse_allowed(mask, bq, bk, B, H, Sq, Skv, causal=causal, window=window, segment_ids=seg)
        W = None if kw is None else np.asarray(key_weight_matrix(kw, H, Sq))
        ref = dense_attention_np(q, k, v, allowed, W, wmode or "gate")
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, ref) < (1e-10 if dtype == jnp.float64 else 2e-5)
    # rows with nothing visible are exactly zero
    empty = ~allowed.any(-1)  # [B, H, Sq]
    assert empty.any()
    assert np.all(np.asarray(out, np.float64)[np.moveaxis(empty, 1, 2)] == 0)


G_CASES = [
    # B, S, H, K, D, bq, U, window, causal, mask, weights, segments
    (1, 37, 4, 2, 8, 16, 5, 0, True, False, None, False),
    (2, 50, 8, 1, 8, 16, 7, 6, True, True, "gate", False),
    (1, 40, 4, 4, 16, 32, 9, 0, False, True, "log", False),
    (2, 45, 4, 2, 8, 16, 6, 5, True, False, "gate", True),
]


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in G_CASES] + [(G_CASES[1], jnp.float64)])
def test_gathered_reference_vs_dense(case, dtype):
    B, S, H, K, D, bq, U, W, causal, use_mask, wmode, use_seg = case
    rng = np.random.default_rng(zlib.crc32(repr((case, dtype)).encode()))
    with enable_x64() if dtype == jnp.float64 else contextlib.nullcontext():
        q, k, v = _qkv(int(rng.integers(1 << 30)), B, S, S, H, K, D, dtype)
        nq = num_blocks(S, bq)
        union = random_union(rng, B, K, nq, U, S)
        sel = rng.random((B, K, S, U)) < 0.7 if use_mask else None
        wsel = jnp.asarray(rng.uniform(0, 1.5, (B, K, S, U)), dtype) if wmode else None
        seg = _segments(rng, B, S) if use_seg else None
        out = gathered_attention_reference(
            q, k, v, jnp.asarray(union), block_q=bq, window=W, selection_mask=None if sel is None else jnp.asarray(sel),
            selection_weights=wsel, weight_mode=wmode or "gate", causal=causal,
            segment_ids=None if seg is None else jnp.asarray(seg))
        onehot, win = gathered_slots(union, bq, H, S, S, window=W, causal=causal, selection_mask=sel, segment_ids=seg)
        allowed, Wm = gathered_allowed_weights(onehot, win, wsel)
        ref = dense_attention_np(q, k, v, allowed, None if Wm is None else np.asarray(Wm), wmode or "gate")
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-10 if dtype == jnp.float64 else 2e-5)
    empty = ~allowed.any(-1)
    assert empty.any() or (W > 0 and not use_seg)  # a window always shows the query itself
    assert np.all(np.asarray(out, np.float64)[np.moveaxis(empty, 1, 2)] == 0)


@pytest.mark.parametrize("wmode", ["gate", "log"])
def test_block_sparse_reference_grads_fd(wmode):
    """float64 finite differences for q, k, v and the key weights (an empty row included)."""
    rng = np.random.default_rng(7)
    B, S, H, K, D, b = 1, 24, 2, 1, 4, 16
    with enable_x64():
        q, k, v = _qkv(3, B, S, S, H, K, D, jnp.float64)
        kw = jnp.asarray(rng.uniform(0.2, 1.5, (B, S, K)))
        mask = np.array([[False, False], [True, True]])  # first query block sees nothing
        lay = BlockLayout.from_mask(mask, b, b)
        f = jax.jit(lambda q, k, v, w: block_sparse_attention_reference(
            q, k, v, lay, key_weights=w, weight_mode=wmode, window=10))
        check_grads(f, (q, k, v, kw), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)
        g = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))(q, k, v, kw)
        assert all(np.isfinite(np.asarray(x)).all() for x in g)
        assert np.all(np.asarray(g[0])[:, :b] == 0)  # the empty rows get zero gradient


def test_gathered_reference_grads_fd():
    rng = np.random.default_rng(8)
    B, S, H, K, D, bq, U = 1, 24, 2, 1, 4, 8, 4
    with enable_x64():
        q, k, v = _qkv(4, B, S, S, H, K, D, jnp.float64)
        union = jnp.asarray(random_union(rng, B, K, S // bq, U, S))
        wsel = jnp.asarray(rng.uniform(0.2, 1.5, (B, K, S, U)))
        f = jax.jit(lambda q, k, v, w: gathered_attention_reference(
            q, k, v, union, block_q=bq, window=3, selection_weights=w, weight_mode="log"))
        check_grads(f, (q, k, v, wsel), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)


def test_log_mode_zero_weights_no_nan():
    """All-zero weights in log mode: the row has no mass -> zero output and finite grads."""
    q, k, v = _qkv(0, 1, 16, 16, 2, 1, 8, jnp.float32)
    lay = BlockLayout.causal(16, 16, 16, 16)
    w = jnp.zeros((1, 16, 1))
    f = lambda q, k, v, w: block_sparse_attention(q, k, v, lay, key_weights=w, weight_mode="log", impl="xla")
    out, vjp = jax.vjp(jax.jit(f), q, k, v, w)
    assert np.all(np.asarray(out) == 0)
    g = vjp(jnp.ones_like(out))
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_entry_point_xla_is_reference():
    q, k, v = _qkv(1, 1, 40, 40, 4, 2, 8, jnp.float32)
    lay = BlockLayout.sliding_window(40, 40, 17, 16, 16)
    a = block_sparse_attention(q, k, v, lay, window=17, impl="xla")
    b = block_sparse_attention(q, k, v, lay, window=17, impl="auto")  # CPU: auto = xla
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------- bad inputs
def _bs_args():
    q, k, v = _qkv(0, 1, 32, 32, 4, 2, 8, jnp.float32)
    return q, k, v, BlockLayout.causal(32, 32, 16, 16)


@pytest.mark.parametrize("change,match", [
    (dict(impl="cuda"), "impl"),
    (dict(weight_mode="mul"), "weight_mode"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(scale=-1.0), "scale"),
    (dict(causal=1), "causal"),
    (dict(key_weights=jnp.ones((1, 32, 4))), "key_weights"),
    (dict(key_weights=jnp.ones((1, 32, 2), jnp.int32)), "key_weights"),
    (dict(segment_ids=jnp.ones((1, 31), jnp.int32)), "segment_ids"),
    (dict(segment_ids=jnp.ones((1, 32), jnp.float32)), "segment_ids"),
    (dict(layout="causal"), "layout"),
    (dict(layout=BlockLayout.causal(48, 32, 16, 16)), "query blocks"),
    (dict(layout=BlockLayout.causal(32, 64, 16, 16)), "key blocks"),
    (dict(layout=BlockLayout.from_mask(np.ones((3, 2, 2), bool), 16, 16)), "head groups"),
    (dict(q=jnp.ones((1, 32, 4), jnp.float32)), "q must have shape"),
    (dict(q=jnp.ones((1, 32, 4, 8), jnp.int32)), "q must be float"),
    (dict(q=jnp.ones((1, 32, 3, 8), jnp.float32)), "multiple"),
    (dict(v=jnp.ones((1, 31, 2, 8), jnp.float32)), "same shape"),
    (dict(k=jnp.ones((1, 32, 2, 4), jnp.float32), v=jnp.ones((1, 32, 2, 4), jnp.float32)), "k/v must have shape"),
    (dict(q=jnp.ones((1, 32, 4, 8), jnp.bfloat16)), "dtype"),
])
def test_block_sparse_bad_inputs(change, match):
    q, k, v, lay = _bs_args()
    a = dict(q=q, k=k, v=v, layout=lay)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("layout"), **a)


@pytest.mark.parametrize("change,match", [
    (dict(block_q=24), "block_q"),
    (dict(window=-1), "window"),
    (dict(window=4, causal=False), "causal"),
    (dict(union_index=jnp.zeros((1, 2, 3, 4), jnp.int32)), r"union_index must have shape"),
    (dict(union_index=jnp.zeros((1, 2, 2, 4), jnp.float32)), "integer"),
    (dict(union_index=jnp.zeros((1, 2, 2, 0), jnp.int32)), "at least one slot"),
    (dict(union_index=jnp.full((1, 2, 2, 4), 32, jnp.int32)), "seq_kv"),
    (dict(union_index=jnp.full((1, 2, 2, 4), -2, jnp.int32)), "seq_kv"),
    (dict(union_index=jnp.array([[[[1, 2, 1, -1]] * 2] * 2], jnp.int32)), "duplicate"),
    (dict(selection_mask=jnp.ones((1, 2, 32, 3), bool)), "selection_mask"),
    (dict(selection_mask=jnp.ones((1, 2, 32, 4), jnp.int32)), "boolean"),
    (dict(selection_weights=jnp.ones((1, 2, 31, 4))), "selection_weights"),
    (dict(selection_weights=jnp.ones((1, 2, 32, 4), jnp.int32)), "floating"),
    (dict(impl="gpu"), "impl"),
])
def test_gathered_bad_inputs(change, match):
    q, k, v = _qkv(0, 1, 32, 32, 4, 2, 8, jnp.float32)
    a = dict(union_index=jnp.tile(jnp.arange(4, dtype=jnp.int32), (1, 2, 2, 1)), block_q=16)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        gathered_attention(q, k, v, a.pop("union_index"), **a)


def test_duplicates_rejected_but_empty_slots_allowed():
    q, k, v = _qkv(0, 1, 32, 32, 2, 1, 8, jnp.float32)
    union = jnp.array([[[[3, -1, -1, 5], [-1, -1, -1, -1]]]], jnp.int32)
    out = gathered_attention(q, k, v, union, block_q=16, impl="xla")
    assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="duplicate"):
        gathered_attention(q, k, v, union.at[0, 0, 1, :2].set(7), block_q=16, impl="xla")
