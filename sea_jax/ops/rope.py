"""Rotary position embeddings (the "rotate half" convention of HF Llama)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
    """inv_freq: [head_dim // 2] float32."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if base <= 1:
        raise ValueError(f"rope base must be > 1, got {base}")
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate x: [B, T, heads, D] by positions: [B, T] (int); computed in float32."""
    D = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(D, base)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
