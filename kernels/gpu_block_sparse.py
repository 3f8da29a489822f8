"""Block-sparse attention on GPU: Pallas kernels with the Triton lowering.

Three kernels, FlashAttention-2 style, all driven by a :class:`BlockLayout`:

* forward: one program per (query tile, head, batch) walks the key blocks
  ``kv_index[b, g, i, :kv_count]`` with an fp32 online softmax (base 2) and writes the output
  and the log-sum-exp (base 2, +inf for rows with nothing visible, so that the backward
  recomputes p = 0 for them - no NaN);
* dQ: same grid and walk, recomputing p from the saved log-sum-exp;
* dK/dV (and the key-weight gradient): one program per (key tile, KV head, batch) walks the
  *transposed* lists ``q_index[b, g, j, :q_count]`` for every query head of its GQA group, so
  every output tile has a single writer (no atomics).

There is no scalar prefetch on the Triton backend: the index tables are plain refs read
inside the kernel, and K/V tiles are sliced with ``pl.ds`` at the loaded block index.
Kernel tiles may be smaller than the layout blocks (``tq | block_q``, ``tk | block_k``); a
layout block is then walked in sub-tiles. ``compiler_params`` is always given explicitly
(``pallas.triton.CompilerParams``) so that ``pallas_call`` lowers to Triton on jax 0.10.2
(where the default GPU lowering is Mosaic GPU) as well as on 0.11+.

Semantics (weights, masking, empty rows) are those of :mod:`sea_jax.kernels.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

with warnings.catch_warnings():  # the Triton backend is deprecated (not removed) in jax 0.11+
    warnings.simplefilter("ignore")
    from jax.experimental.pallas import triton as pltriton

from sea_jax.kernels.cell_mask import MAX_TILE_KEYS, CellMask, cell_words, cells_of_tile, num_words
from sea_jax.kernels.gpu_block_sparse_mosaic import block_sparse_forward_mosaic, mosaic_forward_supported
from sea_jax.kernels.layout import BlockLayout, num_blocks, validate_block_size

__all__ = ["block_sparse_attention_gpu", "BlockSparseGpuConfig"]

LOG2E = math.log2(math.e)


def _pad_to(x, axis, length, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _next_pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def row_scaled_tile(tile: int, head_dim: int, dtype) -> int:
    """A default tile of rows, scaled down for rows wider than 256 bytes.

    The default tiles and pipeline stages were measured (and fit the H100's 227 KiB of shared
    memory) with bfloat16 rows of D = 128, 256 bytes. Wider rows (float32 at D = 128, bfloat16
    at D = 256) keep the same bytes per tile by halving the rows per doubling of the row width
    (min 16): float32 at D = 128 with the bfloat16 tiles asked for 273-355 KiB."""
    row_bytes = _next_pow2(head_dim) * jnp.dtype(dtype).itemsize
    return max(16, tile * 256 // max(256, row_bytes))


def compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton compiler params (forces the Triton lowering on every jax version)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class BlockSparseGpuConfig:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument)."""

    seq_q: int
    seq_k: int
    num_heads: int
    num_kv_heads: int
    num_groups: int
    block_q: int
    block_k: int
    causal: bool
    window: int | None
    weight_mode: str
    has_weights: bool
    has_segments: bool
    scale: float
    interpret: bool
    # tiles and launch parameters per kernel
    fwd_tq: int
    fwd_tk: int
    fwd_warps: int
    fwd_stages: int
    dq_tq: int
    dq_tk: int
    dq_warps: int
    dq_stages: int
    dkv_tq: int
    dkv_tk: int
    dkv_warps: int
    dkv_stages: int
    always_mask: bool  # True: mask every tile with jnp.where; False: branch per tile
    fwd_impl: str = "triton"  # "triton" or "mosaic" (gpu_block_sparse_mosaic, Hopper only)
    num_cells: int = 0  # > 0: a CellMask (cells per row) masks every tile
    dkv_queries_major: bool = False  # dK/dV tiles [tq, tk] instead of [tk, tq] (kernel option dkv_major)
    mosaic_block_kv: int = 128
    mosaic_stages: int = 2


