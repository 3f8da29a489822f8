"""A token mask given as selected *cells* of each query row's prefix (SEA's selection).

SEA (``sea_jax.ops.sea_select``) picks, for query row t and head h, some of ``M`` (= t_m)
compressed columns of the row's estimated attention. Cell c of a row with prefix
``[row_start[t], row_start[t] + row_length[t])`` covers the keys at offsets
``o = s - row_start[t]`` with ``cell_of_offset(o, row_length[t], M) == c``, i.e. relative
positions [c, c + 1) / M of the prefix. :class:`CellMask` carries that selection as it is
([B, Sq, H, M] bits plus two [B, Sq] vectors, no [Sq, Skv] array): query t of head h may see
key s iff

    0 <= s - row_start[t] < row_length[t]   and   cells[b, t, h, cell_of_offset(s - row_start[t], ...)]

The block-sparse entry point (:func:`sea_jax.kernels.block_sparse_attention`,
``cell_mask=``) intersects it with the layout (which lists the key blocks to visit: SEA's
``touched_blocks``), the causal / window / segment masks, so attention runs on exactly the
selected keys; the GPU kernel rebuilds the mask of each visited tile on chip
(:func:`cells_of_tile`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sea_jax.ops.sea_select import cell_of_offset

__all__ = ["CellMask", "cells_of_tile"]

# 2 * M * row_length must stay below 2**31 (int32 arithmetic, on chip too)
_MAX_PRODUCT = 2**30


class CellMask(NamedTuple):
    """Selected cells of every query row's prefix.

    cells: bool [batch, seq_q, heads, M]: cell c of row t is selected for head h.
    row_start: int [batch, seq_q]: first key position of each row's prefix.
    row_length: int [batch, seq_q]: length of the prefix (0: the row sees nothing).
    """

    cells: jax.Array
    row_start: jax.Array
    row_length: jax.Array

    @property
    def num_cells(self) -> int:
        return int(self.cells.shape[-1])

    def check(self, batch: int, seq_q: int, heads: int, seq_kv: int) -> None:
        """Raise ValueError unless the shapes / dtypes fit a call with these sizes."""
        c = self.cells
        if c.ndim != 4 or c.shape[:3] != (batch, seq_q, heads) or c.shape[3] < 1:
            raise ValueError(f"cell_mask.cells must have shape [{batch}, {seq_q}, {heads}, M] "
                             f"(batch, seq_q, heads, cells; M >= 1), got {c.shape}")
        if c.dtype != jnp.bool_:
            raise ValueError(f"cell_mask.cells must be boolean, got {c.dtype}")
        for name in ("row_start", "row_length"):
            x = getattr(self, name)
            if x.shape != (batch, seq_q) or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"cell_mask.{name} must be an integer array of shape "
                                 f"{(batch, seq_q)}, got {x.shape} {x.dtype}")
        if self.num_cells * max(seq_q, seq_kv) >= _MAX_PRODUCT:
            raise ValueError(f"cells per row * sequence length must be < 2**30 (int32 cell "
                             f"arithmetic), got M={self.num_cells}, length={max(seq_q, seq_kv)}")

    def allowed(self, qpos: jax.Array, kpos: jax.Array, head: jax.Array) -> jax.Array:
        """Reference semantics: bool mask for query positions ``qpos``, key positions ``kpos``
        and query heads ``head``, all int arrays broadcasting to [B, ...] (batch leading)."""
        B = self.cells.shape[0]
        b = jnp.arange(B).reshape((B,) + (1,) * (max(qpos.ndim, kpos.ndim, head.ndim) - 1))
        qsafe = jnp.clip(qpos, 0, self.cells.shape[1] - 1)
        start = self.row_start.astype(jnp.int32)[b, qsafe]
        length = self.row_length.astype(jnp.int32)[b, qsafe]
        off = kpos - start
        inside = (off >= 0) & (off < length) & (qpos < self.cells.shape[1])
        cell = cell_of_offset(off, length, self.num_cells)
        return inside & self.cells[b, qsafe, head, cell]


def cells_of_tile(cells_ref, base, qpos, kpos, start, length, num_cells: int):
    """Kernel-side mask of one tile: ``CellMask.allowed`` without an integer division.

    cells_ref: a flat int8 ref; the cell bit of (query row t, cell c) lives at
    ``base + t * num_cells + c``. qpos, kpos: int32, broadcasting to the tile; start, length:
    the rows' prefixes, broadcasting like qpos. The cell index is estimated in float32 (its
    error is far below one cell: 2 M L < 2**31, 24-bit significand) and corrected by one
    exact integer step each way, so it equals ``cell_of_offset``'s floor division.
    """
    off = kpos - start
    inside = (off >= 0) & (off < length)
    num = (2 * off + 1) * num_cells
    den = 2 * jnp.maximum(length, 1)
    est = jnp.floor(num.astype(jnp.float32) * (1.0 / den.astype(jnp.float32))).astype(jnp.int32)
    est = jnp.where(num >= (est + 1) * den, est + 1, est)
    est = jnp.where(num < est * den, est - 1, est)
    cell = jnp.minimum(jnp.maximum(est, 0), num_cells - 1)
    bit = cells_ref[base + qpos * num_cells + cell]
    return inside & (bit != 0)
