"""sea_jax.kernels.cell_mask and the block-sparse kernels' ``cell_mask=`` (SEA's token-level
selection), in interpret mode on CPU and compiled on a GPU.

References written here: the allowed keys by explicit loops with Python integer arithmetic
(cell c of a row of length L holds offset o iff (2 o + 1) M // (2 L) == c), then the dense
masked softmax of kernel_reference.py (float64). Tolerances as test_gpu_block_sparse.py:
float32 2e-5 forward / 1e-4 gradients, bfloat16 1.5e-2 / 3e-2 (relative norm error).
"""

import functools
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from kernel_reference import dense_attention_jnp, dense_attention_np, random_block_mask, rel_err  # noqa: E402
from reference_attention import segment_rows  # noqa: E402
from x64 import enable_x64  # noqa: E402

from sea_jax.kernels import BlockLayout, CellMask, block_sparse_attention  # noqa: E402
from sea_jax.kernels.cell_mask import cells_of_tile  # noqa: E402
from sea_jax.kernels.layout import num_blocks  # noqa: E402

FWD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.5e-2}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _cell_allowed(cells, start, length, S):
    """allowed [B, H, T, S] of a cell selection, by loops."""
    B, T, H, M = cells.shape
    a = np.zeros((B, H, T, S), bool)
    for b in range(B):
        for t in range(T):
            L = int(length[b, t])
            for s in range(int(start[b, t]), int(start[b, t]) + L):
                c = ((2 * (s - int(start[b, t])) + 1) * M) // (2 * L)
                a[b, :, t, s] = cells[b, t, :, c]
    return a


