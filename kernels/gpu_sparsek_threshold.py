"""The SparseK threshold of every query of a block, solved on chip (Pallas, Triton lowering).

The causal SparseK selection (:mod:`sea_jax.ops.sparsek_select_fast`) gives every query block a
list of M = C + block_q candidate keys sorted by score; query i of the block sees one
contiguous range of it, ``s_i <= m <= last_i``, minus the keys that enter the prefix after
it (``tin[m] > i``). Its threshold tau_i solves

    sum over its visible entries m of clip(z_m - theta_i - t, 0, 1) = k,   t = tau_i - theta_i,

with theta_i its k-th visible score (so t lies in [-1, 0)). The XLA solver
(:func:`sea_jax.ops.sparsek.solve_shifted_threshold`) runs a safeguarded Newton / bisection
iteration in which every step is a full pass of XLA reductions over [block_q, M] generated
rows, 10-25 passes, each reading the rows from HBM: ~130 ms at T = 32k, K = 16, k = 1024 on
an H100. Here one program owns one list: the iteration and its passes run over the list in
on-chip chunks of ``chunk`` entries, and only the [block_q] thresholds are written.

Same iteration as the XLA solver (statistics f, |S|, sum_S d, U and the next breakpoint at the
probe; closed form of the segment; Newton point if inside the bracket, else the midpoint), so
the result is the same exact root; only the summation order (hence rounding) differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["list_threshold", "list_threshold_reference"]


def _kernel(z_ref, tin_ref, s_ref, last_ref, act_ref, theta_ref, tau_ref, *, k, chunk, max_passes):
    bq = s_ref.shape[0]
    s = s_ref[...]
    end = last_ref[...] + 1  # exclusive end of each row's candidate range
    act = act_ref[...] != 0
    theta = theta_ref[...]
    row = lax.broadcasted_iota(jnp.int32, (bq,), 0)
    big = jnp.int32(2**30)
    # only the chunks some active row can see
    c0 = jnp.min(jnp.where(act, s, big)) // chunk
    c1 = (jnp.max(jnp.where(act, end, 0)) + chunk - 1) // chunk
    kf = jnp.float32(k)
    inf = jnp.float32(jnp.inf)

    def stats(t):
        def body(c, acc):
            f, ns, sd, u, nb = acc
            m0 = pl.multiple_of(c * chunk, chunk)
            z = z_ref[pl.ds(m0, chunk)]
            tin = tin_ref[pl.ds(m0, chunk)]
            m = m0 + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
            valid = (act[:, None] & (m >= s[:, None]) & (m < end[:, None]) & (tin[None, :] <= row[:, None]))
            d = z[None, :] - theta[:, None]
            x = d - t[:, None]
            free = valid & (x > 0) & (x <= 1)
            up = valid & (x > 1)
            f = f + jnp.sum(jnp.where(valid, jnp.clip(x, 0.0, 1.0), 0.0), axis=1)
            ns = ns + jnp.sum(free.astype(jnp.int32), axis=1)
            sd = sd + jnp.sum(jnp.where(free, d, 0.0), axis=1)
            u = u + jnp.sum(up.astype(jnp.int32), axis=1)
            nb = jnp.minimum(nb, jnp.min(jnp.where(valid & (x > 0), d, inf), axis=1))
            nb = jnp.minimum(nb, jnp.min(jnp.where(up, d - 1.0, inf), axis=1))
            return f, ns, sd, u, nb

        zf = jnp.zeros((bq,), jnp.float32)
        zi = jnp.zeros((bq,), jnp.int32)
        return lax.fori_loop(c0, c1, body, (zf, zi, zf, zi, jnp.full((bq,), inf)))

    def cond(st):
        it, lo, hi, ns, sd, u, nb, done, tau = st
        return (it < max_passes) & (jnp.sum(jnp.where(done, 0, 1)) > 0)

    def body(st):
        it, lo, hi, ns, sd, u, nb, done, tau = st
        den = jnp.where(ns > 0, ns, 1).astype(jnp.float32)
        tc = jnp.where(ns > 0, (sd + u.astype(jnp.float32) - kf) / den, lo)
        # the root lies on [lo, nb]: the closed form of that segment is exact
        ok = jnp.where(ns > 0, tc <= nb, u == k)
        newly = ok & ~done
        tau = jnp.where(newly, jnp.clip(tc, lo, hi), tau)
        done = done | ok
        newton = (ns > 0) & (tc > lo) & (tc < hi)
        split = jnp.where(newton, tc, 0.5 * (lo + hi))
        f2, ns2, sd2, u2, nb2 = stats(split)
        move = (f2 >= kf) & ~done
        lo = jnp.where(move, split, lo)
        hi = jnp.where(~move & ~done, split, hi)
        return (it + 1, lo, hi, jnp.where(move, ns2, ns), jnp.where(move, sd2, sd),
                jnp.where(move, u2, u), jnp.where(move, nb2, nb), done, tau)

    lo = jnp.full((bq,), -1.0, jnp.float32)
    _, ns, sd, u, nb = stats(lo)
    st = (jnp.int32(0), lo, jnp.zeros((bq,), jnp.float32), ns, sd, u, nb, ~act,
          jnp.zeros((bq,), jnp.float32))
    _, lo, hi, ns, sd, u, nb, done, tau = lax.while_loop(cond, body, st)
    # rows cut off by max_passes: the best closed form inside the bracket
    den = jnp.where(ns > 0, ns, 1).astype(jnp.float32)
    tc = jnp.where(ns > 0, (sd + u.astype(jnp.float32) - kf) / den, lo)
    tau = jnp.where(done, tau, jnp.clip(tc, lo, hi))
    tau_ref[...] = jnp.where(act, tau, 0.0)


def _check(z, tin, s, last, active, theta, k):
    if z.ndim != 2 or z.dtype != jnp.float32:
        raise ValueError(f"z must be float32 [rows, M], got {z.dtype} {z.shape}")
    n, m = z.shape
    if tin.shape != (n, m) or tin.dtype != jnp.int32:
        raise ValueError(f"tin must be int32 {(n, m)}, got {tin.dtype} {tin.shape}")
    bq = s.shape[-1]
    for name, a, dt in (("s", s, jnp.int32), ("last", last, jnp.int32), ("theta", theta, jnp.float32)):
        if a.shape != (n, bq) or a.dtype != dt:
            raise ValueError(f"{name} must be {jnp.dtype(dt).name} {(n, bq)}, got {a.dtype} {a.shape}")
    if active.shape != (n, bq) or active.dtype != jnp.bool_:
        raise ValueError(f"active must be bool {(n, bq)}, got {active.dtype} {active.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def list_threshold(z, tin, s, last, active, theta, *, k: int, chunk: int = 128, num_warps: int = 4,
                   max_passes: int = 64, interpret: bool = False) -> jax.Array:
    """tau - theta of every query of every list: float32 [rows, block_q].

    Args:
      z: float32 [rows, M] list scores (any value where no row can see them).
      tin: int32 [rows, M] the query index at which each entry becomes visible (-1: always).
      s, last: int32 [rows, block_q] each query's candidate range [s, last] of the list (any
        block_q; the kernel pads it to a power of two >= 16).
      active: bool [rows, block_q] rows to solve: more than k visible entries, so the root
        lies in [-1, 0); inactive rows return 0.
      theta: float32 [rows, block_q] each query's k-th visible score (the shift).
      k: the budget. chunk: list entries per on-chip step (a power of two).
      interpret: run in Pallas interpret mode (CPU tests).
    """
    _check(z, tin, s, last, active, theta, k)
    if chunk & (chunk - 1) or chunk < 16:
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    n, m = z.shape
    bq0 = s.shape[-1]
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with inactive rows
    if bq != bq0:
        pad = lambda a: jnp.pad(a, ((0, 0), (0, bq - bq0)))  # noqa: E731
        s, last, active, theta = pad(s), pad(last), pad(active), pad(theta)
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M are beyond every row's range
        z = jnp.pad(z, ((0, 0), (0, mp - m)))
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    row_spec = pl.BlockSpec((None, bq), lambda r: (r, 0))
    list_spec = pl.BlockSpec((None, mp), lambda r: (r, 0))
    return pl.pallas_call(
        functools.partial(_kernel, k=k, chunk=chunk, max_passes=max_passes),
        grid=(n,),
        in_specs=[list_spec, list_spec, row_spec, row_spec, row_spec, row_spec],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((n, bq), jnp.float32),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_threshold",
    )(z, tin, s, last, active.astype(jnp.int32), theta)[:, :bq0]


def list_threshold_reference(z, tin, s, last, active, theta, *, k: int) -> jax.Array:
    """The same thresholds by the XLA solver on materialised rows (for tests)."""
    from sea_jax.ops.sparsek import solve_shifted_threshold

    _check(z, tin, s, last, active, theta, k)
    m = jnp.arange(z.shape[-1], dtype=jnp.int32)
    row = jnp.arange(s.shape[-1], dtype=jnp.int32)[:, None]
    valid = ((m >= s[..., None]) & (m <= last[..., None]) & (tin[:, None, :] <= row) & active[..., None])
    d = jnp.where(valid, z[:, None, :] - theta[..., None], 0)
    return solve_shifted_threshold(lambda: (d, valid), k, s.shape, jnp.float32, active=active)
