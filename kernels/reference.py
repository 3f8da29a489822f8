"""XLA reference implementations of block-sparse and gathered attention.

These define the semantics every kernel is tested against and serve as the ``impl="xla"``
backend. They are blockwise: queries are processed one block at a time (``lax.map``), each
against only the keys its layout / index list names, so memory is O(T * keys-per-block),
never T x T. Gradients come from autodiff of the same code.

Weight semantics (shared by all backends). Let ``s_ij = scale * q_i . k_j`` over the keys
``j`` that query ``i`` may see (the *allowed* set), ``w_j`` the key weight (1 where none) and
``c_j = 1`` in ``"gate"`` mode, ``c_j = w_j`` in ``"log"`` mode. Then

    o_i = sum_j exp(s_ij - m_i) * w_j * v_j / sum_j c_j * exp(s_ij - m_i)

i.e. ``"gate"``: softmax over the allowed keys, each value scaled by its weight (SparseK's
value gating, o_i = sum_j softmax_j(q.k) m_j v_j); ``"log"``: softmax(s_ij + log w_j), written
without the logarithm so that w_j = 0 is exact (the key drops out) and the gradient with
respect to w_j stays finite there. Weights must be finite and >= 0. A query with no allowed
key (or, in "log" mode, only zero-weight keys) gets a zero output and zero gradients - never
NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sea_jax.kernels.layout import BlockLayout, num_blocks

__all__ = ["block_sparse_attention_reference", "gathered_attention_reference", "masked_softmax_rows"]


def masked_softmax_rows(s, allowed, w, weight_mode, v_dtype_f32=True):
    """Row-wise weighted softmax factors.

    s: float [..., Q, L] scaled scores (float32, or float64 for float64 inputs); allowed: bool
    broadcastable to s; w: float broadcastable to s (key weights, 1 = unweighted).
    Returns (p [..., Q, L] = exp(s - m) * w / l, the probabilities times weights that multiply
    the values; lse [..., Q], the log of the normaliser, +inf for empty rows).
    """
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(s - m), 0.0)
    c = e * w if weight_mode == "log" else e
    den = jnp.sum(c, axis=-1, keepdims=True)
    safe = jnp.where(den > 0, den, 1.0)
    p = jnp.where(den > 0, e * w / safe, 0.0)
    lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(safe[..., 0]), jnp.inf)
    return p, lse


def _pad_axis(x, axis, new_len, value=0):
    pad = new_len - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def block_sparse_attention_reference(
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
    return_lse: bool = False,
    cell_mask=None,
):
    """Block-sparse attention in plain XLA, one query block at a time.

    q: [B, Sq, H, D]; k, v: [B, Skv, K, D] with H % K == 0 (query head h reads kv head
    h // (H // K)); layout: a :class:`BlockLayout` for (Sq, Skv); key_weights: optional
    [B, Skv, K] (one weight per key and KV head); segment_ids: optional [B, S] (requires
    Sq == Skv; 0 = padding, never attended; tokens attend only within their segment).
    Query t may see key s iff s lies in a key block listed for t's query block, s < Skv,
    (causal) s <= t, (window) t - window < s, segments match and (``cell_mask``, a
    :class:`~sea_jax.kernels.cell_mask.CellMask`) ``cell_mask.allowed`` holds.
    Arithmetic runs in promote_types(q.dtype, float32): float32 for half inputs, float64 for
    float64 ones (used by the finite-difference tests).
    Returns out [B, Sq, H, D] in q.dtype (and lse [B, H, Sq] in that dtype if ``return_lse``,
    natural log, +inf for rows with no allowed key).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    bq, bk = layout.block_q, layout.block_k
    nq, nk = num_blocks(Sq, bq), num_blocks(Skv, bk)
    layout = layout.broadcast_batch(B)
    G = layout.num_groups
    scale = D**-0.5 if scale is None else float(scale)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # accumulation dtype

    qp = _pad_axis(q, 1, nq * bq).reshape(B, nq, bq, H, D)
    head_kv = jnp.arange(H) // (H // K)
    head_group = jnp.arange(H) // (H // G)
    # per query head copies of the key/value blocks: [B, H, nK, bk, D] (O(T) memory)
    kb = jnp.moveaxis(_pad_axis(k, 1, nk * bk).reshape(B, nk, bk, K, D), 3, 1)[:, head_kv]
    vb = jnp.moveaxis(_pad_axis(v, 1, nk * bk).reshape(B, nk, bk, K, D), 3, 1)[:, head_kv]
    if key_weights is None:
        wb = jnp.ones((B, H, nk, bk), acc)
    else:
        wb = jnp.moveaxis(_pad_axis(jnp.asarray(key_weights).astype(acc), 1, nk * bk).reshape(B, nk, bk, K), 3, 1)
        wb = wb[:, head_kv]
    seg = None if segment_ids is None else _pad_axis(jnp.asarray(segment_ids).astype(jnp.int32), 1, max(nq * bq, nk * bk))

    def one_block(i):
        idx = layout.kv_index[:, :, i][:, head_group]  # [B, H, M]
        cnt = layout.kv_count[:, :, i][:, head_group]  # [B, H]
        M = idx.shape[-1]
        take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
        kg = take(kb).reshape(B, H, M * bk, D)
        vg = take(vb).reshape(B, H, M * bk, D)
        wg = take(wb).reshape(B, H, 1, M * bk)
        kpos = (idx[..., None] * bk + jnp.arange(bk)).reshape(B, H, 1, M * bk)
        slot_ok = jnp.repeat(jnp.arange(M)[None, None] < cnt[..., None], bk, axis=-1)[:, :, None]
        qpos = (i * bq + jnp.arange(bq))[None, None, :, None]
        allowed = slot_ok & (kpos < Skv)
        if causal:
            allowed &= kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        if seg is not None:
            sq = lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1)  # [B, bq]
            sk = jnp.take_along_axis(seg[:, None, :], jnp.minimum(kpos[:, :, 0], seg.shape[1] - 1), axis=2)
            allowed &= (sq[:, None, :, None] == sk[:, :, None, :]) & (sk[:, :, None, :] != 0)
        if cell_mask is not None:
            allowed &= cell_mask.allowed(qpos, kpos, jnp.arange(H)[None, :, None, None])
        qi = jnp.moveaxis(qp[:, i], 2, 1).astype(acc)  # [B, H, bq, D]
        s = jnp.einsum("bhqd,bhkd->bhqk", qi, kg.astype(acc)) * scale
        p, lse = masked_softmax_rows(s, allowed, wg, weight_mode)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vg.astype(acc))
        return jnp.moveaxis(o, 1, 2), lse  # [B, bq, H, D], [B, H, bq]

    out, lse = lax.map(one_block, jnp.arange(nq))  # [nq, B, bq, H, D], [nq, B, H, bq]
    out = jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, H, D)[:, :Sq].astype(q.dtype)
    if return_lse:
        lse = jnp.moveaxis(lse, 0, 2).reshape(B, H, nq * bq)[:, :, :Sq]
        return out, lse
    return out


