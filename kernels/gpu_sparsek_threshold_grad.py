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
cannot see yet. A program takes a group of queries of one list: three interleaved binary
searches find a_i, b_i and the start of the tie entry's value; with the block's entering keys
in list order, one [rows, block_q] tile counts the hidden keys in each range, locates the tie
entry (the j-th visible entry: hidden keys with fewer than j visible entries ahead, an
exclusive cumulative sum) and sums each entering key's correction (the shifts of the queries
it is hidden from inside their ranges). Everything goes into a difference array by atomic
adds (+shift at a_i, -shift at b_i, point values v at m as +v at m and -v at m + 1): a handful
of [rows] / [block_q] updates per program instead of a pass over the list. The caller's
cumulative sum turns it into dz. (A first version that wrote dz directly, one [rows, chunk]
reduction per chunk of the list, took 1.25 ms on the layer's lists at T = 32k on an H100,
against 0.52 ms for the XLA form: benchmarks/results/profile_layer_32k_1124f.json.)
Atomic adds make the float32 rounding order vary between runs, as the XLA form's scatter-adds
do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params, pltriton

__all__ = ["list_threshold_grad"]


def _kernel(z_ref, p_ref, t_ref, s_ref, end_ref, last_ref, nvis_ref, theta_ref, tau_ref, g_ref, _zeros_ref,
            diff_ref, *, k, m, search_steps):
    rows = s_ref.shape[0]
    mp = z_ref.shape[0]
    row = pl.program_id(1) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    s = s_ref[...]
    end = end_ref[...]  # exclusive end of each row's candidate range (s: none)
    nvis = nvis_ref[...]
    theta = theta_ref[...]
    tau = tau_ref[...]  # tau - theta
    g = g_ref[...]
    active = nvis > k
    inactive = (nvis > 0) & (nvis <= k)
    zat = lambda m: z_ref[jnp.clip(m, 0, mp - 1)]  # noqa: E731
    target = jnp.where(inactive, zat(last_ref[...]), theta)

    # a: first entry with x < 1, b: first with x <= 0 (x = (z - theta) - tau, non-increasing
    # along a row's range), m0: first with z <= target
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

    # the entering keys (list order) hidden from each row inside its candidate range
    p = p_ref[...][None, :]
    hid = (t_ref[...][None, :] > row[:, None]) & (p >= s[:, None]) & (p < end[:, None])  # [rows, block_q]
    hid_i = hid.astype(jnp.int32)
    in_free = hid & (p >= a[:, None]) & (p < b[:, None])
    n_free = (b - a) - jnp.sum(in_free.astype(jnp.int32), axis=1)
    shift = jnp.where(n_free > 0, g / jnp.where(n_free > 0, n_free, 1).astype(jnp.float32), 0.0)
    need = inactive | (active & (n_free == 0))
    # the tie entry: the first visible entry at or after m0, i.e. the j-th visible one
    j = (m0 - s) - jnp.sum(jnp.where(p < m0[:, None], hid_i, 0), axis=1) + 1
    vb = (p - s[:, None]) - (lax.cumsum(hid_i, axis=1) - hid_i)  # visible entries ahead of each hidden key
    first = s + j - 1 + jnp.sum(jnp.where(vb < j[:, None], hid_i, 0), axis=1)
    corr = jnp.sum(jnp.where(in_free, shift[:, None], 0.0), axis=0)  # [block_q]: per entering key

    dummy = mp - 1  # an entry past the list that nobody reads: lanes with nothing to add
    _add_unique(diff_ref, a, shift, dummy)
    _add_unique(diff_ref, b, -shift, dummy)
    g_first = jnp.where(need, g, 0.0)
    first = jnp.where(need, first, dummy)
    _add_unique(diff_ref, first, g_first, dummy)
    _add_unique(diff_ref, jnp.where(need, first + 1, dummy), -g_first, dummy)
    pv = jnp.where(p[0] < m, p[0], dummy)  # the entering keys' list indices are distinct
    pltriton.atomic_add(diff_ref, (pv,), -corr)
    pltriton.atomic_add(diff_ref, (jnp.where(p[0] < m, pv + 1, dummy),), corr)


def _add_unique(ref, idx, val, dummy):
    """ref[idx] += val for a [n] vector whose indices may repeat: the values of one index are
    summed first and added by its first lane, the other lanes add 0 at ``dummy``. (Pallas
    interpret mode runs a vector atomic add as a gather and a scatter, which keeps one of
    repeated indices' updates; masked atomics it does not run at all.)"""
    n = idx.shape[0]
    same = idx[:, None] == idx[None, :]
    earlier = lax.broadcasted_iota(jnp.int32, (n, n), 1) < lax.broadcasted_iota(jnp.int32, (n, n), 0)
    repeat = jnp.sum(jnp.where(same & earlier, 1, 0), axis=1) > 0
    total = jnp.sum(jnp.where(same, val[None, :], 0.0), axis=1)
    pltriton.atomic_add(ref, (jnp.where(repeat, dummy, idx),), jnp.where(repeat, 0.0, total))


