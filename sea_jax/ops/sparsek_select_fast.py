"""The "fast" schedule of the causal SparseK selection: same outputs, far fewer passes.

It computes exactly what :func:`sea_jax.ops.sparsek_select.select_block` computes for every
query block (same sorted block list, candidate sets, masks, overflow flags; weights and tau
by the same solver, to float rounding), organised for a GPU:

1. **Global ranks.** Keys are ordered once per (batch row, KV head) by (run, score, position)
   descending, the order every list of the selection uses. From then on a key *is* its rank
   (int32, 0 = best, ``EMPTY`` = none), so every later sort or merge has one int key instead
   of three float/int keys, and run / score / position are gathered back through ``order``.
2. **Carries by a bitonic prefix merge.** Each block's carry is the top-C ranks of the keys
   that entered before it (an exclusive ``lax.associative_scan``, as in the "parallel"
   schedule). Two sorted lists merge without a sort: ``min(a, reverse(b))`` holds the C
   smallest of the union as a bitonic sequence (log2 elementwise min/max stages sort it) and
   the smallest of ``max(a, reverse(b))`` is the (C + 1)-th, the evicted key. (The GPU kernel
   path skips the scan: :func:`kernel_block_lists` builds every block's sorted list in one Pallas
   pass over the keys in rank order, :mod:`sea_jax.kernels.gpu_block_lists`; before it the merges
   ran as one Pallas pass each, :mod:`sea_jax.kernels.gpu_rank_merge`, still used with
   ``KERNEL_BLOCK_LISTS = False``.)
3. **Per query without cumsum.** A block's list (carry + the block_q entering keys, sorted by
   rank) is shared by its queries. Query i sees the entries of its own run (one contiguous
   range [s_i, e_i) of the list, since runs sort first) except the entering keys of later
   queries of the block (at most block_q - 1). So "the j-th visible entry" is s_i + j - 1
   plus the number of invisible entries ahead of it, a [block_q, block_q] computation (one
   tiny matmul counts the invisible entries ahead of each other). With the positions of the
   k-th, C-th and (C + 1)-th visible entries, every mask of the block is a comparison of
   small arrays, and the SparseK solver runs on rows generated on the fly inside its fused
   reductions: no [block_q, C + block_q] array is stored, forward or backward.
4. **Closed-form VJP on the list.** The backward of the weights and tau (the SparseK VJP of
   :mod:`sea_jax.ops.sparsek`: free set, its mean cotangent, tau's cotangent to the argmin /
   k-th entry for rows without a free set) is written against the same generated rows.

Measured on an H100 (T = 32k, B = 1, K = 16, k = c = 1024, w = 512, block_q = 64;
benchmarks/profile_sparsek_select.py -> benchmarks/results/sparsek_select_stages.json):
carries 1.6 ms, + block lists 3.2 ms, + per-query structure 3.5 ms, + threshold 130 ms,
forward 137 ms, forward+backward 142 ms. The threshold solver
(:func:`sea_jax.ops.sparsek.solve_shifted_threshold`) is what remains: it makes 10-25
full passes over each query's ~C candidates (bisection steps once Newton leaves the
bracket; on CPU at T = 4096, k = 256: median ~9, max 22), and a batch runs as many passes
as its slowest row (all 512 blocks in one batch: 205 ms). The next step is a solver that
uses the sorted list: each query's candidates are one sorted range minus at most
block_q - 1 hidden entries, so f(t) is two binary searches plus a [block_q] correction
instead of an O(C) pass. That solver is here as ``method="sorted"`` (schedule
"fast_sorted" of causal_prefix_select): 69 ms forward at 32k in XLA. The same idea as a Pallas
Triton kernel, one program per block list (``method="pallas"``, schedule "fused";
:mod:`sea_jax.kernels.gpu_sparsek_threshold`), takes 6.2 ms for the threshold and 13.8 / 18.8 ms
for the whole selection forward / forward+backward at 32k. (Since then that kernel walks each
list's queries in order, each root from the previous one: 0.37 ms in the layer at 32k, block_q
128; see sea_jax.kernels.gpu_sparsek_threshold.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sea_jax.ops.sparsek import bracket_tolerance, solve_shifted_threshold, sort_shifted_threshold

__all__ = ["EMPTY", "global_ranks", "bitonic_merge_lowest", "prefix_ranks", "kernel_block_lists", "fast_select_blocks",
           "key_ends"]

EMPTY = jnp.iinfo(jnp.int32).max  # the rank of "no key" (sorts last)

# Factored selections on the kernel path ("pallas", float32 scores): True lets the threshold walk
# also derive each query's structure and free ranges (list_select) instead of the XLA [Bq, Bq]
# passes and list_threshold. On an H100 (SparseK layer forward+backward, both paths in one process,
# benchmarks/results/structure_ab_1124c.json) 10.25 vs 10.66 ms at T = 32k, 19.45 vs 20.57 at 64k,
# 0.09-0.18 GiB less temporaries; both compile in 11-13 s. False: the XLA passes (kept as the
# reference the tests compare the kernel path with, and for A/B measurements).
STRUCTURE_IN_KERNEL = True
# The kernel path's block lists: True builds every block's sorted list and ev in one Pallas pass
# over the keys in rank order (kernel_block_lists); False: the merge scan of on-chip rank merges
# (prefix_ranks, merge="pallas") and a radix sort of the lists (sorted_block_lists), for A/B runs.
KERNEL_BLOCK_LISTS = True
# global_ranks by two stable 1-D key-index sorts (XLA's GPU radix sort) instead of one batched
# 3-key sort, where the packed keys fit in int32
RADIX_RANKS = True
# list_select's entries per vector step in the layer: 128 against 64 / 256 took it from 0.61 / 0.65
# to 0.55 ms in the forward at T = 32k on an H100 (profile_layer.py --select_options, one process
# each; the plain walk's best was 64)
_SELECT_CHUNK = 128


def _take(a, idx):
    """a: [..., S] (leading axes broadcast against idx's), idx: int [..., N] clipped -> [..., N]."""
    return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[-1] - 1), axis=-1)


