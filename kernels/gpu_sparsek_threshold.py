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
an H100. Here one program owns one list and writes only its [block_q] thresholds:

1. **Search on the sorted list.** The same safeguarded Newton / bisection iteration (closed
   form of the segment right of the bracket's low end; Newton point if inside the bracket, else
   the midpoint), but the statistics at a probe t come from the list's order instead of a pass:
   the entries with x = z - theta - t > 1 and with 0 < x <= 1 are two index ranges found by
   binary search (the rounded predicate is monotone along the list), their visible counts are
   the range lengths minus the hidden entering keys inside them (a [block_q, block_q]
   comparison), the free sum comes from prefix sums of the scores anchored at the block's mean
   threshold and clipped to [-clip, clip] (small numbers, so the differences stay accurate), and
   the next breakpoint is read at the last visible index of each range.
2. **Exact closed form.** One on-chip pass over each row's free range sums d = z - theta
   directly (as the XLA solver does); the closed form is accepted only inside its own segment
   [pb, nb] (pb: the largest breakpoint <= the bracket's low end), which makes it the exact root
   whatever rounding steered the search.
3. **Exact fallback.** Rows that fail (rounding at a breakpoint, a threshold farther than
   clip - 1 from the anchor, max_passes) rerun the iteration with exact statistics, one on-chip
   pass over the row's candidates per step (skipped when no row of the list needs it), from the
   cheap search's bracket where two exact passes confirm that it holds the root (f(lo) >= k >
   f(hi)), else from [-1, 0]. A list's fallback passes decide when its program ends, so they
   make the kernel's tail: on the layer's lists at 32k the confirmed bracket took the kernel from
   7.9 / 7.3 / 6.1 to 5.8 / 6.5 / 5.4 ms (three input seeds, threshold_layer_lists_verified.json).

Every iteration also stops once its bracket is narrower than 4 float32 ulps of 1 (the root
is then known to rounding): a root within rounding of a breakpoint has a closed form a few
ulps past its own segment, which no step accepts, and such rows ran all max_passes exact
passes.

On an H100 at T = 32k (8192 lists of M = 2112, block_q = 64, k = 1024): 6.2-6.8 ms vs 135.6 ms
for the XLA solver, ~18 search steps per list, 4 lists of 8192 needing the fallback
(benchmarks/bench_sparsek_threshold.py -> benchmarks/results/sparsek_threshold.json). A first
version that ran every step as an on-chip pass (step 3 alone) took 166-368 ms. On the lists
of the SparseK layer itself (``--from_layer``, three input seeds;
threshold_layer_lists_{before,after}.json): 18.9 / 18.1 / 6.1 ms before the bracket width stop
(2, 1 and 0 lists ran all 64 fallback passes), 7.9 / 7.3 / 6.1 ms after it (at most 24 passes).

The cheap search is bound by load latency, not arithmetic: ncu (H100, 64-row programs of 4
warps, binary searches) showed 255 registers per thread, so 2 programs per SM (12.5 %
occupancy) and ~0.4 eligible warps per scheduler. Two changes took the kernel on the layer's
lists at 32k from 5.85 / 6.62 ms (input seeds 0 / 1) to 2.14 / 2.25 ms (same run;
threshold_layer_lists_{arity,arity2,sweep}.json): 8-ary index searches (both searches of a
step at once, 7 probes each: 4 dependent loads instead of 2 x 13) and 16-row programs (smaller
[rows, block_q] correction tiles: 72 registers, 43.8 % occupancy; ncu_threshold_*.txt).

The result is the XLA solver's root up to rounding (max |difference| 1.4e-6 there).

