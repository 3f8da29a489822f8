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

__all__ = ["CellMask", "cell_words", "cells_of_tile", "num_words"]

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


def num_words(num_cells: int) -> int:
    """Words per row of :func:`cell_words`."""
    return -(-num_cells // 32) + 1


def cell_words(cells: jax.Array) -> jax.Array:
    """Pack bool cells [..., M] into int32 words [..., ceil(M / 32) + 1]: cell c is bit c % 32
    of word c // 32; the last word is 0 (so a 32-cell window starting at any cell reads two
    words without a bounds check)."""
    M = cells.shape[-1]
    W = num_words(M)
    x = jnp.pad(cells, [(0, 0)] * (cells.ndim - 1) + [(0, 32 * W - M)])
    x = x.reshape(cells.shape[:-1] + (W, 32)).astype(jnp.uint32)
    words = jnp.sum(x << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def _bit(words, index):
    """Bit ``index % 32`` of ``words`` (int32 arrays broadcasting together) as bool."""
    return (jax.lax.shift_right_logical(words, index & 31) & 1) != 0


def _cell(off, num_cells, length):
    """cell_of_offset by integer division (for per-row vectors: cheap there)."""
    return ((2 * off + 1) * num_cells) // (2 * length)


# Rows shorter than this may take the float path: there (r + 1/2) / (2 L) with r < 2 L * 33
# lies >= 1 / (4 L) > 1.5e-5 from every integer, beyond float32's rounding (< 1e-5 at 33)
_FLOAT_PATH_MAX_LENGTH = 16384


def cells_of_tile(words_ref, base, qrow, kpos, start, length, num_cells: int, k0, tk: int, axis: int):
    """Kernel-side ``CellMask.allowed`` of one tile: keys [k0, k0 + tk) for the query rows
    ``qrow`` (an int32 vector) along ``axis`` of the tile (0: [rows, keys]; 1: [keys, rows]).

    words_ref: a flat int32 ref of packed cells (:func:`cell_words`): row t's W words start at
    ``base + t * W``. kpos: the tile's key positions (broadcasting to it); start, length: the
    rows' prefixes, vectors like ``qrow``.

    Per row, the cells the tile spans, [c_lo, c_hi], and the 32 cell bits from c_lo (two word
    loads) are found once; then per element, no division and no load:

    * every row spans <= 2 cells (long rows): a key is in c_lo iff it lies before the row's
      next cell boundary, one comparison;
    * every row spans <= 32 cells and is shorter than 16384: the cell offset from c_lo is
      floor((r + 1/2) / (2 L)) in float32 (r the integer numerator relative to c_lo; exact,
      see ``_FLOAT_PATH_MAX_LENGTH``);
    * otherwise: the cell by a float estimate corrected by one exact integer step each way
      (equal to ``cell_of_offset``'s floor division), its word loaded per element.
    """
    M = num_cells
    W = num_words(M)
    row = (lambda x: x[:, None]) if axis == 0 else (lambda x: x[None, :])
    valid = length > 0
    L = jnp.maximum(length, 1)
    lo = _cell(jnp.minimum(jnp.maximum(k0 - start, 0), L - 1), M, L)
    hi = _cell(jnp.minimum(jnp.maximum(k0 + tk - 1 - start, 0), L - 1), M, L)
    span = jnp.max(jnp.where(valid, hi - lo, 0))
    longest = jnp.max(length)
    inside = (kpos >= row(start)) & (kpos < row(start + length))

    def window_bits(d):  # bit d of the 32 cells from c_lo, d in [0, 32)
        w = base + qrow * W + lax_shift_right(lo, 5)
        w0, w1 = words_ref[w], words_ref[w + 1]
        sh = lo & 31
        upper = jnp.where(sh == 0, 0, jax.lax.shift_left(w1, (32 - sh) & 31))
        pattern = jax.lax.shift_right_logical(w0, sh) | upper
        return _bit(row(pattern), d)

    def two_cells(_):
        bound = start + (2 * (lo + 1) * L + M - 1) // (2 * M)  # first key of cell c_lo + 1
        return window_bits(jnp.where(kpos >= row(bound), 1, 0))

    def float_cells(_):
        rc = M - 2 * M * start - 2 * L * lo  # r = 2 M kpos + rc = (2 off + 1) M - 2 L c_lo
        inv = 1.0 / (2 * L).astype(jnp.float32)
        r = (2 * M * kpos + row(rc)).astype(jnp.float32)
        d = jnp.floor(r * row(inv) + row(0.5 * inv)).astype(jnp.int32)
        return window_bits(jnp.minimum(jnp.maximum(d, 0), 31))

    def any_cells(_):
        off = kpos - row(start)
        num = (2 * off + 1) * M
        den = row(2 * L)
        est = jnp.floor(num.astype(jnp.float32) * (1.0 / den.astype(jnp.float32))).astype(jnp.int32)
        est = jnp.where(num >= (est + 1) * den, est + 1, est)
        est = jnp.where(num < est * den, est - 1, est)
        cell = jnp.minimum(jnp.maximum(est, 0), M - 1)
        return _bit(words_ref[base + row(qrow) * W + lax_shift_right(cell, 5)], cell)

    def not_two(_):
        return jax.lax.cond((span <= 31) & (longest < _FLOAT_PATH_MAX_LENGTH), float_cells, any_cells, None)

    return inside & jax.lax.cond(span <= 1, two_cells, not_two, None)


def lax_shift_right(x, n: int):
    return jax.lax.shift_right_logical(x, jnp.int32(n))