def gathered_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    union_index: jax.Array,
    *,
    block_q: int,
    window: int = 0,
    selection_mask: jax.Array | None = None,
    selection_weights: jax.Array | None = None,
    weight_mode: str = "gate",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Gathered (token-level) attention in plain XLA, one query block at a time.

    q: [B, Sq, H, D]; k, v: [B, Skv, K, D] (GQA as in block_sparse_attention);
    union_index: int32 [B, K, nQ, U], nQ = ceil(Sq / block_q): for each KV head and query
      block, the key positions selected by any query of the block; -1 marks an empty slot.
    selection_mask: optional bool [B, K, Sq, U]: slot u is selected by query t (default:
      every non-empty slot).
    selection_weights: optional float [B, K, Sq, U]: the weight w of slot u for query t
      (default 1); see the module docstring for "gate" / "log".
    window: each query t also attends the contiguous span t - window < s <= t with weight 1
      (0 = no window). Requires causal=True when > 0.
    A slot is used by query t iff it is non-empty, selected, s < Skv, (causal) s <= t -
    window when window > 0 else s <= t (keys inside the window are covered by the window
    span, with weight 1, and never counted twice), and segments match.
    Returns out [B, Sq, H, D] in q.dtype (and lse [B, H, Sq] if ``return_lse``).
    """
    q, k, v, union_index = (jnp.asarray(x) for x in (q, k, v, union_index))
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    bq = block_q
    nq = num_blocks(Sq, bq)
    U = union_index.shape[-1]
    rep = H // K
    scale = D**-0.5 if scale is None else float(scale)
    W = int(window)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # accumulation dtype

    qp = _pad_axis(q, 1, nq * bq).reshape(B, nq, bq, K, rep, D)
    kt = jnp.moveaxis(k, 2, 1)  # [B, K, Skv, D]
    vt = jnp.moveaxis(v, 2, 1)
    span = bq + W - 1 if W > 0 else 0
    # front-pad by W - 1 so that the span of block i starts at padded index i * bq
    kw_src = jnp.pad(kt, ((0, 0), (0, 0), (max(W - 1, 0), nq * bq - Skv if nq * bq > Skv else 0), (0, 0)))
    vw_src = jnp.pad(vt, ((0, 0), (0, 0), (max(W - 1, 0), nq * bq - Skv if nq * bq > Skv else 0), (0, 0)))
    if selection_mask is None:
        sel_mask = None
    else:
        sel_mask = _pad_axis(jnp.asarray(selection_mask), 2, nq * bq, False).reshape(B, K, nq, bq, U)
    if selection_weights is None:
        sel_w = None
    else:
        sel_w = _pad_axis(jnp.asarray(selection_weights).astype(acc), 2, nq * bq, 0).reshape(B, K, nq, bq, U)
    seg = None if segment_ids is None else _pad_axis(jnp.asarray(segment_ids).astype(jnp.int32), 1, max(nq * bq, Skv))

    def one_block(i):
        qpos = i * bq + jnp.arange(bq)  # [bq]
        idx = union_index[:, :, i]  # [B, K, U]
        safe = jnp.clip(idx, 0, Skv - 1)
        ks = jnp.take_along_axis(kt, safe[..., None], axis=2)  # [B, K, U, D]
        vs = jnp.take_along_axis(vt, safe[..., None], axis=2)
        ok = (idx >= 0)[:, :, None, :] & (idx < Skv)[:, :, None, :]  # [B, K, 1, U]
        if causal:
            ok &= idx[:, :, None, :] <= (qpos - W if W > 0 else qpos)[None, None, :, None]
        if sel_mask is not None:
            ok &= sel_mask[:, :, i]
        w_sel = jnp.ones((1, 1, 1, U), acc) if sel_w is None else sel_w[:, :, i]
        if seg is not None:
            sq = lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1)  # [B, bq]
            sk = jnp.take_along_axis(seg[:, None, :], safe, axis=2)  # [B, K, U]
            ok &= (sq[:, None, :, None] == sk[:, :, None, :]) & (sk[:, :, None, :] != 0)
        keys, vals, allowed, weights = [ks], [vs], [ok], [jnp.broadcast_to(w_sel, ok.shape[:2] + (bq, U))]
        if W > 0:
            kw = lax.dynamic_slice_in_dim(kw_src, i * bq, span, axis=2)  # [B, K, span, D]
            vw = lax.dynamic_slice_in_dim(vw_src, i * bq, span, axis=2)
            kpos = i * bq - (W - 1) + jnp.arange(span)
            d = qpos[:, None] - kpos[None, :]
            okw = (d >= 0) & (d < W) & (kpos >= 0)[None] & (kpos < Skv)[None]
            okw = jnp.broadcast_to(okw, (B, K, bq, span))
            if seg is not None:
                skw = jnp.take_along_axis(seg, jnp.clip(kpos, 0, seg.shape[1] - 1)[None], axis=1)
                okw &= ((sq[:, :, None] == skw[:, None, :]) & (skw[:, None, :] != 0))[:, None]
            keys.append(kw)
            vals.append(vw)
            allowed.append(okw)
            weights.append(jnp.ones((B, K, bq, span), acc))
        kc = jnp.concatenate(keys, axis=2).astype(acc)  # [B, K, L, D]
        vc = jnp.concatenate(vals, axis=2).astype(acc)
        al = jnp.concatenate(allowed, axis=-1)[:, :, None]  # [B, K, 1, bq, L]
        wc = jnp.concatenate(weights, axis=-1)[:, :, None]
        qi = jnp.moveaxis(qp[:, i], 1, 3).astype(acc)  # [B, K, rep, bq, D]
        s = jnp.einsum("bkrqd,bkld->bkrql", qi, kc) * scale
        p, lse = masked_softmax_rows(s, al, wc, weight_mode)
        o = jnp.einsum("bkrql,bkld->bkrqd", p, vc)
        return jnp.moveaxis(o, 3, 1).reshape(B, bq, H, D), lse.reshape(B, H, bq)

    out, lse = lax.map(one_block, jnp.arange(nq))
    out = jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, H, D)[:, :Sq].astype(q.dtype)
    if return_lse:
        return out, jnp.moveaxis(lse, 0, 2).reshape(B, H, nq * bq)[:, :, :Sq]
    return out