**The walk** (``algorithm="walk"``, the default since 2026-11-24). The search above treats
every query on its own; but consecutive queries of one range see the same list except one
entering key and the candidate cap's entries at the range's end, so their roots are a few
breakpoints apart. One program per list (1 warp) takes its queries in order and keeps the
solve's state: the upper / free pointers into the list, the visible counts of both sets and the
free scores' sum (Neumaier-compensated, anchored at the range's first theta). A new query
updates the state for the entries that join or leave, then crosses breakpoints one at a time,
right while f >= k, left while f < k, until the closed form falls inside the current segment
(a root at a segment's right end crosses it: a flat piece may follow, whose right end,
t = -1, is the solvers' convention). A range's first active query starts at t = -1 with
``start_steps`` safeguarded Newton steps, each one pass over the list that also counts the
pointers. On the layer's lists at 32k (block_q 128, 4096 lists of 2176; threshold_walk_1124b.json)
0.55 ms against 2.33 for the search (330 walk steps per list on average, 3 start steps; without
them 1148 steps, 0.92 ms); in the layer 0.37 ms against 1.77 (profile_layer_32k_1124n.json).
Float32 roots of these lists are good to ~1e-5 (the walk, the search and the XLA solver all lie
up to 1.4e-5 from the float64 root on the same rows); the tests hold both algorithms to 2e-5.

**The walk with the structure** (:func:`list_select`): the same walk, given each query's run
range [s, e) instead of its candidate range and k-th score. It keeps the visible count and the
k-th, C-th and (C + 1)-th visible entries as pointers that follow the entering keys (computed
around the previous query's walk, so that their loads overlap it), and after the walk fixes up
each query's free range under the dense VJP's rounding (upper x >= 1, free 0 < x < 1, x = (z -
theta) - tau_s; the walk's own sets differ from these at ties with 1 and by rounding) and finds
the entry that takes tau's cotangent where no entry is free. The selection's XLA [block_q,
block_q] passes and its VJP's binary searches are then not needed. H100, SparseK layer at 32k:
forward+backward 10.18 vs 10.68 ms (one process), the kernel itself 0.62-0.67 ms against the
plain walk's 0.37 (benchmarks/README.md, 2026-11-24, fourth session).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import compiler_params

__all__ = ["list_threshold", "list_threshold_reference", "list_select", "ListSelect"]


def _kernel(z_ref, tin_ref, pre_ref, s_ref, last_ref, act_ref, theta_ref, anc_ref, spos_ref, zent_ref,
            tau_ref, *passes_ref, k, chunk, max_passes, search_steps, clip, tol, arity):
    bq = s_ref.shape[0]  # rows of this program (all of the block's queries unless rows_per_program)
    s = s_ref[...]
    end = last_ref[...] + 1  # exclusive end of each row's candidate range
    act = act_ref[...] != 0
    theta = theta_ref[...]
    anchor = anc_ref[...]
    spos = spos_ref[...]  # list index of the key entering at query j of the block (none: past M)
    zent = zent_ref[...]  # its clipped, anchored score
    local = lax.broadcasted_iota(jnp.int32, (bq,), 0)
    row = pl.program_id(1) * bq + local  # the query index within the block
    big = jnp.int32(2**30)
    kf = jnp.float32(k)
    inf = jnp.float32(jnp.inf)
    ninf = jnp.float32(-jnp.inf)  # a literal: Triton's lowering cannot negate constants
    zeros_f = jnp.zeros((bq,), jnp.float32)
    zeros_i = jnp.zeros((bq,), jnp.int32)
    # entering key j (of all the block's queries) is hidden from query i < j (it enters the prefix later)
    later = lax.broadcasted_iota(jnp.int32, (bq, spos.shape[0]), 1) > row[:, None]

    # ---- cheap statistics from the sorted list: binary searches + [bq, bq] corrections ----
    def hidden_in(lo, hi):
        h = later & (spos[None, :] >= lo[:, None]) & (spos[None, :] < hi[:, None])
        return jnp.sum(h.astype(jnp.int32), axis=1), jnp.sum(jnp.where(h, zent[None, :], 0.0), axis=1)

    def first_not_above(t, c, lo, hi):
        """First list index m in [lo, hi) with not((z_m - theta) - t > c): z is
        non-increasing on every row's range, and so is the rounded predicate."""
        def step(_, lh):
            lo, hi = lh
            open_ = lo < hi
            mid = (lo + hi) // 2
            zm = z_ref[jnp.clip(mid, 0, z_ref.shape[0] - 1)]
            above = (zm - theta) - t > c
            return jnp.where(open_ & above, mid + 1, lo), jnp.where(open_ & ~above, mid, hi)

        return lax.fori_loop(0, search_steps, step, (lo, hi))[0]

    def last_visible(lo, hi):
        """Largest visible index in [lo, hi) (lo - 1 if none)."""
        def cond(m):
            return jnp.sum(jnp.where((m >= lo) & (tin_ref[jnp.maximum(m, 0)] > row), 1, 0)) > 0

        def body(m):
            return jnp.where((m >= lo) & (tin_ref[jnp.maximum(m, 0)] > row), m - 1, m)

        return lax.while_loop(cond, body, hi - 1)

    def first_visible(lo, hi):
        """Smallest visible index in [lo, hi) (hi if none)."""
        def hid(m):
            return (m < hi) & (tin_ref[jnp.clip(m, 0, z_ref.shape[0] - 1)] > row)

        return lax.while_loop(lambda m: jnp.sum(jnp.where(hid(m), 1, 0)) > 0,
                              lambda m: jnp.where(hid(m), m + 1, m), lo)

    def first_not_above_both(t, lo, hi):
        """first_not_above(t, 1, lo, hi) and first_not_above(t, 0, lo, hi) by two interleaved
        `arity`-ary searches: each step probes arity - 1 points of both intervals at once (one
        [rows, arity] gather each), so a search takes ~log_arity(M) dependent loads instead of
        log2(M) - the kernel waits on load latency, not on arithmetic."""
        j = lax.broadcasted_iota(jnp.int32, (1, arity), 1) + 1  # probe j at lo + j * L // arity; j = arity: hi

        def narrow(lo, hi, c):
            n = hi - lo
            pos = lo[:, None] + (j * n[:, None]) // arity
            zm = z_ref[jnp.clip(pos, 0, z_ref.shape[0] - 1)]
            above = (pos < hi[:, None]) & ((zm - theta[:, None]) - t[:, None] > c)
            cnt = jnp.sum(above.astype(jnp.int32), axis=1)  # the predicate is monotone: a prefix of the probes
            return jnp.where(cnt > 0, lo + (cnt * n) // arity + 1, lo), lo + ((cnt + 1) * n) // arity

        def step(_, st):
            return (*narrow(st[0], st[1], 1.0), *narrow(st[2], st[3], 0.0))

        out = lax.fori_loop(0, search_steps, step, (lo, hi, lo, hi))
        return out[0], out[2]

    def cheap_stats(t):
        if arity == 2:
            a = first_not_above(t, 1.0, s, end)  # [s, a): x > 1
            b = first_not_above(t, 0.0, a, end)  # [a, b): 0 < x <= 1
        else:
            a, b = first_not_above_both(t, s, end)
        ha, _ = hidden_in(s, a)
        hb, zh = hidden_in(a, b)
        u = a - s - ha
        ns = b - a - hb
        # sum over the free entries of d = z - theta from prefix sums of the clipped,
        # anchored scores (approximate: the exact sum is taken once the segment is found)
        sd = (pre_ref[b] - pre_ref[a] - zh) + ns.astype(jnp.float32) * (anchor - theta)
        f = u.astype(jnp.float32) + sd - ns.astype(jnp.float32) * t
        ib = last_visible(a, b)
        ia = last_visible(s, a)
        nb = jnp.minimum(jnp.where(ns > 0, z_ref[jnp.maximum(ib, 0)] - theta, inf),
                         jnp.where(u > 0, (z_ref[jnp.maximum(ia, 0)] - theta) - 1.0, inf))
        return f, ns, sd, u, nb, a, b

    def iterate(stats, st, it_max):
        """solve_shifted_threshold's safeguarded Newton / bisection on the given statistics."""
        def cond(st):
            return (st[0] < it_max) & (jnp.sum(jnp.where(st[7], 0, 1)) > 0)

        def body(st):
            it, lo, hi, ns, sd, u, nb, done, tau, a, b = st
            den = jnp.where(ns > 0, ns, 1).astype(jnp.float32)
            tc = jnp.where(ns > 0, (sd + u.astype(jnp.float32) - kf) / den, lo)
            # the root lies on [lo, nb]: the closed form of that segment is exact; a collapsed
            # bracket holds it to rounding (a root within rounding of a breakpoint whose
            # closed form lands past nb would otherwise run all it_max steps)
            ok = jnp.where(ns > 0, tc <= nb, u == k) | (hi - lo <= tol)
            tau = jnp.where(ok & ~done, jnp.clip(tc, lo, hi), tau)
            done = done | ok
            newton = (ns > 0) & (tc > lo) & (tc < hi)
            split = jnp.where(newton, tc, 0.5 * (lo + hi))
            f2, ns2, sd2, u2, nb2, a2, b2 = stats(split)
            move = (f2 >= kf) & ~done
            lo = jnp.where(move, split, lo)
            hi = jnp.where(~move & ~done, split, hi)
            pick = lambda x, y: jnp.where(move, x, y)  # noqa: E731
            return (it + 1, lo, hi, pick(ns2, ns), pick(sd2, sd), pick(u2, u), pick(nb2, nb), done, tau,
                    pick(a2, a), pick(b2, b))

        return lax.while_loop(cond, body, st)

    lo = jnp.full((bq,), -1.0, jnp.float32)
    _, ns, sd, u, nb, a, b = cheap_stats(lo)
    st = (jnp.int32(0), lo, zeros_f, ns, sd, u, nb, ~act, zeros_f, a, b)
    it1, lo, hi, ns, sd, u, nb, done, _, a, b = iterate(cheap_stats, st, max_passes)

    # ---- exact closed form of the located segment: one pass over the free ranges ----
    def exact_sum(c, acc):
        m0 = pl.multiple_of(c * chunk, chunk)
        z = z_ref[pl.ds(m0, chunk)]
        tin = tin_ref[pl.ds(m0, chunk)]
        m = m0 + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        free = (m >= a[:, None]) & (m < b[:, None]) & (tin[None, :] <= row[:, None])
        return acc + jnp.sum(jnp.where(free, z[None, :] - theta[:, None], 0.0), axis=1)

    need = act & (ns > 0)
    c0 = jnp.min(jnp.where(need, a, big)) // chunk
    c1 = (jnp.max(jnp.where(need, b, 0)) + chunk - 1) // chunk
    sd = lax.fori_loop(c0, c1, exact_sum, zeros_f)
    den = jnp.where(ns > 0, ns, 1).astype(jnp.float32)
    tc = jnp.where(ns > 0, (sd + u.astype(jnp.float32) - kf) / den, lo)
    # the cheap search's bracket may be off where its approximate f was within rounding of k, so
    # accept the exact closed form only inside its own segment [pb, nb] (pb: the largest
    # breakpoint <= lo, where the free / upper sets of lo begin)
    ja = first_visible(a, end)
    jb = first_visible(b, end)
    pb = jnp.maximum(jnp.where(jb < end, z_ref[jnp.clip(jb, 0, z_ref.shape[0] - 1)] - theta, ninf),
                     jnp.where(ja < end, (z_ref[jnp.clip(ja, 0, z_ref.shape[0] - 1)] - theta) - 1.0, ninf))
    pb = jnp.maximum(pb, -1.0)
    ok = done & jnp.where(ns > 0, (tc <= nb) & (tc >= pb), u == k)
    tau = jnp.where(ns > 0, jnp.clip(tc, pb, nb), lo)

    # ---- rows the cheap search could not settle (rounding at a breakpoint, scores too far from
    # the anchor for the clipped prefix sums, max_passes): the exact iteration, one pass over the
    # candidates per step, from the cheap bracket if exact sums confirm it, else from [-1, 0] ----
    def exact_stats(t):
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

        c0 = jnp.min(jnp.where(act, s, big)) // chunk
        c1 = (jnp.max(jnp.where(act, end, 0)) + chunk - 1) // chunk
        out = lax.fori_loop(c0, c1, body, (zeros_f, zeros_i, zeros_f, zeros_i, jnp.full((bq,), inf)))
        return (*out, zeros_i, zeros_i)

    redo = act & ~ok

    def fallback(_):
        # start from the cheap search's bracket where exact sums confirm that it holds the root
        # (f(lo) >= k > f(hi); the rows here mostly have a root within rounding of a breakpoint,
        # and the narrow bracket ends them in a few passes), else from the full bracket [-1, 0]
        f_l, ns0, sd0, u0, nb0, _, _ = exact_stats(lo)
        f_h = exact_stats(hi)[0]
        held = (f_l >= kf) & (f_h < kf)
        lo0 = jnp.where(held, lo, -1.0)
        hi0 = jnp.where(held, hi, 0.0)
        widen = jnp.sum(jnp.where(redo & ~held, 1, 0)) > 0
        ns0, sd0, u0, nb0 = lax.cond(widen, lambda _: exact_stats(lo0)[1:5], lambda _: (ns0, sd0, u0, nb0), None)
        st = (jnp.int32(0), lo0, hi0, ns0, sd0, u0, nb0, ~redo, zeros_f, zeros_i, zeros_i)
        it2, lo2, hi2, ns2, sd2, u2, _, done2, tau2, _, _ = iterate(exact_stats, st, max_passes)
        # rows cut off by max_passes: the best closed form inside the bracket
        den = jnp.where(ns2 > 0, ns2, 1).astype(jnp.float32)
        tc2 = jnp.where(ns2 > 0, (sd2 + u2.astype(jnp.float32) - kf) / den, lo2)
        return jnp.where(done2, tau2, jnp.clip(tc2, lo2, hi2)), it2 + 2 + widen.astype(jnp.int32)

    any_redo = jnp.sum(jnp.where(redo, 1, 0)) > 0
    tau2, it2 = lax.cond(any_redo, fallback, lambda _: (tau, it1 * 0), None)  # (a traced 0: Triton's yield)
    tau = jnp.where(redo, tau2, tau)
    tau_ref[...] = jnp.where(act, tau, 0.0)
    if passes_ref:  # (cheap search steps, exact passes of the fallback) of this program
        passes_ref[0][...] = jnp.where(local == 0, it1 + 1, it2)


def _walk_kernel(*refs, k, chunk, start_steps, cap=None, free_start="walk"):
    """One list, its queries in order: each threshold from the previous one by a walk over the
    breakpoints (see list_threshold's ``algorithm="walk"``).

    With ``cap`` (C, :func:`list_select`) the kernel also derives each query's structure from
    its run range [s, e) instead of reading it: the visible count and the k-th, C-th and
    (C + 1)-th visible entries, kept as pointers that move by one visible entry when a key
    enters (a fresh vector pass where a range begins), and after the solve the free range
    [free_lo, free_hi) and free count under the dense VJP's rounding, and the entry that takes
    tau's cotangent in rows without a free set.

    The state of a query's solve, for its range [s, end) of the list at t (scores anchored at
    the range's first theta, y = z - anchor): ``a`` / ``b`` the first index whose entry is not
    above t + 1 / not above t (z is non-increasing on the range, so [s, a) is the upper set and
    [a, b) the free set, whether or not an entry is visible yet), ``u`` / ``ns`` the visible
    entries of the two sets and ``S`` (+ its compensation ``c``) the sum of y over the visible
    free ones. Then f(t) = u + S - ns t, and between the nearest breakpoints the root is
    (S + u - k) / ns.
    """
    if cap is None:
        z_ref, tin_ref, s_ref, last_ref, act_ref, theta_ref, spos_ref, tau_ref, *steps_ref = refs
    else:
        z_ref, tin_ref, s_ref, e_ref, spos_ref, tau_ref, *int_refs = refs
        steps_ref = int_refs[8:]
    bq = s_ref.shape[0]
    mp = z_ref.shape[0]
    local = lax.broadcasted_iota(jnp.int32, (bq,), 0)
    kf = jnp.float32(k)
    inf = jnp.float32(jnp.inf)
    ninf = jnp.float32(-jnp.inf)  # a literal: Triton's lowering cannot negate constants
    zero_f = jnp.float32(0.0)
    one_i = jnp.int32(1)
    zero_i = jnp.int32(0)

    def z_at(m):
        return z_ref[jnp.clip(m, 0, mp - 1)]

    def seen(m, i):  # entry m is visible to query i (its range aside)
        return tin_ref[jnp.clip(m, 0, mp - 1)] <= i

    def count(x):
        return jnp.where(x, one_i, zero_i)

    def add(S, c, x):
        """S + x with Neumaier's compensation c: the walk adds and removes ~a thousand scores
        per list (plain float32 sums drifted 1.3e-5 from the XLA solver on the layer's lists)."""
        s2 = S + x
        c = c + jnp.where(jnp.abs(S) >= jnp.abs(x), (S - s2) + x, (x - s2) + S)
        return s2, c

    def root(u, ns, S, c):
        return ((S + c) + u.astype(jnp.float32) - kf) / jnp.maximum(ns, 1).astype(jnp.float32)

    def start(i, s_i, end, anchor):
        """The state at a t with f(t) >= k near the root: safeguarded Newton steps from t = -1
        (f(-1) >= k: the k visible entries >= theta count 1 each) with f(0) < k, each one pass
        over the range that also counts the pointers."""
        def stats(t):
            def body(c, acc):
                u, ns, S, na, nb = acc
                m0 = pl.multiple_of(c * chunk, chunk)
                y = z_ref[pl.ds(m0, chunk)] - anchor
                m = m0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
                inside = (m >= s_i) & (m < end)
                vis = inside & (tin_ref[pl.ds(m0, chunk)] <= i)
                x = y - t
                up = inside & (x > 1.0)
                free = inside & (x > 0.0) & ~up
                return (u + jnp.sum((vis & up).astype(jnp.int32)), ns + jnp.sum((vis & free).astype(jnp.int32)),
                        S + jnp.sum(jnp.where(vis & free, y, 0.0)), na + jnp.sum(up.astype(jnp.int32)),
                        nb + jnp.sum((up | free).astype(jnp.int32)))

            u, ns, S, na, nb = lax.fori_loop(s_i // chunk, (end + chunk - 1) // chunk, body,
                                             (zero_i, zero_i, zero_f, zero_i, zero_i))
            return t, s_i + na, s_i + nb, u, ns, S, zero_f * t

        def newton(_, carry):
            lo, hi = carry
            _, _, _, u, ns, S, c = lo
            tn = root(u, ns, S, c)  # the root of lo's segment, extended
            t = jnp.where((ns > 0) & (tn > lo[0]) & (tn < hi), tn, 0.5 * (lo[0] + hi))
            st = stats(t)
            move = st[3].astype(jnp.float32) + st[5] - st[4].astype(jnp.float32) * t >= kf
            return jax.tree.map(lambda x, y: jnp.where(move, x, y), st, lo), jnp.where(move, hi, t)

        lo = stats((s_i * 0).astype(jnp.float32) - 1.0)  # (traced: Triton's scf.yield takes no constants)
        return lax.fori_loop(0, start_steps, newton, (lo, lo[0] * 0.0))[0]

    def advance(i, s_i, end_old, end, anchor, st):
        """From query i - 1's state to query i's before its solve: the range end moves (the
        candidate cap: entries leave or join at the end) and the key entering at i appears."""
        t, a, b, u, ns, S, c = st

        def leave(m, st):  # entry m of [end, end_old) leaves (counted if query i - 1 saw it)
            a, b, u, ns, S, c = st
            vis = seen(m, i - 1)
            up = vis & (m < a)
            free = vis & (m >= a) & (m < b)
            return (a, b, u - count(up), ns - count(free), *add(S, c, jnp.where(free, anchor - z_at(m), zero_f)))

        a, b, u, ns, S, c = lax.fori_loop(end, end_old, leave, (a, b, u, ns, S, c))
        a, b = jnp.minimum(a, end), jnp.minimum(b, end)

        def join(m, st):  # entries of [end_old, end) in order: upper / free while above t + 1 / t
            a, b, u, ns, S, c = st
            y = z_at(m) - anchor
            vis = seen(m, i)
            up = (a == m) & (y - t > 1.0)
            free = ~up & (b == m) & (y - t > 0.0)
            return (a + count(up), b + count(up | free), u + count(up & vis), ns + count(free & vis),
                    *add(S, c, jnp.where(free & vis, y, zero_f)))

        a, b, u, ns, S, c = lax.fori_loop(end_old, end, join, (a, b, u, ns, S, c))
        # the key entering at query i (if inside the range it had and keeps)
        p = spos_ref[i] if cap is None else at(spos_v, i)
        enter = (p >= s_i) & (p < jnp.minimum(end_old, end))
        up = enter & (p < a)
        free = enter & (p >= a) & (p < b)
        return (t, a, b, u + count(up), ns + count(free), *add(S, c, jnp.where(free, z_at(p) - anchor, zero_f)))

    def solve(i, s_i, end, anchor, st):
        """Walk from t to the root over the breakpoints (right if f(t) >= k, else left); each
        step either stops inside the current segment or moves one entry between the sets."""
        t, a, b, u, ns, S, c = st
        right = u.astype(jnp.float32) + (S + c) - ns.astype(jnp.float32) * t >= kf

        def go_right(st):
            t, a, b, u, ns, S, c, n, _ = st
            za = z_at(a - 1) - anchor  # the lowest upper entry turns free at t = za - 1
            zb = z_at(b - 1) - anchor  # the lowest free entry leaves at t = zb
            ta = jnp.where(a > s_i, za - 1.0, inf)
            tb = jnp.where(b > a, zb, inf)
            nb = jnp.minimum(ta, tb)
            tr = root(u, ns, S, c)
            # ns = 0: f = u, flat (u = k) or past it. A root at nb itself crosses it: a flat piece
            # may follow, whose right end is the solvers' convention (see query below)
            stop = jnp.where(ns > 0, tr < nb, u <= k)
            cross_b = ~stop & (tb <= ta)
            cross_a = ~stop & ~(tb <= ta)
            vb = cross_b & seen(b - 1, i)
            va = cross_a & seen(a - 1, i)
            t = jnp.where(stop, jnp.where(ns > 0, jnp.maximum(tr, t), t), nb)
            S, c = add(S, c, jnp.where(va, za, jnp.where(vb, -zb, zero_f)))
            return (t, a - count(cross_a), b - count(cross_b), u - count(va), ns - count(vb) + count(va),
                    S, c, n + 1, stop)

        def go_left(st):
            t, a, b, u, ns, S, c, n, _ = st
            za = z_at(a) - anchor  # the highest free entry turns upper below t = za - 1
            zb = z_at(b) - anchor  # the highest entry below joins the free set below t = zb
            ta = jnp.where(a < b, za - 1.0, ninf)
            tb = jnp.where(b < end, zb, ninf)
            pb = jnp.maximum(ta, tb)
            tr = root(u, ns, S, c)
            # ns = 0: f = u, flat where u = k (or no entry left of t: cannot happen)
            stop = jnp.where(ns > 0, tr >= pb, (u == k) | (pb == ninf))
            cross_b = ~stop & (tb >= ta)
            cross_a = ~stop & ~(tb >= ta)
            vb = cross_b & seen(b, i)
            va = cross_a & seen(a, i)
            t = jnp.where(stop, jnp.where(ns > 0, jnp.minimum(tr, t), t), pb)
            S, c = add(S, c, jnp.where(vb, zb, jnp.where(va, -za, zero_f)))
            return (t, a + count(cross_a), b + count(cross_b), u + count(va), ns + count(vb) - count(va),
                    S, c, n + 1, stop)

        init = (t, a, b, u, ns, S, c, a * 0, a < 0)  # (traced: Triton's scf.yield)
        out = lax.cond(right, lambda s: lax.while_loop(lambda s: ~s[-1], go_right, s),
                       lambda s: lax.while_loop(lambda s: ~s[-1], go_left, s), init)
        return out[:7], out[7]

    def at(vec, i):  # element i of a [bq] vector (a few shuffles: no dependent load in the walk)
        return jnp.sum(jnp.where(local == i, vec, jnp.zeros_like(vec)))

    zeros_i = jnp.zeros((bq,), jnp.int32)
    if cap is not None:
        s_v = s_ref[...]
        spos_v = spos_ref[...]
        # ---- each query's structure: pointers that follow the entering keys (one round of
        # loads per query, mostly), computed around the previous query's walk ----
        e_v = e_ref[...]
        jv = lax.broadcasted_iota(jnp.int32, (4,), 0)
        targets = jnp.where(jv == 0, k, jnp.where(jv == 1, cap, cap + 1))  # k, C, C + 1 (and a spare)

        def pick(P, j):
            return jnp.sum(jnp.where(jv == j, P, 0))

        def struct_start(i, s_i, e_i):
            """Visible count, last visible entry and the targets' entries of query i's range
            [s, e): one vector pass (counts by cumulative sums), -1 where none exists."""
            def body(c, acc):
                nv, lv, P = acc
                m0 = pl.multiple_of(c * chunk, chunk)
                m = m0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
                vis = (m >= s_i) & (m < e_i) & (tin_ref[pl.ds(m0, chunk)] <= i)
                vi = vis.astype(jnp.int32)
                cs = nv + jnp.cumsum(vi)
                hit = vis[None, :] & (cs[None, :] == targets[:, None])
                P = jnp.maximum(P, jnp.max(jnp.where(hit, m[None, :], -1), axis=1))
                return nv + jnp.sum(vi), jnp.maximum(lv, jnp.max(jnp.where(vis, m, -1))), P

            init = (zero_i, zero_i - 1, targets * 0 - 1)
            return lax.fori_loop(s_i // chunk, (e_i + chunk - 1) // chunk, body, init)

        def struct_a(i, s_i, e_i, nv, lv, P):
            """Query i's structure from query i - 1's (same range), first half: the key entering
            at i (if in the range) is one more visible entry; a target's entry behind it moves
            to the previous visible entry (the loads that tell whether that one is still hidden
            from i are issued here, read in struct_b); one may appear. Scalar code (one lane's
            work: ~32 one-warp programs share an SM)."""
            p = at(spos_v, i)
            enter = (p >= s_i) & (p < e_i)
            nv1 = nv + count(enter)
            lv1 = jnp.where(enter, jnp.maximum(lv, p), lv)

            def update(P, j):
                exists = nv >= j
                move = enter & exists & (p < P)
                P = jnp.where(enter & ~exists & (nv1 == j), lv1, P)
                return jnp.where(move, P - 1, P), move

            (pk, mk), (pc, mc), (pd, md) = update(P[0], k), update(P[1], cap), update(P[2], cap + 1)
            raw = tuple(tin_ref[jnp.clip(m, 0, mp - 1)] for m in (pk, pc, pd))
            return nv1, lv1, (pk, pc, pd), (mk, mc, md), raw

        def struct_b(i, P, move, raw):
            """Second half: pointers that landed on a hidden entry step on (rare)."""
            def hidden(m, move):
                return move & (tin_ref[jnp.clip(m, 0, mp - 1)] > i)

            def back(c):
                pk, pc, pd, hk, hc, hd = c
                pk, pc, pd = pk - count(hk), pc - count(hc), pd - count(hd)
                return pk, pc, pd, hidden(pk, hk), hidden(pc, hc), hidden(pd, hd)

            flags = tuple(m & (r > i) for m, r in zip(move, raw))
            return lax.while_loop(lambda c: c[3] | c[4] | c[5], back, (*P, *flags))[:3]

        def struct_fresh(i, s_i, e_i):
            nv, lv, Pv = struct_start(i, s_i, e_i)
            return nv, lv, (pick(Pv, 0), pick(Pv, 1), pick(Pv, 2))

        def derive(s_i, nv, lv, P):
            """(kpos, last, nxt): the min(nvis, k)-th, min(nvis, C)-th, (C + 1)-th visible entry."""
            none = nv <= 0
            return (jnp.where(none, s_i - 1, jnp.where(nv >= k, P[0], lv)),
                    jnp.where(none, s_i - 1, jnp.where(nv >= cap, P[1], lv)), jnp.where(nv > cap, P[2], -1))

        s0, e0 = at(s_v, 0), at(e_v, 0)
        nv0, lv0, P0 = struct_fresh(zero_i, s0, e0)
        cur0 = (s0, e0, nv0, lv0, P0, z_at(derive(s0, nv0, lv0, P0)[0]))

    def query(i, carry):
        valid, s_prev, end_prev, anchor, st, tau, steps, starts, ends, cur, outs = carry
        if cap is None:
            s_i = s_ref[i]
            end = last_ref[i] + 1
            act = act_ref[i] != 0
            theta = theta_ref[i]
        else:
            # query i's structure came with the carry; query i + 1's is computed around the
            # walk of query i (its loads issued before, read after): its latency hides in the walk's
            s_i, e_i, nv, lv, P, theta = cur
            kpos, last, nxt = derive(s_i, nv, lv, P)
            act = nv > k
            end = last + 1
            j = jnp.minimum(i + 1, bq - 1)
            s_n, e_n = at(s_v, j), at(e_v, j)
            nv1, lv1, P1, move, raw = struct_a(j, s_n, e_n, nv, lv, P)
        fresh = act & ~(valid & (s_i == s_prev))
        anchor = jnp.where(fresh, theta, anchor)

        def work(st):
            st = lax.cond(fresh, lambda st: start(i, s_i, end, anchor),
                          lambda st: advance(i, s_i, end_prev, end, anchor, st), st)
            return solve(i, s_i, end, anchor, st)

        st, n = lax.cond(act, work, lambda st: (st, st[1] * 0), st)  # (a traced 0: Triton's yield)
        # a flat root (no free entry: exactly k at 1) is not unique: the solvers' convention is
        # its right end, t = -1 (tau = theta - 1, which moves with the k-th entry)
        t = jnp.where(st[4] > 0, st[0] - (theta - anchor), -1.0)
        tau = jnp.where(local == i, jnp.where(act, t, 0.0), tau)
        if cap is not None:
            # the walk's pointers at the root (a, b, ns), for the free ranges; the structure
            ends = tuple(jnp.where(local == i, v, o) for v, o in zip((st[1], st[2], st[4]), ends))
            outs = tuple(jnp.where(local == i, v, o) for v, o in zip((kpos, last, nxt, nv), outs))
            same = (s_n == s_i) & (e_n == e_i)
            nv_n, lv_n, P_n = lax.cond(same, lambda _: (nv1, lv1, struct_b(j, P1, move, raw)),
                                       lambda _: struct_fresh(j, s_n, e_n), None)
            cur = (s_n, e_n, nv_n, lv_n, P_n, z_at(derive(s_n, nv_n, lv_n, P_n)[0]))
        return act, s_i, end, anchor, st, tau, steps + n, starts + count(fresh), ends, cur, outs

    st0 = (zero_f, zero_i, zero_i, zero_i, zero_i, zero_f, zero_f)
    keep = cap is not None
    carry = (jnp.bool_(False), zero_i, zero_i, zero_f, st0, jnp.zeros((bq,), jnp.float32), zero_i, zero_i,
             (zeros_i,) * 3 if keep else (), cur0 if keep else (), (zeros_i,) * 4 if keep else ())
    _, _, _, _, _, tau, steps, starts, ends, _, outs = lax.fori_loop(0, bq, query, carry)
    tau_ref[...] = tau
    if cap is not None:
        kpos_v, lastv_v, nxt_v, nvis_v = outs
        end_v = lastv_v + 1
        act_v = nvis_v > k
        theta_v = jnp.where(act_v, z_ref[jnp.clip(kpos_v, 0, mp - 1)], 0.0)
        # ---- free ranges under the dense VJP's rounding, all rows at once: x = (z - theta) -
        # tau_s, upper x >= 1, free 0 < x < 1. The walk's sets (y - t > 1 and > 0 of anchored
        # scores) differ at ties with the bounds and by rounding: a few entries at most ----
        a_v, b_v, ns_v = ends
        if free_start != "walk":  # (tests: the fix-up from the range's start or end, every entry a step)
            a_v = b_v = s_v if free_start == "range_start" else end_v
            ns_v = zeros_i

        def xv(m):
            return (z_ref[jnp.clip(m, 0, mp - 1)] - theta_v) - tau

        def vis(m):
            return tin_ref[jnp.clip(m, 0, mp - 1)] <= local

        def fa_step(c):
            a, ns, _ = c
            left = act_v & (a > s_v) & (xv(a - 1) < 1.0)
            right = act_v & ~left & (a < end_v) & (xv(a) >= 1.0)
            ns = ns + jnp.where(left & vis(a - 1), 1, 0) - jnp.where(right & (a < b_v) & vis(a), 1, 0)
            return a - jnp.where(left, 1, 0) + jnp.where(right, 1, 0), ns, jnp.sum(jnp.where(left | right, 1, 0)) > 0

        fa, ns1, _ = lax.while_loop(lambda c: c[2], fa_step, (a_v, ns_v, jnp.sum(a_v) >= 0))

        def fb_step(c):
            b, ns, _ = c
            left = act_v & (b > fa) & (xv(b - 1) <= 0.0)
            right = act_v & ~left & (b < end_v) & (xv(b) > 0.0)
            ns = ns - jnp.where(left & vis(b - 1), 1, 0) + jnp.where(right & vis(b), 1, 0)
            return b - jnp.where(left, 1, 0) + jnp.where(right, 1, 0), ns, jnp.sum(jnp.where(left | right, 1, 0)) > 0

        # (fa past b: the walk's free entries all left on the way, ns1 = 0)
        fb, nf, _ = lax.while_loop(lambda c: c[2], fb_step, (jnp.maximum(b_v, fa), ns1, jnp.sum(a_v) >= 0))
        fa, fb, nf = jnp.where(act_v, fa, s_v), jnp.where(act_v, fb, s_v), jnp.where(act_v, nf, 0)
        # rows without a free set: the first visible entry equal to tau's target (the k-th
        # visible entry's score, or the minimum where the row keeps everything)
        need = (act_v & (nf == 0)) | (~act_v & (nvis_v > 0))
        p0 = jnp.where(act_v, kpos_v, lastv_v)
        target = z_ref[jnp.clip(p0, 0, mp - 1)]

        def tie_left(m):
            return need & (m > s_v) & (z_ref[jnp.clip(m - 1, 0, mp - 1)] <= target)

        m = lax.while_loop(lambda m: jnp.sum(jnp.where(tie_left(m), 1, 0)) > 0,
                           lambda m: m - jnp.where(tie_left(m), 1, 0), p0)
        m = lax.while_loop(lambda m: jnp.sum(jnp.where(need & ~vis(m), 1, 0)) > 0,
                           lambda m: m + jnp.where(need & ~vis(m), 1, 0), m)
        for ref, val in zip(int_refs[:8], (kpos_v, lastv_v, nxt_v, nvis_v, fa, fb, nf, jnp.where(need, m, -1))):
            ref[...] = val
    if steps_ref:  # (walk steps, fresh starts) of this list in its first two entries
        steps_ref[0][...] = jnp.where(local == 0, steps, jnp.where(local == 1, starts, 0))


def _search_steps(n: int, arity: int) -> int:
    """Steps that close any index interval of length <= n (binary: the first_not_above loop)."""
    if arity == 2:
        return n.bit_length() + 1
    steps = 0
    while n > 0:  # an arity-ary step leaves at most ceil(n / arity) - [n < arity] entries
        n = 0 if n < arity else -(-n // arity)
        steps += 1
    return steps


def _check_lists(z, tin):
    """(rows, M) of the list scores z and entry times tin, or a ValueError."""
    if z.ndim != 2 or z.dtype != jnp.float32:
        raise ValueError(f"z must be float32 [rows, M], got {z.dtype} {z.shape}")
    n, m = z.shape
    if tin.shape != (n, m) or tin.dtype != jnp.int32:
        raise ValueError(f"tin must be int32 {(n, m)}, got {tin.dtype} {tin.shape}")
    return n, m


def _check(z, tin, s, last, active, theta, k):
    n, m = _check_lists(z, tin)
    bq = s.shape[-1]
    for name, a, dt in (("s", s, jnp.int32), ("last", last, jnp.int32), ("theta", theta, jnp.float32)):
        if a.shape != (n, bq) or a.dtype != dt:
            raise ValueError(f"{name} must be {jnp.dtype(dt).name} {(n, bq)}, got {a.dtype} {a.shape}")
    if active.shape != (n, bq) or active.dtype != jnp.bool_:
        raise ValueError(f"active must be bool {(n, bq)}, got {active.dtype} {active.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def list_threshold(z, tin, s, last, active, theta, *, k: int, chunk: int = 64, num_warps: int | None = None,
                   max_passes: int = 64, clip: float = 8.0, interpret: bool = False,
                   return_passes: bool = False, rows_per_program: int | None = None,
                   search_arity: int | None = None, algorithm: str = "walk", start_steps: int = 3,
                   spos: jax.Array | None = None) -> jax.Array:
    """tau - theta of every query of every list: float32 [rows, block_q].

    Args:
      z: float32 [rows, M] list scores (any value where no row can see them).
      tin: int32 [rows, M] the query index at which each entry becomes visible (-1: always;
        block_q or more: never); at most one entry of a list per query index (one key
        enters the prefix per query).
      s, last: int32 [rows, block_q] each query's candidate range [s, last] of the list (any
        block_q; the kernel pads it to a power of two >= 16).
      active: bool [rows, block_q] rows to solve: more than k visible entries, so the root
        lies in [-1, 0); inactive rows return 0.
      theta: float32 [rows, block_q] each query's k-th visible score (the shift).
      k: the budget. chunk: list entries per on-chip step (a power of two).
      num_warps: per program (None: 1 for "walk", 4 for "search").
      interpret: run in Pallas interpret mode (CPU tests).
      clip: the cheap search's prefix sums use scores anchored at the block's mean threshold and
        clipped to [-clip, clip]; rows whose threshold lies farther than clip - 1 from it are
        solved by the exact fallback.
      return_passes: also return int32 [rows] the cheap search's steps and int32 [rows] the
        exact fallback's passes over the list (0: not needed) of each list (the most over its
        programs).
      rows_per_program: split each list's queries over programs of this many rows (a power of
        two >= 16 dividing the padded block; None: 16). Smaller programs hold smaller
        [rows, block_q] correction tiles: the kernel is latency-bound and its occupancy register-bound
        (ncu, H100, 64-row programs of 4 warps: 255 registers per thread, 2 programs per SM), so
        more, smaller programs hide the loads' latency better, although each passes over
        the whole list. Results are the same to rounding. On the layer's lists at 32k (block_q 64,
        threshold_layer_lists_arity{,2}.json): 64 / 32 / 16 rows per program 5.85 / 4.56 / 4.84 ms
        with binary searches, 3.51 / 3.30 / 2.27 ms with 8-ary ones.
      search_arity: the cheap search's index searches probe this many - 1 points per step (None:
        8; a power of two; 2: binary searches, one after the other; more: both searches at once,
        log_arity(M) dependent steps instead of 2 log2(M)). The same indices whatever the arity
        (the thresholds may differ by float rounding: the compiled reductions differ). 64-row
        programs on the layer's lists at 32k: arity 2 / 4 / 8 / 16 / 32: 5.85 / 3.05 / 3.51 /
        5.93 / 11.30 ms (wider probes cost registers).
      algorithm: "walk" (default: one program per list takes its queries in order and moves
        each root from the previous query's across the breakpoints between them; see the
        module docstring) or "search" (the cheap search and its exact fallback, every query on
        its own). With "walk", chunk is the start passes' width, ``rows_per_program`` and
        ``search_arity`` must stay None, ``clip`` and ``max_passes`` do not apply, and
        ``return_passes`` returns each list's walk steps and fresh starts instead.
      spos: optional int32 [rows, block_q]: the list index of the entry that enters at each
        query (tin[spos] = query; M or more: none), when the caller has it (the selection
        does); else found from tin by a scatter.
      start_steps: "walk" only: the safeguarded Newton steps (one pass over the list each) that
        take a range's first query from t = -1 towards its root before the walk finishes it.
    """
    _check(z, tin, s, last, active, theta, k)
    if chunk & (chunk - 1) or chunk < 16:
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if algorithm not in ("search", "walk"):
        raise ValueError(f"algorithm must be 'search' or 'walk', got {algorithm!r}")
    if spos is not None and (spos.shape != s.shape or spos.dtype != jnp.int32):
        raise ValueError(f"spos must be int32 {s.shape}, got {spos.dtype} {spos.shape}")
    if num_warps is None:
        num_warps = 1 if algorithm == "walk" else 4
    if algorithm == "walk" and (rows_per_program, search_arity) != (None, None):
        raise ValueError("rows_per_program and search_arity apply to algorithm='search' only")
    search_arity = 8 if search_arity is None else search_arity
    if algorithm == "walk":
        if isinstance(start_steps, bool) or not isinstance(start_steps, int) or start_steps < 0:
            raise ValueError(f"start_steps must be an int >= 0, got {start_steps!r}")
        return _list_threshold_walk(z, tin, s, last, active, theta, k=k, chunk=chunk, num_warps=num_warps,
                                    interpret=interpret, return_passes=return_passes, start_steps=start_steps,
                                    spos=spos)
    n, m = z.shape
    bq0 = s.shape[-1]
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with inactive rows
    if bq != bq0:
        pad = lambda a: jnp.pad(a, ((0, 0), (0, bq - bq0)))  # noqa: E731
        s, last, active, theta = pad(s), pad(last), pad(active), pad(theta)
    rp = 16 if rows_per_program is None else rows_per_program
    if isinstance(rp, bool) or not isinstance(rp, int) or rp < 16 or rp & (rp - 1) or bq % rp:
        raise ValueError(f"rows_per_program must be None or a power of two >= 16 dividing the padded "
                         f"block ({bq} rows), got {rows_per_program!r}")
    if isinstance(search_arity, bool) or not isinstance(search_arity, int) or search_arity < 2 \
            or search_arity & (search_arity - 1):
        raise ValueError(f"search_arity must be a power of two >= 2, got {search_arity!r}")
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M are beyond every row's range
        z = jnp.pad(z, ((0, 0), (0, mp - m)))
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    row_spec = pl.BlockSpec((None, rp), lambda r, h: (r, h))
    block_spec = pl.BlockSpec((None, bq), lambda r, h: (r, 0))  # the block's entering keys, every program
    list_spec = pl.BlockSpec((None, mp), lambda r, h: (r, 0))
    # the cheap search's prefix sums: scores anchored at the block's mean threshold and clipped
    # (free entries lie within 1 of their row's threshold; rows farther than clip - 1 from the
    # anchor are settled by the exact fallback)
    anchor = jnp.sum(jnp.where(active, theta, 0), 1) / jnp.maximum(jnp.sum(active, 1), 1)  # [n]
    seen = tin < bq
    zc = jnp.where(seen, jnp.clip(z - anchor[:, None], -clip, clip), 0.0)
    pre = jnp.concatenate([jnp.zeros((n, 1), jnp.float32), jnp.cumsum(zc, axis=1)], axis=1)
    pre = jnp.pad(pre, ((0, 0), (0, chunk - 1)))
    if spos is None:
        spos = _entering_positions(tin, bq)
    else:
        spos = jnp.minimum(spos, mp) if bq == bq0 else jnp.pad(jnp.minimum(spos, mp), ((0, 0), (0, bq - bq0)),
                                                                constant_values=mp)
    zent = jnp.where(spos < mp, jnp.take_along_axis(zc, jnp.minimum(spos, mp - 1), 1), 0.0)
    anc = jnp.broadcast_to(anchor[:, None], (n, bq))
    pre_spec = pl.BlockSpec((None, mp + chunk), lambda r, h: (r, 0))
    out_shape = [jax.ShapeDtypeStruct((n, bq), jnp.float32)]
    if return_passes:
        out_shape.append(jax.ShapeDtypeStruct((n, bq), jnp.int32))
    out = pl.pallas_call(
        functools.partial(_kernel, k=k, chunk=chunk, max_passes=max_passes,
                          search_steps=_search_steps(mp + 1, search_arity), clip=clip, arity=search_arity,
                          tol=4.0 * float(jnp.finfo(jnp.float32).eps)),  # = ops.sparsek.bracket_tolerance
        grid=(n, bq // rp),
        in_specs=[list_spec, list_spec, pre_spec] + [row_spec] * 5 + [block_spec] * 2,
        out_specs=[row_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_list_threshold",
    )(z, tin, pre, s, last, active.astype(jnp.int32), theta, anc, spos, zent)
    if return_passes:  # (steps, fallback passes) in the first two rows of each program
        return out[0][:, :bq0], jnp.max(out[1][:, 0::rp], 1), jnp.max(out[1][:, 1::rp], 1)
    return out[0][:, :bq0]


def _entering_positions(tin, bq: int):
    """spos int32 [n, bq]: the list index of the entry that enters at each query (M: none)."""
    n, mp = tin.shape
    ent = jnp.where((tin >= 0) & (tin < bq), tin, bq)  # [n, mp]: entering query of each entry
    return jnp.full((n, bq + 1), mp, jnp.int32).at[jnp.arange(n)[:, None], ent].min(
        jnp.broadcast_to(jnp.arange(mp, dtype=jnp.int32), (n, mp)))[:, :bq]


def _walk_call(lists, rows, *, int_outs, return_passes, name, num_warps, interpret, **kernel_kw):
    """_walk_kernel over one program per list: ``lists`` [n, M'] and ``rows`` [n, block_q] inputs;
    outputs float32 [n, block_q] thresholds, then ``int_outs`` int32 rows (and the walk counts)."""
    n, mp = lists[0].shape
    bq = rows[0].shape[-1]
    row_spec = pl.BlockSpec((None, bq), lambda r: (r, 0))
    list_spec = pl.BlockSpec((None, mp), lambda r: (r, 0))
    out_shape = [jax.ShapeDtypeStruct((n, bq), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct((n, bq), jnp.int32)] * (int_outs + int(return_passes))
    return pl.pallas_call(
        functools.partial(_walk_kernel, **kernel_kw),
        grid=(n,),
        in_specs=[list_spec] * len(lists) + [row_spec] * len(rows),
        out_specs=[row_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name=name,
    )(*lists, *rows)


def _list_threshold_walk(z, tin, s, last, active, theta, *, k, chunk, num_warps, interpret, return_passes,
                         start_steps, spos):
    n, m = z.shape
    bq0 = s.shape[-1]
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with inactive rows
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M are beyond every row's range
        z = jnp.pad(z, ((0, 0), (0, mp - m)))
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    spos = _entering_positions(tin, bq0) if spos is None else jnp.minimum(spos, m)
    if bq != bq0:
        pad = lambda a, v=0: jnp.pad(a, ((0, 0), (0, bq - bq0)), constant_values=v)  # noqa: E731
        s, last, active, theta, spos = pad(s), pad(last), pad(active), pad(theta), pad(spos, m)
    out = _walk_call((z, tin), (s, last, active.astype(jnp.int32), theta, spos), int_outs=0,
                     return_passes=return_passes, name="sparsek_list_threshold_walk", num_warps=num_warps,
                     interpret=interpret, k=k, chunk=chunk, start_steps=start_steps)
    if return_passes:
        return out[0][:, :bq0], out[1][:, 0], out[1][:, 1]
    return out[0][:, :bq0]


class ListSelect(NamedTuple):
    """What :func:`list_select` returns per list and query (int32 [rows, block_q] unless noted).

    tau_s: float32, tau - theta (0 where the query keeps every visible entry); kpos / last /
    nxt: list index of the k-th, min(nvis, C)-th and (C + 1)-th visible entry (kpos holds the
    last visible one where nvis < k; s - 1 where nvis = 0; nxt -1 where nvis <= C); nvis: the
    visible entries; free_lo, free_hi, n_free: the free range and its visible entries under
    the dense VJP's rounding (free_lo = free_hi = s, n_free = 0 for rows that keep
    everything); first: the first visible entry equal to tau's target in rows without a free
    set (kpos's score for solved rows, the minimum for the others; -1 in rows with a free set
    or nothing visible).
    """

    tau_s: jax.Array
    kpos: jax.Array
    last: jax.Array
    nxt: jax.Array
    nvis: jax.Array
    free_lo: jax.Array
    free_hi: jax.Array
    n_free: jax.Array
    first: jax.Array


def list_select(z, tin, s, e, spos, *, k: int, cap: int, chunk: int = 64, num_warps: int = 1,
                start_steps: int = 3, interpret: bool = False, return_passes: bool = False,
                _free_start: str = "walk"):
    """The walk of ``list_threshold`` that also derives each query's structure (one program per
    list, its queries in order): :class:`ListSelect`.

    Args:
      z, tin: as :func:`list_threshold` (float32 / int32 [rows, M]).
      s, e: int32 [rows, block_q] each query's run range [s, e) of the list (s = e: the query
        sees nothing, e.g. padding).
      spos: int32 [rows, block_q] the list index of the entry entering at each query (M or
        more: none); it must agree with tin (tin[spos[t]] = t, and every entry with 0 <= tin <
        block_q is some spos): the structure's pointers skip hidden entries by it.
      k: the budget; cap: C, the candidate cap (int >= k): query i's candidates are its first
        min(nvis, C) visible entries.
      chunk, num_warps, start_steps, interpret: as :func:`list_threshold` (walk).
      return_passes: also return each list's walk steps and fresh starts (int32 [rows] each).
      _free_start: tests only: "range_start" / "range_end" start the free ranges' fix-up from
        the range's start / end instead of the walk's pointers (same results, every entry a step).

    Where the selection's XLA passes computed the visible counts and the k-th / C-th / (C+1)-th
    visible entries with [block_q, block_q] arrays, and the threshold's VJP re-derived the free
    ranges by binary searches, this kernel keeps them as pointers while it walks.
    """
    n, m = _check_lists(z, tin)
    bq0 = s.shape[-1]
    for name, a in (("s", s), ("e", e), ("spos", spos)):
        if a.shape != (n, bq0) or a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 {(n, bq0)}, got {a.dtype} {a.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < k:
        raise ValueError(f"cap must be an int >= k={k}, got {cap!r}")
    if chunk & (chunk - 1) or chunk < 16:
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if isinstance(start_steps, bool) or not isinstance(start_steps, int) or start_steps < 0:
        raise ValueError(f"start_steps must be an int >= 0, got {start_steps!r}")
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with empty rows
    mp = -(-m // chunk) * chunk
    if mp != m:  # entries past M are beyond every row's range
        z = jnp.pad(z, ((0, 0), (0, mp - m)))
        tin = jnp.pad(tin, ((0, 0), (0, mp - m)), constant_values=bq)
    spos = jnp.minimum(spos, m)
    if bq != bq0:
        pad = lambda a, v=0: jnp.pad(a, ((0, 0), (0, bq - bq0)), constant_values=v)  # noqa: E731
        s, e, spos = pad(s), pad(e), pad(spos, m)
    out = _walk_call((z, tin), (s, e, spos), int_outs=8, return_passes=return_passes, name="sparsek_list_select",
                     num_warps=num_warps, interpret=interpret, k=k, chunk=chunk, start_steps=start_steps, cap=cap,
                     free_start=_free_start)
    res = ListSelect(*(o[:, :bq0] for o in out[:9]))
    if return_passes:
        return res, out[9][:, 0], out[9][:, 1]
    return res


def _hidden_sums_kernel(spos_ref, lo_ref, hi_ref, val_ref, out_ref):
    bq = spos_ref.shape[-1]
    i = lax.broadcasted_iota(jnp.int32, (bq, bq), 0)
    t = lax.broadcasted_iota(jnp.int32, (bq, bq), 1)
    sp = spos_ref[...][None, :]
    hid = (i < t) & (sp >= lo_ref[...][:, None]) & (sp < hi_ref[...][:, None])
    out_ref[...] = jnp.sum(jnp.where(hid, val_ref[...][:, None], 0.0), axis=0)


def hidden_range_sums(spos, lo, hi, val, *, num_warps: int = 4, interpret: bool = False):
    """out[r, t] = sum over queries i < t of val[r, i] where lo[r, i] <= spos[r, t] < hi[r, i]
    (float32 [rows, block_q]): per entering key, the values of the earlier queries whose list
    range holds it while it is still hidden from them (the correction list_select's VJP takes
    back from a difference array), one program per list.

    Args:
      spos, lo, hi: int32 [rows, block_q]; val: float32 [rows, block_q].

    A [block_q, block_q] reduction that XLA's GPU compiler would otherwise emit as a fusion it
    autotunes: at T = 32k on an H100 that fusion spilled 36 KB of registers per thread and its
    ptxas runs took the layer's forward+backward compile from 23 s to 133 s.
    """
    n, bq0 = spos.shape
    for name, a, dt in (("spos", spos, jnp.int32), ("lo", lo, jnp.int32), ("hi", hi, jnp.int32),
                        ("val", val, jnp.float32)):
        if a.shape != (n, bq0) or a.dtype != dt:
            raise ValueError(f"{name} must be {jnp.dtype(dt).name} {(n, bq0)}, got {a.dtype} {a.shape}")
    bq = max(16, 1 << (bq0 - 1).bit_length())  # Triton blocks are powers of two: pad with empty ranges
    if bq != bq0:
        pad = lambda a: jnp.pad(a, ((0, 0), (0, bq - bq0)))  # noqa: E731  (lo = hi = 0: holds nothing)
        spos, lo, hi, val = pad(spos), pad(lo), pad(hi), pad(val)
    spec = pl.BlockSpec((None, bq), lambda r: (r, 0))
    out = pl.pallas_call(
        _hidden_sums_kernel,
        grid=(n,),
        in_specs=[spec] * 4,
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((n, bq), jnp.float32),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="sparsek_hidden_range_sums",
    )(spos, lo, hi, val)
    return out[:, :bq0]


def list_threshold_reference(z, tin, s, last, active, theta, *, k: int) -> jax.Array:
    """The same thresholds by the XLA solver on materialised rows (for tests)."""
    from sea_jax.ops.sparsek import solve_shifted_threshold

    _check(z, tin, s, last, active, theta, k)
    m = jnp.arange(z.shape[-1], dtype=jnp.int32)
    row = jnp.arange(s.shape[-1], dtype=jnp.int32)[:, None]
    valid = ((m >= s[..., None]) & (m <= last[..., None]) & (tin[:, None, :] <= row) & active[..., None])
    d = jnp.where(valid, z[:, None, :] - theta[..., None], 0)
    return solve_shifted_threshold(lambda: (d, valid), k, s.shape, jnp.float32, active=active)
