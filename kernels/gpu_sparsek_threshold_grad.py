"""The gradient of the SparseK thresholds of a block list, on chip (Pallas, Triton lowering).

The backward of :func:`sea_jax.kernels.gpu_sparsek_threshold.list_threshold`'s thresholds as
the causal SparseK selection uses them (:mod:`sea_jax.ops.sparsek_select_fast`, factored
selections: the weights are clip(z - tau, 0, 1) inside the attention kernels, so the
selection's only differentiable output is tau). For query i of a list with threshold tau_i
and cotangent g_i the SparseK VJP (:mod:`sea_jax.ops.sparsek`) sends to the list scores

* g_i / |F_i| to every entry of its free set F_i = {visible candidates with
  0 < z - tau_i < 1} (z - tau_i computed as (z - theta_i) - (tau_i - theta_i), the forward's
  rounding, so that the free sets are the forward's),
* g_i to one entry where F_i is empty: the first visible candidate equal to the k-th visible
  score (an active row saturated exactly) or to the smallest candidate (a row that keeps
  every candidate it sees, tau = min z - 1).

On the sorted list F_i is one index range [a_i, b_i) minus the entering keys that query i
cannot see yet (``tin[m] > i``), so one program per list finds a_i, b_i and the tie entry by
three interleaved binary searches, counts |F_i| in one pass over the rows' ranges, and writes
dz [M] in one pass over the list: per chunk of entries a [rows, chunk] comparison summed over
the rows. The XLA form (:func:`sea_jax.ops.sparsek_select_fast._tau_grad_ranges`) needs
~20 kernels for the same (difference arrays, a cumulative sum, three scatter-adds and
[block_q, block_q] hidden-entry counts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["list_threshold_grad"]


def _kernel(z_ref, tin_ref, s_ref, end_ref, last_ref, nvis_ref, theta_ref, tau_ref, g_ref, dz_ref, *,
            k, chunk, search_steps):
    bq = s_ref.shape[0]
    mp = z_ref.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (bq,), 0)
    s = s_ref[...]
    end = end_ref[...]  # exclusive end of each row's candidate range (s: none)
    nvis = nvis_ref[...]
    theta = theta_ref[...]
    tau = tau_ref[...]  # tau - theta
    g = g_ref[...]
    active = nvis > k
    inactive = (nvis > 0) & (nvis <= k)
    big = jnp.int32(2**30)
    zat = lambda m: z_ref[jnp.clip(m, 0, mp - 1)]  # noqa: E731
    target = jnp.where(inactive, zat(last_ref[...]), theta)

    # a: first entry with x < 1, b: first with x <= 0 (x = (z - theta) - tau, non-increasing
    # along a row's range), m0: first with z <= target; binary searches interleaved
    def narrow(lo, hi, above):
        open_ = lo < hi
        return jnp.where(open_ & above, (lo + hi) // 2 + 1, lo), jnp.where(open_ & ~above, (lo + hi) // 2, hi)

    def step(_, st):
        la, ha, lb, hb, lm, hm = st
        xa = (zat((la + ha) // 2) - theta) - tau
        xb = (zat((lb + hb) // 2) - theta) - tau
        return (*narrow(la, ha, xa >= 1.0), *narrow(lb, hb, xb > 0.0), *narrow(lm, hm, zat((lm + hm) // 2) > target))

    a, _, b, _, m0, _ = lax.fori_loop(0, search_steps, step, (s, end, s, end, s, end))
    a = jnp.where(active, a, s)
    b = jnp.where(active, b, a)

    def count(c, n):
        m = c * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        tin = tin_ref[pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
        free = (m >= a[:, None]) & (m < b[:, None]) & (tin[None, :] <= row[:, None])
        return n + jnp.sum(free.astype(jnp.int32), axis=1)

    c0 = jnp.min(jnp.where(b > a, a, big)) // chunk
    c1 = (jnp.max(jnp.where(b > a, b, 0)) + chunk - 1) // chunk
    n_free = lax.fori_loop(c0, c1, count, jnp.zeros((bq,), jnp.int32))
    shift = jnp.where(n_free > 0, g / jnp.where(n_free > 0, n_free, 1).astype(jnp.float32), 0.0)
    need = inactive | (active & (n_free == 0))

    # the tie entry: the first visible entry at or after m0 (it exists for every row in need)
    def hidden(m):
        return need & (m < end) & (tin_ref[jnp.clip(m, 0, mp - 1)] > row)

    first = lax.while_loop(lambda m: jnp.sum(jnp.where(hidden(m), 1, 0)) > 0,
                           lambda m: jnp.where(hidden(m), m + 1, m), m0)
    first = jnp.where(need, first, -1)
    g_first = jnp.where(need, g, 0.0)

    def write(c, carry):
        m0c = pl.multiple_of(c * chunk, chunk)
        m = m0c + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        tin = tin_ref[pl.ds(m0c, chunk)]
        free = (m >= a[:, None]) & (m < b[:, None]) & (tin[None, :] <= row[:, None])
        val = jnp.where(free, shift[:, None], 0.0) + jnp.where(m == first[:, None], g_first[:, None], 0.0)
        dz_ref[pl.ds(m0c, chunk)] = jnp.sum(val, axis=0)
        return carry

    lax.fori_loop(0, mp // chunk, write, jnp.int32(0))


def _check(z, tin, rows_args, k):
    if z.ndim != 2 or z.dtype != jnp.float32:
        raise ValueError(f"z must be float32 [rows, M], got {z.dtype} {z.shape}")
    n, m = z.shape
    if tin.shape != (n, m) or tin.dtype != jnp.int32:
        raise ValueError(f"tin must be int32 {(n, m)}, got {tin.dtype} {tin.shape}")
    bq = rows_args[0][1].shape[-1]
    for name, a, dt in rows_args:
        if a.shape != (n, bq) or a.dtype != dt:
            raise ValueError(f"{name} must be {jnp.dtype(dt).name} {(n, bq)}, got {a.dtype} {a.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def list_threshold_grad(z, tin, s, end, last, nvis, theta, tau, g, *, k: int, chunk: int = 32,
                        num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """dz float32 [rows, M]: the cotangent of the list scores from the thresholds' cotangent.

    Args:
      z: float32 [rows, M] list scores, non-increasing on every row's candidate range.
      tin: int32 [rows, M] the query index at which each entry becomes visible (-1: always).
      s, end: int32 [rows, block_q] each query's candidate range [s, end) (end = s: none).
      last: int32 [rows, block_q] its last candidate (rows that keep every candidate: tau's
        cotangent goes to the first visible entry equal to z[last]).
      nvis: int32 [rows, block_q] visible entries of the query's run (0: it selects nothing;
        at most k: it keeps them all; more: active, tau from the projection).
      theta: float32 [rows, block_q] the k-th visible score of active queries (the shift).
      tau: float32 [rows, block_q] tau - theta of active queries (list_threshold's output).
      g: float32 [rows, block_q] the cotangent of tau.
      k: the budget. chunk: list entries per on-chip step (a power of two >= 16).
      interpret: Pallas interpret mode (CPU tests).
    """
    rows_args = [("s", s, jnp.int32), ("end", end, jnp.int32), ("last", last, jnp.int32),
                 ("nvis", nvis, jnp.int32), ("theta", theta, jnp.float32), ("tau", tau, jnp.float32),
                 ("g", g, jnp.float32)]
    _check(z, tin, rows_args, k)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    n, m = z.shape
    bq0 = s.shape[-1]
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with empty rows
    row_args = [a for _, a, _ in rows_args]
    if bq != bq0:
        row_args = [jnp.pad(a, ((0, 0), (0, bq - bq0))) for a in row_args]  # nvis 0: no contribution
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M are beyond every row's range
        z = jnp.pad(z, ((0, 0), (0, mp - m)))
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    list_spec = pl.BlockSpec((None, mp), lambda r: (r, 0))
    row_spec = pl.BlockSpec((None, bq), lambda r: (r, 0))
    dz = pl.pallas_call(
        functools.partial(_kernel, k=k, chunk=chunk, search_steps=(mp + 1).bit_length() + 1),
        grid=(n,),
        in_specs=[list_spec, list_spec] + [row_spec] * 7,
        out_specs=list_spec,
        out_shape=jax.ShapeDtypeStruct((n, mp), jnp.float32),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_threshold_grad",
    )(z, tin, *row_args)
    return dz[:, :m]
