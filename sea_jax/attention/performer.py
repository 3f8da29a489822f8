"""Performer: causal linear attention with random features (the linear-attention baseline).

Linear memory in sequence length (chunked scan, see ``sea_jax.ops.linear_attention``);
decoding carries the running sums S = sum phi(k) v^T and z = sum phi(k) per kv head, so the
cache is constant in context length.
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
from sea_jax.ops.linear_attention import LinearAttentionState, causal_linear_attention
from sea_jax.ops.random_features import (
    FEATURE_KINDS,
    default_num_features,
    draw_projection,
    feature_map,
)


class RandomProjection(nnx.Variable):
    """A fixed (not trained) random projection; kept apart from nnx.Param so optimisers
    and parameter counts skip it, but it is saved with the model."""


@dataclasses.dataclass(frozen=True)
class PerformerOptions:
    """features: "relu" (generalised ReLU kernel) or "favor" (FAVOR+, estimates softmax).
    num_features: M; None -> d ln d / nbf. orthogonal: orthogonal random features.
    chunk: tokens per chunk of the causal scan."""

    features: str = "favor"
    num_features: int | None = None
    nbf: float = 8.0
    orthogonal: bool = True
    chunk: int = 64

    def __post_init__(self):
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {self.features!r}")
        if self.num_features is not None and (not isinstance(self.num_features, int) or self.num_features < 1):
            raise ValueError(f"num_features must be None or an int >= 1, got {self.num_features!r}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


@struct.dataclass
class PerformerCache:
    state: LinearAttentionState
    length: jax.Array


@register_attention("performer", PerformerOptions)
class PerformerAttention(nnx.Module):
    """Causal Performer attention with GQA; one random projection shared by all heads."""

    def __init__(self, dims: AttentionDims, options: PerformerOptions = PerformerOptions(), *, rngs: nnx.Rngs):
        self.dims = dims
        self.options = options
        m = options.num_features or default_num_features(dims.head_dim, options.nbf)
        self.projection = RandomProjection(
            draw_projection(rngs.params(), m, dims.head_dim, options.orthogonal)
        )

    @property
    def num_features(self) -> int:
        return self.projection[...].shape[0]

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> PerformerCache:
        state = LinearAttentionState.zeros(batch, self.dims.num_kv_heads, self.num_features, self.dims.head_dim)
        return PerformerCache(state, jnp.zeros((), jnp.int32))

    def __call__(self, q, k, v, *, x=None, segment_ids=None, cache=None, return_aux=False):
        check_qkv(self.dims, q, k, v, x, segment_ids)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are not supported together with a decode cache")
        kind, proj = self.options.features, self.projection[...]
        scale = self.dims.head_dim ** -0.5
        fq = feature_map(kind, q, proj, is_query=True, scale=scale)
        # no stabiliser shared over the sequence: its max would run over future keys, so a
        # later token could change (or underflow) earlier outputs. Unshifted FAVOR+ key
        # features exp(w.k - |k|^2/2) are bounded by exp(|w|^2/2), finite in float32 for
        # head_dim <= 128; decoding and the full pass then compute the same features.
        fk = feature_map(kind, k, proj, is_query=False, scale=scale, stabilise_keys=False)
        out, state = causal_linear_attention(
            fq,
            fk,
            v,
            segment_ids=segment_ids,
            state=None if cache is None else cache.state,
            chunk=self.options.chunk,
        )
        new_cache = None if cache is None else PerformerCache(state, cache.length + q.shape[1])
        return AttentionOutput(out.astype(q.dtype), new_cache, {})
