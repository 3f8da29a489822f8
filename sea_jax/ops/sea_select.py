"""SEA's selection: per-row budgets, top-k on the compressed estimate, expansion to keys,
and the block layout (per query block, the key blocks touched).

Geometry. Every query row ``t`` attends inside its *prefix*: the keys
``[row_start[t], row_start[t] + row_length[t])``. In the causal variant the prefix is the
row's own segment up to and including ``t`` (``row_length = t - row_start + 1``); in the
bidirectional variant it is the whole segment. Padding rows have ``row_length = 0``.

Compressed column ``c`` of row ``t`` (one of ``t_m``) means "relative position c / t_m of
that row's prefix", not a fixed block of keys. With ``L = row_length[t]`` the key at offset
``o`` (``0 <= o < L``) belongs to cell ``floor((2 o + 1) t_m / (2 L))`` (nearest neighbour:
the official code's ``resize_m_to_t`` gather), so cell ``c`` covers the offsets
``[s_c, s_{c+1})`` with ``s_c = floor((2 c L + t_m - 1) / (2 t_m))``. The cells partition the
prefix; when ``L < t_m`` some cells are empty. Everything is integer arithmetic (int32:
``2 * t_m * L`` must stay below 2**31, i.e. L < 4M tokens for t_m = 256).

Budgets (``mode="shared"``, the paper's ``causal_batch``): row ``t`` keeps the
``round(H k t_m / L)`` best cells of all its heads' ``H * t_m`` cells together (heads compete
for one budget; on average ``k`` keys per head), clamped to ``[1, H t_m]``; rows with
``L <= k`` keep every cell, i.e. are dense. ``mode="per_head"``: each head keeps its own
``round(k t_m / L)`` cells, clamped to ``[1, t_m]``. Halves round up. ``k`` is just an
argument, so it can change at inference without retraining ("dynamic k").

Ties in the estimate are broken towards the lower flat index (head-major, then cell), the
rule of both ``lax.top_k`` and a stable descending sort, so every path selects the same set.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SELECT_MODES = ("shared", "per_head")

# 2 * t_m * L must fit in int32
_MAX_PRODUCT = 2**30


def check_lengths(max_length: int, t_m: int) -> None:
    """Raise ValueError when the integer span arithmetic would overflow int32."""
    if t_m * max_length >= _MAX_PRODUCT:
        raise ValueError(
            f"t_m * sequence length must be < 2**30 for exact int32 span arithmetic, got "
            f"t_m={t_m}, length={max_length}"
        )


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------

def row_geometry(segment_ids: jax.Array | None, batch: int, length: int, *, causal: bool):
    """Prefix of every query row of a full pass.

    segment_ids: optional [B, T] int, contiguous runs, 0 = padding.
    Returns (row_start [B, T] int32, row_length [B, T] int32, offset [B, T] int32) where
    ``offset`` is the token's index inside its segment (its in-segment position).
    """
    t = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        start = jnp.zeros((batch, length), jnp.int32)
        offset = jnp.broadcast_to(t, (batch, length))
        if causal:
            row_len = offset + 1
        else:
            row_len = jnp.full((batch, length), length, jnp.int32)
        return start, row_len, offset
    seg = segment_ids.astype(jnp.int32)
    new_run = jnp.concatenate([jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new_run, t, 0), axis=1)
    offset = t - start
    valid = seg != 0
    if causal:
        row_len = offset + 1
    else:
        ends_run = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones((batch, 1), bool)], axis=1)
        end = jax.lax.cummin(jnp.where(ends_run, t, length), axis=1, reverse=True)
        row_len = end - start + 1
    return start, jnp.where(valid, row_len, 0), offset


def span_starts(row_length: jax.Array, t_m: int) -> jax.Array:
    """row_length [...] int -> [..., t_m + 1] int32: cell c covers offsets [s_c, s_{c+1})."""
    L = row_length.astype(jnp.int32)[..., None]
    c = jnp.arange(t_m + 1, dtype=jnp.int32)
    return (2 * c * L + (t_m - 1)) // (2 * t_m)


def cell_of_offset(offset: jax.Array, row_length: jax.Array, t_m: int) -> jax.Array:
    """Cell index of key offset ``offset`` (0 <= offset < row_length); broadcasting ints.

    Out-of-range offsets give a value clipped to [0, t_m - 1]; callers mask them."""
    L = jnp.maximum(row_length.astype(jnp.int32), 1)
    cell = ((2 * offset.astype(jnp.int32) + 1) * t_m) // (2 * L)
    return jnp.clip(cell, 0, t_m - 1)


# --------------------------------------------------------------------------------------
# budgets and top-k
# --------------------------------------------------------------------------------------

def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return int(k)


def _check_mode(mode: str) -> str:
    if mode not in SELECT_MODES:
        raise ValueError(f"mode must be one of {SELECT_MODES}, got {mode!r}")
    return mode


def row_budgets(row_length, *, k: int, t_m: int, num_heads: int, mode: str = "shared"):
    """Number of cells each row keeps.

    row_length: [...] int (0 = padding). Returns [...] int32: ``round(H k t_m / L)`` clamped
    to [1, H t_m] (shared) or ``round(k t_m / L)`` clamped to [1, t_m] (per_head, a budget
    per head); 0 for padding rows. Works on numpy inputs too (static bounds).
    """
    k = _check_k(k)
    _check_mode(mode)
    xp = np if isinstance(row_length, (np.ndarray, int, np.integer)) else jnp
    L = xp.asarray(row_length).astype(np.int32)
    heads = num_heads if mode == "shared" else 1
    total = heads * k * t_m
    if total >= _MAX_PRODUCT:
        raise ValueError(f"num_heads * k * t_m must be < 2**30, got {total}")
    safe = xp.maximum(L, 1)
    budget = (2 * total + safe) // (2 * safe)  # round half up, exact in integers
    budget = xp.clip(budget, 1, heads * t_m)
    return xp.where(L > 0, budget, 0).astype(np.int32)


def _select_flat(scores, budget, cap: int | None):
    """scores [R, N] float, budget [R] int -> bool [R, N]: the ``budget`` best entries."""
    R, N = scores.shape
    rows = jnp.arange(R)[:, None]
    if cap is None or cap >= N:
        order = jnp.argsort(-scores, axis=-1, stable=True)
        keep = jnp.arange(N)[None, :] < budget[:, None]
    else:
        _, order = jax.lax.top_k(scores, cap)
        keep = jnp.arange(cap)[None, :] < budget[:, None]
    return jnp.zeros((R, N), bool).at[rows, order].set(keep)


SELECT_METHODS = ("sort", "pallas", "pallas_interpret")


def select_cells(probs, budgets, *, mode: str = "shared", cap: int | None = None, method: str = "sort"):
    """Top-k cells of the compressed estimate.

    probs: [B, T, H, t_m] estimate (any monotone transform of the logits selects the same
    cells); budgets: [B, T] int from :func:`row_budgets` (same ``mode``).
    cap: None, or a static bound on every budget (then ``lax.top_k(cap)`` replaces a full
    sort; the caller guarantees ``budgets <= cap``).
    method: "sort" (XLA: a stable sort, or top_k with ``cap``) or "pallas" /
    "pallas_interpret" (sea_jax.kernels.gpu_top_budget's radix select, GPU; ``cap`` unused):
    the same cells.
    Returns bool [B, T, H, t_m]. No gradient flows through the selection.
    """
    _check_mode(mode)
    if method not in SELECT_METHODS:
        raise ValueError(f"method must be one of {SELECT_METHODS}, got {method!r}")
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape [batch, seq, heads, t_m], got {probs.shape}")
    B, T, H, M = probs.shape
    if budgets.shape != (B, T):
        raise ValueError(f"budgets must have shape {(B, T)}, got {budgets.shape}")
    scores = jax.lax.stop_gradient(probs).astype(jnp.float32)
    if method == "sort":
        select = lambda x, b: _select_flat(x, b, cap)  # noqa: E731
    else:
        from sea_jax.kernels.gpu_top_budget import top_budget_mask

        select = lambda x, b: top_budget_mask(x, b, interpret=method == "pallas_interpret")  # noqa: E731
    if mode == "shared":
        sel = select(scores.reshape(B * T, H * M), budgets.reshape(B * T))
    else:
        b = jnp.broadcast_to(budgets[:, :, None], (B, T, H))
        sel = select(scores.reshape(B * T * H, M), b.reshape(-1))
    return sel.reshape(B, T, H, M)


# --------------------------------------------------------------------------------------
# expansion
# --------------------------------------------------------------------------------------

def expand_selection(selection, row_start, row_length, key_length: int):
    """Token-level mask of the selection (small sizes only: plots and tests).

    selection: bool [B, T, H, t_m]; row_start, row_length: [B, T] int; key_length: S.
    Returns bool [B, H, T, S]: key j is attended by (row t, head h) iff it lies in the row's
    prefix and its cell is selected.
    """
    B, T, H, M = selection.shape
    j = jnp.arange(key_length, dtype=jnp.int32)[None, None, :]
    off = j - row_start[:, :, None]
    inside = (off >= 0) & (off < row_length[:, :, None])  # [B, T, S]
    cell = cell_of_offset(off, row_length[:, :, None], M)  # [B, T, S]
    sel = jnp.take_along_axis(selection, jnp.broadcast_to(cell[:, :, None, :], (B, T, H, key_length)), axis=-1)
    return jnp.moveaxis(sel & inside[:, :, None, :], 2, 1)


def selected_key_spans(selection, row_start, row_length):
    """Absolute key spans of the selected cells.

    Returns (lo, hi) int32 [B, T, H, t_m]: cell (t, h, c) covers keys [lo, hi); empty
    (lo == hi) where the cell is not selected or its span is empty.
    """
    M = selection.shape[-1]
    s = span_starts(row_length, M) + row_start[..., None]  # [B, T, M + 1]
    lo = jnp.broadcast_to(s[:, :, None, :-1], selection.shape)
    hi = jnp.broadcast_to(s[:, :, None, 1:], selection.shape)
    hi = jnp.where(selection, hi, lo)
    return lo, hi


# --------------------------------------------------------------------------------------
# block layout
# --------------------------------------------------------------------------------------

class SEABlockLayout(NamedTuple):
    """Per (batch, head, query block) the key blocks its rows' selections touch.

    block_mask: bool [B, H, nQ, nK]; kv_index: int32 [B, H, nQ, nK], the touched key blocks
    first in increasing order, padding repeats the last valid one (0 for an empty row);
    kv_count: int32 [B, H, nQ]. Query block i covers rows [i bq, (i + 1) bq), key block j keys
    [j bk, (j + 1) bk). Block level only (O(nQ nK)), never token level.
    """

    block_mask: jax.Array
    kv_index: jax.Array
    kv_count: jax.Array


def touched_blocks(selection, row_start, row_length, *, key_length: int, block_q: int, block_k: int):
    """bool [B, H, nQ, nK]: key blocks that hold at least one key a row of the query block
    may attend under ``selection`` (a superset at block level: for each selected cell the
    hull of its spans over the block's rows is marked).

    selection: bool [B, T, H, t_m]; row_start, row_length: [B, T] int.
    """
    B, T, H, M = selection.shape
    nq = -(-T // block_q)
    nk = -(-key_length // block_k)
    lo, hi = selected_key_spans(selection, row_start, row_length)
    nonempty = hi > lo
    pad = nq * block_q - T
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        lo, hi = jnp.pad(lo, widths), jnp.pad(hi, widths)
        nonempty = jnp.pad(nonempty, widths)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.where(nonempty, lo, big).reshape(B, nq, block_q, H, M).min(axis=2)
    hi = jnp.where(nonempty, hi, 0).reshape(B, nq, block_q, H, M).max(axis=2)
    any_sel = hi > 0  # [B, nq, H, M]
    first = jnp.where(any_sel, lo // block_k, 0)
    last = jnp.where(any_sel, (hi - 1) // block_k + 1, 0)  # exclusive
    # difference array over key blocks: +1 where a hull starts, -1 after it ends
    diff = jnp.zeros((B, nq, H, nk + 1), jnp.int32)
    b_i = jnp.arange(B)[:, None, None, None]
    q_i = jnp.arange(nq)[None, :, None, None]
    h_i = jnp.arange(H)[None, None, :, None]
    one = any_sel.astype(jnp.int32)
    diff = diff.at[b_i, q_i, h_i, first].add(one).at[b_i, q_i, h_i, last].add(-one)
    touched = jnp.cumsum(diff[..., :nk], axis=-1) > 0
    return jnp.moveaxis(touched, 2, 1)


def compact_blocks(block_mask):
    """bool [..., nK] -> (kv_index [..., nK] int32 increasing then padded with the last
    valid index (0 for an empty row), kv_count [...] int32)."""
    nk = block_mask.shape[-1]
    count = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(jnp.logical_not(block_mask), axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    index = jnp.where(jnp.arange(nk) < count[..., None], order, last)
    return index, count


def block_layout(selection, row_start, row_length, *, key_length: int, block_q: int, block_k: int):
    """The :class:`SEABlockLayout` of a selection (see :func:`touched_blocks`)."""
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    mask = touched_blocks(
        selection, row_start, row_length, key_length=key_length, block_q=block_q, block_k=block_k
    )
    index, count = compact_blocks(mask)
    return SEABlockLayout(mask, index, count)
