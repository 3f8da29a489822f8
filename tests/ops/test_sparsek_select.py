"""Causal prefix selection against a brute-force loop over queries (float64 NumPy bisection).

Tolerances: weights and tau |diff| <= 2e-5 in float32; float64 finite differences <= 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.ops.sparsek_select import CandidateState, causal_prefix_select, segment_runs
from x64 import enable_x64

# jitted once per static configuration: eager op-by-op dispatch dominated these tests' time
select_jit = jax.jit(causal_prefix_select,
                     static_argnames=("k", "window", "extra", "block_q", "method", "schedule", "block_batch",
                                      "interpret"))


def bisect_capped_simplex(z, k, iters=200):
    """p = clip(z - tau, 0, 1) with sum p = k (n > k), by plain bisection in float64."""
    z = np.asarray(z, np.float64)
    lo, hi = z.min() - 1.0, z.max()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.clip(z - mid, 0, 1).sum() >= k else (lo, mid)
    tau = 0.5 * (lo + hi)
    return np.clip(z - tau, 0, 1), tau


def brute_force(u, k, window, extra, segment_ids=None):
    """Per (b, h, i): dict position -> weight of the selected keys, tau (nan if <= k), overflow."""
    u = np.asarray(u, np.float64)
    B, T, K = u.shape
    seg = np.ones((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    out = {}
    for b in range(B):
        # contiguous runs: run id = start position of the run
        run = np.zeros(T, int)
        for t in range(1, T):
            run[t] = run[t - 1] if seg[b, t] == seg[b, t - 1] else t
        for h in range(K):
            for i in range(T):
                if seg[b, i] == 0:
                    out[b, h, i] = ({}, np.nan, False)
                    continue
                prefix = [j for j in range(i - window + 1) if run[j] == run[i] and seg[b, j] != 0]
                order = sorted(prefix, key=lambda j: (u[b, j, h], j), reverse=True)
                cand = order[: k + extra]
                if len(cand) <= k:
                    # prefix rule (weight 1); with c = 0 the prefix may hold more keys: the
                    # query overflows when the next one clears the reported tau = min - 1
                    overflow = len(order) > len(cand) and u[b, order[len(cand)], h] > u[b, cand[-1], h] - 1
                    out[b, h, i] = ({j: 1.0 for j in cand}, np.nan, overflow)
                    continue
                p, tau = bisect_capped_simplex(u[b, cand, h], k)
                overflow = len(order) > k + extra and u[b, order[k + extra], h] > tau
                out[b, h, i] = ({j: p[n] for n, j in enumerate(cand[:k])}, tau, overflow)
    return out


def check_against_brute_force(u, k, window, extra, block_q, segment_ids=None):
    sel = select_jit(jnp.asarray(u), k=k, window=window, extra=extra, block_q=block_q,
                     segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
    ref = brute_force(u, k, window, extra, segment_ids)
    idx, mask, weight = np.asarray(sel.union_index), np.asarray(sel.mask), np.asarray(sel.weight)
    tau, overflow = np.asarray(sel.tau), np.asarray(sel.overflow)
    B, T, K = u.shape
    assert idx.shape[-1] == k + block_q - 1
    for (b, h, i), (want, tau_ref, ovf) in ref.items():
        row = idx[b, h, i // block_q]
        got = {int(row[s]): float(weight[b, h, i, s]) for s in np.nonzero(mask[b, h, i])[0]}
        assert set(got) == set(want), (b, h, i, sorted(got), sorted(want))
        for j in want:
            assert abs(got[j] - want[j]) <= 2e-5, (b, h, i, j, got[j], want[j])
        if not np.isnan(tau_ref):
            assert abs(tau[b, h, i] - tau_ref) <= 2e-5
        assert bool(overflow[b, h, i]) == bool(ovf), (b, h, i)
    assert int(sel.overflow_count) == sum(int(v[2]) for v in ref.values())
    # union rows hold distinct positions (the kernels require it)
    for row in idx.reshape(-1, idx.shape[-1]):
        r = row[row >= 0]
        assert len(set(r.tolist())) == len(r)
    return sel


@pytest.mark.parametrize(
    "B,T,K,k,window,extra,block_q",
    [
        (1, 23, 1, 3, 2, 3, 4),  # T not a multiple of the block
        (2, 17, 2, 2, 0, 1, 5),  # no window: a query may select itself
        (1, 20, 1, 4, 3, 0, 3),  # c = 0: exactly k candidates, weight 1
        (1, 9, 1, 1, 1, 2, 16),  # block longer than the sequence
    ],
)
def test_matches_brute_force(B, T, K, k, window, extra, block_q):
    rng = np.random.default_rng(T * 7 + k)
    u = (rng.standard_normal((B, T, K)) * 0.6).astype(np.float32)
    check_against_brute_force(u, k, window, extra, block_q)


def test_ties_and_overflow_counter():
    rng = np.random.default_rng(11)
    # quantised scores: many exact ties (later position wins), near-uniform -> overflows with c=1
    # and with c = 0 (k candidates at weight 1, the (k+1)-th key within 1 of the k-th)
    u = (np.round(rng.standard_normal((1, 24, 2)) * 2) / 8).astype(np.float32)
    sel = check_against_brute_force(u, 3, 1, 1, 4)
    assert int(sel.overflow_count) > 0  # the counter is exercised, not vacuous
    sel = check_against_brute_force(u, 3, 1, 0, 4)
    assert int(sel.overflow_count) > 0
    sel = check_against_brute_force(u, 3, 1, 30, 4)
    assert int(sel.overflow_count) == 0  # c large enough: exact everywhere


def test_segments_and_padding():
    rng = np.random.default_rng(12)
    u = rng.standard_normal((2, 19, 1)).astype(np.float32)
    seg = np.array([[1] * 7 + [2] * 9 + [0] * 3, [3] * 4 + [5] * 12 + [6] * 3])
    check_against_brute_force(u, 2, 1, 2, 4, seg)
    runs = np.asarray(segment_runs(jnp.asarray(seg), 2, 19))
    assert runs[0, 8] == 7 and runs[0, 17] == -1 and runs[1, 18] == 16


def test_gradient_against_float64_finite_differences():
    rng = np.random.default_rng(13)
    B, T, K, k = 1, 11, 2, 3
    with enable_x64():
        u = jnp.asarray(rng.standard_normal((B, T, K)) * 0.4, jnp.float64)
        gw = jnp.asarray(rng.standard_normal((B, K, T, k + 4 - 1)), jnp.float64)
        gt = jnp.asarray(rng.standard_normal((B, K, T)), jnp.float64)

        @jax.jit
        def loss(u):
            sel = causal_prefix_select(u, k, window=1, extra=2, block_q=4)
            assert sel.weight.dtype == jnp.float64
            return jnp.sum(sel.weight * gw) + jnp.sum(jnp.where(jnp.isfinite(sel.tau), sel.tau, 0) * gt)

        grad = np.asarray(jax.grad(loss)(u))
        eps = 1e-6
        steps = eps * jnp.eye(u.size, dtype=jnp.float64).reshape((u.size,) + u.shape)
        fd = np.asarray((jax.vmap(loss)(u + steps) - jax.vmap(loss)(u - steps)) / (2 * eps)).reshape(u.shape)
        np.testing.assert_allclose(grad, fd, atol=1e-6)
        assert np.abs(grad).max() > 1e-3  # scores do receive gradient


def test_bad_inputs():
    u = jnp.zeros((1, 8, 1))
    with pytest.raises(ValueError, match="k"):
        causal_prefix_select(u, 0)
    with pytest.raises(ValueError, match="window"):
        causal_prefix_select(u, 2, window=-1)
    with pytest.raises(ValueError, match="extra"):
        causal_prefix_select(u, 2, extra=-1)
    with pytest.raises(ValueError, match="block_q"):
        causal_prefix_select(u, 2, block_q=0)
    with pytest.raises(ValueError, match="scores"):
        causal_prefix_select(jnp.zeros((8, 1)), 2)
    with pytest.raises(ValueError, match="floating"):
        causal_prefix_select(jnp.zeros((1, 8, 1), jnp.int32), 2)
    with pytest.raises(ValueError, match="segment_ids"):
        causal_prefix_select(u, 2, segment_ids=jnp.ones((1, 7), jnp.int32))


# ---------------------------------------------------------------------------------------------
# parallel schedule (prefix merge + batched blocks) against the serial scan: same slots, masks,
# overflow flags exactly; weights and tau to 1e-6 (float32; identical arithmetic per block)

def _random_case(seed, B, T, K, ties, segments):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((B, T, K))
    # integer-valued scores: many exact ties (the later position must win in both schedules)
    u = np.round(u * 2) if ties else u * 0.7
    seg = None
    if segments:
        # contiguous runs with a repeated id after a gap (a new run) and trailing padding
        seg = np.zeros((B, T), np.int32)
        for b in range(B):
            cuts = np.sort(rng.choice(np.arange(1, T - 2), size=3, replace=False))
            ids = [1 + b, 2, 1 + b, 0]
            for n, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, T])):
                seg[b, lo:hi] = ids[n]
        seg = jnp.asarray(seg)
    return jnp.asarray(u, jnp.float32), seg


PARALLEL_CASES = [
    # B, T, K, k, window, extra, block_q, block_batch, ties, segments
    (2, 37, 2, 3, 2, 3, 4, 3, True, False),    # T % block_q != 0, batch not dividing nQ
    (1, 50, 2, 2, 0, 0, 5, 1, True, False),    # window 0 (selects itself), c = 0
    (2, 41, 1, 20, 1, 5, 4, None, False, True),  # k larger than every prefix, segments + padding
    (2, 64, 2, 1, 3, 2, 16, 2, True, True),    # block wider than C, segments with ties
    (1, 30, 3, 4, 5, 30, 3, 4, False, False),  # C > T: nothing is ever evicted
    (2, 45, 2, 2, 1, 1, 2, 7, True, True),     # many blocks (deep prefix tree)
]


def _carries_by_scan(u, k, window, extra, block_q, seg):
    """The carry each block starts with, by the serial schedule (explicit Python loop)."""
    from sea_jax.ops.sparsek_select import KeyTable, empty_candidates, select_block, union_size

    B, T, K = u.shape
    runs = segment_runs(seg, B, T)
    table = KeyTable(jnp.moveaxis(u, 1, 2), jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, K, T)),
                     jnp.broadcast_to(runs[:, None, :], (B, K, T)))
    nq = -(-T // block_q)
    step = jax.jit(lambda *a: select_block(*a, k=k, window=window, union=union_size(k, extra, block_q))[0])
    runs = np.asarray(runs)
    state = empty_candidates(B, K, k, extra, u.dtype)
    states, enters = [], []
    for q in range(nq):
        qpos = np.arange(q * block_q, (q + 1) * block_q, dtype=np.int32)
        qrun = np.where(qpos < T, runs[:, np.clip(qpos, 0, T - 1)], -1).astype(np.int32)
        en = np.broadcast_to(np.where((qpos - window >= 0) & (qpos < T), qpos - window, -1), (B, block_q))
        states.append(state)
        enters.append(en.astype(np.int32))
        state = step(state, table, qpos, qrun, en.astype(np.int32))
    return table, jnp.asarray(np.stack(enters)), states


@pytest.mark.parametrize("radix", [True, False])
@pytest.mark.parametrize("B,K,T", [(2, 3, 50), (1, 2, 333), (3, 1, 7)])
def test_global_ranks_order(B, K, T, radix, monkeypatch):
    """Keys ordered by (run, score, position) descending, non-keys (run -1) last: against
    NumPy's lexsort, with tied scores, interleaved -0.0 / 0.0 (equal), several segment runs and
    non-keys; jitted, so that XLA's simplifications apply as in the selection."""
    from sea_jax.ops import sparsek_select_fast as fast

    monkeypatch.setattr(fast, "RADIX_RANKS", radix)  # the two stable 1-D sorts or the 3-key sort
    rng = np.random.default_rng(B * 100 + T)
    score = np.round(rng.normal(size=(B, K, T)) * 2) / 2  # many ties
    score[0, 0, :6] = [-0.0, 0.0, -0.0, -0.0, 0.0, -0.0]  # interleaved: equal, ordered by position
    step = max(1, T // 3)
    run = np.where(rng.random((B, K, T)) < 0.1, -1, (np.arange(T) // step) * step).astype(np.int32)
    # a fresh function per call: jit's cache would keep the other path's trace
    ranks = jax.jit(lambda s, r: fast.global_ranks(s, r))
    order, rank = (np.asarray(a) for a in ranks(jnp.asarray(score, jnp.float32), jnp.asarray(run)))
    for b in range(B):
        for h in range(K):
            has = run[b, h] >= 0
            want = np.lexsort((-np.arange(T), -np.where(has, score[b, h] + 0.0, -np.inf), -np.where(has, run[b, h], -1)))
            np.testing.assert_array_equal(order[b, h], want)
            np.testing.assert_array_equal(rank[b, h][order[b, h]], np.arange(T))


def test_global_ranks_keep_float64_order():
    """float64 scores that round to one float32 value stay ordered by score (not by position, as
    float32 radix keys would order them)."""
    from x64 import enable_x64

    from sea_jax.ops import sparsek_select_fast as fast

    with enable_x64():
        score = jnp.asarray([[[1.0 + 1e-12, 1.0, 0.5]]], jnp.float64)
        order, _ = fast.global_ranks(score, jnp.zeros((1, 1, 3), jnp.int32))
    np.testing.assert_array_equal(np.asarray(order)[0, 0], [0, 1, 2])


@pytest.mark.parametrize("B,K,T,window", [(2, 3, 60, 4), (1, 2, 200, 0), (1, 1, 9, 12)])
def test_key_ends_against_the_definition(B, K, T, window):
    """key_ends against its definition written as loops: per query t, R_t = its k-th visible
    rank (or its run's last rank when it keeps all it sees, T - 1 rule for padding queries:
    the previous query's R); key p ends at the first query t >= p + window with min(R_0..R_t) <
    rank_p (T if none), p + window (clipped) for non-keys; with segment runs, non-keys and
    queries that keep everything."""
    from sea_jax.ops import sparsek_select_fast as fast

    rng = np.random.default_rng(T + window)
    step = max(1, T // 3)
    run = np.where(rng.random((B, K, T)) < 0.1, -1, (np.arange(T) // step) * step).astype(np.int32)
    rank = np.stack([np.stack([rng.permutation(T) for _ in range(K)]) for _ in range(B)]).astype(np.int32)
    kth = rng.integers(0, T, (B, K, T)).astype(np.int32)
    kth[rng.random((B, K, T)) < 0.3] = -1
    got = np.asarray(jax.jit(lambda *a: fast.key_ends(*a, window))(*(jnp.asarray(x) for x in (kth, rank, run))))
    for b in range(B):
        for h in range(K):
            has = run[b, h] >= 0
            keys_from = np.array([has[p:].sum() for p in range(T)])
            R, cur = np.empty(T, np.int64), np.iinfo(np.int64).max
            for t in range(T):
                if has[t]:
                    r_t = kth[b, h, t] if kth[b, h, t] >= 0 else keys_from[run[b, h, t]] - 1
                    cur = min(cur, r_t)
                R[t] = cur
            for p in range(T):
                start = min(p + window, T)
                want = start
                if has[p]:
                    want = next((t for t in range(start, T) if R[t] < rank[b, h, p]), T)
                assert got[b, h, p] == want, (b, h, p)


@pytest.mark.parametrize("num_keys", [50, 2**29])  # 2**29: rows * (num_keys + 1) > 2**31, several 1-D sorts
def test_sorted_block_lists(num_keys):
    from sea_jax.ops import sparsek_select_fast as fast

    rng = np.random.default_rng(num_keys % 97)
    lead, C, Bq = (3, 2, 5), 12, 4
    carry = rng.integers(0, num_keys, size=lead + (C,))
    enter = rng.integers(0, num_keys, size=lead + (Bq,))
    carry[rng.random(carry.shape) < 0.2] = fast.EMPTY
    enter[rng.random(enter.shape) < 0.3] = fast.EMPTY
    got = fast.sorted_block_lists(jnp.asarray(carry, jnp.int32), jnp.asarray(enter, jnp.int32), num_keys)
    want = np.sort(np.concatenate([carry, enter], -1), axis=-1)
    np.testing.assert_array_equal(np.asarray(got), want)


def _fast_carries(table, enters, c):
    """The fast schedule's carries as CandidateState fields (slots = positions, -1 empty)."""
    from sea_jax.ops import sparsek_select_fast as fast

    order, rank = fast.global_ranks(table.score, table.run)
    nq, B, Bq = enters.shape
    K = table.run.shape[1]
    ent = jnp.broadcast_to(enters[:, :, None, :], (nq, B, K, Bq))
    take = lambda a: jax.vmap(lambda i: jnp.take_along_axis(a, jnp.clip(i, 0, None), -1))(ent)  # noqa: E731
    er = jnp.where((ent >= 0) & (take(table.run) >= 0), take(rank), fast.EMPTY)
    ranks, ev = fast.prefix_ranks(er, c)
    gather = lambda a, r: jax.vmap(lambda i: jnp.take_along_axis(a, jnp.clip(i, 0, a.shape[-1] - 1), -1))(r)  # noqa: E731
    slots = jnp.where(ranks != fast.EMPTY, gather(order, ranks), -1)
    ev_pos = gather(order, ev[..., None])[..., 0]
    ev_run = jnp.where(ev != fast.EMPTY, gather(table.run, ev_pos[..., None])[..., 0], -1)
    ev_score = jnp.where(ev_run >= 0, gather(table.score, ev_pos[..., None])[..., 0], -jnp.inf)
    return slots, ev_run, ev_score


def _schedule_cases():
    """Every case with "parallel" (the default); "fast" / "fast_sorted" / "fused" on four cases in the
    default run (c = 0, segments + ties, many blocks, C > T between them) and on all six with
    --runslow (CI time: the rest repeat what these cover)."""
    fast_on = {"fast": (1, 3, 5, 2), "fast_sorted": (0, 3, 4, 5), "fused": (0, 2, 3, 5)}
    out = []
    for i, case in enumerate(PARALLEL_CASES):
        out.append(pytest.param(*case, "parallel"))
        for sched, keep in fast_on.items():
            marks = () if i in keep else (pytest.mark.slow,)
            out.append(pytest.param(*case, sched, marks=marks))
    return out


@pytest.mark.parametrize("B,T,K,k,window,extra,block_q,block_batch,ties,segments,schedule", _schedule_cases())
def test_parallel_schedule_equals_scan(B, T, K, k, window, extra, block_q, block_batch, ties, segments, schedule):
    from sea_jax.ops.sparsek_select import prefix_candidates

    u, seg = _random_case(B * 100 + T, B, T, K, ties, segments)
    # the prefix merge reproduces the serial carries exactly (slots and the evicted key)
    table, enters, states = _carries_by_scan(u, k, window, extra, block_q, seg)
    if schedule == "parallel":
        par = jax.jit(prefix_candidates, static_argnums=2)(table, enters, k + extra)
    else:
        par = CandidateState(*jax.jit(_fast_carries, static_argnums=2)(table, enters, k + extra))
    evicted_seen = False
    for q, st in enumerate(states):
        np.testing.assert_array_equal(np.asarray(par.slots[q]), np.asarray(st.slots), err_msg=f"block {q}")
        np.testing.assert_array_equal(np.asarray(par.ev_run[q]), np.asarray(st.ev_run), err_msg=f"block {q}")
        np.testing.assert_array_equal(np.asarray(par.ev_score[q]), np.asarray(st.ev_score), err_msg=f"block {q}")
        evicted_seen |= bool((np.asarray(st.ev_run) >= 0).any())
    assert evicted_seen == (k + extra < T - window - block_q)  # ev tracking is exercised when possible

    kw = dict(window=window, extra=extra, block_q=block_q, segment_ids=seg)
    a = select_jit(u, k=k, schedule="scan", **kw)
    # "fused" runs its threshold kernel in interpret mode here (Pallas, on CPU)
    b = select_jit(u, k=k, schedule=schedule, block_batch=block_batch, interpret=schedule == "fused", **kw)
    for name in ("union_index", "mask", "overflow", "overflow_count"):
        np.testing.assert_array_equal(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(b.weight), np.asarray(a.weight), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(b.tau), np.asarray(a.tau), atol=1e-6, rtol=0)
    assert np.asarray(a.mask).any()


@pytest.mark.parametrize("schedule,extra,ties,method", [
    ("parallel", 2, False, "bracket"),
    ("fast", 2, False, "bracket"),
    ("fast", 0, True, "bracket"),   # c = 0: prefix-rule rows send tau's cotangent to their minimum
    ("fast", 30, True, "sort"),     # ties: saturated rows and first-occurrence rules; sort solver
    ("fast_sorted", 2, True, "bracket"),
    ("fused", 2, True, "bracket"),  # the threshold kernel (interpret mode), fast's VJP
])
def test_parallel_gradient_equals_scan(schedule, extra, ties, method):
    u, seg = _random_case(7, 2, 29, 2, ties, True)
    ct = jnp.asarray(np.random.default_rng(8).standard_normal((2, 2, 29, 3 + 4 - 1)), jnp.float32)

    def loss(u, schedule):
        sel = causal_prefix_select(u, 3, window=1, extra=extra, block_q=4, segment_ids=seg,
                                   schedule=schedule, block_batch=3, method=method,
                                   interpret=schedule == "fused")
        return jnp.sum(sel.weight * ct) + jnp.sum(jnp.where(jnp.isfinite(sel.tau), sel.tau, 0))

    g_scan = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(u, "scan"))
    g_par = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(u, schedule))
    np.testing.assert_allclose(g_par, g_scan, atol=2e-6, rtol=0)
    assert np.abs(g_scan).max() > 1e-2


@pytest.mark.parametrize("ties", [False, True])
def test_sorted_solver_locates_every_segment(monkeypatch, ties):
    """fast_sorted's cheap iteration must find the root's segment itself: its fallback (the
    reference solver, for rows that fail the exact check) is replaced by NaN here, and the
    thresholds must equal the reference path's."""
    from sea_jax.ops import sparsek_select_fast as fast

    u, seg = _random_case(21, 1, 300, 2, ties, True)
    kw = dict(k=16, window=8, extra=16, block_q=8, segment_ids=seg)
    ref = select_jit(u, schedule="fast", **kw)
    monkeypatch.setattr(fast, "solve_shifted_threshold",
                        lambda rows, k, shape, dtype, active=None: jnp.full(shape, jnp.nan, dtype))
    got = jax.jit(causal_prefix_select, static_argnames=("k", "window", "extra", "block_q", "schedule"))(
        u, schedule="fast_sorted", **kw)
    assert not np.isnan(np.asarray(got.tau)).any()
    assert (np.asarray(got.tau) != 0).sum() > 100  # active rows were solved
    np.testing.assert_allclose(np.asarray(got.tau), np.asarray(ref.tau), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got.weight), np.asarray(ref.weight), atol=1e-6, rtol=0)
    for name in ("union_index", "mask", "overflow"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)))


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_bitonic_merge_lowest_against_sort(n):
    from sea_jax.ops.sparsek_select_fast import EMPTY, bitonic_merge_lowest

    rng = np.random.default_rng(n)
    rows = 50
    vals = np.stack([rng.permutation(10 * n)[: 2 * n] for _ in range(rows)]).astype(np.int32)
    # some rows padded with EMPTY (lists shorter than n), including all-empty lists
    cut_a = rng.integers(0, n + 1, rows)
    cut_b = rng.integers(0, n + 1, rows)
    a = np.sort(vals[:, :n], -1)
    b = np.sort(vals[:, n:], -1)
    a = np.where(np.arange(n) < cut_a[:, None], a, EMPTY).astype(np.int32)
    b = np.where(np.arange(n) < cut_b[:, None], b, EMPTY).astype(np.int32)
    low, nxt = jax.jit(bitonic_merge_lowest)(jnp.asarray(a), jnp.asarray(b))
    want = np.sort(np.concatenate([a, b], -1), -1)
    np.testing.assert_array_equal(np.asarray(low), want[:, :n])
    np.testing.assert_array_equal(np.asarray(nxt), want[:, n])


@pytest.mark.parametrize("schedule", ["scan", "fast"])
def test_brute_force_with_other_schedules(schedule):
    """The serial schedule (kept for reference) and the fast one against the brute force too."""
    rng = np.random.default_rng(14)
    u = (np.round(rng.standard_normal((1, 22, 2)) * 2) / 4).astype(np.float32)
    seg = np.array([[1] * 9 + [2] * 10 + [0] * 3])
    sel = select_jit(jnp.asarray(u), k=2, window=1, extra=1, block_q=4,
                     segment_ids=jnp.asarray(seg), schedule=schedule)
    ref = brute_force(u, 2, 1, 1, seg)
    mask, idx = np.asarray(sel.mask), np.asarray(sel.union_index)
    for (b, h, i), (want, _, ovf) in ref.items():
        got = {int(idx[b, h, i // 4, s]) for s in np.nonzero(mask[b, h, i])[0]}
        assert got == set(want) and bool(sel.overflow[b, h, i]) == ovf


@pytest.mark.parametrize("schedule", ["fused", "fast", "fast_sorted", "parallel", "scan"])
def test_no_quadratic_array_at_8192(schedule):
    T, k, bq = 8192, 16, 64

    def loss(u):
        sel = causal_prefix_select(u, k, window=8, block_q=bq, schedule=schedule)
        return jnp.sum(sel.weight)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(jax.ShapeDtypeStruct((1, T, 2), jnp.float32))
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                sizes.append((int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0, v.aval))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else [p]:
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert len(sizes) > 50
    biggest = max(sizes, key=lambda s: s[0])
    # the largest arrays are the [B, K, T, U] selections (U = k + block_q - 1), far below T x T
    assert biggest[0] <= 2 * T * (k + bq - 1) * 2, biggest
    assert all(sum(d >= T for d in getattr(a, "shape", ())) < 2 for _, a in sizes)


def test_bad_schedule_arguments():
    u = jnp.zeros((1, 8, 1))
    with pytest.raises(ValueError, match="schedule"):
        causal_prefix_select(u, 2, schedule="serial")
    with pytest.raises(ValueError, match="block_batch"):
        causal_prefix_select(u, 2, block_batch=0)


@pytest.mark.parametrize("case", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_union_multiple_pads_with_empty_slots(case):
    """union_multiple rounds U up (kernel slot tiles): the first U slots are the same schedule's
    plain selection, the rest empty (-1, unmasked, weight 0), for every schedule."""
    B, T, K, k, window, extra, block_q, _, ties, segments = PARALLEL_CASES[case]
    u, seg = _random_case(B * 100 + T, B, T, K, ties, segments)
    kw = dict(k=k, window=window, extra=extra, block_q=block_q, segment_ids=seg)
    sel = jax.jit(causal_prefix_select, static_argnames=("k", "window", "extra", "block_q", "schedule",
                                                         "interpret", "union_multiple"))
    for schedule in ("scan", "parallel", "fast", "fused"):
        a = sel(u, schedule=schedule, interpret=True, **kw)
        U0 = a.union_index.shape[-1]
        b = sel(u, schedule=schedule, interpret=True, union_multiple=8, **kw)
        idx, mask, weight = (np.asarray(x) for x in (b.union_index, b.mask, b.weight))
        assert idx.shape[-1] == -(-U0 // 8) * 8 > U0, schedule
        np.testing.assert_array_equal(idx[..., :U0], np.asarray(a.union_index), err_msg=schedule)
        np.testing.assert_array_equal(mask[..., :U0], np.asarray(a.mask), err_msg=schedule)
        np.testing.assert_allclose(weight[..., :U0], np.asarray(a.weight), atol=1e-6, rtol=0, err_msg=schedule)
        assert (idx[..., U0:] == -1).all() and not mask[..., U0:].any() and not weight[..., U0:].any()
        np.testing.assert_array_equal(np.asarray(b.overflow), np.asarray(a.overflow), err_msg=schedule)
    with pytest.raises(ValueError, match="union_multiple"):
        causal_prefix_select(u, k, union_multiple=0)


FACTORED_CASES = [
    # (PARALLEL_CASES index, schedule, union_multiple, STRUCTURE_IN_KERNEL)
    (3, "fused", 8, False),       # segments with ties, block wider than C; padded union
    (3, "fused", 8, True),        # the same through list_select
    (0, "fast", 1, False),        # T % block_q != 0
    (0, "fused", 1, True),        # the same through list_select (the GPU default)
    (5, "fused", 1, True),        # many blocks, segments with ties, through list_select
    pytest.param(5, "fast_sorted", 1, False, marks=pytest.mark.slow),
    pytest.param(2, "fused", 1, False, marks=pytest.mark.slow),  # k larger than every prefix
    pytest.param(2, "fused", 1, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case,schedule,multiple,structure_in_kernel", FACTORED_CASES)
def test_factored_selection_equals_dense(case, schedule, multiple, structure_in_kernel, monkeypatch):
    """factored=True (slot range + slot scores + thresholds, sea_jax.kernels.SlotSelection)
    describes the same selection as the [B, K, T, U] mask and weights of the same schedule,
    and the gradient of the scores through it is the same. With structure_in_kernel, "fused"
    takes its structure, thresholds and tau VJP from list_select (the dense form keeps the XLA
    structure: an independent reference)."""
    from sea_jax.ops import sparsek_select_fast

    monkeypatch.setattr(sparsek_select_fast, "STRUCTURE_IN_KERNEL", structure_in_kernel)
    B, T, K, k, window, extra, block_q, _, ties, segments = PARALLEL_CASES[case]
    u, seg = _random_case(B * 100 + T + 1, B, T, K, ties, segments)
    kw = dict(k=k, window=window, extra=extra, block_q=block_q, segment_ids=seg, schedule=schedule,
              interpret=True, union_multiple=multiple)
    sel = jax.jit(causal_prefix_select, static_argnames=("k", "window", "extra", "block_q", "schedule",
                                                         "interpret", "union_multiple", "factored"))
    a = sel(u, **kw)
    b = sel(u, factored=True, **kw)
    assert b.mask is None and b.weight is None
    mask, weight = b.dense_mask_weight(window, block_q)
    for name in ("union_index", "overflow", "overflow_count"):
        np.testing.assert_array_equal(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), err_msg=name)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(a.mask))
    np.testing.assert_allclose(np.asarray(weight), np.asarray(a.weight), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(b.tau), np.asarray(a.tau), atol=1e-6, rtol=0)
    assert np.asarray(a.mask).any() and (np.asarray(b.slots.threshold) == -np.inf).any()
    # the key intervals describe the same selection: key p is selected by exactly the queries
    # [p + window, key_end[p]) of its run, and its slots carry its score
    idx = np.asarray(b.union_index)
    pos = np.repeat(idx, block_q, axis=2)[:, :, :T]  # [B, K, T, U]
    safe = np.maximum(pos, 0)
    end = np.take_along_axis(np.asarray(b.slots.key_end)[:, :, None, :].repeat(T, 2), safe, -1)
    runs = np.asarray(segment_runs(seg, B, T))[:, None, :].repeat(K, 1)  # [B, K, T]
    same_run = (np.take_along_axis(runs[:, :, None, :].repeat(T, 2), safe, -1) == runs[..., None]) & (runs[..., None] >= 0)
    t = np.arange(T)[:, None]
    np.testing.assert_array_equal((pos >= 0) & (pos + window <= t) & (t < end) & same_run, np.asarray(a.mask))
    nq = idx.shape[2]
    zkey = np.take_along_axis(np.asarray(b.slots.key_scores)[:, :, None, :].repeat(nq, 2), np.maximum(idx, 0), -1)
    np.testing.assert_array_equal(np.where(idx >= 0, zkey, 0), np.where(idx >= 0, np.asarray(b.slots.slot_scores), 0))

    rng = np.random.default_rng(case)
    ct = jnp.asarray(rng.standard_normal(a.weight.shape), jnp.float32)
    ct_tau = jnp.asarray(rng.standard_normal(a.tau.shape), jnp.float32)

    def loss(u, factored):
        s = causal_prefix_select(u, factored=factored, **kw)
        m, w = s.dense_mask_weight(window, block_q)
        return jnp.sum(w * ct) + jnp.sum(jnp.where(jnp.isfinite(s.tau), s.tau * ct_tau, 0))

    g_dense = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(u, False))
    g_fact = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(u, True))
    np.testing.assert_allclose(g_fact, g_dense, atol=2e-6, rtol=0)
    assert np.abs(g_dense).max() > 1e-2


def test_factored_needs_a_fast_schedule():
    with pytest.raises(ValueError, match="factored=True needs schedule"):
        causal_prefix_select(jnp.zeros((1, 8, 1)), 2, schedule="parallel", factored=True)
