"""The selection of gathered attention in factored (SparseK) form.

Gathered attention (:func:`sea_jax.kernels.gathered_attention`) gives every query t of query
block i the union slots ``union_index[b, h, i, :]``, each with a mask bit and a weight. Stored
densely those are two [batch, kv_heads, seq_q, U] arrays (at 32k tokens, 16 KV heads and
U = 1088: 2.3 GB of float32 weights plus the mask), written by the selection, read by the
forward and twice more by the backward, and a same-sized weight gradient comes back.

SparseK's selection has a structure that needs none of that: the union slots of a block are
sorted by score, so the slots a query keeps form one contiguous range [lo_t, hi_t) (further
thinned only by causality / the window / segments, which the kernel checks anyway), and
every weight is the clipped difference of one per-slot and one per-query number,
``m_tu = clip(z_u - tau_t, 0, 1)``. :class:`SlotSelection` carries exactly these vectors;
the GPU kernel generates mask and weights tile by tile on chip, and its backward returns
the gradients of ``z`` (per slot) and ``tau`` (per query) directly. :meth:`SlotSelection.dense`
expands it into the dense pair: the XLA and TPU paths use that, and the tests use it as the
definition.

SparseK's selection has one more structure: scores do not depend on the query, so once k
better keys are visible to a query a key is never selected again. Key p is therefore selected
by one contiguous range of queries, [p + window, key_end[p]) (of those that can see it: same
segment). With the optional ``key_scores`` / ``key_end`` the GPU backward computes the
selected keys' dK / dV key-major (one program per tile of keys over the query range the tile
is selected by: no per-slot partial sums, no reduction pass) and returns the scores'
gradient per key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SlotSelection", "slot_weights"]


def slot_weights(x: jax.Array) -> jax.Array:
    """clip(x, 0, 1) whose derivative is 1 strictly inside (0, 1) and 0 elsewhere, as in the
    SparseK operator's VJP (``jnp.clip`` would give 1/2 at the corners)."""
    return jnp.where(x >= 1, jnp.ones_like(x), jnp.where(x > 0, x, jnp.zeros_like(x)))


class SlotSelection(NamedTuple):
    """Per-(query, slot) selection mask and weights in factored form.

    slot_scores: float [batch, kv_heads, ceil(seq_q / block_q), U]: score z_u of every union
      slot of every query block (differentiable; empty slots: any value).
    select_lo, select_hi: int [batch, kv_heads, seq_q]: query t uses the slots u with
      lo_t <= u < hi_t (and, as always, only keys visible to it).
    threshold: float [batch, kv_heads, seq_q]: tau_t (differentiable). The weight of a used
      slot is clip(z_u - tau_t, 0, 1); tau_t = -inf gives weight 1.
    key_scores, key_end: optional, both or neither: float / int [batch, kv_heads, seq_kv], the
      same selection key by key: key p is used by exactly the queries t with
      p + window <= t < key_end[p] that can see it (same segment), and every slot holding key
      p has the score key_scores[p] (the caller guarantees both; SparseK's selection builds
      them, tests/ops/test_sparsek_select.py checks it). key_scores must be a differentiable
      view of the same scores as slot_scores: an implementation returns the scores' gradient
      through one of the two (the GPU kernel's key-major backward through key_scores, every
      other path through slot_scores), so only their sum is defined.
    """

    slot_scores: jax.Array
    select_lo: jax.Array
    select_hi: jax.Array
    threshold: jax.Array
    key_scores: jax.Array | None = None
    key_end: jax.Array | None = None

    @property
    def has_key_intervals(self) -> bool:
        return self.key_scores is not None

    def dense(self, block_q: int) -> tuple[jax.Array, jax.Array]:
        """(mask bool, weights float32) [batch, kv_heads, seq_q, U] of the dense interface
        (weights 0 where the mask is False); differentiable in slot_scores and threshold."""
        seq_q = self.threshold.shape[-1]
        z = jnp.repeat(self.slot_scores.astype(jnp.float32), block_q, axis=2)[:, :, :seq_q]
        u = jnp.arange(z.shape[-1], dtype=jnp.int32)
        mask = (u >= self.select_lo[..., None]) & (u < self.select_hi[..., None])
        w = slot_weights(z - self.threshold.astype(jnp.float32)[..., None])
        return mask, jnp.where(mask, w, 0.0)

    def check(self, batch: int, kv_heads: int, seq_q: int, n_blocks: int, slots: int,
              seq_kv: int | None = None) -> None:
        """ValueError naming the field whose shape or dtype is wrong."""
        want = {"slot_scores": (batch, kv_heads, n_blocks, slots), "select_lo": (batch, kv_heads, seq_q),
                "select_hi": (batch, kv_heads, seq_q), "threshold": (batch, kv_heads, seq_q)}
        if (self.key_scores is None) != (self.key_end is None):
            raise ValueError("selection.key_scores and selection.key_end go together: give both or neither")
        if self.key_scores is not None:
            want["key_scores"] = want["key_end"] = (batch, kv_heads, seq_q if seq_kv is None else seq_kv)
        for name, shape in want.items():
            x = getattr(self, name)
            if getattr(x, "shape", None) != shape:
                raise ValueError(f"selection.{name} must have shape {shape}, got {getattr(x, 'shape', None)}")
            floating = name in ("slot_scores", "threshold", "key_scores")
            if floating != jnp.issubdtype(x.dtype, jnp.floating) or not (
                    floating or jnp.issubdtype(x.dtype, jnp.integer)):
                kind = "floating point" if floating else "integer"
                raise ValueError(f"selection.{name} must be {kind}, got dtype {x.dtype}")
