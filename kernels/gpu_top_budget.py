"""Per-row top-``budget`` masks on GPU: a Pallas Triton radix select (SEA's cell selection).

``top_budget_mask(scores, budget)`` marks, in every row of ``scores`` [R, N], the ``budget[r]``
largest entries, ties broken towards the lower index (the rule of ``lax.top_k`` and of a
stable descending sort). SEA keeps round(H k t_m / L) of each row's H * t_m = 4096 cells
(k = 64, t_m = 256, H = 16); XLA computes ``lax.top_k(scores, 256)`` of that shape as a full
sort: 7.6 of the SEA layer's 25 ms forward at T = 32k on an H100
(benchmarks/results/profile_sea_32k_1124b.json).

One program per row (``rows_per_program`` rows): the row's scores become order-preserving
uint32 keys held in registers; 32 count passes find the budget-th largest key bit by bit
(largest v with #{key >= v} >= budget), then ceil(log2(N + 1)) more find how many of the
entries equal to it, in index order, complete the budget. No sort, no global memory
besides one read of the row and one write of the mask. The XLA form it replaces (and is
tested against) is ``sea_jax.ops.sea_select.select_cells(method="sort")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["top_budget_mask"]


def _order_keys(x):
    """float32 -> uint32 with the same order; -0.0 becomes +0.0 (equal, as in jax's sorts, so
    that they tie by index); NaNs: above +inf or below -inf by sign."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    negative = (bits >> 31) != 0
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _kernel(scores_ref, budget_ref, out_ref, *, index_bits: int):
    x = scores_ref[...]  # [P, N]
    budget = budget_ref[...]  # [P]
    key = _order_keys(x)
    one = jnp.uint32(1)

    def value_bit(i, thr):
        cand = thr | (one << (31 - i).astype(jnp.uint32))
        count = jnp.sum((key >= cand[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(count >= budget, cand, thr)

    thr = lax.fori_loop(0, 32, value_bit, jnp.zeros(budget.shape, jnp.uint32))
    above = key > thr[:, None]
    tie = key == thr[:, None]
    need = budget - jnp.sum(above.astype(jnp.int32), axis=1)
    idx = lax.broadcasted_iota(jnp.int32, x.shape, 1)

    def index_bit(i, bound):
        cand = bound | (1 << (index_bits - 1 - i))
        count = jnp.sum((tie & (idx < cand[:, None])).astype(jnp.int32), axis=1)
        return jnp.where(count <= need, cand, bound)

    bound = lax.fori_loop(0, index_bits, index_bit, jnp.zeros(budget.shape, jnp.int32))
    keep = (above | (tie & (idx < bound[:, None]))) & (budget > 0)[:, None]
    out_ref[...] = keep.astype(jnp.int8)


def top_budget_mask(scores: jax.Array, budget: jax.Array, *, rows_per_program: int = 1, num_warps: int = 4,
                    interpret: bool = False) -> jax.Array:
    """bool [R, N]: the ``budget[r]`` largest entries of each row (ties: lower index first).

    Args:
      scores: float32 [R, N] (N is padded to a power of two with -inf inside; NaN: undefined).
      budget: int [R], 0 <= budget <= N (0 keeps nothing).
      rows_per_program: rows per Pallas program (power of two); num_warps: Triton warps.
      interpret: run the kernel in interpret mode (CPU tests).
    """
    if scores.ndim != 2 or scores.dtype != jnp.float32:
        raise ValueError(f"scores must be float32 [rows, n], got {scores.dtype} {scores.shape}")
    R, N = scores.shape
    if budget.shape != (R,) or not jnp.issubdtype(budget.dtype, jnp.integer):
        raise ValueError(f"budget must be an int array of shape {(R,)}, got {budget.dtype} {budget.shape}")
    P = rows_per_program
    if isinstance(P, bool) or not isinstance(P, int) or P < 1 or P & (P - 1):
        raise ValueError(f"rows_per_program must be a power of two >= 1, got {P!r}")
    n = max(16, 1 << (N - 1).bit_length())  # Triton blocks are powers of two
    rows = -(-R // P) * P
    x = jnp.pad(scores, ((0, rows - R), (0, n - N)), constant_values=-jnp.inf)
    b = jnp.pad(budget.astype(jnp.int32), (0, rows - R))  # padding rows keep nothing
    out = pl.pallas_call(
        functools.partial(_kernel, index_bits=n.bit_length()),  # bounds up to n inclusive
        grid=(rows // P,),
        in_specs=[pl.BlockSpec((P, n), lambda r: (r, 0)), pl.BlockSpec((P,), lambda r: (r,))],
        out_specs=pl.BlockSpec((P, n), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, n), jnp.int8),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sea_top_budget_mask",
    )(x, b)
    return out[:R, :N] != 0

