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

from sea_jax.ops.sea_select import cell_of_offset, check_lengths

__all__ = ["CellMask", "MAX_TILE_KEYS", "cell_words", "cells_of_tile", "num_words"]

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
        check_lengths(max(seq_q, seq_kv), self.num_cells)  # 2 M L < 2**31: int32 cell arithmetic

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


# the tile masks read a window of words from the row's first visible cell: key tiles of up to
# this many keys (the Triton kernels' tiles are <= 128)
MAX_TILE_KEYS = 128
_WINDOW_WORDS = (31 + MAX_TILE_KEYS) // 32 + 1


# the float32 path takes a row's cell offset from c_lo as floor((r + 1/2) / (2 L)): that quotient
# x <= span + 1 lies >= 1 / (4 L) from every integer and its two float32 roundings move it by
# <= x * 2.4e-7, so the floor is exact while L (span + 1) < ~1e6; the kernels ask for
# L (span + 32) < this bound (the offset from c_lo's word, span + 31, bounds span + 1: margin)
_FLOAT_EXACT_BOUND = 1_000_000
FLOAT_PATH = True  # benchmarks switch it off to time the corrected path alone


def num_words(num_cells: int) -> int:
    """Words per row of :func:`cell_words` (the cells, then zero words for the window)."""
    return -(-num_cells // 32) + _WINDOW_WORDS - 1


def cell_words(cells: jax.Array, row_length: jax.Array) -> jax.Array:
    """The kernel form of a cell selection: int32 words [B, Sq, H, num_words(M)].

    Bit c % 32 of word c // 32 is the bit of "cell" c, where rows of at least M keys keep
    their cells, and rows shorter than M (whose keys each lie in a different cell) store the
    bit of every key offset o < L instead, so that a tile of tk keys always spans fewer than
    tk + 1 consecutive entries (for those rows the kernel's cell of offset o is o itself).
    cells: bool [B, Sq, H, M]; row_length: int [B, Sq].
    """
    M = cells.shape[-1]
    L = row_length.astype(jnp.int32)[:, :, None, None]
    off = jnp.arange(M, dtype=jnp.int32)
    keyed = jnp.take_along_axis(cells, jnp.broadcast_to(cell_of_offset(off, L, M), L.shape[:2] + (1, M)), axis=-1)
    bits = jnp.where(L < M, keyed & (off < L), cells)
    W = num_words(M)
    x = jnp.pad(bits, [(0, 0)] * 3 + [(0, 32 * W - M)])
    x = x.reshape(bits.shape[:-1] + (W, 32)).astype(jnp.uint32)
    words = jnp.sum(x << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def _bit(words, index):
    """Bit ``index % 32`` of ``words`` (int32 arrays broadcasting together) as bool."""
    return (jax.lax.shift_right_logical(words, index & 31) & 1) != 0


def _cell(off, num_cells, length):
    """cell_of_offset for off >= 0 by integer division (per-row vectors: cheap there)."""
    return jax.lax.div((2 * off + 1) * num_cells, 2 * length)


def cells_of_tile(words_ref, base, qrow, kpos, start, length, num_cells: int, k0, tk: int, axis: int):
    """Kernel-side ``CellMask.allowed`` of one tile: keys [k0, k0 + tk) for the query rows
    ``qrow`` (an int32 vector) along ``axis`` of the tile (0: [rows, keys]; 1: [keys, rows]).

    words_ref: a flat int32 ref of :func:`cell_words`: row t's words start at
    ``base + t * num_words(M)``. kpos: the tile's key positions (broadcasting to it); start,
    length: the rows' prefixes, vectors like ``qrow``.

    Per row, the first entry the tile can see, c_lo (its cell; its offset for rows shorter
    than M), and the words from c_lo's word on are loaded once (vector loads, no per-element
    gather). Per element:

    * when every row spans <= 2 cells (long rows): a key is in c_lo iff it lies before the
      row's next cell boundary, one comparison;
    * otherwise its entry (the key offset for rows shorter than M, else its cell) relative to
      c_lo's word, picked from the row's window of words; the cell is floor((r + 1/2) / (2 L))
      in float32 with r the integer numerator relative to c_lo, exact while
      L (d_max + 1) < ``_FLOAT_EXACT_BOUND`` (every row shorter than ~30k keys at M = 256,
      64-key tiles), else a float estimate corrected by one exact integer step each way
      (equal to ``cell_of_offset``'s floor division).
    """
    if tk > MAX_TILE_KEYS:
        raise ValueError(f"cell masks take key tiles of <= {MAX_TILE_KEYS} keys, got {tk}")
    M = num_cells
    W = num_words(M)
    row = (lambda x: x[:, None]) if axis == 0 else (lambda x: x[None, :])
    valid = length > 0
    short = length < M
    L = jnp.maximum(length, 1)
    first = jnp.minimum(jnp.maximum(k0 - start, 0), L - 1)
    last = jnp.minimum(jnp.maximum(k0 + tk - 1 - start, 0), L - 1)
    lo = jnp.where(short, first, _cell(first, M, L))
    spread = _cell(last, M, L) - lo  # cells the tile spans past c_lo (long rows)
    span = jnp.max(jnp.where(valid, jnp.where(short, 2, spread), 0))
    inside = (kpos >= row(start)) & (kpos < row(start + length))
    w_lo = jax.lax.shift_right_logical(lo, 5)
    wptr = base + qrow * W + w_lo
    window = (31 + tk) // 32 + 1  # words the tile's entries can reach from c_lo's word
    d_max = jnp.where(short, 0, spread + 31)
    # (L < bound first: the product could overflow int32 for long rows; with M L < 2**30 it cannot then)
    score = jnp.where(L < _FLOAT_EXACT_BOUND, L * (d_max + 1), _FLOAT_EXACT_BOUND)
    float_ok = jnp.max(jnp.where(valid & ~short, score, 0)) < _FLOAT_EXACT_BOUND

    def lookup(d):  # bit d of the row's window (d clipped: entries outside the row are masked)
        d = jnp.minimum(jnp.maximum(d, 0), 32 * window - 1)
        word = row(words_ref[wptr + window - 1])
        for j in range(window - 2, -1, -1):
            word = jnp.where(d < 32 * (j + 1), row(words_ref[wptr + j]), word)
        return _bit(word, d)

    def two_cells(_):  # long rows: keys before the boundary are in c_lo, the others in c_lo + 1
        bound = start + jax.lax.div(2 * (lo + 1) * L + M - 1, 2 * M)  # first key of cell c_lo + 1
        w0, w1 = words_ref[wptr], words_ref[wptr + 1]
        a0 = _bit(w0, lo)
        a1 = _bit(jnp.where((lo & 31) == 31, w1, w0), lo + 1)
        return jnp.where(kpos >= row(bound), row(a1), row(a0))

    def float_cells(_):  # r = (2 off + 1) M - 2 L c_lo >= 0 inside the row, exact in float32
        off = kpos - row(start)
        inv = 1.0 / (2 * L).astype(jnp.float32)
        r = (2 * M * kpos + row(M - 2 * M * start - 2 * L * lo)).astype(jnp.float32)
        d = jnp.floor(r * row(inv) + row(0.5 * inv)).astype(jnp.int32) + row(lo - 32 * w_lo)
        return lookup(jnp.where(row(short), off - row(32 * w_lo), d))

    def any_cells(_):
        off = kpos - row(start)
        num = (2 * off + 1) * M
        den = row(2 * L)
        est = jnp.floor(num.astype(jnp.float32) * row(1.0 / (2 * L).astype(jnp.float32))).astype(jnp.int32)
        est = jnp.where(num >= (est + 1) * den, est + 1, est)
        est = jnp.where(num < est * den, est - 1, est)
        return lookup(jnp.where(row(short), off, est) - row(32 * w_lo))

    def not_two(_):
        if not FLOAT_PATH:
            return any_cells(None)
        return jax.lax.cond(float_ok, float_cells, any_cells, None)

    return inside & jax.lax.cond(span <= 1, two_cells, not_two, None)