def _radix_order(score, run, has):
    """global_ranks' order by two stable 1-D (key, index) sorts, which XLA's GPU compiler runs as
    radix sorts, instead of one batched 3-key comparison sort (~14 kernels at T = 32k): first by
    score, descending, over positions fed in descending order (so ties keep later positions
    first), then by (row, run descending), which keeps that order within a run."""
    T = score.shape[-1]
    rows = int(np.prod(score.shape[:-1]))
    x = jnp.where(score == 0, jnp.float32(0), score.astype(jnp.float32))  # -0.0 ties with 0.0, as in lax.sort
    bits = lax.bitcast_convert_type(x, jnp.int32)
    mono = bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))  # int order = float order
    key_a = jnp.where(has, ~mono, jnp.iinfo(jnp.int32).max)  # best score first, non-keys last
    flat = jnp.arange(rows * T, dtype=jnp.int32).reshape(rows, T)[:, ::-1].reshape(-1)
    _, f = lax.sort((key_a.reshape(rows, T)[:, ::-1].reshape(-1), flat), num_keys=1, is_stable=True)
    run_f = run.reshape(-1)[f]
    key_b = (f // T) * (T + 2) + (T - jnp.where(run_f >= 0, run_f, -1))  # row, then later runs first
    _, f = lax.sort((key_b, f), num_keys=1, is_stable=True)
    return (f % T).reshape(score.shape)


@jax.named_scope("sparsek_ranks")
def global_ranks(score: jax.Array, run: jax.Array) -> tuple[jax.Array, jax.Array]:
    """order, rank: int32 [B, K, T] of keys sorted by (run, score, position) descending.

    Args:
      score: [B, K, T] key scores (read without gradient).
      run: int32 [B, K, T] segment-run ids in [-1, T), -1 = not a key (those rank last).
    Returns:
      order[r] = position of the key of rank r; rank[j] = rank of the key at position j.

    Where the packed keys fit in int32 and the scores in float32 (``RADIX_RANKS``) the order
    comes from two stable 1-D sorts (:func:`_radix_order`), else from one batched 3-key sort
    (float64 scores: the radix keys hold float32 bits). On an H100 in the SparseK
    layer at T = 32k, K = 16 (profile_sparsek_32k_radix_ranks_{on,off}_1124.json, two processes
    each): ranks and sorts 0.16 vs 0.27 ms, 11 vs 22 kernels, device kernels 8.73 / 8.72 vs 8.82 /
    8.96 ms. The inverse permutation is one scatter.
    """
    T = score.shape[-1]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), score.shape)
    has = run >= 0
    rows = int(np.prod(score.shape[:-1]))
    if RADIX_RANKS and rows * (T + 2) < 2**31 and jnp.dtype(score.dtype).itemsize <= 4:
        order = _radix_order(lax.stop_gradient(score), run, has)
    else:
        key = jnp.where(has, lax.stop_gradient(score), -jnp.inf)
        # the tie rules of select_block's sort: later run first, then higher score, then later position
        _, _, neg_pos = lax.sort((-jnp.where(has, run, -1), -key, -pos), dimension=-1, num_keys=3)
        order = -neg_pos
    # the inverse permutation is a scatter, not a second sort (XLA's batched sort: ~14 kernels)
    rank = jnp.put_along_axis(jnp.zeros_like(order), order, pos, axis=-1, inplace=False)
    return order, rank


