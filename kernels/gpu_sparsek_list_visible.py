"""Each query's visible entries of a SparseK block list, counted on chip (Pallas, Triton lowering).

The causal SparseK selection (:mod:`sea_jax.ops.sparsek_select_fast`) gives every query block
one list of candidate keys sorted by rank; query i of the block sees the entries of its run's
range [s_i, e_i) except the keys that enter the prefix after it (``tin[m] > i``). Its
selection needs the number of entries it sees and the list indices of its k-th, C-th and
(C + 1)-th visible entries (the last selected key, the last candidate, the best key left out).
The XLA form counts, for each hidden entering key, the visible entries ahead of it (a
[block_q, block_q] x [block_q, block_q] product per list) and then the hidden entries ahead of
each target (a packed [block_q, block_q] reduction): ~10 kernels and two [block_q, block_q]
arrays per list in HBM. Here one program takes a group of queries of one list and walks the
list once in chunks: a running count of each query's visible entries (a cumulative sum along
the chunk) marks the entry where it reaches each target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["list_visible"]


def _kernel(tin_ref, s_ref, e_ref, nvis_ref, kpos_ref, last_ref, nxt_ref, *, k, c, chunk):
    rows = s_ref.shape[0]
    row = pl.program_id(1) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    s = s_ref[...]
    e = e_ref[...]
    zero = jnp.zeros((rows,), jnp.int32)

    def step(ci, carry):
        n, pk, pc, pn, lastvis = carry
        m0 = pl.multiple_of(ci * chunk, chunk)
        m = m0 + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        tin = tin_ref[pl.ds(m0, chunk)]
        vis = (m >= s[:, None]) & (m < e[:, None]) & (tin[None, :] <= row[:, None])
        cum = n[:, None] + lax.cumsum(vis.astype(jnp.int32), axis=1)  # visible entries up to m
        at = lambda j: jnp.sum(jnp.where(vis & (cum == j), m, 0), axis=1)  # noqa: E731  (one hit at most)
        lastvis = jnp.maximum(lastvis, jnp.max(jnp.where(vis, m, -1), axis=1))
        return n + jnp.sum(vis.astype(jnp.int32), axis=1), pk + at(k), pc + at(c), pn + at(c + 1), lastvis

    big = jnp.int32(2**30)
    c0 = jnp.min(jnp.where(e > s, s, big)) // chunk
    c1 = (jnp.max(jnp.where(e > s, e, 0)) + chunk - 1) // chunk
    n, pk, pc, pn, lastvis = lax.fori_loop(c0, c1, step, (zero, zero, zero, zero, s - 1))
    nvis_ref[...] = n
    # fewer than j visible entries: the j-th is the last one (s - 1 when there is none)
    kpos_ref[...] = jnp.where(n >= k, pk, lastvis)
    last_ref[...] = jnp.where(n >= c, pc, lastvis)
    nxt_ref[...] = jnp.where(n > c, pn, e)


def list_visible(tin, s, e, *, k: int, c: int, chunk: int = 64, rows_per_program: int = 32,
                 num_warps: int = 4, interpret: bool = False):
    """(nvis, kpos, last, nxt) int32 [rows, block_q]: each query's visible entries of a list.

    Args:
      tin: int32 [rows, M] the query index (within the block) at which each list entry
        becomes visible (-1: always).
      s, e: int32 [rows, block_q] each query's range [s, e) of the list (its run's entries).
      k, c: the budget and the carry length C (k <= C).
      chunk: list entries per step (a power of two >= 16); rows_per_program: queries per
        program (a power of two >= 16; the block is padded to a multiple of it).
      interpret: Pallas interpret mode (CPU tests).
    Returns:
      nvis: entries of [s, e) with tin <= i; kpos / last: list index of the min(nvis, k)-th /
      min(nvis, C)-th visible entry (s - 1 when nvis = 0); nxt: of the (C + 1)-th where
      nvis > C, else e.
    """
    if tin.ndim != 2 or tin.dtype != jnp.int32:
        raise ValueError(f"tin must be int32 [rows, M], got {tin.dtype} {tin.shape}")
    n, m = tin.shape
    bq0 = s.shape[-1]
    for name, a in (("s", s), ("e", e)):
        if a.shape != (n, bq0) or a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 {(n, bq0)}, got {a.dtype} {a.shape}")
    for name, v in (("k", k), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if c < k:
        raise ValueError(f"c must be >= k, got c={c}, k={k}")
    for name, v in (("chunk", chunk), ("rows_per_program", rows_per_program)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
    rp = rows_per_program
    bq = -(-bq0 // rp) * rp
    if bq != bq0:  # padding rows: empty ranges
        s = jnp.pad(s, ((0, 0), (0, bq - bq0)))
        e = jnp.pad(e, ((0, 0), (0, bq - bq0)))
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M: outside every range
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    row_spec = pl.BlockSpec((None, rp), lambda r, h: (r, h))
    out = pl.pallas_call(
        functools.partial(_kernel, k=k, c=c, chunk=chunk),
        grid=(n, bq // rp),
        in_specs=[pl.BlockSpec((None, mp), lambda r, h: (r, 0)), row_spec, row_spec],
        out_specs=[row_spec] * 4,
        out_shape=[jax.ShapeDtypeStruct((n, bq), jnp.int32)] * 4,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_visible",
    )(tin, s, e)
    return tuple(x[:, :bq0] for x in out)