# --------------------------------------------------------------------------- masking
def _tile_needs_mask(cfg, q0, tq, k0, tk):
    """Traced bool: the tile [q0, q0+tq) x [k0, k0+tk) may hold an invisible (query, key)
    pair, so it needs the element mask; None: every tile does (segments).

    Tiles that are entirely invisible take the masked path too (they are rare: a layout
    lists them only when its blocks are coarser than the causal / window pattern) and
    contribute exactly zero there.
    """
    if cfg.has_segments:
        return None
    q_last, k_last = q0 + tq - 1, k0 + tk - 1
    need = k_last >= cfg.seq_k
    if cfg.causal:
        need = need | (k_last > q0)
    if cfg.window is not None:
        need = need | (k0 <= q_last - cfg.window)
    return need


def _element_mask(cfg, qpos, kpos, segq, segk):
    """Visibility of key kpos for query qpos; qpos/kpos broadcast to the tile shape."""
    ok = kpos < cfg.seq_k
    if cfg.causal:
        ok = ok & (kpos <= qpos)
    if cfg.window is not None:
        ok = ok & (kpos > qpos - cfg.window)
    if cfg.has_segments:
        ok = ok & (segq == segk) & (segk != 0)
    return ok


def _cell_mask(cfg, cells_ref, rows_ref, h, kpos, q0, tq, k0, tk, axis: int):
    """The CellMask of a tile (``cells_of_tile``); query rows [q0, q0 + tq) run along ``axis``
    of the tile (0: [tq, tk], forward / dQ; 1: [tk, tq], dK/dV). ``h``: the query head inside
    the KV head's group (the row of ``cells_ref``'s flat [group heads, Sq_pad, words] block)."""
    start = rows_ref[0, pl.ds(q0, tq)]
    length = rows_ref[1, pl.ds(q0, tq)]
    qrow = q0 + lax.broadcasted_iota(jnp.int32, (tq,), 0)
    base = h * (rows_ref.shape[1] * num_words(cfg.num_cells))
    return cells_of_tile(cells_ref, base, qrow, kpos, start, length, cfg.num_cells, k0, tk, axis)


def _split(t, n: int):
    """(t // n, t % n) for a traced int32 t >= 0 and a static n."""
    if n == 1:
        return t, 0
    # lax.div/rem (t >= 0): jnp's floor-division helpers emit bool selects the lowering rejects
    n = jnp.int32(n)
    return lax.div(t, n), lax.rem(t, n)


def _dot(a, b, contract_a=1, contract_b=0):
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
    )


