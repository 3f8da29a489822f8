"""Dense, explicit references for the sea_jax.kernels tests (tiny sizes only).

Written independently of the library: masks are built by explicit loops over tokens, and
attention is an explicit masked T x S softmax. Semantics (see sea_jax.kernels.reference):

    o_t = sum_s a_ts e_ts W_ts v_s / sum_s a_ts C_ts e_ts,   e_ts = exp(scale q_t.k_s - max)

with a = the allowed mask, W = the weight of key s for query t (1 where none), C = 1 in
"gate" mode and C = W in "log" mode; a row with a zero denominator gives 0.

Also random generators for block layouts and gathered index lists with the awkward rows the
kernels must handle (empty rows, full rows, one block, many blocks, -1 holes).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------- dense attention
def dense_attention_np(q, k, v, allowed, weights=None, weight_mode="gate", scale=None):
    """float64 NumPy, explicit loops over (batch, head, query).

    q: [B, T, H, D]; k, v: [B, S, K, D] (GQA: head h reads kv head h // (H // K));
    allowed: bool [B, H, T, S]; weights: float [B, H, T, S] >= 0 or None.
    Returns [B, T, H, D] float64.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    W = np.ones(allowed.shape) if weights is None else np.asarray(weights, np.float64)
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            kh = h // rep
            for t in range(T):
                cols = np.nonzero(allowed[b, h, t])[0]
                if cols.size == 0:
                    continue
                s = k[b, cols, kh] @ q[b, t, h] * scale
                e = np.exp(s - s.max())
                w = W[b, h, t, cols]
                den = np.sum(e * (w if weight_mode == "log" else 1.0))
                if den > 0:
                    out[b, t, h] = (e * w) @ v[b, cols, kh] / den
    return out


def dense_attention_jnp(q, k, v, allowed, weights=None, weight_mode="gate", scale=None):
    """The same function in jax.numpy (differentiable; run under enable_x64 for float64).

    allowed: bool [B, H, T, S] (NumPy); weights: [B, H, T, S] (may be traced) or None.
    Arithmetic in promote_types(q.dtype, float32).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kh = jnp.repeat(k.astype(acc), rep, axis=2)
    vh = jnp.repeat(v.astype(acc), rep, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(acc), kh) * scale
    a = jnp.asarray(allowed)
    s = jnp.where(a, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(a, jnp.exp(s - m), 0.0)
    w = jnp.ones_like(e) if weights is None else weights.astype(acc)
    den = jnp.sum(e * w if weight_mode == "log" else e, axis=-1, keepdims=True)
    p = jnp.where(den > 0, e * w / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.einsum("bhts,bshd->bthd", p, vh)


# ----------------------------------------------------------------- token-level masks
def token_allowed(B, H, T, S, *, causal=True, window=None, segment_ids=None):
    """allowed[b, h, t, s] by explicit loops: s <= t (causal), t - s < window, same
    non-zero segment."""
    seg = None if segment_ids is None else np.asarray(segment_ids)
    a = np.zeros((B, H, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                ok = True
                if causal and s > t:
                    ok = False
                if window is not None and not s > t - window:
                    ok = False
                if seg is not None and (seg[b, t] != seg[b, s] or seg[b, s] == 0):
                    ok = False
                a[b, :, t, s] = ok
    return a


def block_sparse_allowed(block_mask, block_q, block_k, B, H, T, S, **token_kw):
    """allowed [B, H, T, S] of block-sparse attention: the token mask restricted to the
    blocks of block_mask (bool [B or 1, G, nQ, nK]; head h uses group h // (H // G))."""
    bm = np.broadcast_to(np.asarray(block_mask), (B,) + np.shape(block_mask)[1:])
    G = bm.shape[1]
    a = token_allowed(B, H, T, S, **token_kw)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                for s in range(S):
                    if not bm[b, g, t // block_q, s // block_k]:
                        a[b, h, t, s] = False
    return a


def key_weight_matrix(key_weights, H, T):
    """W[b, h, t, s] = key_weights[b, s, h // (H // K)] (jnp; differentiable)."""
    K = key_weights.shape[2]
    w = jnp.repeat(jnp.moveaxis(key_weights, 2, 1), H // K, axis=1)  # [B, H, S]
    return jnp.broadcast_to(w[:, :, None, :], w.shape[:2] + (T,) + w.shape[2:])


def gathered_slots(union, block_q, H, T, S, *, window=0, causal=True, selection_mask=None,
                   segment_ids=None):
    """Which slot feeds which (query, key), by explicit loops.

    union: int [B, K, nQ, U] (-1 empty). Returns (slot_onehot float64 [B, H, T, U, S]: 1 where
    slot u of query t's block is used by t and holds key s; window_allowed bool [B, H, T, S]:
    the window span t - window < s <= t). A slot whose key falls inside the window is not
    used (the window covers it with weight 1).
    """
    union = np.asarray(union)
    B, K, nQ, U = union.shape
    rep = H // K
    seg = None if segment_ids is None else np.asarray(segment_ids)
    sel = None if selection_mask is None else np.asarray(selection_mask)
    onehot = np.zeros((B, H, T, U, S))
    win = np.zeros((B, H, T, S), bool)
    for b in range(B):
        for h in range(H):
            kh = h // rep
            for t in range(T):
                for u in range(U):
                    s = union[b, kh, t // block_q, u]
                    if s < 0:
                        continue
                    if causal and s > (t - window if window > 0 else t):
                        continue
                    if sel is not None and not sel[b, kh, t, u]:
                        continue
                    if seg is not None and (seg[b, t] != seg[b, s] or seg[b, s] == 0):
                        continue
                    onehot[b, h, t, u, s] = 1.0
                if window > 0:
                    for s in range(max(0, t - window + 1), min(t, S - 1) + 1):
                        if seg is not None and (seg[b, t] != seg[b, s] or seg[b, s] == 0):
                            continue
                        win[b, h, t, s] = True
    return onehot, win


def gathered_allowed_weights(onehot, win, selection_weights=None, H=None):
    """(allowed bool [B, H, T, S] NumPy, W [B, H, T, S] jnp) from gathered_slots' output.

    selection_weights: [B, K, T, U] (jnp, may be traced) or None (weight 1)."""
    allowed = (onehot.sum(3) > 0) | win
    if selection_weights is None:
        return allowed, None
    B, Hh, T, U, S = onehot.shape
    K = selection_weights.shape[1]
    wsel = jnp.repeat(selection_weights, Hh // K, axis=1)  # [B, H, T, U]
    w = jnp.einsum("bhtu,bhtus->bhts", wsel.astype(jnp.promote_types(wsel.dtype, jnp.float32)),
                   jnp.asarray(onehot, wsel.dtype if wsel.dtype == jnp.float64 else jnp.float32))
    return allowed, jnp.where(jnp.asarray(win), 1.0, w)


# ------------------------------------------------------------------ random patterns
def random_block_mask(rng, B, G, nQ, nK, kinds=("empty", "full", "one", "random")):
    """bool [B, G, nQ, nK]; row i of each (b, g) is of kind kinds[(i + b + g) % len]."""
    m = np.zeros((B, G, nQ, nK), bool)
    for b in range(B):
        for g in range(G):
            for i in range(nQ):
                kind = kinds[(i + b + g) % len(kinds)]
                if kind == "full":
                    m[b, g, i] = True
                elif kind == "one":
                    m[b, g, i, rng.integers(nK)] = True
                elif kind == "random":
                    m[b, g, i] = rng.random(nK) < 0.5
    return m


def random_union(rng, B, K, nQ, U, S, kinds=("empty", "full", "holes", "random")):
    """int32 [B, K, nQ, U]: distinct key positions in [0, S) in random order, -1 = empty.

    Row kinds: empty (all -1), full (U distinct keys), holes (keys with -1 in random places),
    random (a random count, then -1s)."""
    out = np.full((B, K, nQ, U), -1, np.int32)
    for b in range(B):
        for kh in range(K):
            for i in range(nQ):
                kind = kinds[(i + b + kh) % len(kinds)]
                if kind == "empty":
                    continue
                n = U if kind == "full" else int(rng.integers(1, U + 1))
                keys = rng.choice(S, size=min(n, S), replace=False)
                if kind == "holes":
                    slots = np.sort(rng.choice(U, size=keys.size, replace=False))
                    out[b, kh, i, slots] = keys
                else:
                    out[b, kh, i, : keys.size] = keys
    return out


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (ref must not be all zeros)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
