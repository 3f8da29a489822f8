"""Exact softmax attention on SEA's token-level selection, blockwise over a block layout.

For query row t and head h the allowed keys are those of the row's prefix
``[row_start, row_start + row_length)`` whose cell (see ``sea_select``) is selected. The
computation visits, per (batch, head, query block), only the key blocks of the layout
(``SEABlockLayout.kv_index[..., :kv_count]``), one slot per step of a ``lax.while_loop``
whose trip count is the largest ``kv_count`` (data dependent, so the work follows the
selection and the result is exact: no capacity, nothing dropped). Inside a visited block the
token mask is rebuilt from the selection. An online softmax (flash-attention style) carries
the running max, normaliser and accumulator, so memory is O(T (D + block_k)) per head plus
the block-level layout; no T x T array is formed.

The backward pass is a ``jax.custom_vjp`` that walks the same slots again (recomputing the
probabilities from the saved log-normaliser) and scatter-adds dK, dV into the key blocks.
Rows with no allowed key return 0 (and zero gradients), never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sea_jax.ops.sea_select import cell_of_offset

def _acc(dtype):
    """Accumulation dtype: float32, or float64 for float64 inputs (finite-difference tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _pad_to(x, axis, length):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _prepare(q, k, v, selection, row_start, row_length, block_q, block_k):
    """Blocked views. Returns dict of q blocks [B,H,nq,bq,D], key/value blocks per query head
    [B,H,nk,bk,D], selection rows [B,H,nq,bq,M], starts/lengths [B,1,nq,bq,1]."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    nq, nk = -(-T // block_q), -(-S // block_k)
    qb = _pad_to(q, 1, nq * block_q).reshape(B, nq, block_q, H, D).transpose(0, 3, 1, 2, 4)
    head_kv = jnp.arange(H) // (H // K)
    kb = _pad_to(k, 1, nk * block_k).reshape(B, nk, block_k, K, D).transpose(0, 3, 1, 2, 4)[:, head_kv]
    vb = _pad_to(v, 1, nk * block_k).reshape(B, nk, block_k, K, D).transpose(0, 3, 1, 2, 4)[:, head_kv]
    M = selection.shape[-1]
    sel = _pad_to(selection, 1, nq * block_q).reshape(B, nq, block_q, H, M).transpose(0, 3, 1, 2, 4)
    start = _pad_to(row_start, 1, nq * block_q).reshape(B, 1, nq, block_q, 1)
    length = _pad_to(row_length, 1, nq * block_q).reshape(B, 1, nq, block_q, 1)
    return qb, kb, vb, sel, start, length


def _slot(i, qb, kb, vb, sel, start, length, kv_index, kv_count, block_k, scale, token_mask):
    """Scores and mask of slot i for every (b, h, query block): s, ok [B,H,nq,bq,bk] and the
    visited key/value blocks [B,H,nq,bk,D] with their block index [B,H,nq]."""
    M = sel.shape[-1]
    idx = jnp.take(kv_index, jnp.minimum(i, kv_index.shape[-1] - 1), axis=-1)  # [B,H,nq]
    active = i < kv_count
    kblk = jnp.take_along_axis(kb, idx[..., None, None], axis=2)  # [B,H,nq,bk,D]
    vblk = jnp.take_along_axis(vb, idx[..., None, None], axis=2)
    s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kblk, preferred_element_type=_acc(qb.dtype)) * scale
    key = idx[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [B,H,nq,bk]
    off = key[:, :, :, None, :] - start  # [B,H,nq,bq,bk]
    inside = (off >= 0) & (off < length)
    ok = inside & active[..., None, None]
    if token_mask:
        cell = cell_of_offset(off, length, M)
        ok = ok & jnp.take_along_axis(sel, cell, axis=-1)
    return s, ok, kblk, vblk, idx


def _forward(q, k, v, selection, row_start, row_length, kv_index, kv_count, block_q, block_k, scale, token_mask):
    B, T, H, D = q.shape
    qb, kb, vb, sel, start, length = _prepare(q, k, v, selection, row_start, row_length, block_q, block_k)
    nq = qb.shape[2]
    shape = (B, H, nq, block_q)
    _F32 = _acc(q.dtype)
    n_iter = jnp.max(kv_count) if kv_count.size else jnp.int32(0)

    def body(carry):
        i, m, l, acc = carry
        s, ok, _, vblk, _ = _slot(i, qb, kb, vb, sel, start, length, kv_index, kv_count, block_k, scale, token_mask)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(vblk.dtype), vblk, preferred_element_type=_F32)
        acc = alpha[..., None] * acc + pv
        return i + 1, m_new, l, acc

    init = (jnp.int32(0), jnp.full(shape, -jnp.inf, _F32), jnp.zeros(shape, _F32), jnp.zeros(shape + (D,), _F32))
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < n_iter, body, init)
    has = l > 0
    out = jnp.where(has[..., None], acc / jnp.where(has, l, 1.0)[..., None], 0.0)
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), jnp.inf)
    out_t = out.transpose(0, 2, 3, 1, 4).reshape(B, nq * block_q, H, D)[:, :T]
    return out_t, (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _selected_attention(q, k, v, selection, row_start, row_length, kv_index, kv_count, block_q, block_k, scale, token_mask):
    return _forward(q, k, v, selection, row_start, row_length, kv_index, kv_count, block_q, block_k, scale, token_mask)[0]


def _fwd(q, k, v, selection, row_start, row_length, kv_index, kv_count, block_q, block_k, scale, token_mask):
    out_t, (out, lse) = _forward(q, k, v, selection, row_start, row_length, kv_index, kv_count, block_q, block_k, scale, token_mask)
    return out_t, (q, k, v, selection, row_start, row_length, kv_index, kv_count, out, lse)


def _bwd(block_q, block_k, scale, token_mask, res, g):
    q, k, v, selection, row_start, row_length, kv_index, kv_count, out, lse = res
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    _F32 = _acc(q.dtype)
    qb, kb, vb, sel, start, length = _prepare(q, k, v, selection, row_start, row_length, block_q, block_k)
    nq, nk = qb.shape[2], kb.shape[2]
    gb = _pad_to(g.astype(_F32), 1, nq * block_q).reshape(B, nq, block_q, H, D).transpose(0, 3, 1, 2, 4)
    delta = jnp.sum(gb * out, axis=-1)  # [B,H,nq,bq]
    n_iter = jnp.max(kv_count) if kv_count.size else jnp.int32(0)
    b_i = jnp.arange(B)[:, None, None]
    kv_i = (jnp.arange(H) // G)[None, :, None]

    def body(carry):
        i, dq, dk, dv = carry
        s, ok, kblk, vblk, idx = _slot(i, qb, kb, vb, sel, start, length, kv_index, kv_count, block_k, scale, token_mask)
        p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)  # lse = inf -> 0
        dv_blk = jnp.einsum("bhnqk,bhnqd->bhnkd", p, gb)
        dp = jnp.einsum("bhnqd,bhnkd->bhnqk", gb, vblk.astype(_F32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhnqk,bhnkd->bhnqd", ds, kblk.astype(_F32))
        dk_blk = jnp.einsum("bhnqk,bhnqd->bhnkd", ds, qb.astype(_F32))
        dk = dk.at[b_i, kv_i, idx].add(dk_blk)
        dv = dv.at[b_i, kv_i, idx].add(dv_blk)
        return i + 1, dq, dk, dv

    init = (
        jnp.int32(0),
        jnp.zeros((B, H, nq, block_q, D), _F32),
        jnp.zeros((B, K, nk, block_k, D), _F32),
        jnp.zeros((B, K, nk, block_k, D), _F32),
    )
    _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < n_iter, body, init)
    dq = dq.transpose(0, 2, 3, 1, 4).reshape(B, nq * block_q, H, D)[:, :T].astype(q.dtype)
    dk = dk.transpose(0, 2, 3, 1, 4).reshape(B, nk * block_k, K, D)[:, :S].astype(k.dtype)
    dv = dv.transpose(0, 2, 3, 1, 4).reshape(B, nk * block_k, K, D)[:, :S].astype(v.dtype)
    return dq, dk, dv, None, None, None, None, None


_selected_attention.defvjp(_fwd, _bwd)


def selected_attention(
    q, k, v, selection, row_start, row_length, kv_index, kv_count, *, block_q: int, block_k: int, scale: float,
    token_mask: bool = True,
):
    """Softmax attention of every (row, head) over its selected keys.

    q: [B, T, H, D]; k, v: [B, S, K, D] (H % K == 0, query head h reads kv head h // (H/K));
    selection: bool [B, T, H, t_m]; row_start, row_length: int [B, T] (row t's prefix is keys
    [row_start, row_start + row_length); length 0 = padding row); kv_index, kv_count: the
    block layout [B, H, ceil(T/block_q), M] / [B, H, ceil(T/block_q)] (every key block holding
    an allowed key of a row of the query block must be listed, see
    ``sea_select.block_layout``). ``token_mask=False`` attends every prefix key of the listed
    blocks instead (block granularity, what ``sea_jax.kernels.block_sparse_attention``
    computes from the same layout). Returns float32 (float64 for float64 inputs) [B, T, H, D] (0 for rows with no key).
    """
    return _selected_attention(
        q, k, v, selection, row_start.astype(jnp.int32), row_length.astype(jnp.int32),
        kv_index.astype(jnp.int32), kv_count.astype(jnp.int32), int(block_q), int(block_k), float(scale),
        bool(token_mask),
    )
