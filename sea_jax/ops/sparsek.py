"""The SparseK operator: Euclidean projection onto the capped simplex, differentiable.

For scores ``z`` (last axis, n entries) and a budget ``k``::

    SparseK(z, k) = argmin_{p : 0 <= p <= 1, sum p = k} ||p - z||^2 = clip(z - tau, 0, 1)

where the threshold ``tau`` solves ``f(tau) = sum_i clip(z_i - tau, 0, 1) = k``. ``f`` is
continuous, piecewise linear and non-increasing with breakpoints {z_i} U {z_i - 1}; on the
segment holding the root, with U = #{z_i >= tau + 1} (saturated at 1) and the free set
S = {tau < z_i < tau + 1}::

    tau = (sum_{i in S} z_i + U - k) / |S|                                   (closed form)

and ``tau`` lies in the bracket [z_(k) - 1, z_(k)) where z_(k) is the k-th largest score
(Lou et al. 2024; derivations in research/sparsek.md).

Two exact solvers, both working on the scores shifted by z_(k) (so the bracket is [-1, 0)
and the arithmetic stays well conditioned at any scale):

* ``method="sort"``: sort the scores, evaluate f at every breakpoint with prefix sums and
  binary search (O(n log n)), take the segment holding the root, finish with the closed form.
* ``method="bracket"``: safeguarded Newton / bisection inside the bracket. Each pass is one
  O(n) sweep; a row is finished as soon as the closed form of the segment at the lower end of
  its bracket lands inside that segment (typically 2-4 passes). The solver is written against
  a *callable* that produces the (shifted) rows, so that the causal selection
  (:mod:`sea_jax.ops.sparsek_select`) can run it over per-query masks computed on the fly,
  without materialising them.

Backward (closed form, ``jax.custom_vjp``): with s = 1[0 < p < 1],
``dz = s * (g_p - mean_{S} g_p) + s * g_tau / |S|``. Where S is empty tau is not unique; the
returned tau is then min(valid z) - 1 (prefix rule) or z_(k) - 1 (exact saturation) and its
cotangent goes to that one entry (the derivative of the value actually returned).

Masking: entries with ``valid=False`` or score ``-inf`` are excluded (p = 0, no gradient).
Prefix rule: a row with at most ``k`` valid entries selects all of them with weight 1 (the
capped simplex is empty or the single point 1); its tau is reported as ``min(valid z) - 1``
(the largest tau that reproduces p = 1) and 0 for a row with no valid entry.
All arithmetic is in float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "SparseKOutput",
    "METHODS",
    "sparsek",
    "sparsek_given_kth",
    "compute_dtype",
    "solve_shifted_threshold",
    "sort_shifted_threshold",
    "check_budget",
]

METHODS = ("sort", "bracket")
# Upper bound on solver passes. A pass at least halves the bracket every second step, and a
# row stops once its closed form lies in its segment or its bracket is narrower than
# bracket_tolerance (~22 halvings of [-1, 0] in float32), so 64 is not reached in practice.
_MAX_PASSES = 64


def bracket_tolerance(dtype) -> float:
    """Bracket width at which the threshold solvers stop: 4 ulps of 1 in ``dtype``.

    The root lies in [lo, hi] and the answer is the segment's closed form clipped into it, so
    stopping there costs at most this much accuracy. Without it a root within rounding of a
    breakpoint (the closed form lands a few ulps past its own segment's end) was never
    accepted: the bracket collapsed onto adjacent floats and the row ran all max_passes
    passes (1-2 of the 8192 block lists of the SparseK layer at T = 32k for two of three inputs;
    they tripled the GPU solver's time).
    """
    return 4.0 * float(jnp.finfo(dtype).eps)


class SparseKOutput(NamedTuple):
    """p: [..., n] weights in [0, 1] summing to k per row (to the valid count for prefix-rule rows);
    tau: [...] thresholds. Both in float32 (float64 for float64 inputs)."""

    p: jax.Array
    tau: jax.Array


def compute_dtype(dtype) -> jnp.dtype:
    """float32, or float64 when the input is float64 (used inside every SparseK computation)."""
    return jnp.promote_types(dtype, jnp.float32)


def check_budget(name: str, value, *, minimum: int = 1) -> int:
    """Validate an integer hyper-parameter; raise ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# the bracket solver (linear time per pass), generic over how rows are produced
# --------------------------------------------------------------------------------------

def _stats_at(rows: Callable, t: jax.Array, dtype):
    """Statistics of f on the segment just right of ``t`` (t: [rows...]).

    Returns f(t), |S|, sum_S d, U and the next breakpoint strictly above t, where for the
    segment (t, next) the free set is S = {t < d <= t + 1} and U = #{d > t + 1}.
    """
    d, valid = rows()
    x = d - t[..., None]
    free = valid & (x > 0) & (x <= 1)
    up = valid & (x > 1)
    f = jnp.sum(jnp.where(valid, jnp.clip(x, 0, 1), 0), axis=-1)
    s = jnp.sum(free, axis=-1, dtype=jnp.int32)
    sd = jnp.sum(jnp.where(free, d, 0), axis=-1)
    u = jnp.sum(up, axis=-1, dtype=jnp.int32)
    inf = jnp.asarray(jnp.inf, dtype)
    nb = jnp.minimum(
        jnp.min(jnp.where(valid & (x > 0), d, inf), axis=-1),
        jnp.min(jnp.where(valid & (x > 1), d - 1, inf), axis=-1),
    )
    return f, s, sd, u, nb


def _closed_form(k, lo, s, sd, u):
    """tau of the segment starting at ``lo`` (``lo`` itself when the segment is flat)."""
    sf = s.astype(lo.dtype)
    return jnp.where(s > 0, (sd + u.astype(lo.dtype) - k) / jnp.where(s > 0, sf, 1), lo)


def solve_shifted_threshold(
    rows: Callable[[], tuple[jax.Array, jax.Array]],
    k: int,
    row_shape: tuple[int, ...],
    dtype,
    *,
    active: jax.Array | None = None,
    max_passes: int = _MAX_PASSES,
) -> jax.Array:
    """Exact threshold of rows shifted so that their k-th largest valid entry is 0.

    Args:
      rows: zero-argument callable returning ``(d, valid)``, broadcastable to
        ``row_shape + (n,)``: the shifted scores (z - z_(k)) and the validity mask. It is
        called inside the solver loop, so masks built from small arrays are fused into each
        pass instead of being stored.
      k: the budget (static int >= 1).
      row_shape: shape of the row axes.
      dtype: the float dtype of ``d``.
      active: optional bool ``row_shape``: rows to solve. Every active row must have more
        than ``k`` valid entries (then the root lies in [-1, 0)); inactive rows return 0.
    Returns:
      tau - z_(k): [row_shape], in [-1, 0) for active rows.
    """
    active = jnp.ones(row_shape, bool) if active is None else jnp.broadcast_to(active, row_shape)
    kf = jnp.asarray(k, dtype)
    lo = jnp.full(row_shape, -1.0, dtype)
    hi = jnp.zeros(row_shape, dtype)
    _, s, sd, u, nb = _stats_at(rows, lo, dtype)

    tol = bracket_tolerance(dtype)

    def finished(lo, s, sd, u, nb):
        tc = _closed_form(kf, lo, s, sd, u)
        # the root lies on [lo, nb]: the closed form of that segment is exact
        ok = jnp.where(s > 0, tc <= nb, u == k)
        return tc, ok

    def cond(state):
        it, lo, hi, s, sd, u, nb, done, tau = state
        return (it < max_passes) & jnp.any(~done)

    def body(state):
        it, lo, hi, s, sd, u, nb, done, tau = state
        tc, ok = finished(lo, s, sd, u, nb)
        ok = ok | (hi - lo <= tol)  # the bracket holds the root to rounding
        newly = ok & ~done
        tau = jnp.where(newly, jnp.clip(tc, lo, hi), tau)
        done = done | ok
        # next probe: the Newton point of the current segment when it falls inside the
        # bracket (it overshoots only if later segments are steeper), else the midpoint
        newton = (s > 0) & (tc > lo) & (tc < hi)
        split = jnp.where(newton, tc, 0.5 * (lo + hi))
        f2, s2, sd2, u2, nb2 = _stats_at(rows, split, dtype)
        move_lo = (f2 >= kf) & ~done
        lo = jnp.where(move_lo, split, lo)
        hi = jnp.where(~move_lo & ~done, split, hi)
        pick = lambda a, b: jnp.where(move_lo, a, b)
        return it + 1, lo, hi, pick(s2, s), pick(sd2, sd), pick(u2, u), pick(nb2, nb), done, tau

    state = (jnp.int32(0), lo, hi, s, sd, u, nb, ~active, jnp.zeros(row_shape, dtype))
    it, lo, hi, s, sd, u, nb, done, tau = lax.while_loop(cond, body, state)
    # rows cut off by max_passes (never seen in tests): best closed form inside the bracket
    tc, _ = finished(lo, s, sd, u, nb)
    tau = jnp.where(done, tau, jnp.clip(tc, lo, hi))
    return jnp.where(active, tau, 0)


def sort_shifted_threshold(d: jax.Array, valid: jax.Array, k: int, *, active: jax.Array | None = None):
    """Exact threshold by sorting (Algorithm-1 style), same contract as solve_shifted_threshold.

    d, valid: [..., n] materialised shifted scores and mask.
    """
    dtype = d.dtype
    n = d.shape[-1]
    row_shape = d.shape[:-1]
    active = jnp.ones(row_shape, bool) if active is None else active
    # ascending valid values, invalid first as -inf
    asc = jnp.sort(jnp.where(valid, d, -jnp.inf), axis=-1)
    # prefix sums over the descending order; values are clipped to [-2, 2] (entries outside
    # never enter a free-set sum, since breakpoints of interest lie in [-1, 0]) so the sums
    # stay small and the differences exact to ~n ulps at any input scale
    desc = jnp.flip(jnp.clip(asc, -2, 2), axis=-1)
    cs = jnp.concatenate([jnp.zeros(row_shape + (1,), dtype), jnp.cumsum(desc, axis=-1)], axis=-1)
    bps = jnp.concatenate([asc, asc - 1], axis=-1)  # candidate breakpoints [.., 2n]
    in_bracket = jnp.isfinite(bps) & (bps >= -1) & (bps <= 0)
    bps = jnp.where(in_bracket, bps, -1.0)  # -1 is always a breakpoint candidate (f >= k)

    def count_ge(a, x):  # #{a >= x}, a ascending
        return n - jnp.searchsorted(a, x, side="left")

    def count_gt(a, x):
        return n - jnp.searchsorted(a, x, side="right")

    flat_asc = asc.reshape(-1, n)
    flat_b = bps.reshape(-1, 2 * n)
    uu = jax.vmap(count_ge)(flat_asc, flat_b + 1).reshape(bps.shape)
    ww = jax.vmap(count_gt)(flat_asc, flat_b).reshape(bps.shape)
    band = jnp.take_along_axis(cs, ww, -1) - jnp.take_along_axis(cs, uu, -1)
    f = uu.astype(dtype) + band - (ww - uu).astype(dtype) * bps
    lo = jnp.max(jnp.where(f >= k, bps, -1.0), axis=-1)
    # finish with the closed form of the segment right of lo (direct sums: exact to rounding)
    _, s, sd, u, _ = _stats_at(lambda: (d, valid), lo, dtype)
    tau = _closed_form(jnp.asarray(k, dtype), lo, s, sd, u)
    return jnp.where(active, jnp.clip(tau, -1.0, 0.0), 0)


# --------------------------------------------------------------------------------------
# the public operator
# --------------------------------------------------------------------------------------

def _kth_largest(z, valid, k):
    """k-th largest valid entry of each row (-inf when fewer than k are valid)."""
    return lax.top_k(jnp.where(valid, z, -jnp.inf), k)[0][..., k - 1]


def _forward(z, valid, k, method, theta=None):
    dtype = z.dtype
    n_valid = jnp.sum(valid, axis=-1)
    active = n_valid > k
    if theta is None:
        theta = _kth_largest(z, valid, k)
    theta = jnp.where(active, theta, 0).astype(dtype)
    d = jnp.where(valid, z - theta[..., None], 0)
    if method == "sort":
        tau_s = sort_shifted_threshold(d, valid & active[..., None], k, active=active)
    else:
        tau_s = solve_shifted_threshold(
            lambda: (d, valid & active[..., None]), k, d.shape[:-1], dtype, active=active
        )
    x = d - tau_s[..., None]
    p = jnp.where(valid, jnp.where(active[..., None], jnp.clip(x, 0, 1), 1), 0).astype(dtype)
    zmin = jnp.min(jnp.where(valid, z, jnp.inf), axis=-1)
    tau = jnp.where(active, theta + tau_s, jnp.where(n_valid > 0, zmin - 1, 0)).astype(dtype)
    free = valid & active[..., None] & (x > 0) & (x < 1)
    # tau is not unique where the free set is empty; the solvers then return the end of the
    # flat piece that moves with one entry, and the VJP sends tau's cotangent to that entry:
    # * prefix-rule rows: tau = min(valid z) - 1 moves with the minimum entry;
    # * exactly saturated rows (k entries at 1, the rest at 0): tau = z_(k) - 1.
    lane = jnp.arange(z.shape[-1])
    argmin = jnp.argmin(jnp.where(valid, z, jnp.inf), axis=-1)
    at_min = (lane == argmin[..., None]) & (~active & (n_valid > 0))[..., None]
    saturated = active & ~jnp.any(free, axis=-1)
    arg_kth = jnp.argmax(valid & (z == theta[..., None]), axis=-1)
    at_kth = (lane == arg_kth[..., None]) & saturated[..., None]
    return SparseKOutput(p, tau), (free, at_min | at_kth)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sparsek(z, valid, k, method):
    return _forward(z, valid, k, method)[0]


def _sparsek_fwd(z, valid, k, method):
    out, res = _forward(z, valid, k, method)
    return out, res


def _sparsek_bwd(k, method, res, g):
    free, at_min = res
    g_p, g_tau = g
    dtype = g_p.dtype
    n_free = jnp.sum(free, axis=-1, keepdims=True).astype(dtype)
    denom = jnp.where(n_free > 0, n_free, 1)
    mean_g = jnp.sum(jnp.where(free, g_p, 0), axis=-1, keepdims=True) / denom
    dz = jnp.where(free, g_p - mean_g + g_tau[..., None] / denom, 0)
    dz = dz + jnp.where(at_min, g_tau[..., None], 0)
    return dz, None


_sparsek.defvjp(_sparsek_fwd, _sparsek_bwd)
# compiled once per shape for eager callers (inside an outer jit this is simply inlined)
_sparsek_jit = jax.jit(_sparsek, static_argnums=(2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sparsek_kth(z, valid, theta, k, method):
    return _forward(z, valid, k, method, theta)[0]


def _sparsek_kth_fwd(z, valid, theta, k, method):
    return _forward(z, valid, k, method, theta)


def _sparsek_kth_bwd(k, method, res, g):
    dz, _ = _sparsek_bwd(k, method, res, g)
    # p and tau - theta do not depend on theta (the shift is exact), so theta gets no gradient
    return dz, None, jnp.zeros(res[0].shape[:-1], dz.dtype)


_sparsek_kth.defvjp(_sparsek_kth_fwd, _sparsek_kth_bwd)


def sparsek_given_kth(z: jax.Array, valid: jax.Array, kth: jax.Array, k: int, *, method: str = "bracket") -> SparseKOutput:
    """SparseK for callers that already know each row's k-th largest valid score.

    The causal selection (:mod:`sea_jax.ops.sparsek_select`) sorts its candidates anyway, so it
    passes the k-th value instead of paying a second top-k per query. No validation beyond
    what the caller guarantees:

    Args:
      z: [..., n] float32/float64 scores, finite where ``valid``.
      valid: bool [..., n] mask of the entries that take part.
      kth: [...] the k-th largest valid entry of each row (ignored for rows with <= k valid
        entries, which select everything with weight 1).
      k: static int >= 1.
    Returns:
      SparseKOutput as :func:`sparsek`; differentiable in z (kth gets zero gradient).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    z = jnp.where(valid, z, 0)
    return _sparsek_kth(z, valid, kth.astype(z.dtype), k, method)


def sparsek(z: jax.Array, k: int, *, valid: jax.Array | None = None, method: str = "bracket") -> SparseKOutput:
    """SparseK: p = clip(z - tau, 0, 1) with sum(p) = k over each row's valid entries.

    Args:
      z: [..., n] floating-point scores (any leading batch axes). ``-inf`` entries count as
        invalid.
      k: budget, a Python int with 1 <= k <= n.
      valid: optional bool mask broadcastable to z's shape; invalid entries get p = 0 and
        no gradient. A row with at most k valid entries selects all of them (p = 1).
      method: "bracket" (linear time per pass, default) or "sort" (O(n log n)); both exact.
    Returns:
      SparseKOutput(p [..., n], tau [...]) in float32 (float64 for float64 z). Differentiable
      in z (closed-form VJP for both p and tau).
    """
    if not hasattr(z, "dtype") or not hasattr(z, "ndim"):
        raise ValueError(f"z must be a jax or numpy array, got {type(z).__name__}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"z must be floating point, got dtype {z.dtype}")
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"z must have a non-empty last axis, got shape {z.shape}")
    n = z.shape[-1]
    k = check_budget("k", k)
    if k > n:
        raise ValueError(f"k must be <= the number of scores n={n} (last axis of z), got k={k}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = compute_dtype(z.dtype)
    z = jnp.asarray(z, dtype)
    if valid is None:
        mask = jnp.ones(z.shape, bool)
    else:
        if not hasattr(valid, "dtype") or valid.dtype != jnp.bool_:
            raise ValueError(f"valid must be a boolean array, got {getattr(valid, 'dtype', type(valid))}")
        try:
            mask = jnp.broadcast_to(valid, z.shape)
        except ValueError:
            raise ValueError(f"valid has shape {valid.shape}, not broadcastable to z's shape {z.shape}") from None
    mask = mask & (z > -jnp.inf)
    # masked entries must not carry -inf/nan into arithmetic (their gradient would be nan)
    z = jnp.where(mask, z, 0)
    return _sparsek_jit(z, mask, k, method)
