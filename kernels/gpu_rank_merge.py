"""The lowest n of two sorted int32 lists, merged on chip (Pallas, Triton lowering).

The causal SparseK selection carries, per query block, the top-C ranks of the keys that
entered before it (:func:`sea_jax.ops.sparsek_select_fast.prefix_ranks`, an associative scan
whose combine step merges two ascending rank lists and keeps the lowest n). In XLA that merge
is a bitonic network: log2(n) + 1 elementwise stages, each a kernel that reads and writes the
whole list (at T = 32k, k = 1024 the carries' 124 kernels took 0.54 ms on an H100,
benchmarks/results/profile_layer_32k_1124d.json). Here one program merges one pair of lists
by rank ("merge path"): a[i] lands at i + #(b < a[i]) and b[j] at j + #(a <= b[j]) (both
counts by binary search on the other list, loads served from L1), so the merge is one pass that
reads each list once and writes the merged list once. Ties are broken as a stable merge (a
first), so repeated values such as the EMPTY padding land on distinct positions.

In the SparseK layer at T = 32k (H100, profile_layer_32k_1124e.json) the carries took 0.41 ms
with it (the merges 0.28 ms in 14 calls, the scan's slicing 0.13 ms in 28 kernels) against
0.54 ms in 124 kernels for the bitonic network: the merges are bound by the binary searches'
load latency (~20 us per call), not by bandwidth.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["merge_lowest"]


def _count(ref, x, n: int, strict: bool):
    """#(ref < x) (strict) or #(ref <= x) for every element of x, ref ascending of length n."""
    lo = jnp.zeros(x.shape, jnp.int32)
    hi = jnp.full(x.shape, n, jnp.int32)
    for _ in range(n.bit_length()):  # enough halvings to close [0, n]
        mid = (lo + hi) // 2
        v = ref[jnp.minimum(mid, n - 1)]
        go = (v < x) if strict else (v <= x)
        open_ = lo < hi
        lo = jnp.where(open_ & go, mid + 1, lo)
        hi = jnp.where(open_ & ~go, mid, hi)
    return lo


def _kernel(a_ref, b_ref, out_ref, *, n: int):
    a = a_ref[...]
    b = b_ref[...]
    i = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    out_ref[i + _count(b_ref, a, n, strict=True)] = a
    out_ref[i + _count(a_ref, b, n, strict=False)] = b


def merge_lowest(a: jax.Array, b: jax.Array, *, num_warps: int = 4, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """The n lowest of two ascending int32 lists and the (n + 1)-th lowest.

    Args:
      a, b: int32 [..., n], each ascending along the last axis; n a power of two (the Triton
        block). Repeated values are allowed (the result is that of a stable merge).
      num_warps: warps per program (one program per pair of lists).
      interpret: Pallas interpret mode (CPU tests).
    Returns:
      (int32 [..., n] ascending, int32 [...]), as
      :func:`sea_jax.ops.sparsek_select_fast.bitonic_merge_lowest`.
    """
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"a and b must have one shape [..., n], got {a.shape} and {b.shape}")
    if a.dtype != jnp.int32 or b.dtype != jnp.int32:
        raise ValueError(f"a and b must be int32, got {a.dtype} and {b.dtype}")
    n = a.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the lists' length must be a power of two, got {n}")
    lead = a.shape[:-1]
    rows = math.prod(lead)
    if rows == 0:  # (associative_scan combines empty slices too)
        return a, jnp.zeros(lead, jnp.int32)
    spec = pl.BlockSpec((None, n), lambda r: (r, 0))
    merged = pl.pallas_call(
        functools.partial(_kernel, n=n),
        grid=(rows,),
        in_specs=[spec, spec],
        out_specs=pl.BlockSpec((None, 2 * n), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, 2 * n), jnp.int32),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_rank_merge",
    )(a.reshape(rows, n), b.reshape(rows, n))
    return merged[:, :n].reshape(a.shape), merged[:, n].reshape(lead)
