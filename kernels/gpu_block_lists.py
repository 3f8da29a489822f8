"""Every query block's sorted candidate list straight from the keys' entry times (Pallas, Triton).

The causal SparseK selection works per query block on one sorted list of key ranks: the C best
ranks of the keys that entered before the block (its carry) and the ranks of the keys entering
during it, ascending, EMPTY-padded (:func:`sea_jax.ops.sparsek_select_fast.sorted_block_lists`),
plus the (C + 1)-th best rank entered before it (``ev``, the exactness check's evicted key). In
XLA that is an associative scan of rank-list merges over the blocks
(:func:`~sea_jax.ops.sparsek_select_fast.prefix_ranks`, ~40 kernels) and a radix sort of all the
lists. Here one program per (row, block) reads the keys in rank order (ranks are the global sort
order, so reading ``entry[row, 0:T]`` is reading the keys best first) and keeps a rank if its key
entered before the block and fewer than C such ranks were kept, or if it enters during the block.
Kept ranks come out in rank order, so the list is sorted as it is written. The pass stops at the
(C + 1)-th earlier key (about C T / q ranks for block q, not T); the block's entering ranks past
that point follow all kept ones, ordered among themselves by a [Bq, Bq] count. Where each
entering rank is written is its query's ``spos`` (the selection's binary search otherwise). Exact integer
outputs, the same as the XLA path's (tests compare the two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params, pltriton

__all__ = ["block_lists", "NEVER"]

EMPTY = jnp.iinfo(jnp.int32).max  # "no key" (sorts last); sea_jax.ops.sparsek_select_fast.EMPTY
NEVER = jnp.iinfo(jnp.int32).max  # the entry time of a rank whose key never enters


def _kernel(entry_ref, enter_ref, list_ref, ev_ref, spos_ref, *, c: int, block_q: int, chunk: int, length: int):
    q0 = pl.program_id(1) * block_q
    num = entry_ref.shape[0]  # ranks, padded to a multiple of chunk with NEVER
    lane = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    zero = jnp.int32(0)
    n_slots = enter_ref.shape[0]

    def cond(st):
        r0, n_old, _, _ = st
        return (r0 < num) & (n_old <= c)

    def body(st):
        r0, n_old, n_out, ev = st
        t = entry_ref[pl.ds(pl.multiple_of(r0, chunk), chunk)]
        old = t < q0
        new = (t >= q0) & (t < q0 + block_q)
        old_i = n_old + jnp.cumsum(old.astype(jnp.int32)) - old.astype(jnp.int32)  # index among earlier keys
        keep = (old & (old_i < c)) | new
        pos = n_out + jnp.cumsum(keep.astype(jnp.int32)) - 1
        # lanes not kept point past the list (masked: never written), each at its own index
        pltriton.store(list_ref.at[jnp.where(keep, pos, length + lane)], r0 + lane, mask=keep)
        n_old_chunk = jnp.sum(old.astype(jnp.int32))
        n_keep = jnp.sum(keep.astype(jnp.int32))
        # where each entering rank lands: the list index of the key entering at query t. Most
        # chunks hold none: a branch, not a masked scatter per chunk, on a count taken from the
        # sums the loop needs anyway (the kept earlier keys are the chunk's first C - n_old)
        @pl.when(n_keep - jnp.minimum(c - n_old, n_old_chunk) > 0)
        def _():
            pltriton.store(spos_ref.at[jnp.where(new, t - q0, n_slots + lane)], pos, mask=new)

        ev = jnp.minimum(ev, jnp.min(jnp.where(old & (old_i == c), r0 + lane, EMPTY)))
        return (r0 + chunk, n_old + n_old_chunk, n_out + n_keep, ev)

    r_end, _, n_out, ev = lax.while_loop(cond, body, (zero, zero, zero, jnp.int32(EMPTY)))
    # The block's entering ranks the scan did not reach (>= r_end) follow every kept rank: after
    # the (C + 1)-th earlier key all C kept ones are behind. Their order among themselves is a
    # [Bq, Bq] count, so the scan stops there instead of running to the block's worst entering rank.
    enter = enter_ref[...]
    late = (enter != EMPTY) & (enter >= r_end)

    def count(i, ahead):  # [Bq, 16] at a time: a whole [Bq, Bq] array would take 128 registers a thread
        other = enter_ref[pl.ds(pl.multiple_of(i * 16, 16), 16)]
        before = (other != EMPTY) & (other >= r_end) & (other[None, :] < enter[:, None])
        return ahead + jnp.sum(before.astype(jnp.int32), axis=1)

    ahead = lax.fori_loop(0, enter.shape[0] // 16, count, jnp.zeros(enter.shape, jnp.int32))
    slot = lax.broadcasted_iota(jnp.int32, enter.shape, 0)
    pltriton.store(list_ref.at[jnp.where(late, n_out + ahead, length + slot)], enter, mask=late)
    pltriton.store(spos_ref.at[slot], n_out + ahead, mask=late)
    pltriton.store(spos_ref.at[slot], jnp.full(enter.shape, length, jnp.int32), mask=enter == EMPTY)
    n_out = n_out + jnp.sum(late.astype(jnp.int32))

    def fill(i, carry):  # EMPTY after the kept ranks
        pos = n_out + i * chunk + lane
        pltriton.store(list_ref.at[pos], jnp.full((chunk,), EMPTY, jnp.int32), mask=pos < length)
        return carry

    lax.fori_loop(0, (length - n_out + chunk - 1) // chunk, fill, zero)
    ev_ref[...] = jnp.full(ev_ref.shape, ev, jnp.int32)


def block_lists(entry: jax.Array, enter_ranks: jax.Array, c: int, *, chunk: int = 1024, num_warps: int = 4,
                interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The sorted list of every query block, the (C + 1)-th best rank entered before it and
    where each entering key lands in its block's list.

    Args:
      entry: int32 [R, N]: for each row (batch x KV head) and rank r, the index of the query at
        which the key of rank r enters (becomes selectable), or ``NEVER``.
      enter_ranks: int32 [nQ, R, Bq]: the rank of the key entering at each query of each block
        (``EMPTY``: none); consistent with ``entry`` (entry[r, enter_ranks[q, r, t]] = q * Bq + t).
      c: C, the carry length (>= 1).
      chunk: ranks read per step (a power of two).
      num_warps: warps per program (one program per row and block).
      interpret: Pallas interpret mode (CPU tests).
    Returns:
      lists int32 [nQ, R, C + Bq]: the C best ranks entered in blocks < q and the ranks entering
      in block q, ascending, EMPTY last (:func:`sea_jax.ops.sparsek_select_fast.sorted_block_lists`
      of :func:`~sea_jax.ops.sparsek_select_fast.prefix_ranks`' carries), and ev int32 [nQ, R]:
      the (C + 1)-th best rank entered in blocks < q (EMPTY: none), and spos int32 [nQ, R, Bq]:
      the list index of the rank entering at each query (C + Bq where none enters; the
      selection's binary search of the entering ranks in the lists, done while writing them).
    """
    if entry.ndim != 2 or enter_ranks.ndim != 3 or enter_ranks.shape[1] != entry.shape[0]:
        raise ValueError(f"entry must be [R, N] and enter_ranks [nQ, R, Bq] with the same R, got "
                         f"{entry.shape} and {enter_ranks.shape}")
    if entry.dtype != jnp.int32 or enter_ranks.dtype != jnp.int32:
        raise ValueError(f"entry and enter_ranks must be int32, got {entry.dtype} and {enter_ranks.dtype}")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"c must be an int >= 1, got {c!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    R, N = entry.shape
    nq, _, bq = enter_ranks.shape
    length = c + bq
    if R == 0 or nq == 0:
        return (jnp.zeros((nq, R, length), jnp.int32), jnp.zeros((nq, R), jnp.int32),
                jnp.full((nq, R, bq), length, jnp.int32))
    n_pad = -(-N // chunk) * chunk
    if n_pad != N:
        entry = jnp.pad(entry, ((0, 0), (0, n_pad - N)), constant_values=NEVER)
    bq_pad = max(16, 1 << (bq - 1).bit_length())  # Triton blocks are powers of two
    if bq_pad != bq:
        enter_ranks = jnp.pad(enter_ranks, ((0, 0), (0, 0), (0, bq_pad - bq)), constant_values=EMPTY)
    lists, ev, spos = pl.pallas_call(
        functools.partial(_kernel, c=c, block_q=bq, chunk=chunk, length=length),
        grid=(R, nq),
        in_specs=[pl.BlockSpec((None, n_pad), lambda r, q: (r, 0)),
                  pl.BlockSpec((None, None, bq_pad), lambda r, q: (q, r, 0))],
        out_specs=[pl.BlockSpec((None, None, length), lambda r, q: (q, r, 0)),
                   pl.BlockSpec((None, None, 16), lambda r, q: (q, r, 0)),
                   pl.BlockSpec((None, None, bq_pad), lambda r, q: (q, r, 0))],
        out_shape=[jax.ShapeDtypeStruct((nq, R, length), jnp.int32),
                   jax.ShapeDtypeStruct((nq, R, 16), jnp.int32),
                   jax.ShapeDtypeStruct((nq, R, bq_pad), jnp.int32)],
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_block_lists",
    )(entry, enter_ranks)
    return lists, ev[..., 0], spos[..., :bq]
