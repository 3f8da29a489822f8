"""Causal kernel (linear) attention in linear memory, chunked over the sequence.

Given feature maps phi(q) and phi(k) (see ``random_features``):

    out_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / sum_{j<=i} phi(q_i).phi(k_j)

Inside a chunk of ``chunk`` tokens the masked [chunk, chunk] product is formed explicitly;
across chunks a running state S = sum phi(k) v^T, z = sum phi(k) is carried by ``lax.scan``,
so memory is O(T * chunk + M * Dv) instead of O(T^2).

Packed sequences (``segment_ids``, contiguous runs, 0 = padding) reset the state at segment
boundaries: a query uses the carried state only if it belongs to the carry's segment.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LinearAttentionState(NamedTuple):
    """Running sums per kv head. s: [B, K, M, Dv]; z: [B, K, M]; segment: [B] int32."""

    s: jax.Array
    z: jax.Array
    segment: jax.Array

    @classmethod
    def zeros(cls, batch, num_kv_heads, num_features, value_dim, dtype=jnp.float32):
        return cls(
            jnp.zeros((batch, num_kv_heads, num_features, value_dim), dtype),
            jnp.zeros((batch, num_kv_heads, num_features), dtype),
            jnp.ones((batch,), jnp.int32),
        )


def causal_linear_attention(
    fq: jax.Array,
    fk: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    state: LinearAttentionState | None = None,
    chunk: int = 64,
    return_normaliser: bool = False,
):
    """Causal linear attention.

    fq: [B, T, H, M] query features; fk: [B, T, K, M] key features (H % K == 0, GQA);
    v: [B, T, K, Dv]; segment_ids: optional [B, T] int (contiguous runs, 0 = padding);
    state: running sums of the tokens before this call (decoding), segments must be None.
    Returns (out [B, T, H, Dv] float32, new state) and, with ``return_normaliser``, also the
    denominators [B, T, H].
    """
    B, T, H, M = fq.shape
    K = fk.shape[2]
    if fk.shape != (B, T, K, M) or H % K:
        raise ValueError(f"fk must have shape [B, T, K, M] with H % K == 0; fq {fq.shape}, fk {fk.shape}")
    if v.shape[:3] != (B, T, K):
        raise ValueError(f"v must have shape {(B, T, K, '*')}, got {v.shape}")
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    G, Dv = H // K, v.shape[-1]
    # float32 accumulation; float64 inputs stay float64 (finite-difference tests)
    acc = jnp.promote_types(jnp.promote_types(fq.dtype, v.dtype), jnp.float32)
    if state is None:
        state = LinearAttentionState.zeros(B, K, M, Dv, acc)
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    fq = fq.astype(acc).reshape(B, T, K, G, M)
    fk = fk.astype(acc) * (seg != 0)[:, :, None, None]
    v = v.astype(acc)

    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        # padded tail tokens get segment 0: they neither contribute nor get output
        fq = jnp.pad(fq, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        fk = jnp.pad(fk, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        seg_p = jnp.pad(seg, ((0, 0), (0, pad)))
    else:
        seg_p = seg

    def to_chunks(x):
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    causal = jnp.tril(jnp.ones((c, c), bool))
    den_floor = float(jnp.finfo(acc).eps) ** 2  # 1.4e-14 in float32: 1/floor^2 stays finite

    def step(carry: LinearAttentionState, xs):
        q_c, k_c, v_c, seg_c = xs  # [B,c,K,G,M], [B,c,K,M], [B,c,K,Dv], [B,c]
        same = (seg_c[:, :, None] == seg_c[:, None, :]) & causal[None]  # [B, c, c]
        a = jnp.einsum("bikgm,bjkm->bkgij", q_c, k_c) * same[:, None, None]
        num = jnp.einsum("bkgij,bjkd->bikgd", a, v_c)
        den = jnp.sum(a, axis=-1).transpose(0, 3, 1, 2)  # [B, c, K, G]
        use_carry = (seg_c == carry.segment[:, None])[:, :, None, None]
        num = num + use_carry[..., None] * jnp.einsum("bikgm,bkmd->bikgd", q_c, carry.s)
        den = den + use_carry * jnp.einsum("bikgm,bkm->bikg", q_c, carry.z)
        last = seg_c[:, -1]
        keep = (carry.segment == last).astype(acc)
        in_last = (seg_c == last[:, None]).astype(acc)  # [B, c]
        k_last = k_c * in_last[:, :, None, None]
        new = LinearAttentionState(
            keep[:, None, None, None] * carry.s + jnp.einsum("bjkm,bjkd->bkmd", k_last, v_c),
            keep[:, None, None] * carry.z + jnp.sum(k_last, axis=1),
            last,
        )
        valid = (seg_c != 0)[:, :, None, None]
        # A floor, not just den > 0: unstabilised FAVOR+ key features of huge-norm keys
        # (LLM "massive activations") underflow, leaving a tiny positive den whose 1/den^2 in
        # the backward overflows to inf and then NaN. Below the floor the output shrinks
        # towards 0 (|out| <= max|v| * den / floor) with a zero gradient through den.
        safe = jnp.where(valid, jnp.maximum(den, den_floor), 1.0)
        out = jnp.where(valid[..., None], num / safe[..., None], 0.0)
        return new, (out, jnp.where(valid, den, 0.0))

    state, (out, den) = jax.lax.scan(
        step, state, (to_chunks(fq), to_chunks(fk), to_chunks(v), to_chunks(seg_p))
    )
    out = jnp.moveaxis(out, 0, 1).reshape(B, n * c, H, Dv)[:, :T]
    if return_normaliser:
        den = jnp.moveaxis(den, 0, 1).reshape(B, n * c, H)[:, :T]
        return out, state, den
    return out, state