def _check(z, keys_args, rows_args, k):
    if z.ndim != 2 or z.dtype != jnp.float32:
        raise ValueError(f"z must be float32 [rows, M], got {z.dtype} {z.shape}")
    n = z.shape[0]
    ne = keys_args[0][1].shape[-1]
    for name, a in keys_args:
        if a.shape != (n, ne) or a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 {(n, ne)}, got {a.dtype} {a.shape}")
    bq = rows_args[0][1].shape[-1]
    for name, a, dt in rows_args:
        if a.shape != (n, bq) or a.dtype != dt:
            raise ValueError(f"{name} must be {jnp.dtype(dt).name} {(n, bq)}, got {a.dtype} {a.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def list_threshold_grad(z, enter_pos, enter_query, s, end, last, nvis, theta, tau, g, *, k: int,
                        rows_per_program: int = 32, num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """dz float32 [rows, M]: the cotangent of the list scores from the thresholds' cotangent.

    Args:
      z: float32 [rows, M] list scores, non-increasing on every row's candidate range.
      enter_pos: int32 [rows, n] the list indices of the block's entering keys, ascending
        (n <= block_q; M or more where no key enters); enter_query: int32 [rows, n] the query
        index (within the block) of each: the key is hidden from the queries before it.
      s, end: int32 [rows, block_q] each query's candidate range [s, end) (end = s: none).
      last: int32 [rows, block_q] its last candidate (rows that keep every candidate: tau's
        cotangent goes to the first visible entry equal to z[last]).
      nvis: int32 [rows, block_q] visible entries of the query's run (0: it selects nothing;
        at most k: it keeps them all; more: active, tau from the projection).
      theta: float32 [rows, block_q] the k-th visible score of active queries (the shift).
      tau: float32 [rows, block_q] tau - theta of active queries (list_threshold's output).
      g: float32 [rows, block_q] the cotangent of tau.
      k: the budget. rows_per_program: queries per program (a power of two >= 16).
      interpret: Pallas interpret mode (CPU tests).
    """
    keys_args = [("enter_pos", enter_pos), ("enter_query", enter_query)]
    rows_args = [("s", s, jnp.int32), ("end", end, jnp.int32), ("last", last, jnp.int32),
                 ("nvis", nvis, jnp.int32), ("theta", theta, jnp.float32), ("tau", tau, jnp.float32),
                 ("g", g, jnp.float32)]
    _check(z, keys_args, rows_args, k)
    rp = rows_per_program
    if isinstance(rp, bool) or not isinstance(rp, int) or rp < 16 or rp & (rp - 1):
        raise ValueError(f"rows_per_program must be a power of two >= 16, got {rp!r}")
    n, m = z.shape
    bq0 = s.shape[-1]
    bq = -(-bq0 // rp) * rp
    row_args = [a for _, a, _ in rows_args]
    if bq != bq0:  # padding rows: nvis 0, no contribution
        row_args = [jnp.pad(a, ((0, 0), (0, bq - bq0))) for a in row_args]
    ne = enter_pos.shape[-1]
    nep = max(16, 1 << (ne - 1).bit_length())  # Triton blocks are powers of two
    if nep != ne:  # padding keys: enter at no query (never hidden)
        enter_pos = jnp.pad(enter_pos, ((0, 0), (0, nep - ne)), constant_values=2**30)
        enter_query = jnp.pad(enter_query, ((0, 0), (0, nep - ne)), constant_values=-1)
    # the difference array: M + 1 entries (a point value at the last entry ends past it) and
    # a spare entry for lanes with nothing to add, padded to a power of two (a Triton block)
    width = 1 << (m + 1).bit_length()
    zp = jnp.pad(z, ((0, 0), (0, width - m)))
    list_spec = pl.BlockSpec((None, width), lambda r, h: (r, 0))
    key_spec = pl.BlockSpec((None, nep), lambda r, h: (r, 0))
    row_spec = pl.BlockSpec((None, rp), lambda r, h: (r, h))
    diff = pl.pallas_call(
        functools.partial(_kernel, k=k, m=m, search_steps=(m + 1).bit_length() + 1),
        grid=(n, bq // rp),
        in_specs=[list_spec, key_spec, key_spec] + [row_spec] * 7 + [list_spec],
        out_specs=list_spec,
        out_shape=jax.ShapeDtypeStruct((n, width), jnp.float32),
        input_output_aliases={10: 0},
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_threshold_grad",
    )(zp, enter_pos, enter_query, *row_args, jnp.zeros((n, width), jnp.float32))
    return jnp.cumsum(diff[:, :m], axis=1)