def _run_tile(cfg, needs_mask, masked_fn, plain_fn, carry):
    """One tile: masked, or (``always_mask`` False) a branch between masked and plain.

    A two-way ``lax.cond`` on a bool; ``lax.switch`` does not lower to Triton (its index
    clamp produced an i32/i1 ``arith.maxsi`` on jax 0.11.2).
    """
    if cfg.always_mask or needs_mask is None:
        return masked_fn(carry)
    return lax.cond(needs_mask, masked_fn, plain_fn, carry)


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: BlockSparseGpuConfig):
    it = iter(refs)
    kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref = (next(it) for _ in range(5))
    w_ref = next(it) if cfg.has_weights else None
    seg_ref = next(it) if cfg.has_segments else None
    cells_ref, rows_ref = (next(it), next(it)) if cfg.num_cells else (None, None)
    o_ref, lse_ref = next(it), next(it)

    tq, tk = cfg.fwd_tq, cfg.fwd_tk
    sub_q, sub_k = cfg.block_q // tq, cfg.block_k // tk
    n_tiles = pl.num_programs(0)
    tile = n_tiles - 1 - pl.program_id(0)  # heavy (late, causal) tiles first
    h, b = pl.program_id(1), pl.program_id(2)
    g = _split(h, cfg.num_heads // cfg.num_groups)[0]
    i = _split(tile, sub_q)[0]
    q0 = tile * tq
    qk_scale = cfg.scale * LOG2E
    h_in_group = _split(h, cfg.num_heads // cfg.num_kv_heads)[1]

    q = q_ref[...]
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    segq = seg_ref[pl.ds(q0, tq)][:, None] if cfg.has_segments else None
    count = kv_count_ref[b, g, i]

    def step(t, carry):
        blk, sub = _split(t, sub_k)
        j = kv_index_ref[b, g, i, blk]
        k0 = pl.multiple_of(j * cfg.block_k + sub * tk, tk)

        def compute(carry, masked):
            acc, m, l = carry
            k = k_ref[pl.ds(k0, tk), :]
            v = v_ref[pl.ds(k0, tk), :]
            s = _dot(q, k, 1, 1) * qk_scale
            if masked:
                kpos = k0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
                segk = seg_ref[pl.ds(k0, tk)][None, :] if cfg.has_segments else None
                ok = _element_mask(cfg, qpos, kpos, segq, segk)
                if cfg.num_cells:
                    ok = ok & _cell_mask(cfg, cells_ref, rows_ref, h_in_group, kpos, q0, tq, k0, tk, 0)
                s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s - m_use[:, None])
            if cfg.has_weights:
                w = w_ref[pl.ds(k0, tk)].astype(jnp.float32)[None, :]
                pw = p * w
                l_new = l * alpha + jnp.sum(pw if cfg.weight_mode == "log" else p, axis=1)
            else:
                pw = p
                l_new = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(pw.astype(v.dtype), v)
            return acc, m_new, l_new

        needs = None if cfg.num_cells else _tile_needs_mask(cfg, q0, tq, k0, tk)  # cells: every tile
        return _run_tile(cfg, needs, lambda c: compute(c, True), lambda c: compute(c, False), carry)

    d = q_ref.shape[-1]
    init = (
        jnp.zeros((tq, d), jnp.float32),
        jnp.full((tq,), -jnp.inf, jnp.float32),
        jnp.zeros((tq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, count * sub_k, step, init)
    ok = l > 0
    safe_l = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log2(safe_l), jnp.inf)


def _full_spec(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _cell_specs(cells, rows, cells_map, rows_map):
    return [pl.BlockSpec((None, None, cells.shape[2]), cells_map),
            pl.BlockSpec((None, 2, rows.shape[2]), rows_map)]


def _forward(cfg, q, k, v, w, seg, cells, rows, kv_index, kv_count):
    """q: [B, Sq_pad, H, Dp]; k, v: [B, Skv_pad, K, Dp]; w: [B, K, Skv_pad] f32 or None;
    seg: [B, S_pad] int32 or None; cells: packed cell words (``cell_words``) int32
    [B, K, rep * Sq_pad * W] and rows: int32 [B, 2, Sq_pad] (prefix starts, lengths), or None. Returns o [B, Sq_pad, H, Dp], lse2
    [B, H, Sq_pad]."""
    if cfg.fwd_impl == "mosaic":
        return block_sparse_forward_mosaic(
            q, k, v, kv_index, kv_count, seq_k=cfg.seq_k, block_q=cfg.block_q, block_k=cfg.block_k,
            causal=cfg.causal, window=cfg.window, scale=cfg.scale, block_kv=cfg.mosaic_block_kv,
            stages=cfg.mosaic_stages)
    B, Sq_pad, H, Dp = q.shape
    Skv_pad, K = k.shape[1], k.shape[2]
    rep = H // K
    tq = cfg.fwd_tq
    n_tiles = Sq_pad // tq
    rev = lambda t: n_tiles - 1 - t
    in_specs = [
        _full_spec(kv_index),
        _full_spec(kv_count),
        pl.BlockSpec((None, tq, None, Dp), lambda t, h, b: (b, rev(t), h, 0)),
        pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, h, b: (b, 0, h // rep, 0)),
        pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, h, b: (b, 0, h // rep, 0)),
    ]
    args = [kv_index, kv_count, q, k, v]
    if cfg.has_weights:
        in_specs.append(pl.BlockSpec((None, None, Skv_pad), lambda t, h, b: (b, h // rep, 0)))
        args.append(w)
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, seg.shape[1]), lambda t, h, b: (b, 0)))
        args.append(seg)
    if cfg.num_cells:
        in_specs += _cell_specs(cells, rows, lambda t, h, b: (b, h // rep, 0), lambda t, h, b: (b, 0, 0))
        args += [cells, rows]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((B, H, Sq_pad), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, tq, None, Dp), lambda t, h, b: (b, rev(t), h, 0)),
        pl.BlockSpec((None, None, tq), lambda t, h, b: (b, h, rev(t))),
    ]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_tiles, H, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.fwd_warps, cfg.fwd_stages),
        interpret=cfg.interpret,
        name="block_sparse_fwd",
    )(*args)
    return o, lse


# ------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, cfg: BlockSparseGpuConfig):
    it = iter(refs)
    kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref = (next(it) for _ in range(5))
    w_ref = next(it) if cfg.has_weights else None
    seg_ref = next(it) if cfg.has_segments else None
    cells_ref, rows_ref = (next(it), next(it)) if cfg.num_cells else (None, None)
    do_ref, lse_ref, delta_ref, dq_ref = next(it), next(it), next(it), next(it)

    tq, tk = cfg.dq_tq, cfg.dq_tk
    sub_q, sub_k = cfg.block_q // tq, cfg.block_k // tk
    tile = pl.num_programs(0) - 1 - pl.program_id(0)
    h, b = pl.program_id(1), pl.program_id(2)
    g = _split(h, cfg.num_heads // cfg.num_groups)[0]
    i = _split(tile, sub_q)[0]
    q0 = tile * tq
    qk_scale = cfg.scale * LOG2E
    h_in_group = _split(h, cfg.num_heads // cfg.num_kv_heads)[1]

    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    segq = seg_ref[pl.ds(q0, tq)][:, None] if cfg.has_segments else None
    count = kv_count_ref[b, g, i]

    def step(t, dq):
        blk, sub = _split(t, sub_k)
        j = kv_index_ref[b, g, i, blk]
        k0 = pl.multiple_of(j * cfg.block_k + sub * tk, tk)

        def compute(dq, masked):
            k = k_ref[pl.ds(k0, tk), :]
            v = v_ref[pl.ds(k0, tk), :]
            s = _dot(q, k, 1, 1) * qk_scale
            if masked:
                kpos = k0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
                segk = seg_ref[pl.ds(k0, tk)][None, :] if cfg.has_segments else None
                ok = _element_mask(cfg, qpos, kpos, segq, segk)
                if cfg.num_cells:
                    ok = ok & _cell_mask(cfg, cells_ref, rows_ref, h_in_group, kpos, q0, tq, k0, tk, 0)
                s = jnp.where(ok, s, -jnp.inf)
            p = jnp.exp2(s - lse)
            dp = _dot(do, v, 1, 1)
            if cfg.has_weights:
                w = w_ref[pl.ds(k0, tk)].astype(jnp.float32)[None, :]
                if cfg.weight_mode == "gate":
                    ds = p * (w * dp - delta)
                else:
                    ds = p * w * (dp - delta)
            else:
                ds = p * (dp - delta)
            return dq + _dot(ds.astype(k.dtype), k)

        needs = None if cfg.num_cells else _tile_needs_mask(cfg, q0, tq, k0, tk)
        return _run_tile(cfg, needs, lambda c: compute(c, True), lambda c: compute(c, False), dq)

    dq = lax.fori_loop(0, count * sub_k, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(cfg, q, k, v, w, seg, cells, rows, do, lse, delta, kv_index, kv_count):
    B, Sq_pad, H, Dp = q.shape
    Skv_pad, K = k.shape[1], k.shape[2]
    rep = H // K
    tq = cfg.dq_tq
    n_tiles = Sq_pad // tq
    rev = lambda t: n_tiles - 1 - t
    qspec = pl.BlockSpec((None, tq, None, Dp), lambda t, h, b: (b, rev(t), h, 0))
    kvspec = pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, h, b: (b, 0, h // rep, 0))
    rowspec = pl.BlockSpec((None, None, tq), lambda t, h, b: (b, h, rev(t)))
    in_specs = [_full_spec(kv_index), _full_spec(kv_count), qspec, kvspec, kvspec]
    args = [kv_index, kv_count, q, k, v]
    if cfg.has_weights:
        in_specs.append(pl.BlockSpec((None, None, Skv_pad), lambda t, h, b: (b, h // rep, 0)))
        args.append(w)
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, seg.shape[1]), lambda t, h, b: (b, 0)))
        args.append(seg)
    if cfg.num_cells:
        in_specs += _cell_specs(cells, rows, lambda t, h, b: (b, h // rep, 0), lambda t, h, b: (b, 0, 0))
        args += [cells, rows]
    in_specs += [qspec, rowspec, rowspec]
    args += [do, lse, delta]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(n_tiles, H, B),
        in_specs=in_specs,
        out_specs=qspec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(cfg.dq_warps, cfg.dq_stages),
        interpret=cfg.interpret,
        name="block_sparse_dq",
    )(*args)


# ---------------------------------------------------------------------------- dK/dV
def _dkv_kernel(*refs, cfg: BlockSparseGpuConfig):
    it = iter(refs)
    q_index_ref, q_count_ref, q_ref, k_ref, v_ref = (next(it) for _ in range(5))
    w_ref = next(it) if cfg.has_weights else None
    seg_ref = next(it) if cfg.has_segments else None
    cells_ref, rows_ref = (next(it), next(it)) if cfg.num_cells else (None, None)
    do_ref, lse_ref, delta_ref = next(it), next(it), next(it)
    dk_ref, dv_ref = next(it), next(it)
    dw_ref = next(it) if cfg.has_weights else None

    tq, tk = cfg.dkv_tq, cfg.dkv_tk
    sub_q, sub_k = cfg.block_q // tq, cfg.block_k // tk
    tile = pl.program_id(0)
    kh, b = pl.program_id(1), pl.program_id(2)
    rep = cfg.num_heads // cfg.num_kv_heads
    gsize = cfg.num_heads // cfg.num_groups
    j = _split(tile, sub_k)[0]
    k0 = tile * tk
    qk_scale = cfg.scale * LOG2E

    # qa: the tile's query axis. Keys-major tiles [tk, tq] (qa = 1) feed dK / dV's products
    # without transposes; queries-major tiles [tq, tk] (qa = 0) keep per-query-row values (the
    # cell mask's) in the layout slice with 2 values per thread instead of 16 (wgmma
    # accumulators: 4 warps x 16 rows along the tile's first axis), at the cost of transposed
    # operands for dV and dK
    qa = 0 if cfg.dkv_queries_major else 1
    shape = (tq, tk) if qa == 0 else (tk, tq)
    along_k = (lambda x: x[None, :]) if qa == 0 else (lambda x: x[:, None])  # a [tk] vector
    along_q = (lambda x: x[:, None]) if qa == 0 else (lambda x: x[None, :])  # a [tq] vector
    k = k_ref[...]
    v = v_ref[...]
    w = along_k(w_ref[...].astype(jnp.float32)) if cfg.has_weights else None
    kpos = k0 + lax.broadcasted_iota(jnp.int32, shape, 1 - qa)
    segk = along_k(seg_ref[pl.ds(k0, tk)]) if cfg.has_segments else None
    d = k.shape[-1]

    def head(r, carry):
        h = kh * rep + r
        g = _split(h, gsize)[0]
        count = q_count_ref[b, g, j]

        def step(t, carry):
            blk, sub = _split(t, sub_q)
            i = q_index_ref[b, g, j, blk]
            q0 = pl.multiple_of(i * cfg.block_q + sub * tq, tq)

            def compute(carry, masked):
                dk, dv, dw = carry
                q = q_ref[pl.ds(q0, tq), r, :]
                do = do_ref[pl.ds(q0, tq), r, :]
                lse = along_q(lse_ref[r, pl.ds(q0, tq)])
                delta = along_q(delta_ref[r, pl.ds(q0, tq)])
                st = (_dot(q, k, 1, 1) if qa == 0 else _dot(k, q, 1, 1)) * qk_scale
                if masked:
                    qpos = q0 + lax.broadcasted_iota(jnp.int32, shape, qa)
                    segq = along_q(seg_ref[pl.ds(q0, tq)]) if cfg.has_segments else None
                    ok = _element_mask(cfg, qpos, kpos, segq, segk)
                    if cfg.num_cells:
                        ok = ok & _cell_mask(cfg, cells_ref, rows_ref, r, kpos, q0, tq, k0, tk, qa)
                    st = jnp.where(ok, st, -jnp.inf)
                pt = jnp.exp2(st - lse)
                dpt = _dot(do, v, 1, 1) if qa == 0 else _dot(v, do, 1, 1)
                if cfg.has_weights:
                    dv = dv + _dot((pt * w).astype(do.dtype), do, qa, 0)
                    if cfg.weight_mode == "gate":
                        dst = pt * (w * dpt - delta)
                        dw = dw + jnp.sum(pt * dpt, axis=qa)
                    else:
                        dst = pt * w * (dpt - delta)
                        dw = dw + jnp.sum(pt * (dpt - delta), axis=qa)
                else:
                    dv = dv + _dot(pt.astype(do.dtype), do, qa, 0)
                    dst = pt * (dpt - delta)
                dk = dk + _dot(dst.astype(q.dtype), q, qa, 0)
                return dk, dv, dw

            needs = None if cfg.num_cells else _tile_needs_mask(cfg, q0, tq, k0, tk)
            return _run_tile(cfg, needs, lambda c: compute(c, True), lambda c: compute(c, False), carry)

        return lax.fori_loop(0, count * sub_q, step, carry)

    init = (
        jnp.zeros((tk, d), jnp.float32),
        jnp.zeros((tk, d), jnp.float32),
        jnp.zeros((tk,), jnp.float32),
    )
    dk, dv, dw = lax.fori_loop(0, rep, head, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.has_weights:
        dw_ref[...] = dw


def _dkv(cfg, q, k, v, w, seg, cells, rows, do, lse, delta, q_index, q_count):
    B, Sq_pad, H, Dp = q.shape
    Skv_pad, K = k.shape[1], k.shape[2]
    rep = H // K
    tk = cfg.dkv_tk
    n_tiles = Skv_pad // tk
    kspec = pl.BlockSpec((None, tk, None, Dp), lambda t, kh, b: (b, t, kh, 0))
    qspec = pl.BlockSpec((None, Sq_pad, rep, Dp), lambda t, kh, b: (b, 0, kh, 0))
    rowspec = pl.BlockSpec((None, rep, Sq_pad), lambda t, kh, b: (b, kh, 0))
    in_specs = [_full_spec(q_index), _full_spec(q_count), qspec, kspec, kspec]
    args = [q_index, q_count, q, k, v]
    if cfg.has_weights:
        in_specs.append(pl.BlockSpec((None, None, tk), lambda t, kh, b: (b, kh, t)))
        args.append(w)
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, seg.shape[1]), lambda t, kh, b: (b, 0)))
        args.append(seg)
    if cfg.num_cells:
        in_specs += _cell_specs(cells, rows, lambda t, kh, b: (b, kh, 0), lambda t, kh, b: (b, 0, 0))
        args += [cells, rows]
    in_specs += [qspec, rowspec, rowspec]
    args += [do, lse, delta]
    out_specs = [kspec, kspec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.has_weights:
        out_specs.append(pl.BlockSpec((None, None, tk), lambda t, kh, b: (b, kh, t)))
        out_shape.append(jax.ShapeDtypeStruct((B, K, Skv_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(n_tiles, K, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.dkv_warps, cfg.dkv_stages),
        interpret=cfg.interpret,
        name="block_sparse_dkv",
    )(*args)
    return outs if cfg.has_weights else (outs[0], outs[1], None)


# ------------------------------------------------------------------------- custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, w, seg, cells, rows, kv_index, kv_count, q_index, q_count):
    o, _ = _forward(cfg, q, k, v, w, seg, cells, rows, kv_index, kv_count)
    return o


def _attention_fwd(cfg, q, k, v, w, seg, cells, rows, kv_index, kv_count, q_index, q_count):
    o, lse = _forward(cfg, q, k, v, w, seg, cells, rows, kv_index, kv_count)
    return o, (q, k, v, w, seg, cells, rows, kv_index, kv_count, q_index, q_count, o, lse)


def _attention_bwd(cfg, res, do):
    q, k, v, w, seg, cells, rows, kv_index, kv_count, q_index, q_count, o, lse = res
    # delta_i = sum_j p_ij dP_ij = dO_i . o_i (weights included in o), fp32: [B, H, Sq_pad]
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    do = do.astype(q.dtype)
    dq = _dq(cfg, q, k, v, w, seg, cells, rows, do, lse, delta, kv_index, kv_count)
    dk, dv, dw = _dkv(cfg, q, k, v, w, seg, cells, rows, do, lse, delta, q_index, q_count)
    if w is not None:
        dw = dw.astype(w.dtype)
    return dq, dk, dv, dw, None, None, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------- public
FORWARD_IMPLS = ("auto", "triton", "mosaic")


def _forward_impl(forward, dtype, head_dim, bq, bk, has_weights, has_segments, interpret) -> str:
    if forward not in FORWARD_IMPLS:
        raise ValueError(f"forward must be one of {FORWARD_IMPLS}, got {forward!r}")
    if forward == "triton":
        return "triton"
    ok, why = mosaic_forward_supported(
        dtype=dtype, head_dim=head_dim, block_q=bq, block_k=bk, has_weights=has_weights,
        has_segments=has_segments, interpret=interpret)
    if forward == "mosaic" and not ok:
        raise ValueError(f"forward='mosaic' cannot run this call: {why}")
    return "mosaic" if ok else "triton"


def _mosaic_block_kv(value, block_k) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 64 or block_k % value:
        raise ValueError(f"mosaic_block_kv must be a multiple of 64 dividing block_k={block_k}, got {value!r}")
    return value


def _stages(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"mosaic_stages must be an int >= 2, got {value!r}")
    return value


def _tile(name, value, block):
    value = validate_block_size(name, value)
    if block % value:
        raise ValueError(f"{name}={value} must divide the layout block ({block})")
    return value


def block_sparse_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    key_weights: jax.Array | None = None,
    weight_mode: str = "gate",
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool = False,
    fwd_tiles: tuple[int, int] | None = None,
    dq_tiles: tuple[int, int] | None = None,
    dkv_tiles: tuple[int, int] | None = None,
    num_warps: tuple[int, int, int] | None = None,
    num_stages: tuple[int, int, int] | None = None,
    always_mask: bool = True,
    dkv_major: str = "auto",
    forward: str = "auto",
    mosaic_block_kv: int | None = None,
    mosaic_stages: int = 2,
    cell_mask: CellMask | None = None,
) -> jax.Array:
    """Block-sparse attention with the Pallas Triton kernels (forward and backward).

    Arguments as :func:`sea_jax.kernels.block_sparse_attention` (validated there), plus the
    tuning knobs (``kernel_options``):
      fwd_tiles / dq_tiles / dkv_tiles: (tq, tk) kernel tiles of the forward, dQ and dK/dV
        kernels; powers of two >= 16 dividing the layout's (block_q, block_k). Defaults:
        (min(128, block_q), min(128, block_k)) forward, (min(64, block_q), min(64, block_k))
        backward, for rows of up to 256 bytes (bfloat16 / float16 at D <= 128); wider rows
        (float32 at D = 128, D = 256) take proportionally fewer rows per tile
        (:func:`row_scaled_tile`: the same shared memory).
      num_warps, num_stages: per kernel (fwd, dq, dkv); defaults (8|4, 4, 4) and (3, 2, 2).
      always_mask: mask every tile elementwise (default) instead of branching per tile
        between a masked and a plain step (False).
      dkv_major: "auto" (default), "keys" or "queries": which of the dK/dV kernel's tile axes
        runs along the MMA's rows. "keys" ([tk, tq] tiles) feeds dK and dV without transposes;
        "queries" ([tq, tk], transposed operands for dK and dV) computes per-query-row values
        (a cell mask's) 8x less redundantly: 2 per thread instead of 16 in the wgmma layout
        (``benchmarks/triton_regs.py --dump``). "auto" takes "queries" with a ``cell_mask``
        and "keys" otherwise. Measured on an H100 (``profile_layer.py --seq 32768``, 64 x 64
        tiles, 2026-11-24): SEA's token granularity (cell mask) dK/dV kernel 17.32 ms keys-major
        against 7.21 queries-major (layer forward+backward 64.8 -> 54.6 ms wall); block
        granularity (no cell mask) 3.67 keys-major against 3.93.
      forward: "auto" | "triton" | "mosaic": the forward kernel. "mosaic" is the Mosaic GPU
        (wgmma/TMA) forward of :mod:`.gpu_block_sparse_mosaic` (Hopper, bf16/fp16, head_dim
        64/128, no key weights or segment ids, block_q % 128 == 0, block_k % 64 == 0; a
        ValueError says which condition fails); "auto" takes it whenever those hold and the
        Triton forward otherwise. The backward is Triton either way (it reads the same
        output and log-sum-exp).
      mosaic_block_kv, mosaic_stages: keys per pipeline step (a multiple of 64 dividing
        block_k; default min(128, block_k)) and shared-memory K/V slots (>= 2) of the Mosaic
        forward.
    Measured in benchmarks/results/block_sparse_bench.json (H100, S = 32k, 12.5 % of the
    causal blocks, D = 128, bf16, forward): 128 x 128 tiles 307 TFLOP/s against 275 for
    128 x 64 (hence the default); always_mask=True raises 128 x 128 to 344 TFLOP/s (and
    forward+backward to 345), and it was faster in every forward setting of the sweep (128 x
    64: 321 vs 275 at 3 stages, 282 vs 279 at 2) and in each kernel of the SEA layer at 32k
    (block granularity, fwd / dQ / dK/dV 2.58 / 3.02 / 3.66 ms against 3.03 / 3.49 / 4.74 with
    the branch; ``profile_layer.py --layers sea`` on 2026-11-24): the branch costs more than
    the mask it skips, hence the default. 4 stages exceed the H100's shared memory at 128 x 128.

    A ``cell_mask`` (:class:`~sea_jax.kernels.cell_mask.CellMask`, validated by the caller)
    masks every visited tile by the selected cells, rebuilt on chip from the packed cell words
    of the tile's rows (``cells_of_tile``); it needs the Triton forward and key tiles of at
    most ``MAX_TILE_KEYS`` (128) keys.

    q: [B, Sq, H, D]; k, v: [B, Skv, K, D]; key_weights: [B, Skv, K] or None.
    Returns [B, Sq, H, D] in q.dtype.
    """
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    layout = layout.broadcast_batch(B)
    bq, bk = layout.block_q, layout.block_k
    Dp = _next_pow2(D)
    t128, t64 = row_scaled_tile(128, D, q.dtype), row_scaled_tile(64, D, q.dtype)  # 128 / 64 at 256-byte rows
    fq, fk = fwd_tiles or (min(t128, bq), min(t128, bk))
    dqq, dqk = dq_tiles or (min(t64, bq), min(t64, bk))
    kq, kk = dkv_tiles or (min(t64, bq), min(t64, bk))
    fq, dqq, kq = (_tile(n, x, bq) for n, x in (("fwd tq", fq), ("dq tq", dqq), ("dkv tq", kq)))
    fk, dqk, kk = (_tile(n, x, bk) for n, x in (("fwd tk", fk), ("dq tk", dqk), ("dkv tk", kk)))
    warps = num_warps or (8 if fq >= 128 else 4, 4, 4)
    stages = num_stages or (3, 2, 2)
    scale = D**-0.5 if scale is None else float(scale)
    if dkv_major not in ("auto", "keys", "queries"):
        raise ValueError(f"dkv_major must be 'auto', 'keys' or 'queries', got {dkv_major!r}")
    if dkv_major == "auto":
        dkv_major = "queries" if cell_mask is not None else "keys"
    if cell_mask is not None and forward == "mosaic":
        raise ValueError("forward='mosaic' cannot run this call: the Mosaic forward takes no cell_mask")
    if cell_mask is not None and max(fk, dqk, kk) > MAX_TILE_KEYS:
        raise ValueError(f"a cell_mask needs key tiles of at most {MAX_TILE_KEYS} keys, got fwd / dq / dkv "
                         f"tk = {fk} / {dqk} / {kk}")
    fwd_impl = "triton" if cell_mask is not None else _forward_impl(
        forward, q.dtype, D, bq, bk, key_weights is not None, segment_ids is not None, bool(interpret))
    m_block_kv = min(128, bk) if mosaic_block_kv is None else mosaic_block_kv
    if fwd_impl == "mosaic":
        m_block_kv, mosaic_stages = _mosaic_block_kv(m_block_kv, bk), _stages(mosaic_stages)
    cfg = BlockSparseGpuConfig(
        seq_q=Sq, seq_k=Skv, num_heads=H, num_kv_heads=K, num_groups=layout.num_groups,
        block_q=bq, block_k=bk, causal=bool(causal), window=window, weight_mode=weight_mode,
        has_weights=key_weights is not None, has_segments=segment_ids is not None,
        scale=scale, interpret=bool(interpret),
        fwd_tq=fq, fwd_tk=fk, fwd_warps=warps[0], fwd_stages=stages[0],
        dq_tq=dqq, dq_tk=dqk, dq_warps=warps[1], dq_stages=stages[1],
        dkv_tq=kq, dkv_tk=kk, dkv_warps=warps[2], dkv_stages=stages[2],
        always_mask=bool(always_mask),
        fwd_impl=fwd_impl, mosaic_block_kv=m_block_kv, mosaic_stages=mosaic_stages,
        num_cells=0 if cell_mask is None else cell_mask.num_cells,
        dkv_queries_major=dkv_major == "queries",
    )
    nq, nk = num_blocks(Sq, bq), num_blocks(Skv, bk)
    qp = _pad_to(_pad_to(q, 1, nq * bq), 3, Dp)
    kp = _pad_to(_pad_to(k, 1, nk * bk), 3, Dp)
    vp = _pad_to(_pad_to(v, 1, nk * bk), 3, Dp)
    w = None
    if key_weights is not None:
        w = jnp.moveaxis(_pad_to(key_weights, 1, nk * bk), 1, 2)  # [B, K, Skv_pad]
    seg = None
    if segment_ids is not None:
        seg = _pad_to(segment_ids.astype(jnp.int32), 1, max(nq * bq, nk * bk))
    cells = rows = None
    if cell_mask is not None:
        # [B, Sq, H, M] bool -> packed int32 words [B, K, (H // K) * Sq_pad * W]: one flat block
        # per KV head
        c = cell_words(_pad_to(cell_mask.cells, 1, nq * bq), _pad_to(cell_mask.row_length, 1, nq * bq))
        cells = jnp.moveaxis(c, 2, 1).reshape(B, K, -1)
        rows = jnp.stack([cell_mask.row_start, cell_mask.row_length], axis=1).astype(jnp.int32)
        rows = _pad_to(rows, 2, nq * bq)  # padding rows: length 0, they see nothing
    o = _attention(cfg, qp, kp, vp, w, seg, cells, rows, layout.kv_index, layout.kv_count,
                   layout.q_index, layout.q_count)
    return o[:, :Sq, :, :D]