@jax.named_scope("sparsek_lists")
def sorted_block_lists(carry_ranks: jax.Array, enter_ranks: jax.Array, num_keys: int) -> jax.Array:
    """Every block's list: its carry and entering ranks, ascending (EMPTY last).

    Args:
      carry_ranks: int32 [..., C]; enter_ranks: int32 [..., Bq]; ranks in [0, num_keys) or EMPTY.
    Returns:
      int32 [..., C + Bq].

    Rows are told apart by a row offset in one int32 key, so that all rows are sorted by 1-D
    sorts (XLA's GPU radix sort; the batched sort it replaces is a comparison sort: 1.08 ms for
    8192 lists of 2112 at T = 32k, benchmarks/results/profile_layer_32k_ranks.json; 0.36 ms as one 1-D
    sort, profile_layer_32k_lists.json), as many
    as the int32 range needs (one at T = 32k, K = 16, block_q = 64; two at 128k).
    """
    x = jnp.concatenate([carry_ranks, enter_ranks], -1)
    lead, M = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead))
    span = num_keys + 1  # EMPTY -> num_keys: sorts last in its row
    x = jnp.where(x == EMPTY, num_keys, x).reshape(rows, M)
    per = max(1, (2**31 - 1) // span)  # rows of one sort: row * span + rank < 2**31
    parts = []
    for r0 in range(0, rows, per):
        part = x[r0:r0 + per]
        n = part.shape[0]
        key = jnp.sort((jnp.arange(n, dtype=jnp.int32)[:, None] * span + part).reshape(n * M))
        parts.append(key.reshape(n, M) % span)  # the row offset keeps every row in place
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return jnp.where(out == num_keys, EMPTY, out).reshape(lead + (M,))


@jax.named_scope("sparsek_lists")
def kernel_block_lists(enter_ranks: jax.Array, c: int, num_keys: int, interpret: bool = False, **kernel_kw
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`sorted_block_lists` of :func:`prefix_ranks`' carries, and their ``ev``, in one
    Pallas pass over the keys in rank order (:func:`sea_jax.kernels.gpu_block_lists.block_lists`).

    Args:
      enter_ranks: int32 [nQ, ..., Bq] ranks of the keys entering at each query (EMPTY: none).
      c: C, the carry length; num_keys: ranks run over [0, num_keys).
      interpret: Pallas interpret mode (CPU).
      kernel_kw: the kernel's ``chunk`` / ``num_warps``.
    Returns:
      lists int32 [nQ, ..., C + Bq] and ev int32 [nQ, ...], exactly as the XLA path's, and spos
      int32 [nQ, ..., Bq]: the list index of the rank entering at each query (C + Bq: none).
    """
    from sea_jax.kernels.gpu_block_lists import NEVER, block_lists

    nq, lead, bq = enter_ranks.shape[0], enter_ranks.shape[1:-1], enter_ranks.shape[-1]
    rows = int(np.prod(lead))
    ent = enter_ranks.reshape(nq, rows, bq)
    # entry[row, rank]: the query at which that rank's key enters (EMPTY ranks fall out of range)
    when = jnp.broadcast_to(jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, 1, bq), ent.shape)
    row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32).reshape(1, rows, 1), ent.shape)
    entry = jnp.full((rows, num_keys), NEVER, jnp.int32).at[row, ent].set(when, mode="drop")
    lists, ev, spos = block_lists(entry, ent, c, interpret=interpret, **kernel_kw)
    return lists.reshape((nq,) + lead + (c + bq,)), ev.reshape((nq,) + lead), spos.reshape((nq,) + lead + (bq,))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad_to(x, n, value=EMPTY):
    if x.shape[-1] == n:
        return x
    return jnp.concatenate([x, jnp.full(x.shape[:-1] + (n - x.shape[-1],), value, x.dtype)], -1)


def _bitonic_to_sorted(x):
    """Sort a bitonic sequence [..., n] (n a power of 2) ascending: log2(n) half-cleaner stages."""
    n = x.shape[-1]
    h = n // 2
    while h >= 1:
        y = x.reshape(x.shape[:-1] + (n // (2 * h), 2, h))
        lo, hi = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([jnp.minimum(lo, hi), jnp.maximum(lo, hi)], axis=-2).reshape(x.shape)
        h //= 2
    return x


def bitonic_merge_lowest(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The n smallest of two ascending int lists [..., n] (n a power of 2), sorted, and the (n+1)-th.

    Distinct values except EMPTY. ``min(a, reverse(b))`` is bitonic and holds the n smallest
    of the union; ``max(a, reverse(b))`` holds the n largest, whose minimum is the (n+1)-th.
    """
    rb = jnp.flip(b, axis=-1)
    return _bitonic_to_sorted(jnp.minimum(a, rb)), jnp.min(jnp.maximum(a, rb), axis=-1)


class _RankList(NamedTuple):
    """Top-P ranks of a key set (ascending, EMPTY-padded) and its (P + 1)-th rank (EMPTY: none)."""

    ranks: jax.Array
    ev: jax.Array


MERGES = ("bitonic", "pallas", "pallas_interpret")


def _merge(a: _RankList, b: _RankList, merge: str = "bitonic") -> _RankList:
    if merge == "bitonic":
        ranks, ev = bitonic_merge_lowest(a.ranks, b.ranks)
    else:
        from sea_jax.kernels.gpu_rank_merge import merge_lowest

        ranks, ev = merge_lowest(a.ranks, b.ranks, interpret=merge == "pallas_interpret")
    return _RankList(ranks, jnp.minimum(ev, jnp.minimum(a.ev, b.ev)))


@jax.named_scope("sparsek_carries")
def prefix_ranks(enter_ranks: jax.Array, c: int, merge: str = "bitonic") -> tuple[jax.Array, jax.Array]:
    """The carry of every query block: the top-C ranks entered before it and the (C + 1)-th.

    Args:
      enter_ranks: int32 [nQ, ..., Bq] ranks of the keys entering at each query (EMPTY: none).
      c: C, the carry length.
      merge: how two sorted lists merge in the scan: "bitonic" (XLA elementwise stages) or
        "pallas" / "pallas_interpret" (:func:`sea_jax.kernels.gpu_rank_merge.merge_lowest`, one
        Pallas Triton pass per merge).
    Returns:
      ranks int32 [nQ, ..., C] ascending (EMPTY-padded), ev int32 [nQ, ...] (EMPTY: none);
      entry q covers the keys entering in blocks < q (an exclusive prefix).
    """
    P = _next_pow2(c)
    leaf = jnp.sort(enter_ranks, axis=-1)
    if leaf.shape[-1] > P:
        leaves = _RankList(leaf[..., :P], leaf[..., P])
    else:
        leaves = _RankList(_pad_to(leaf, P), jnp.full(leaf.shape[:-1], EMPTY, jnp.int32))
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    incl = lax.associative_scan(functools.partial(_merge, merge=merge), leaves, axis=0)
    excl = jax.tree.map(lambda a: jnp.concatenate([jnp.full((1,) + a.shape[1:], EMPTY, jnp.int32), a[:-1]], 0), incl)
    # the lists hold the top P >= C exactly: the (C + 1)-th is inside them unless P = C
    ev = excl.ranks[..., c] if P > c else excl.ev
    return excl.ranks[..., :c], ev


class _Rows(NamedTuple):
    """Per-query structure of a block list ([..., Bq] unless noted), all without gradient.

    s, e: the query's run range [s, e) in the list; tin: int32 [..., M] the query index at
    which each list entry entered (-1 carried; entry m is visible to query i iff s <= m < e
    and tin[m] <= i); last: list index of the last candidate; kpos: of the k-th visible
    entry (the last selected); nvis: visible entries (0: the query selects nothing);
    theta: the k-th score where active (nvis > k), else 0.
    inv: bool [..., Bq, Bq] entering key t is hidden from query i; spos: int32 [..., Bq]
    list index of entering key t; vb: int16 (lists shorter than 2**15) or int32 [..., Bq, Bq]
    visible entries ahead of it.
    """

    s: jax.Array
    e: jax.Array
    tin: jax.Array
    last: jax.Array
    kpos: jax.Array
    nvis: jax.Array
    theta: jax.Array
    inv: jax.Array
    spos: jax.Array
    vb: jax.Array


def _masks(r: _Rows, cols: int, k: int):
    """(candidate, selected, active) masks [..., Bq, cols] / [..., Bq] generated from _Rows."""
    Bq = r.s.shape[-1]
    m = jnp.arange(cols, dtype=jnp.int32)
    i = jnp.arange(Bq, dtype=jnp.int32)[:, None]
    ok = ((m >= r.s[..., None]) & (m < r.e[..., None]) & (r.tin[..., None, :cols] <= i)
          & (r.nvis[..., None] > 0))
    cand = ok & (m <= r.last[..., None])
    sel = ok & (m <= r.kpos[..., None])
    return cand, sel, r.nvis > k


def _shifted(z, r: _Rows, cand):
    """d = z - theta on candidates (0 elsewhere), [..., Bq, cols]."""
    return jnp.where(cand, z[..., None, : cand.shape[-1]] - r.theta[..., None], 0)


def _visible(r: _Rows, lo, hi):
    """Visible entries of each query's list in [lo, hi) ([..., Bq] bounds)."""
    hidden = r.inv & (r.spos[..., None, :] >= lo[..., None]) & (r.spos[..., None, :] < hi[..., None])
    return hi - lo - jnp.sum(hidden, axis=-1, dtype=jnp.int32), hidden


def _first_not_above(z, theta, t, c0, lo, hi):
    """First list index m in [lo, hi) with not((z[m] - theta) - t > c0) (hi if none), by
    binary search: z is non-increasing on every query's candidate range."""
    for _ in range(max(1, (z.shape[-1] + 1).bit_length())):
        open_ = lo < hi
        mid = (lo + hi) // 2
        above = (_take(z, mid) - theta) - t > c0  # the old solver's rounding: d = z - theta, x = d - t
        lo = jnp.where(open_ & above, mid + 1, lo)
        hi = jnp.where(open_ & ~above, mid, hi)
    return lo


def _sorted_stats(z, zc, r: _Rows, t):
    """sea_jax.ops.sparsek._stats_at (f, |S|, sum_S d, U, next breakpoint) of every query at
    t [..., Bq], from the sorted list: two binary searches, prefix sums of z and [Bq]
    corrections for the hidden entries instead of a pass over the candidates. Counts and
    the breakpoint are exact; f and sum_S d are rounded differently (prefix sums)."""
    end = r.last + 1
    a = _first_not_above(z, r.theta, t, 1, r.s, end)  # [s, a): x > 1
    b = _first_not_above(z, r.theta, t, 0, a, end)    # [a, b): 0 < x <= 1
    u, _ = _visible(r, r.s, a)
    n_free, hidden = _visible(r, a, b)
    z_hidden = jnp.sum(jnp.where(hidden, _take(z, r.spos)[..., None, :], 0), axis=-1)
    sd = (_take(zc, b) - _take(zc, a) - z_hidden) - n_free.astype(z.dtype) * r.theta
    f = u.astype(z.dtype) + sd - n_free.astype(z.dtype) * t
    jb = u + n_free  # visible entries with x > 0; the last of them holds the smallest such d
    ib, ia = _nth_visible(r.s, r.inv, r.vb, jb, u)
    inf = jnp.asarray(jnp.inf, z.dtype)
    nb = jnp.minimum(jnp.where(jb > 0, _take(z, ib) - r.theta, inf),
                     jnp.where(u > 0, (_take(z, ia) - r.theta) - 1, inf))
    return f, n_free, sd, u, nb


def _sorted_threshold(z, r: _Rows, k: int, rows, active, max_passes: int = 64):
    """solve_shifted_threshold's Newton / bisection over _sorted_stats, then one exact pass.

    The loop locates the segment holding the root with cheap statistics; the closed form is
    then evaluated with the exact pass of the reference solver (same sums, same rounding).
    Rows whose located segment fails the exact check (rounding at a breakpoint) are solved
    again by the reference solver (only when some row of the batch needs it).
    """
    dtype = z.dtype
    zc = jnp.concatenate([jnp.zeros(z.shape[:-1] + (1,), dtype), jnp.cumsum(z, axis=-1)], -1)
    kf = jnp.asarray(k, dtype)
    shape = r.s.shape

    def finished(lo, s, sd, u, nb):
        tc = (sd + u.astype(dtype) - kf) / jnp.where(s > 0, s.astype(dtype), 1)
        tc = jnp.where(s > 0, tc, lo)
        return tc, jnp.where(s > 0, tc <= nb, u == k)

    def cond(st):
        return (st[0] < max_passes) & jnp.any(~st[7])

    tol = bracket_tolerance(dtype)

    def body(st):
        it, lo, hi, s, sd, u, nb, done = st
        tc, ok = finished(lo, s, sd, u, nb)
        # a collapsed bracket ends the search too (the exact check below decides)
        done = done | ok | (hi - lo <= tol)
        newton = (s > 0) & (tc > lo) & (tc < hi)
        split = jnp.where(newton, tc, 0.5 * (lo + hi))
        f2, s2, sd2, u2, nb2 = _sorted_stats(z, zc, r, split)
        move = (f2 >= kf) & ~done
        lo = jnp.where(move, split, lo)
        hi = jnp.where(~move & ~done, split, hi)
        pick = lambda x, y: jnp.where(move, x, y)  # noqa: E731
        return it + 1, lo, hi, pick(s2, s), pick(sd2, sd), pick(u2, u), pick(nb2, nb), done

    lo = jnp.full(shape, -1.0, dtype)
    st = (jnp.int32(0), lo, jnp.zeros(shape, dtype), *_sorted_stats(z, zc, r, lo)[1:], ~active)
    _, lo, hi, *_ = lax.while_loop(cond, body, st)
    # the exact closed form on the located segment (the reference solver's statistics)
    from sea_jax.ops.sparsek import _closed_form, _stats_at

    _, s, sd, u, nb = _stats_at(rows, lo, dtype)
    tc = _closed_form(kf, lo, s, sd, u)
    ok = jnp.where(s > 0, tc <= nb, u == k) | ~active
    tau = jnp.clip(tc, lo, hi)
    # a while loop of at most one step rather than lax.cond: under vmap (lax.map batches) a
    # cond with a batched predicate becomes a select that would always run the fallback
    def fallback(c):
        return jnp.bool_(False), jnp.where(ok, c[1], solve_shifted_threshold(rows, k, shape, dtype, active=active))

    _, tau = lax.while_loop(lambda c: c[0], fallback, (jnp.any(~ok), tau))
    return jnp.where(active, tau, 0)


def _rows_of(lead, a, n):
    """a broadcast to lead + (n,) as [prod(lead), n]: the kernels' one list (or row set) per row."""
    return jnp.broadcast_to(a, lead + (n,)).reshape(-1, n)


@jax.named_scope("sparsek_threshold")
def _kernel_threshold(z, r: _Rows, k: int, interpret: bool):
    """tau - theta by the on-chip solver (sea_jax.kernels.gpu_sparsek_threshold): one Pallas
    program per block list instead of 10-25 XLA passes over generated rows."""
    from sea_jax.kernels.gpu_sparsek_threshold import list_threshold

    M, Bq = z.shape[-1], r.s.shape[-1]
    lead = r.s.shape[:-1]
    flat = functools.partial(_rows_of, lead)
    tau = list_threshold(
        flat(lax.stop_gradient(z), M), flat(r.tin.astype(jnp.int32), M), flat(r.s, Bq), flat(r.last, Bq),
        flat((r.nvis > k) & (r.nvis > 0), Bq), flat(r.theta.astype(jnp.float32), Bq), k=k, interpret=interpret,
        spos=flat(r.spos.astype(jnp.int32), Bq))
    return tau.reshape(lead + (Bq,))


def _solve(z, r: _Rows, k: int, method: str):
    M = z.shape[-1]
    if method in ("pallas", "pallas_interpret"):
        if z.dtype == jnp.float32:
            return _kernel_threshold(z, r, k, interpret=method == "pallas_interpret")
        method = "bracket"  # float64 runs: the XLA solver
    cand, _, active = _masks(r, M, k)
    if method == "sort":
        d = _shifted(z, r, cand)
        return sort_shifted_threshold(d, cand & active[..., None], k, active=active)

    def rows():  # regenerated inside every solver pass (fused, never stored)
        cand, _, active = _masks(r, M, k)
        return _shifted(z, r, cand), cand & active[..., None]

    if method == "sorted":
        return _sorted_threshold(z, r, k, rows, active)
    return solve_shifted_threshold(rows, k, r.s.shape, z.dtype, active=active)


def _tau(z, r: _Rows, tau_s, k: int):
    zmin = _take(z, r.last)  # the candidates of a run sort by score: the last is the minimum
    return jnp.where(r.nvis > k, r.theta + tau_s, jnp.where(r.nvis > 0, zmin - 1, 0)).astype(z.dtype)


def _outputs(z, r: _Rows, tau_s, k: int, union: int):
    cand, sel, active = _masks(r, union, k)
    x = _shifted(z, r, cand) - tau_s[..., None]
    p = jnp.where(cand, jnp.where(active[..., None], jnp.clip(x, 0, 1), 1), 0)
    weight = jnp.where(sel, p, 0).astype(z.dtype)
    return weight, _tau(z, r, tau_s, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _list_sparsek(z, r: _Rows, k: int, union: int, method: str):
    """weight [..., Bq, U] and tau [..., Bq] of every query of a block from its list scores z [..., M]."""
    return _outputs(z, r, _solve(z, r, k, method), k, union)


def _list_sparsek_fwd(z, r, k, union, method):
    tau_s = _solve(z, r, k, method)
    return _outputs(z, r, tau_s, k, union), (z, r, tau_s)


@jax.named_scope("sparsek_weight_grad")
def _list_sparsek_bwd(k, union, method, res, g):
    """The SparseK VJP (sea_jax.ops.sparsek._sparsek_bwd) over generated rows: dz of (weight,
    tau) with cotangents g = (g_w [..., Bq, U], g_tau [..., Bq])."""
    g_w, g_tau = g
    z, r, tau_s = res
    M = z.shape[-1]
    dtype = z.dtype
    cand, sel, active = _masks(r, M, k)
    x = _shifted(z, r, cand) - tau_s[..., None]
    free = cand & active[..., None] & (x > 0) & (x < 1)
    n_free = jnp.sum(free, axis=-1).astype(dtype)
    denom = jnp.where(n_free > 0, n_free, 1)
    # weight = where(sel, p, 0)[:U]: p's cotangent is g_w on selected entries (all within U)
    g_p = jnp.where(sel[..., :union], g_w, 0)
    sum_g = jnp.sum(jnp.where(free[..., :union], g_p, 0), axis=-1)
    shift = (g_tau - sum_g) / denom  # every free entry gets g_p - mean_g + g_tau / |S|
    # rows without a free set send tau's cotangent to one entry: the first minimum (prefix
    # rule) or the first k-th value (exact saturation), as the dense operator's argmin/argmax
    m = jnp.arange(M, dtype=jnp.int32)
    inactive = ~active & (r.nvis > 0)
    saturated = active & (n_free == 0)
    target = jnp.where(inactive, _take(z, r.last), r.theta)
    first = jnp.min(jnp.where(cand & (z[..., None, :] == target[..., None]), m, M), axis=-1)
    first = jnp.where(inactive | saturated, first, -1)
    dz = jnp.sum(jnp.where(free, shift[..., None], 0) + jnp.where(m == first[..., None], g_tau[..., None], 0),
                 axis=-2)
    dz = dz + jnp.pad(jnp.sum(jnp.where(free[..., :union], g_p, 0), axis=-2),
                      [(0, 0)] * (dz.ndim - 1) + [(0, M - union)])
    r_zero = jax.tree.map(lambda a: None, r)
    return dz.astype(dtype), r_zero


_list_sparsek.defvjp(_list_sparsek_fwd, _list_sparsek_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _list_tau(z, r: _Rows, k: int, method: str):
    """tau [..., Bq] alone (the factored output: weights are clip(z - tau) in the kernel)."""
    return _tau(z, r, _solve(z, r, k, method), k)


def _list_tau_fwd(z, r, k, method):
    tau_s = _solve(z, r, k, method)
    return _tau(z, r, tau_s, k), (z, r, tau_s)


def _list_tau_bwd(k, method, res, g_tau):
    return _tau_grad_ranges(k, res, g_tau)


def _first_false(pred, lo, hi, n: int):
    """First index m in [lo, hi) with pred(m) False, for pred True on a prefix (hi if none):
    a binary search, [..., Bq] bounds."""
    for _ in range(max(1, (n + 1).bit_length())):
        open_ = lo < hi
        mid = (lo + hi) // 2
        t = pred(mid)
        lo = jnp.where(open_ & t, mid + 1, lo)
        hi = jnp.where(open_ & ~t, mid, hi)
    return lo


def _scatter_add(base, idx, val):
    """base [..., N] + val [..., Bq] added at idx [..., Bq] (indices >= N dropped)."""
    lead = base.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    flat = base.reshape(rows, base.shape[-1])
    r = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, idx.shape[-1]))
    out = flat.at[r, idx.reshape(rows, -1)].add(val.reshape(rows, -1), mode="drop")
    return out.reshape(base.shape)


@jax.named_scope("sparsek_tau_grad")
def _tau_grad_ranges(k, res, g_tau):
    """_list_sparsek_bwd with g_w = 0 (tau's cotangent alone) without [Bq, M] arrays.

    The free set of query i (0 < x < 1 on its visible candidates) is one range [a_i, b_i) of
    its score-sorted list minus the entering keys it cannot see yet: each row adds
    g_tau / |free| over its range through a difference array (one cumulative sum per list)
    and takes it back from its hidden entries ([Bq, Bq] corrections). The bounds come from
    binary searches on x computed exactly as the dense formula computes it, so the free sets
    are identical; only the summation order of the range sums differs.
    """
    z, r, tau_s = res
    M = z.shape[-1]
    dtype = z.dtype
    active = r.nvis > k
    lo = r.s
    hi = jnp.where(r.nvis > 0, jnp.minimum(r.e, r.last + 1), r.s)  # candidates (before visibility)
    x_at = lambda m: (_take(z, m) - r.theta) - tau_s  # noqa: E731  (= _shifted(...) - tau_s)
    a = _first_false(lambda m: x_at(m) >= 1, lo, hi, M)
    b = _first_false(lambda m: x_at(m) > 0, a, hi, M)
    a = jnp.where(active, a, lo)
    b = jnp.where(active, b, a)
    spos = r.spos[..., None, :]
    hid = r.inv & (spos >= a[..., None]) & (spos < b[..., None])  # [..., Bq(i), Bq(t)]
    # rows without a free set: tau's cotangent to the first visible candidate equal to the
    # target (prefix rule: the minimum; exact saturation: the k-th value), as the dense rule
    inactive = ~active & (r.nvis > 0)
    target = jnp.where(inactive, _take(z, r.last), r.theta)
    m0 = _first_false(lambda m: _take(z, m) > target, lo, hi, M)  # first entry with z <= target
    # the hidden entries in [a, b) and in [lo, m0): one packed pass over the [Bq, Bq] arrays
    hidden_free, hidden_before = _hidden_counts(r.inv, r.spos, (a, b), (lo, m0))
    n_free = (b - a) - hidden_free
    shift = jnp.where(n_free > 0, g_tau / jnp.where(n_free > 0, n_free, 1).astype(dtype), 0).astype(dtype)
    diff = jnp.zeros(z.shape[:-1] + (M + 1,), dtype)
    diff = _scatter_add(_scatter_add(diff, a, shift), b, -shift)
    dz = jnp.cumsum(diff, axis=-1)[..., :M]
    corr = jnp.sum(jnp.where(hid, shift[..., :, None], 0), axis=-2)  # per entering key t
    dz = _scatter_add(dz, r.spos, -corr)  # spos = M: no entering key, dropped
    saturated = active & (n_free == 0)
    first = _nth_visible(r.s, r.inv, r.vb, (m0 - lo) - hidden_before + 1)
    need = inactive | saturated
    dz = _scatter_add(dz, jnp.where(need, first, M), jnp.where(need, g_tau, 0).astype(dtype))
    r_zero = jax.tree.map(lambda a: None, r)
    return dz.astype(dtype), r_zero


_list_tau.defvjp(_list_tau_fwd, _list_tau_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _walk_tau(z, tin, s, e, spos, k: int, cap: int, M: int, interpret: bool):
    """(tau, kpos, last, nxt, nvis) [..., Bq] of every query from its list scores z [..., M] by
    the walk that also keeps the structure (sea_jax.kernels.gpu_sparsek_threshold.list_select);
    tau is differentiable in z (the VJP of _list_tau, from the kernel's free ranges)."""
    return _walk_tau_fwd(z, tin, s, e, spos, k, cap, M, interpret)[0]


@jax.named_scope("sparsek_threshold")
def _walk_tau_fwd(z, tin, s, e, spos, k, cap, M, interpret):
    from sea_jax.kernels.gpu_sparsek_threshold import ListSelect, list_select

    Bq = s.shape[-1]
    lead = s.shape[:-1]
    flat = functools.partial(_rows_of, lead)
    zs = lax.stop_gradient(z)
    out = list_select(flat(zs, M), flat(tin.astype(jnp.int32), M), flat(s, Bq), flat(e, Bq),
                      flat(spos.astype(jnp.int32), Bq), k=k, cap=cap, chunk=_SELECT_CHUNK, interpret=interpret)
    out = ListSelect(*(o.reshape(lead + (Bq,)) for o in out))
    nvis = out.nvis
    tau = jnp.where(nvis > k, _take(zs, out.kpos) + out.tau_s, jnp.where(nvis > 0, _take(zs, out.last) - 1, 0))
    res = (out.free_lo, out.free_hi, out.n_free, out.first, s, e, spos)
    return (tau.astype(z.dtype), out.kpos, out.last, out.nxt, nvis), res


@jax.named_scope("sparsek_tau_grad")
def _walk_tau_bwd(k, cap, M, interpret, res, g):
    """_tau_grad_ranges with the kernel's free ranges, free counts and target entries, as one
    difference array (one scatter, one cumulative sum): +g/|free| over [free_lo, free_hi), less
    the same at the entering keys hidden inside the range (their sums per key by one small
    kernel, hidden_range_sums), plus tau's cotangent at the target entry of rows without a
    free set."""
    from sea_jax.kernels.gpu_sparsek_threshold import hidden_range_sums

    fa, fb, nf, first, s, e, spos = res
    g_tau = g[0]
    dtype = g_tau.dtype
    shift = jnp.where(nf > 0, g_tau / jnp.maximum(nf, 1).astype(dtype), 0).astype(dtype)
    Bq = s.shape[-1]
    lead = s.shape[:-1]
    flat = functools.partial(_rows_of, lead, n=Bq)
    # entering key t is hidden inside query i's free range: i < t, spos_t in [fa_i, fb_i) within
    # [s_i, e_i) (spos = M, no entering key: never). A kernel, not an XLA [Bq, Bq] reduction:
    # see hidden_range_sums for the compile time that fusion cost.
    corr = hidden_range_sums(flat(spos.astype(jnp.int32)), flat(jnp.maximum(fa, s)), flat(jnp.minimum(fb, e)),
                             flat(shift.astype(jnp.float32)), interpret=interpret)
    corr = corr.reshape(lead + (Bq,)).astype(dtype)
    need = first >= 0
    at = jnp.where(need, first, M)
    g_first = jnp.where(need, g_tau, 0).astype(dtype)
    # point values become pairs of steps; indices past M + 1 (none) are dropped
    idx = jnp.concatenate([fa, fb, spos, spos + 1, at, at + 1], axis=-1)
    val = jnp.concatenate([shift, -shift, -corr, corr, g_first, -g_first], axis=-1)
    diff = _scatter_add(jnp.zeros(fa.shape[:-1] + (M + 1,), dtype), idx, val)
    return jnp.cumsum(diff, axis=-1)[..., :M], None, None, None, None


_walk_tau.defvjp(_walk_tau_fwd, _walk_tau_bwd)


def _pack_counts(preds):
    """Per-row counts (int32 [..., Bq]) of ``preds`` (bool [..., Bq, Bq] each, summed over the
    last axis) by one reduction: the counts (<= Bq) in the bit fields of one int32 sum when
    they fit, else one sum each."""
    bits = preds[0].shape[-1].bit_length()
    if len(preds) == 1 or len(preds) * bits > 31:
        return [jnp.sum(p, axis=-1, dtype=jnp.int32) for p in preds]
    total = jnp.sum(sum(p.astype(jnp.int32) << (n * bits) for n, p in enumerate(preds)), axis=-1, dtype=jnp.int32)
    return [(total >> (n * bits)) & ((1 << bits) - 1) for n in range(len(preds))]


def _hidden_counts(inv, spos, *ranges):
    """For each (lo, hi) of ``ranges`` ([..., Bq] list-index bounds per query i): the entering
    keys hidden from query i (inv [..., Bq, Bq]) whose list index spos [..., Bq] lies in [lo, hi)."""
    sp = spos[..., None, :]
    return _pack_counts([inv & (sp >= lo[..., None]) & (sp < hi[..., None]) for lo, hi in ranges])


def _nth_visible(s, inv, vb, j, *more):
    """List index of the j-th (1-based, [..., Bq]) visible entry: s + j - 1 plus the invisible
    entries ahead of it (those with fewer than j visible entries before them).

    Further j's (``more``) are answered by the same pass over ``inv`` and ``vb`` (one
    [..., Bq, Bq] read instead of one per j: three separate passes were 0.44 ms of the
    layer's forward at T = 32k on an H100, benchmarks/results/profile_layer_32k_1124b.json);
    then a tuple is returned.
    """
    js = (j,) + more
    ahead = _pack_counts([inv & (vb < x[..., None].astype(vb.dtype)) for x in js])
    out = tuple(s + x - 1 + a for x, a in zip(js, ahead))
    return out if more else out[0]


@jax.named_scope("sparsek_key_ends")
def key_ends(kth: jax.Array, rank: jax.Array, run: jax.Array, window: int) -> jax.Array:
    """key_end int32 [B, K, T]: key p is selected by exactly the queries [p + window, key_end[p])
    (of those in its run; key_end <= p + window: never).

    Args:
      kth: int32 [B, K, T] per query the rank of its k-th visible key, -1 where it keeps every
        visible key (or sees none); rank: int32 [B, K, T] the global ranks
        (:func:`global_ranks`); run: int32 [B, K, T] run ids (start positions, -1: padding).

    Query t selects the visible keys ranked <= R_t, R_t = kth_t, or for queries keeping all
    they see the last rank of their run (runs rank later-first, so the keys of runs >= r hold
    the ranks [0, #keys at positions >= r)). R is non-increasing along the sequence: within a
    run more visible keys can only bring the k-th best rank down, and a later run's ranks are
    all below an earlier one's. So the queries that rank key p in are a prefix, and key p's
    range ends at the first query after p + window with R_t < rank_p.
    """
    T = rank.shape[-1]
    # without segments run is a constant. XLA's GPU compiler constant-folded an int32 cumulative
    # sum of a [1, 16, 32768] constant at compile time (4.3 and 6.9 s at T = 32k on an H100, its
    # slow-operation alarm; by its shape and dtype this one, the selection's only cumulative sum
    # over the keys of a constant): the barrier keeps it a device computation (the effect on the
    # compile time is not measured yet)
    has = lax.optimization_barrier(run) >= 0
    keys_from = jnp.cumsum(has[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1]  # keys at positions >= p
    run_last = _take(keys_from, run) - 1  # the last rank of the query's run
    r = jnp.where(has, jnp.where(kth >= 0, kth, run_last), T - 1)  # (ranks are < T: T - 1 ranks every key in)
    r = lax.cummin(r, axis=r.ndim - 1)  # padding queries take the previous value (they select nothing)
    # the queries that rank rank v in are [0, X(v)), X(v) = 1 + the last query t with R_t >= v:
    # for every v at once by a scatter-max of t + 1 at R_t and a suffix maximum (instead of a
    # binary search per key, ~16 dependent gather passes)
    lead = r.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    t1 = jnp.broadcast_to(jnp.arange(1, T + 1, dtype=jnp.int32), (rows, T))
    row = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, T))
    r2 = r.reshape(rows, T)
    mark = jnp.zeros((rows, T), jnp.int32).at[row, jnp.where(r2 >= 0, r2, T)].max(t1, mode="drop")
    last_in = lax.cummax(mark, axis=1, reverse=True).reshape(r.shape)
    start = jnp.minimum(jnp.arange(T, dtype=jnp.int32) + window, T)
    start = jnp.broadcast_to(start, rank.shape)
    end = jnp.maximum(start, _take(last_in, rank))
    return jnp.where(has, end, start)


@jax.named_scope("sparsek_block")
def fast_select_blocks(
    block_list, ev_rank, enter_ranks, query_pos, query_run, *, order, score, run,
    k: int, c: int, window: int, union: int, method: str, factored: bool = False, spos=None,
    segments: bool = True,
):
    """Selection of one query block from its carry (what select_block returns).

    Args:
      block_list: int32 [B, K, C + Bq]: the block's list, i.e. the C ranks carried into it and its
        entering ranks, ascending, EMPTY last (:func:`sorted_block_lists`, all blocks at once).
      ev_rank: int32 [B, K] the (C + 1)-th rank of the prefix (EMPTY: none).
      enter_ranks: int32 [B, K, Bq] rank of the key entering at each query (EMPTY: none).
      query_pos: int32 [Bq]; query_run: int32 [B, Bq] (-1: padding query).
      order, score, run: [B, K, T] the global order, the (differentiable) scores, the runs.
      k, c: budget and carry length C; window: w; union: U.
      method: "bracket" (sea_jax.ops.sparsek.solve_shifted_threshold over generated rows),
        "sort" (its sort solver on materialised rows), "sorted" (:func:`_sorted_threshold`:
        the bracket iteration on statistics read off the sorted list, one exact pass) or
        "pallas" / "pallas_interpret" (the on-chip solver, :func:`_kernel_threshold`; float32
        scores, the XLA "bracket" solver otherwise).
      factored: return the selection as (slot range, slot scores and gate thresholds) instead
        of a mask and weights (sea_jax.kernels.SlotSelection's vectors); the mask is then
        (lo, hi, kth): kth int32 [B, K, Bq] the rank of the k-th visible key of an active
        query, -1 for the others (:func:`key_ends` turns it into key intervals).
      spos: optional int32 [B, K, Bq]: the list index of the rank entering at each query, C + Bq
        or more where none enters (:func:`kernel_block_lists` writes it with the lists); None:
        a binary search of the entering ranks in the list.
      segments: False promises one run for every key and query (-1 only for padding queries):
        each query's run range is then the list's keys, no binary search.
    Returns:
      (union positions int32 [B, K, U], mask bool [B, K, Bq, U], weight [B, K, Bq, U],
      tau [B, K, Bq], overflow bool [B, K, Bq]); factored: mask is (lo, hi, kth) int32 [B, K, Bq]
      (query i selects the slots lo <= u < hi that it can see) and weight is (slot scores
      [B, K, U], thresholds [B, K, Bq]: tau, -inf where the query keeps everything with
      weight 1), both differentiable.
    """
    Bq = enter_ranks.shape[-1]
    # a union rounded up past the list (causal_prefix_select's union_multiple): empty entries
    lst = _pad_to(block_list, max(union, block_list.shape[-1]))  # [B, K, M]
    M = lst.shape[-1]
    has = lst != EMPTY
    slot = jnp.where(has, _take(order, lst), -1)
    lrun = jnp.where(has, _take(run, slot), -1)
    z = jnp.where(has, _take(score, slot), 0)  # differentiable gather
    zs = lax.stop_gradient(z)
    base = query_pos[0] - window
    tin = jnp.where(has & (slot >= base), slot - base, -1)

    qrun = query_run[:, None, :]  # [B, 1, Bq]
    # the list is sorted by rank: runs descending (non-keys last), so a query's run range and
    # an entering key's list index are binary searches ([B, K, Bq] bounds, no [Bq, M] counts)
    zero = jnp.zeros(lst.shape[:-1] + (Bq,), jnp.int32)
    end = zero + M
    qr = jnp.broadcast_to(qrun, zero.shape)
    if segments:
        s = _first_false(lambda m: _take(lrun, m) > qr, zero, end, M)  # [B, K, Bq]
        e = _first_false(lambda m: _take(lrun, m) >= qr, s, end, M)
    else:  # the keys first (one run), then EMPTY: what the searches return for run 0 and -1
        n_keys = jnp.sum(lrun >= 0, axis=-1, dtype=jnp.int32)[..., None]
        s = jnp.where(qr >= 0, 0, n_keys)
        e = jnp.where(qr >= 0, n_keys, M)
    if spos is None:
        spos = jnp.where(enter_ranks != EMPTY, _first_false(lambda m: _take(lst, m) < enter_ranks, zero, end, M), M)
    else:
        spos = jnp.where(spos < block_list.shape[-1], spos, M)
    if STRUCTURE_IN_KERNEL and factored and method in ("pallas", "pallas_interpret") and z.dtype == jnp.float32:
        # the kernel keeps each query's structure while it walks: no [Bq, Bq] arrays
        tau, kpos, last, nxt_pos, nvis = _walk_tau(z, tin, s, jnp.where(qrun >= 0, e, s), spos, k, c, M,
                                                   method == "pallas_interpret")
        sel, weight = _factored(s, e, kpos, nvis, lst, z, tau, k, union)
        return _finish_block(lst, slot, zs, nvis, nxt_pos, ev_rank, order, run, score, qrun, c, k, Bq, union,
                             sel, weight, tau)
    t = jnp.arange(Bq, dtype=jnp.int32)
    # inv[i, t]: the key entering at query t > i lies in query i's run range (hidden from it)
    inv = (t > t[:, None]) & (spos[..., None, :] >= s[..., None]) & (spos[..., None, :] < e[..., None])
    ahead = (spos[..., :, None] < spos[..., None, :]).astype(jnp.bfloat16)  # [t', t]: t' ahead of t
    # 0/1 bfloat16 operands with a float32 sum: exact (counts <= Bq), on the tensor cores. As a
    # float32 HIGHEST einsum it was, by all signs, the layer's one large gemm at 32k on an H100
    # (0.13 ms at block_q 64, 0.46 at 128: growing as Bq^2; the bfloat16 form is not measured yet)
    # (int16 where the list is shorter than 2**15: half the bytes of the [Bq, Bq] arrays that
    # the gemm writes and the passes below read. At T = 32k on an H100 the int32 gemm and three
    # separate passes took 0.15 + 0.44 ms, the int16 gemm and _nth_visible's one packed pass
    # 0.12 + 0.10: profile_layer_32k_1124{b,d}.json)
    small = jnp.int16 if M < 2**15 else jnp.int32
    before = jnp.einsum("...it,...tu->...iu", inv.astype(jnp.bfloat16), ahead,
                        preferred_element_type=jnp.float32).astype(small)
    vb = (spos[..., None, :] - s[..., None]).astype(small) - before  # visible entries ahead of hidden entry t
    nvis = jnp.where(qrun >= 0, e - s - jnp.sum(inv, axis=-1, dtype=jnp.int32), 0)
    kpos, last, nxt_pos = _nth_visible(s, inv, vb, jnp.minimum(nvis, k), jnp.minimum(nvis, c),
                                       jnp.full_like(nvis, c + 1))
    active = nvis > k
    theta = jnp.where(active, _take(zs, kpos), 0)
    r = _Rows(s, e, tin, last, kpos, nvis, theta, inv, spos, vb)
    if factored:
        tau = _list_tau(z, r, k, method)
        sel, weight = _factored(s, e, kpos, nvis, lst, z, tau, k, union)
    else:
        weight, tau = _list_sparsek(z, r, k, union, method)
        _, sel, _ = _masks(r, union, k)
    return _finish_block(lst, slot, zs, nvis, nxt_pos, ev_rank, order, run, score, qrun, c, k, Bq, union,
                         sel, weight, tau)


def _factored(s, e, kpos, nvis, lst, z, tau, k, union):
    """The factored selection of a block (fast_select_blocks' mask and weight with factored=True).

    The list is sorted by score within a run: query i's selected entries are the visible ones
    of [s, kpos] (tin > i hides the rest, the kernel's causal check); the third mask entry is
    the k-th visible rank (-1: inactive)."""
    sel = (s, jnp.minimum(jnp.where(nvis > 0, jnp.minimum(e, kpos + 1), s), union),
           jnp.where(nvis > k, _take(lst, kpos), -1))
    return sel, (z[..., :union], jnp.where(nvis > k, tau, -jnp.inf))


def _finish_block(lst, slot, zs, nvis, nxt_pos, ev_rank, order, run, score, qrun, c, k, Bq, union, sel, weight,
                  tau):
    """fast_select_blocks' outputs: the overflow flags and the union's slots."""
    # exactness: the best key outside the candidate set must not clear the threshold
    nxt = jnp.where(nvis > c, _take(zs, nxt_pos), -jnp.inf)
    ev_has = ev_rank != EMPTY
    ev_slot = _take(order, ev_rank[..., None])[..., 0]
    ev_run = jnp.where(ev_has, _take(run, ev_slot[..., None])[..., 0], -1)
    ev_score = lax.stop_gradient(_take(score, ev_slot[..., None])[..., 0])
    ev = jnp.where(ev_has[..., None] & (ev_run[..., None] == qrun), ev_score[..., None], -jnp.inf)
    overflow = jnp.maximum(nxt, ev) > lax.stop_gradient(tau)
    # slots past the block's union (U rounded up, see union_multiple) are never selected: empty
    used = min(k + Bq - 1, c + Bq)
    out_slot = jnp.where(jnp.arange(union) < used, slot[..., :union], -1)
    return out_slot, sel, weight, tau, overflow
