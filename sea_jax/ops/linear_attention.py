"""Causal kernel (linear) attention in linear memory, chunked over the sequence.

Given feature maps phi(q) and phi(k) (see ``random_features``):

    out_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / sum_{j<=i} phi(q_i).phi(k_j)

Inside a chunk of ``chunk`` tokens the masked [chunk, chunk] product is formed explicitly;
across chunks the running state S = sum phi(k) v^T, z = sum phi(k) is either

* ``schedule="parallel"`` (default): every chunk's own sums at once (one batched matmul), the
  states before every chunk by one ``lax.associative_scan`` over the chunks, then every chunk's
  queries against its state at once: a few large kernels, memory O(T * chunk + (T / chunk) *
  M * Dv). On an H100 the sequential form was ~7,700 small kernels for SEA's estimator at
  T = 32k (512 chunks x ~15 kernels, most of its 40 ms forward;
  benchmarks/results/profile_sea_32k_1124.json);
* ``schedule="scan"``: carried through ``lax.scan``, memory O(T * chunk + M * Dv): the one
  for memory-bound or very long inputs.

Packed sequences (``segment_ids``, contiguous runs, 0 = padding) reset the state at segment
boundaries: a query uses the carried state only if it belongs to the carry's segment.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


SCHEDULES = ("parallel", "scan")


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
    schedule: str = "parallel",
):
    """Causal linear attention.

    fq: [B, T, H, M] query features; fk: [B, T, K, M] key features (H % K == 0, GQA);
    v: [B, T, K, Dv]; segment_ids: optional [B, T] int (contiguous runs, 0 = padding);
    state: running sums of the tokens before this call (decoding), segments must be None;
    schedule: "parallel" or "scan" (module docstring: same results up to float rounding).
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
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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
        # padded tail tokens have zero features: they neither contribute nor count (their
        # outputs are sliced off)...
        fq = jnp.pad(fq, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        fk = jnp.pad(fk, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        # ... but they repeat the last token's segment: with segment 0 the state returned after
        # a padded tail was reset (its segment 0), so a decode that went on from it lost the
        # context (any prefill longer than the chunk and not a multiple of it)
        seg_p = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    else:
        seg_p = seg

    def to_chunks(x):
        return jnp.moveaxis(x.reshape(B, n, c, *x.shape[2:]), 1, 0)

    causal = jnp.tril(jnp.ones((c, c), bool))
    den_floor = float(jnp.finfo(acc).eps) ** 2  # 1.4e-14 in float32: 1/floor^2 stays finite

    def step(carry: LinearAttentionState, xs):
        q_c, k_c, v_c, seg_c = xs  # [B,c,K,G,M], [B,c,K,M], [B,c,K,Dv], [B,c]
        out, den = _chunk_outputs(q_c, k_c, v_c, seg_c, carry, causal, den_floor)
        last, own_s, own_z = _chunk_sums(k_c, v_c, seg_c)
        keep = (carry.segment == last).astype(acc)
        new = LinearAttentionState(keep[:, None, None, None] * carry.s + own_s, keep[:, None, None] * carry.z + own_z,
                                   last)
        return new, (out, den)

    if schedule == "scan":
        state, (out, den) = jax.lax.scan(
            step, state, (to_chunks(fq), to_chunks(fk), to_chunks(v), to_chunks(seg_p))
        )
        out = jnp.moveaxis(out, 0, 1).reshape(B, n * c, H, Dv)[:, :T]
        den = jnp.moveaxis(den, 0, 1).reshape(B, n * c, H)[:, :T]
    else:
        state, out, den = _parallel_chunks(fq, fk, v, seg_p, state, n, c, causal, den_floor)
        out = out.reshape(B, n * c, H, Dv)[:, :T]
        den = den.reshape(B, n * c, H)[:, :T]
    if return_normaliser:
        return out, state, den
    return out, state


def _chunk_sums(k, v, seg):
    """What a chunk adds to the state: (its last segment [...], sum phi(k) v^T [..., K, M, Dv],
    sum phi(k) [..., K, M]) over its tokens of that segment (the state carries only one).

    k [..., c, K, M], v [..., c, K, Dv], seg [..., c] (any leading axes)."""
    last = seg[..., -1]
    k_last = k * (seg == last[..., None]).astype(k.dtype)[..., None, None]
    return last, jnp.einsum("...jkm,...jkd->...kmd", k_last, v), jnp.sum(k_last, axis=-3)


def _chunk_outputs(q, k, v, seg, carry: LinearAttentionState, causal, den_floor):
    """(out [..., c, K, G, Dv], den [..., c, K, G]) of a chunk's queries: the masked in-chunk
    products plus the carried state for the queries of the carry's segment.

    q [..., c, K, G, M], k [..., c, K, M], v [..., c, K, Dv], seg [..., c]; carry: the state
    before the chunk (s [..., K, M, Dv], z [..., K, M], segment [...]); any leading axes."""
    same = (seg[..., :, None] == seg[..., None, :]) & causal  # [..., c, c]
    a = jnp.einsum("...ikgm,...jkm->...kgij", q, k) * same[..., None, None, :, :]
    num = jnp.einsum("...kgij,...jkd->...ikgd", a, v)
    den = jnp.moveaxis(jnp.sum(a, axis=-1), -1, -3)  # [..., c, K, G]
    use_carry = (seg == carry.segment[..., None]).astype(q.dtype)[..., None, None]
    num = num + use_carry[..., None] * jnp.einsum("...ikgm,...kmd->...ikgd", q, carry.s)
    den = den + use_carry * jnp.einsum("...ikgm,...km->...ikg", q, carry.z)
    valid = (seg != 0)[..., None, None]
    # A floor, not just den > 0: unstabilised FAVOR+ key features of huge-norm keys
    # (LLM "massive activations") underflow, leaving a tiny positive den whose 1/den^2 in
    # the backward overflows to inf and then NaN. Below the floor the output shrinks
    # towards 0 (|out| <= max|v| * den / floor) with a zero gradient through den.
    safe = jnp.where(valid, jnp.maximum(den, den_floor), 1.0)
    out = jnp.where(valid[..., None], num / safe[..., None], 0.0)
    return out, jnp.where(valid, den, 0.0)


def _parallel_chunks(fq, fk, v, seg, state: LinearAttentionState, n: int, c: int, causal, den_floor):
    """The scan's steps for all chunks at once (the same per-chunk functions).

    fq [B, T', K, G, M], fk [B, T', K, M], v [B, T', K, Dv], seg [B, T'] with T' = n * c.
    Returns (final state, out [B, n, c, K, G, Dv], den [B, n, c, K, G]).

    The state after chunk i is S_i = keep_i * S_{i-1} + own_i, where own_i sums the chunk's
    tokens of its last segment and keep_i says that segment continues the carry's: a linear
    recurrence, so an associative scan over (keep, own) pairs gives every S_i.
    """
    B = fq.shape[0]
    split = lambda x: x.reshape(B, n, c, *x.shape[2:])  # noqa: E731
    q, k, vv, sg = split(fq), split(fk), split(v), split(seg)
    last, own_s, own_z = _chunk_sums(k, vv, sg)  # [B, n], [B, n, K, M, Dv], [B, n, K, M]
    carry_seg = jnp.concatenate([state.segment[:, None], last[:, :-1]], axis=1)  # the state's before each chunk
    keep = (carry_seg == last).astype(q.dtype)
    # the incoming state enters as chunk 0's predecessor: fold it into chunk 0 and cut there
    own_s = own_s.at[:, 0].add(keep[:, 0, None, None, None] * state.s)
    own_z = own_z.at[:, 0].add(keep[:, 0, None, None] * state.z)
    keep = keep.at[:, 0].set(0)

    def combine(x, y):
        (ka, sa, za), (kb, sb, zb) = x, y
        return ka * kb, kb[..., None, None, None] * sa + sb, kb[..., None, None] * za + zb

    _, s_after, z_after = jax.lax.associative_scan(combine, (keep, own_s, own_z), axis=1)
    before = LinearAttentionState(jnp.concatenate([state.s[:, None], s_after[:, :-1]], axis=1),
                                  jnp.concatenate([state.z[:, None], z_after[:, :-1]], axis=1), carry_seg)
    out, den = _chunk_outputs(q, k, vv, sg, before, causal, den_floor)
    return LinearAttentionState(s_after[:, -1], z_after[:, -1], last[:, -1]), out, den
