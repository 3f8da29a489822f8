"""Decode caches shared by several attention cores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every past position.

    k, v:   [B, max_len, K, D]; entries at index >= length are zeros.
    length: int32 scalar, number of positions written so far.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, batch, max_len, num_kv_heads, head_dim, dtype):
        shape = (batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def append_kv(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """Write k, v [B, T, K, D] at positions [length, length + T)."""
    if k.shape[1] > cache.k.shape[1]:
        raise ValueError(f"{k.shape[1]} new tokens do not fit a cache of max_len {cache.k.shape[1]}")
    start = (0, cache.length, 0, 0)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
        cache.length + k.shape[1],
    )
