"""Dense causal softmax attention: cuDNN flash attention on GPU, XLA elsewhere."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention.base import (
    AttentionDims,
    AttentionOutput,
    check_qkv,
    register_attention,
)
from sea_jax.attention.cache import KVCache, append_kv

_IMPLS = ("auto", "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class DenseOptions:
    """impl: "auto" (cuDNN on GPU for bf16/fp16 without segment ids, XLA otherwise),
    "cudnn" or "xla"."""

    impl: str = "auto"

    def __post_init__(self):
        if self.impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {self.impl!r}")


def _use_cudnn(impl: str, q: jax.Array, segment_ids) -> bool:
    if impl == "xla":
        return False
    ok = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] <= 128
        and segment_ids is None
    )
    if impl == "cudnn" and not ok:
        raise ValueError(
            "impl='cudnn' needs a GPU backend, bf16/fp16 inputs, head_dim <= 128 and no "
            f"segment_ids (backend={jax.default_backend()}, dtype={q.dtype}, "
            f"head_dim={q.shape[-1]}, segment_ids={'set' if segment_ids is not None else None})"
        )
    return ok


def causal_segment_mask(q_index, k_index, q_segments=None, k_segments=None):
    """Boolean [B or 1, 1, T, S] mask: key index <= query index, same non-zero segment."""
    mask = (k_index[None, :] <= q_index[:, None])[None, None]
    if q_segments is not None:
        same = q_segments[:, :, None] == k_segments[:, None, :]
        mask = mask & (same & (k_segments[:, None, :] != 0))[:, None]
    return mask


@register_attention("dense", DenseOptions)
class DenseAttention(nnx.Module):
    """Exact causal softmax attention with GQA.

    Full pass: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU; XLA, which
    materialises [B, H, T, T] scores, elsewhere). Decode: a [B, max_len, K, D] KV cache.
    """

    def __init__(self, dims: AttentionDims, options: DenseOptions = DenseOptions(), *, rngs=None):
        self.dims = dims
        self.options = options

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> KVCache:
        return KVCache.zeros(batch, max_len, self.dims.num_kv_heads, self.dims.head_dim, dtype)

    def __call__(self, q, k, v, *, x=None, segment_ids=None, cache=None, return_aux=False):
        check_qkv(self.dims, q, k, v, x, segment_ids)
        scale = self.dims.head_dim ** -0.5
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
            cache = append_kv(cache, k, v)
            T, S = q.shape[1], cache.k.shape[1]
            q_index = cache.length - T + jnp.arange(T)
            mask = causal_segment_mask(q_index, jnp.arange(S))
            out = jax.nn.dot_product_attention(
                q, cache.k, cache.v, mask=mask, scale=scale, implementation="xla"
            )
            return AttentionOutput(out, cache, {})

        if _use_cudnn(self.options.impl, q, segment_ids):
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, scale=scale, implementation="cudnn"
            )
            return AttentionOutput(out, None, {})
        T = q.shape[1]
        idx = jnp.arange(T)
        mask = causal_segment_mask(idx, idx, segment_ids, segment_ids)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
        if segment_ids is not None:
            # padding queries see no key: return zeros rather than a uniform average
            out = jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(out.dtype)
        return AttentionOutput(out, None, {})