def _block_allowed(block_mask, bq, bk, H, T, S):
    B, G = block_mask.shape[:2]
    a = np.zeros((B, H, T, S), bool)
    for h in range(H):
        for t in range(T):
            for s in range(S):
                a[:, h, t, s] = block_mask[:, h // (H // G), t // bq, s // bk]
    return a


def _tiles(rng, M, tk, tq, n):
    """n tiles of tq rows (prefix starts, lengths, key tile start): rows from one regime (long
    rows spanning <= 2 cells of a tk-key tile, medium rows <= 32 cells, short rows, lengths
    near the int32 limit) with the tile near a row's cell boundary or at random, or rows of
    mixed kinds, each with its own start so that a cell boundary falls inside the tile."""
    top = 2**30 // M - 1
    starts, lengths, k0s = [], [], []
    for i in range(n):
        regime = i % 7
        if regime >= 5:  # rows of every kind, each with a cell boundary inside the tile
            k0 = top // 2 - tk
            kinds = rng.integers(0 if regime == 5 else 1, 3, tq)
            L = np.where(kinds == 0, rng.integers(1, max(3, M * tk // 8), tq),
                         np.where(kinds == 1, rng.integers(M * tk // 31 + 1, 16384, tq), rng.integers(16384, top // 2, tq)))
            c = rng.integers(1, M, tq)
            bound = (2 * c * L + M - 1) // (2 * M)
            start = np.where(kinds == 0, k0 - rng.integers(0, 3, tq), k0 - bound + rng.integers(-2, tk + 2, tq))
            if 2**27 < top and regime == 5:
                # L (d_max + 1) = 2**27 * 32 = 2**32 would wrap to 0 in int32: the tile ends just
                # before a cell boundary, where the float path rounds wrong at this length
                L[:] = 2**27
                L[0] = 1  # a short row: the tile leaves the two-cell path
                start[:] = k0 + tk - (2 * L + M - 1) // (2 * M)
                start[0] = k0
            start = np.maximum(start, 0)
        else:
            if regime == 3:  # short and long rows in one tile
                L = np.concatenate([rng.integers(1, max(3, M * tk // 8), tq // 2),
                                    rng.integers(16384, top, tq - tq // 2)])
            else:
                lo, hi = [(M * tk, top), (M * tk // 31 + 1, 16384), (1, M * tk // 31 + 2), None, (top - 64, top)][regime]
                L = rng.integers(lo, max(hi, lo + 1), tq)
            s0 = int(rng.integers(0, 50))
            t = int(rng.integers(0, tq))
            c = int(rng.integers(1, M))
            bound = (2 * c * max(int(L[t]), 1) + M - 1) // (2 * M)  # a key where row t's cell changes
            shortest = int(L.min())
            k0 = s0 + bound - int(rng.integers(0, tk)) if i % 2 else s0 + int(rng.integers(-tk // 2, shortest))
            start = np.full(tq, s0)
        L[1:][rng.random(tq - 1) < 0.1] = 0  # rows that see nothing
        starts.append(start)
        lengths.append(L)
        k0s.append(k0)
    return np.array(starts, np.int32), np.array(lengths, np.int32), np.array(k0s, np.int32)


@pytest.mark.parametrize("M,tk", [(4, 16), (12, 32), (256, 64), (40, 64), (256, 128)])
def test_cells_of_tile_equals_integer_division(M, tk):
    """The kernel's tile mask (three paths: one boundary comparison per element when every
    row spans <= 2 cells; otherwise the cell in float32 relative to the row's first cell, or
    a float estimate with an exact integer correction where that could round wrong, or the
    key offset for rows shorter than M, looked up in the row's window of words) equals the floor division (2 o + 1) M // (2 L) and the cell's bit, for rows from every
    regime including lengths near the int32 limit 2 M L < 2**31, M not a power of two, keys
    outside the rows, tiles starting just before a cell boundary; both tile orientations."""
    from sea_jax.kernels.cell_mask import cell_words, num_words

    rng = np.random.default_rng(M * 1000 + tk)
    tq, n = 16, 84
    starts, lengths, k0s = _tiles(rng, M, tk, tq, n)
    bits = rng.random((n, tq, M)) < 0.5
    words = cell_words(jnp.asarray(bits)[:, :, None], jnp.asarray(lengths)).reshape(n, -1)
    qrow = jnp.arange(tq, dtype=jnp.int32)

    def one(words, start, length, k0, axis):
        kpos = k0 + jnp.arange(tk, dtype=jnp.int32)
        kpos = kpos[None, :] if axis == 0 else kpos[:, None]
        return cells_of_tile(words, 0, qrow, kpos, start, length, M, k0, tk, axis)

    off = (k0s[:, None, None] + np.arange(tk)[None, None, :] - starts[:, :, None]).astype(np.int64)
    L = lengths[:, :, None].astype(np.int64)
    cell = np.clip(((2 * off + 1) * M) // (2 * np.maximum(L, 1)), 0, M - 1)
    want = (off >= 0) & (off < L) & np.take_along_axis(bits, cell, axis=2)
    args = (words, jnp.asarray(starts), jnp.asarray(lengths), jnp.asarray(k0s))
    got0 = np.asarray(jax.jit(jax.vmap(lambda *a: one(*a, 0)))(*args))
    got1 = np.asarray(jax.jit(jax.vmap(lambda *a: one(*a, 1)))(*args))
    np.testing.assert_array_equal(got0, want)
    np.testing.assert_array_equal(np.swapaxes(got1, 1, 2), want)
    # both paths ran on some tiles, the general one also on tiles with rows shorter than M
    lo = ((2 * np.clip(k0s[:, None] - starts, 0, np.maximum(lengths, 1) - 1) + 1) * M) // (2 * np.maximum(lengths, 1))
    hi = ((2 * np.clip(k0s[:, None] + tk - 1 - starts, 0, np.maximum(lengths, 1) - 1) + 1) * M) // (
        2 * np.maximum(lengths, 1))
    short = (lengths > 0) & (lengths < M)
    two = np.where(lengths > 0, np.where(short, 2, hi - lo), 0).max(1) <= 1
    flt = ~two & (np.where((lengths > 0) & ~short, lengths.astype(np.int64) * (hi - lo + 32), 0).max(1) < 10**6)
    assert two.sum() >= 3 and flt.sum() >= 3 and (~two & ~flt).sum() >= 3 and (flt & short.any(1)).sum() >= 1
    assert num_words(M) == words.shape[1] // tq


CASES = [
    # name, B, T, S, H, K, G, D, bq, bk, M, dtype, causal, segments
    ("gqa2_causal_odd_m12", 2, 77, 77, 4, 2, 4, 64, 32, 16, 12, jnp.float32, True, False),
    ("segments_m8_gqa4", 1, 90, 90, 4, 1, 2, 64, 16, 32, 8, jnp.float32, True, True),
    ("noncausal_segments_d128", 1, 50, 50, 2, 2, 2, 128, 16, 16, 16, jnp.float32, False, True),
    ("bf16_causal_m8", 1, 64, 64, 4, 4, 4, 64, 32, 32, 8, jnp.bfloat16, True, False),
]
# the dK/dV kernel's two tile orientations: queries-major (the default with a cell mask) in the others
CASE_OPTIONS = {"segments_m8_gqa4": {"dkv_major": "keys"}, "bf16_causal_m8": {"dkv_major": "keys"}}


def _case_inputs(case, seed):
    name, B, T, S, H, K, G, D, bq, bk, M, dtype, causal, use_seg = case
    rng = _rng(name, seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), dtype)
    seg = np.ones((B, T), np.int32)
    if use_seg:
        for b in range(B):
            c = np.sort(rng.choice(np.arange(3, T - 4), 2, replace=False))
            seg[b, c[0]: c[1]], seg[b, c[1]: T - 3], seg[b, T - 3:] = 2, 3, 0
    start, length = segment_rows(seg, causal)
    cells = rng.random((B, T, H, M)) < 0.4
    cells[:, : T // 4, 0] = True  # whole rows selected
    cells[:, T // 3, :] = False  # rows selecting nothing
    nq, nk = num_blocks(T, bq), num_blocks(S, bk)
    block = random_block_mask(rng, B, G, nq, nk, ("full", "random", "one", "empty"))
    lay = BlockLayout.from_mask(block, bq, bk, max_kv_blocks=nk, max_q_blocks=nq)
    cm = CellMask(jnp.asarray(cells), jnp.asarray(start), jnp.asarray(length))
    allowed = _cell_allowed(cells, start, length, S) & _block_allowed(block, bq, bk, H, T, S)
    segj = jnp.asarray(seg) if use_seg else None
    return q, k, v, lay, cm, segj, allowed


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients(case):
    """Output (every element written: interpret mode poisons outputs with NaN) against the
    dense reference and the XLA path; rows with nothing allowed give exactly 0; dQ, dK, dV
    against float64 autodiff of the dense reference."""
    name, B, T, S, H, K, G, D, bq, bk, M, dtype, causal, use_seg = case
    q, k, v, lay, cm, seg, allowed = _case_inputs(case, 0)

    def run(impl, **kw):
        f = lambda q, k, v: block_sparse_attention(q, k, v, lay, causal=causal, segment_ids=seg, cell_mask=cm,
                                                   impl=impl, **kw)
        return jax.vjp(jax.jit(f), q, k, v)

    out, vjp = run("pallas_gpu", interpret=True, kernel_options=CASE_OPTIONS.get(name))
    out64 = np.asarray(out, np.float64)
    assert out.dtype == dtype and np.isfinite(out64).all()
    assert rel_err(out, dense_attention_np(q, k, v, allowed)) < FWD_TOL[dtype]
    out_x, _ = run("xla")
    assert rel_err(out, out_x) < FWD_TOL[dtype]
    empty = np.moveaxis(~allowed.any(-1), 1, 2)
    assert empty.any() and np.all(out64[empty] == 0)

    ct = jnp.asarray(_rng(name, "ct").standard_normal(q.shape), dtype)
    g = vjp(ct)
    with enable_x64():
        up = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        _, vjp64 = jax.vjp(lambda q, k, v: dense_attention_jnp(q, k, v, allowed), up(q), up(k), up(v))
        g64 = vjp64(up(ct))
    for n, a, r in zip("qkv", g, g64):
        assert np.isfinite(np.asarray(a, np.float64)).all()
        assert rel_err(a, np.asarray(r)) < GRAD_TOL[dtype], n


def test_bad_cell_masks():
    q = jnp.ones((1, 32, 2, 16), jnp.float32)
    lay = BlockLayout.causal(32, 32, 16, 16)
    rows = jnp.zeros((1, 32), jnp.int32), jnp.arange(1, 33, dtype=jnp.int32)[None]
    good = CellMask(jnp.ones((1, 32, 2, 8), bool), *rows)
    for cm, match in [
        (good._replace(cells=jnp.ones((1, 32, 3, 8), bool)), "cells must have shape"),
        (good._replace(cells=jnp.ones((1, 32, 2, 8), jnp.int32)), "cells must be boolean"),
        (good._replace(row_start=jnp.zeros((1, 31), jnp.int32)), "row_start must be an integer array"),
        (good._replace(row_length=jnp.ones((1, 32), jnp.float32)), "row_length must be an integer array"),
        ((good.cells, *rows), "cell_mask must be a CellMask"),
    ]:
        with pytest.raises(ValueError, match=match):
            block_sparse_attention(q, q, q, lay, cell_mask=cm, impl="xla")
    with pytest.raises(ValueError, match="does not take a cell_mask"):
        block_sparse_attention(q, q, q, lay, cell_mask=good, impl="pallas_tpu", interpret=True)
    with pytest.raises(ValueError, match="the Mosaic forward takes no cell_mask"):
        block_sparse_attention(q, q, q, lay, cell_mask=good, impl="pallas_gpu", interpret=True,
                               kernel_options={"forward": "mosaic"})
    q256 = jnp.ones((1, 256, 2, 16), jnp.float32)
    cm256 = CellMask(jnp.ones((1, 256, 2, 8), bool), jnp.zeros((1, 256), jnp.int32), jnp.ones((1, 256), jnp.int32))
    with pytest.raises(ValueError, match="key tiles of at most 128 keys"):
        block_sparse_attention(q256, q256, q256, BlockLayout.causal(256, 256, 256, 256), cell_mask=cm256,
                               impl="pallas_gpu", interpret=True, kernel_options={"fwd_tiles": (16, 256)})
    with pytest.raises(ValueError, match="< 2\\*\\*30"):
        CellMask(jnp.ones((1, 32, 2, 2**26), bool), *rows).check(1, 32, 2, 32)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernels need a GPU (interpret mode covers them on CPU)")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_matches_xla_on_gpu(dtype):
    """Compiled kernels (default tiles) with a cell mask against the XLA path: 1000 causal
    tokens in two segments, M = 256 (more cells than keys in early rows), GQA 2."""
    rng = _rng("compiled", str(jnp.dtype(dtype)))
    B, T, H, K, D, M, bq, bk = 1, 1000, 4, 2, 128, 256, 64, 64
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, D)), dtype) for n in (H, K, K))
    seg = np.ones((B, T), np.int32)
    seg[:, 600:] = 2
    start, length = segment_rows(seg, True)
    cm = CellMask(jnp.asarray(rng.random((B, T, H, M)) < 0.3), jnp.asarray(start), jnp.asarray(length))
    lay = BlockLayout.causal(T, T, bq, bk)
    ct = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def run(impl, q, k, v):
        f = lambda q, k, v: block_sparse_attention(q, k, v, lay, segment_ids=jnp.asarray(seg), cell_mask=cm, impl=impl)
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out, vjp(ct.astype(q.dtype))

    out, g = run("pallas_gpu", q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out_x, gx = run("xla", f32(q), f32(k), f32(v))
    fwd_tol, grad_tol = (3e-3, 1e-2) if dtype == jnp.float32 else (FWD_TOL[dtype], 3e-2)
    assert rel_err(out, out_x) < fwd_tol
    for n, a, r in zip("qkv", g, gx):
        assert rel_err(a, r) < grad_tol, n


def test_triton_lowering_for_an_h100():
    """Forward and backward with a cell mask lower to Triton kernels for an H100 on the CPU
    (the three tile-mask paths as scf.if branches: the lowering accepts every op they use)."""
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    B, T, H, K, D, M = 1, 512, 4, 2, 128, 256
    sds = jax.ShapeDtypeStruct
    lay = BlockLayout.causal(T, T, 64, 64)

    def loss(q, k, v, cells, start, length, options=None):
        cm = CellMask(cells, start, length)
        return jnp.sum(block_sparse_attention(q, k, v, lay, cell_mask=cm, impl="pallas_gpu",
                                              kernel_options=options).astype(jnp.float32))

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    args = (sds((B, T, H, D), jnp.bfloat16), sds((B, T, K, D), jnp.bfloat16), sds((B, T, K, D), jnp.bfloat16),
            sds((B, T, H, M), jnp.bool_), sds((B, T), jnp.int32), sds((B, T), jnp.int32))
    for options in (None, {"dkv_major": "keys"}):
        f = jax.jit(jax.grad(functools.partial(loss, options=options), argnums=(0, 1, 2)))
        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
            text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        for name in ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"):
            assert name in text, name
