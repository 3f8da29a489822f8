"""Self-attention layer: Q/K/V/O projections + RoPE around a pluggable attention core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention.base import AttentionDims, AttentionOutput, make_attention
from sea_jax.model.partitioning import logical_param
from sea_jax.ops.rope import apply_rope


class SelfAttention(nnx.Module):
    """x: [B, T, E] -> [B, T, E].

    The projections are plain einsum kernels (q_proj: [E, H, D], k_proj/v_proj: [E, K, D],
    o_proj: [H, D, E]); ``core`` is any registered attention core. Replacing the core keeps
    the projections, which is how a pretrained model's attention is swapped for SEA/SparseK.
    """

    def __init__(
        self,
        dims: AttentionDims,
        attention: str = "dense",
        options=None,
        *,
        rope_base: float = 10000.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        E, H, K, D = dims.embed_dim, dims.num_heads, dims.num_kv_heads, dims.head_dim
        init = jax.nn.initializers.normal(init_std)
        self.dims = dims
        self.rope_base = rope_base
        self.dtype = dtype
        self.q_proj = logical_param(init(rngs.params(), (E, H, D), param_dtype), ("embed", "q_heads", "head_dim"))
        self.k_proj = logical_param(init(rngs.params(), (E, K, D), param_dtype), ("embed", "kv_heads", "head_dim"))
        self.v_proj = logical_param(init(rngs.params(), (E, K, D), param_dtype), ("embed", "kv_heads", "head_dim"))
        self.o_proj = logical_param(init(rngs.params(), (H, D, E), param_dtype), ("q_heads", "head_dim", "embed"))
        self.core = make_attention(attention, dims, options, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.core.init_cache(batch, max_len, dtype or self.dtype)

    def __call__(self, x, positions, *, segment_ids=None, cache=None, return_aux=False) -> AttentionOutput:
        """x: [B, T, E]; positions: [B, T] int (RoPE positions)."""
        if x.ndim != 3 or x.shape[-1] != self.dims.embed_dim:
            raise ValueError(f"x must have shape [batch, seq, {self.dims.embed_dim}], got {x.shape}")
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x, self.v_proj[...].astype(dt))
        q = apply_rope(q, positions, self.rope_base)
        k = apply_rope(k, positions, self.rope_base)
        res = self.core(q, k, v, x=x, segment_ids=segment_ids, cache=cache, return_aux=return_aux)
        out = jnp.einsum("bthd,hde->bte", res.out.astype(dt), self.o_proj[...].astype(dt))
        return AttentionOutput(out, res.cache, res.aux)
