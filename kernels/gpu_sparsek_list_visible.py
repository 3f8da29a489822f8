"""Each query's visible entries of a SparseK block list, counted on chip (Pallas, Triton lowering).

The causal SparseK selection (:mod:`sea_jax.ops.sparsek_select_fast`) gives every query block
one list of candidate keys sorted by rank; query i of the block sees the entries of its run's
range [s_i, e_i) except the keys that enter the prefix after it (the entering key of query
t > i). Its selection needs the number of entries it sees and the list indices of its k-th,
C-th and (C + 1)-th visible entries (the last selected key, the last candidate, the best key
left out).

With the block's entering keys in list order (list index p_r, entering query t_r), the keys
hidden from query i are those with t_r > i inside its range, and the visible entries ahead of
hidden key r are (p_r - s_i) minus the hidden keys before it in that order: an exclusive
cumulative sum along the [rows, block_q] tile of "hidden" flags. The j-th visible entry is
then s_i + j - 1 plus the hidden keys with fewer than j visible entries ahead. One tile per
program, no pass over the list. The XLA form builds the same counts with a
[block_q, block_q] x [block_q, block_q] product per list (the entering keys in rank order are
not known there without it) and two [block_q, block_q] arrays in HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["list_visible"]


def _kernel(p_ref, t_ref, s_ref, e_ref, nvis_ref, kpos_ref, last_ref, nxt_ref, *, k, c):
    rows = s_ref.shape[0]
    row = pl.program_id(1) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    s = s_ref[...][:, None]
    e = e_ref[...][:, None]
    p = p_ref[...][None, :]
    hid = ((t_ref[...][None, :] > row[:, None]) & (p >= s) & (p < e)).astype(jnp.int32)  # [rows, block_q]
    vb = (p - s) - (lax.cumsum(hid, axis=1) - hid)  # visible entries ahead of each hidden key
    nvis = (e - s)[:, 0] - jnp.sum(hid, axis=1)
    nth = lambda j: s[:, 0] + j - 1 + jnp.sum(jnp.where(vb < j[:, None], hid, 0), axis=1)  # noqa: E731
    nvis_ref[...] = nvis
    kpos_ref[...] = nth(jnp.minimum(nvis, k))
    last_ref[...] = nth(jnp.minimum(nvis, c))
    nxt_ref[...] = jnp.where(nvis > c, nth(jnp.full_like(nvis, c + 1)), e[:, 0])


def list_visible(enter_pos, enter_query, s, e, *, k: int, c: int, rows_per_program: int = 32,
                 num_warps: int = 4, interpret: bool = False):
    """(nvis, kpos, last, nxt) int32 [rows, block_q]: each query's visible entries of a list.

    Args:
      enter_pos: int32 [rows, n] the list indices of the block's entering keys, ascending
        (n <= block_q; entries past the list, e.g. M, for queries where no key enters);
      enter_query: int32 [rows, n] the query index (within the block) of each: the key is
        hidden from the queries before it.
      s, e: int32 [rows, block_q] each query's range [s, e) of the list (its run's entries).
      k, c: the budget and the carry length C (k <= C).
      rows_per_program: queries per program (a power of two >= 16; the block is padded).
      interpret: Pallas interpret mode (CPU tests).
    Returns:
      nvis: the entries of [s, e) the query sees; kpos / last: list index of its
      min(nvis, k)-th / min(nvis, C)-th visible entry (s - 1 when nvis = 0); nxt: of the
      (C + 1)-th where nvis > C, else e.
    """
    for name, a in (("enter_pos", enter_pos), ("enter_query", enter_query)):
        if a.ndim != 2 or a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [rows, n], got {a.dtype} {a.shape}")
    if enter_query.shape != enter_pos.shape:
        raise ValueError(f"enter_query must have enter_pos's shape {enter_pos.shape}, got {enter_query.shape}")
    n, ne = enter_pos.shape
    bq0 = s.shape[-1]
    for name, a in (("s", s), ("e", e)):
        if a.shape != (n, bq0) or a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 {(n, bq0)}, got {a.dtype} {a.shape}")
    for name, v in (("k", k), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if c < k:
        raise ValueError(f"c must be >= k, got c={c}, k={k}")
    rp = rows_per_program
    if isinstance(rp, bool) or not isinstance(rp, int) or rp < 16 or rp & (rp - 1):
        raise ValueError(f"rows_per_program must be a power of two >= 16, got {rp!r}")
    bq = -(-bq0 // rp) * rp
    if bq != bq0:  # padding rows: empty ranges
        s = jnp.pad(s, ((0, 0), (0, bq - bq0)))
        e = jnp.pad(e, ((0, 0), (0, bq - bq0)))
    nep = max(16, 1 << (ne - 1).bit_length())  # Triton blocks are powers of two
    if nep != ne:  # padding keys: enter at no query (never hidden)
        enter_pos = jnp.pad(enter_pos, ((0, 0), (0, nep - ne)), constant_values=2**30)
        enter_query = jnp.pad(enter_query, ((0, 0), (0, nep - ne)), constant_values=-1)
    row_spec = pl.BlockSpec((None, rp), lambda r, h: (r, h))
    key_spec = pl.BlockSpec((None, nep), lambda r, h: (r, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, k=k, c=c),
        grid=(n, bq // rp),
        in_specs=[key_spec, key_spec, row_spec, row_spec],
        out_specs=[row_spec] * 4,
        out_shape=[jax.ShapeDtypeStruct((n, bq), jnp.int32)] * 4,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_visible",
    )(enter_pos, enter_query, s, e)
    return tuple(x[:, :bq0] for x in out)
