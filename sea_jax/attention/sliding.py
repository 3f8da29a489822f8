"""Causal sliding-window attention: query i attends keys i - window < j <= i.

Computed blockwise: queries in chunks of ``chunk`` tokens, each chunk against the keys of its
own and the preceding ``ceil((window - 1) / chunk)`` chunks, so memory is
O(T * (window + chunk)), never T x T. Decoding keeps the last ``window`` keys and values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sea_jax.attention.base import (
    AttentionDims,
    AttentionOutput,
    check_qkv,
    register_attention,
)


@dataclasses.dataclass(frozen=True)
class SlidingOptions:
    """window: number of keys each query sees, itself included (>= 1).
    chunk: query block size of the blockwise computation (>= 1)."""

    window: int = 256
    chunk: int = 256

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {self.chunk!r}")


@struct.dataclass
class SlidingCache:
    """The last ``window`` keys/values, oldest first, right-aligned.

    k, v: [B, window, K, D]; length: int32 scalar, tokens seen so far.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


def _masked_softmax_attend(q, k, v, mask, scale):
    """q: [..., K, G, Tq, D], k/v: [..., K, L, D], mask broadcastable to [..., K, G, Tq, L].

    fp32 softmax; rows with no allowed key give zeros (never NaN).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64 (gradient tests)
    s = jnp.einsum("...kgqd,...kld->...kgql", q.astype(acc), k.astype(acc))
    s = jnp.where(mask, s * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("...kgql,...kld->...kgqd", p, v.astype(acc))


def sliding_window_attention(q, k, v, window: int, *, segment_ids=None, chunk: int = 256, scale=None):
    """Blockwise causal sliding-window attention.

    q: [B, T, H, D]; k, v: [B, T, K, D]; segment_ids: optional [B, T] (0 = padding).
    Returns [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    scale = D ** -0.5 if scale is None else scale
    c = min(chunk, T)
    n_prev = -(-(window - 1) // c)
    n = -(-T // c)
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def pad_seq(x, front, back):
        return jnp.pad(x, [(0, 0), (front, back)] + [(0, 0)] * (x.ndim - 2))

    back = n * c - T
    qb = pad_seq(q, 0, back).reshape(B, n, c, K, G, D)
    kp = pad_seq(k, n_prev * c, back).reshape(B, n + n_prev, c, K, D)
    vp = pad_seq(v, n_prev * c, back).reshape(B, n + n_prev, c, K, D)
    sp = pad_seq(seg, n_prev * c, back).reshape(B, n + n_prev, c)
    # keys of chunk b: padded chunks b .. b + n_prev (i.e. real chunks b - n_prev .. b)
    kw = jnp.concatenate([kp[:, i : i + n] for i in range(n_prev + 1)], axis=2)
    vw = jnp.concatenate([vp[:, i : i + n] for i in range(n_prev + 1)], axis=2)
    sw = jnp.concatenate([sp[:, i : i + n] for i in range(n_prev + 1)], axis=2)  # [B, n, L]
    sq = pad_seq(seg, 0, back).reshape(B, n, c)

    L = (n_prev + 1) * c
    qpos = jnp.arange(n)[:, None] * c + jnp.arange(c)[None, :]  # [n, c]
    kpos = (jnp.arange(n)[:, None] - n_prev) * c + jnp.arange(L)[None, :]  # [n, L]
    dist = qpos[:, :, None] - kpos[:, None, :]  # [n, c, L]
    allowed = (dist >= 0) & (dist < window)
    same = (sq[:, :, :, None] == sw[:, :, None, :]) & (sw[:, :, None, :] != 0)  # [B, n, c, L]
    mask = (allowed[None] & same)[:, :, None, None]  # [B, n, 1, 1, c, L]

    out = _masked_softmax_attend(
        jnp.moveaxis(qb, 2, 4),  # [B, n, K, G, c, D]
        jnp.moveaxis(kw, 2, 3),  # [B, n, K, L, D]
        jnp.moveaxis(vw, 2, 3),
        mask,
        scale,
    )  # [B, n, K, G, c, D]
    out = jnp.moveaxis(out, 4, 2).reshape(B, n * c, H, D)[:, :T]
    return out.astype(q.dtype)


@register_attention("sliding", SlidingOptions)
class SlidingWindowAttention(nnx.Module):
    """Causal sliding-window softmax attention with GQA (the local baseline)."""

    def __init__(self, dims: AttentionDims, options: SlidingOptions = SlidingOptions(), *, rngs=None):
        self.dims = dims
        self.options = options

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> SlidingCache:
        shape = (batch, self.options.window, self.dims.num_kv_heads, self.dims.head_dim)
        return SlidingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def __call__(self, q, k, v, *, x=None, segment_ids=None, cache=None, return_aux=False):
        check_qkv(self.dims, q, k, v, x, segment_ids)
        w = self.options.window
        if cache is None:
            out = sliding_window_attention(q, k, v, w, segment_ids=segment_ids, chunk=self.options.chunk)
            return AttentionOutput(out, None, {})
        if segment_ids is not None:
            raise ValueError("segment_ids are not supported together with a decode cache")
        B, T = q.shape[:2]
        # buffer slot s holds position length - w + s; slots before position 0 are empty
        kk = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        vv = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        filled = jnp.arange(w) >= w - cache.length
        kseg = jnp.concatenate([filled, jnp.ones((T,), bool)]).astype(jnp.int32)
        if T <= w:
            # few new tokens: attend directly to the w + T candidates
            qpos = w + jnp.arange(T)
            dist = qpos[:, None] - jnp.arange(w + T)[None, :]
            mask = (dist >= 0) & (dist < w) & (kseg[None, :] != 0)
            K, G = self.dims.num_kv_heads, self.dims.group_size
            qg = jnp.moveaxis(q.reshape(B, T, K, G, -1), 1, 3)  # [B, K, G, T, D]
            out = _masked_softmax_attend(
                qg, jnp.moveaxis(kk, 1, 2), jnp.moveaxis(vv, 1, 2), mask, self.dims.head_dim ** -0.5
            )
            out = jnp.moveaxis(out, 3, 1).reshape(q.shape).astype(q.dtype)
        else:
            # long prefill through the cache: run the blockwise path over buffer + new tokens
            qq = jnp.concatenate([jnp.zeros((B, w) + q.shape[2:], q.dtype), q], axis=1)
            seg = jnp.broadcast_to(kseg[None], (B, w + T))
            out = sliding_window_attention(qq, kk, vv, w, segment_ids=seg, chunk=self.options.chunk)[:, w:]
        new_cache = SlidingCache(kk[:, -w:], vv[:, -w:], cache.length + T)
        return AttentionOutput(out, new_cache, {})
