"""The on-chip SparseK list threshold (kernels/gpu_sparsek_threshold.py), interpret mode on CPU.

Both algorithms ("walk", the default, and "search") are checked against a float64 NumPy solver
written here (enumerate the breakpoints of f(t) = sum clip(d - t, 0, 1) over each row's visible
entries, take the segment holding k and its closed form) and against the XLA solver on
materialised rows.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_sparsek_threshold import list_threshold, list_threshold_reference


def _exact_root(d: np.ndarray, k: int) -> float:
    """t with sum clip(d - t, 0, 1) = k (float64; d has more than k entries)."""
    f = lambda t: np.clip(d - t, 0, 1).sum()  # noqa: E731
    bps = np.unique(np.concatenate([d, d - 1]))
    bps = bps[(bps >= -1) & (bps <= 0)]
    bps = np.concatenate([[-1.0], bps, [0.0]])
    vals = np.array([f(t) for t in bps])
    j = np.max(np.nonzero(vals >= k)[0])  # f is non-increasing: the last probe with f >= k
    lo = bps[j]
    free = (d - lo > 0) & (d - lo <= 1)
    if not free.any():
        return lo
    return (d[free].sum() + (d - lo > 1).sum() - k) / free.sum()


def _lists(rng, rows, bq, m, k, *, ties=False):
    """Random block lists in the selection's structure (sorted scores, carried and entering
    entries, per-query ranges)."""
    z = -np.sort(-rng.normal(size=(rows, m)) * rng.uniform(0.2, 3.0, size=(rows, 1)), axis=1)
    if ties:
        z = np.round(z * 4) / 4
    tin = np.full((rows, m), -1, np.int64)
    s = np.zeros((rows, bq), np.int64)
    last = np.zeros((rows, bq), np.int64)
    theta = np.zeros((rows, bq))
    active = np.zeros((rows, bq), bool)
    for r in range(rows):
        n_enter = rng.integers(0, bq + 1)
        at = rng.choice(m, size=n_enter, replace=False)
        tin[r, at] = rng.permutation(bq)[:n_enter]  # at most one key enters per query
        for i in range(bq):
            s[r, i] = rng.integers(0, 3) if rng.random() < 0.3 else 0
            vis = np.nonzero((np.arange(m) >= s[r, i]) & (tin[r] <= i))[0]
            cap = rng.integers(k - 2, len(vis) + 1) if rng.random() < 0.2 else len(vis)
            if i == 1:  # at most k visible: an inactive row in every list
                cap = min(cap, k)
            vis = vis[:max(cap, 1)]
            last[r, i] = vis[-1]
            active[r, i] = len(vis) > k
            theta[r, i] = z[r, vis[min(k, len(vis)) - 1]] if active[r, i] else 0.0
    return z, tin, s, last, active, theta


def _expected(z, tin, s, last, active, theta, k):
    rows, bq = s.shape
    out = np.zeros((rows, bq))
    for r in range(rows):
        for i in range(bq):
            if not active[r, i]:
                continue
            m = np.arange(z.shape[1])
            vis = (m >= s[r, i]) & (m <= last[r, i]) & (tin[r] <= i)
            out[r, i] = _exact_root(z[r, vis] - theta[r, i], k)
    return out


# sweep: also the variants that must give the same roots (start steps, rows per program, search
# arity), on three cases of different shapes (each variant is one more interpret-mode run)
@pytest.mark.parametrize("rows,bq,m,k,chunk,ties,sweep", [
    (3, 16, 80, 20, 16, False, True),     # M not a multiple of the chunk
    (2, 32, 200, 64, 64, False, False),
    (2, 16, 100, 7, 32, True, True),      # ties at breakpoints
    (1, 16, 40, 1, 16, False, False),     # k = 1
    (2, 5, 30, 4, 16, False, False),      # block of 5 queries (padded to 16 inside)
    (3, 32, 300, 100, 32, False, False),  # long free ranges holding hidden keys
    (1, 128, 300, 90, 64, False, True),   # a block of 128: eight programs of 16 rows by default
])
def test_matches_float64_solver_and_xla(rows, bq, m, k, chunk, ties, sweep):
    rng = np.random.default_rng(rows * 1000 + m + k)
    z, tin, s, last, active, theta = _lists(rng, rows, bq, m, k, ties=ties)
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    got = np.asarray(list_threshold(*args, k=k, chunk=chunk, interpret=True))  # the walk
    search = np.asarray(list_threshold(*args, k=k, chunk=chunk, interpret=True, algorithm="search"))
    # the walk from t = -1 alone or after Newton steps: the same roots to rounding
    for start_steps in (0, 1, 8) if sweep else ():
        np.testing.assert_allclose(got, np.asarray(list_threshold(
            *args, k=k, chunk=chunk, interpret=True, start_steps=start_steps)), atol=1e-6, rtol=0)
    # the block's queries over programs of 64 rows or in one program (default: 16 rows per
    # program): the same thresholds to rounding (row sums of differently shaped tiles may be
    # vectorised in another order)
    for rows_per_program in sorted({min(64, bq), bq}) if bq >= 32 and sweep else ():
        np.testing.assert_allclose(search, np.asarray(list_threshold(
            *args, k=k, chunk=chunk, interpret=True, rows_per_program=rows_per_program, algorithm="search")),
            atol=5e-7, rtol=0)
    # arity-ary index searches find the same indices as the binary ones: the same search steps and
    # fallback passes (a wrong index would mostly be caught by the exact check and cost fallback
    # passes, not a wrong threshold) and the same thresholds, bit for bit
    binary = [np.asarray(a) for a in list_threshold(*args, k=k, chunk=chunk, interpret=True, return_passes=True,
                                                    search_arity=2, algorithm="search")]
    for arity in (4, 8, 16) if sweep else (4,):
        for want, have in zip(binary, list_threshold(*args, k=k, chunk=chunk, interpret=True, return_passes=True,
                                                     search_arity=arity, algorithm="search")):
            np.testing.assert_array_equal(want, np.asarray(have))
    want = _expected(z, tin, s, last, active, theta, k)
    xla = np.asarray(list_threshold_reference(*args, k=k))
    assert active.any() and (~active).any()
    for tau in (got, search):
        np.testing.assert_allclose(tau, want, atol=2e-5, rtol=0)  # float32 sums of <= M entries
        np.testing.assert_allclose(tau, xla, atol=2e-5, rtol=0)
        assert np.all(tau[~active] == 0)
        # it is a root: f(tau) = k on every active row (to float32 rounding of the sums)
        for r in range(rows):
            for i in np.nonzero(active[r])[0]:
                mm = np.arange(m)
                vis = (mm >= s[r, i]) & (mm <= last[r, i]) & (tin[r] <= i)
                f = np.clip(z[r, vis] - theta[r, i] - tau[r, i], 0, 1).sum()
                assert abs(f - k) < 1e-3 * max(1, k ** 0.5)


def test_bad_arguments():
    z = jnp.zeros((2, 64), jnp.float32)
    tin = jnp.zeros((2, 64), jnp.int32)
    s = jnp.zeros((2, 16), jnp.int32)
    act = jnp.ones((2, 16), bool)
    th = jnp.zeros((2, 16), jnp.float32)
    with pytest.raises(ValueError, match="z must be float32"):
        list_threshold(z.astype(jnp.float16), tin, s, s, act, th, k=4, interpret=True)
    with pytest.raises(ValueError, match="tin must be int32"):
        list_threshold(z, tin[:, :10], s, s, act, th, k=4, interpret=True)
    with pytest.raises(ValueError, match="last must be int32"):
        list_threshold(z, tin, s, s[:, :8], act, th, k=4, interpret=True)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        list_threshold(z, tin, s, s, act, th, k=0, interpret=True)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        list_threshold(z, tin, s, s, act, th, k=4, chunk=48, interpret=True)
    for bad in (8, 24, 32):  # below 16, not a power of two, more than the block's 16 rows
        with pytest.raises(ValueError, match="rows_per_program must be None or a power of two"):
            list_threshold(z, tin, s, s, act, th, k=4, interpret=True, rows_per_program=bad, algorithm="search")
    with pytest.raises(ValueError, match="apply to algorithm='search' only"):
        list_threshold(z, tin, s, s, act, th, k=4, interpret=True, rows_per_program=16)
    for bad in (1, 3, 12, True):
        with pytest.raises(ValueError, match="search_arity must be a power of two >= 2"):
            list_threshold(z, tin, s, s, act, th, k=4, interpret=True, search_arity=bad, algorithm="search")
    with pytest.raises(ValueError, match="algorithm must be 'search' or 'walk'"):
        list_threshold(z, tin, s, s, act, th, k=4, interpret=True, algorithm="bisect")
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="start_steps must be an int >= 0"):
            list_threshold(z, tin, s, s, act, th, k=4, interpret=True, start_steps=bad)


def test_flat_root_takes_its_right_end():
    """Integer scores: f = k on a whole interval (no free entry, k at 1). Both algorithms return
    its right end, t = -1 (the reference solvers' convention); the walk reaches these roots from
    the previous query's at a breakpoint where the flat piece begins (a list of the causal
    selection's tests, captured)."""
    z = np.array([[3.0, 2.0, 2.0, 1.0, -1.0, -2.0, 0.0, 0.0, 0.0, 0.0]])
    tin = np.array([[0, 3, -1, 2, 1, -1, -1, -1, -1, -1]])
    s, last = np.zeros((1, 4), np.int64), np.full((1, 4), 5)
    active = np.array([[False, True, True, True]])
    theta = np.array([[0.0, -1.0, 1.0, 2.0]])
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    want = _expected(z, tin, s, last, active, theta, 3)
    np.testing.assert_array_equal(want, [[0.0, -1.0, -1.0, -1.0]])
    for algorithm in ("walk", "search"):
        np.testing.assert_array_equal(np.asarray(list_threshold(*args, k=3, interpret=True, algorithm=algorithm)), want)


@pytest.mark.parametrize("start_steps", [0, 3])
def test_walk_both_ways(start_steps):
    """Queries whose candidate cap drops the list's lowest entry, one per query, while the keys
    entering are too low to count: f falls and every root lies left of the previous one (the
    walk moves left); then a stretch whose cap stays and keys enter high (it moves right)."""
    rng = np.random.default_rng(start_steps)
    m, bq, k = 96, 32, 40
    z = -np.sort(-rng.normal(size=(1, m)) * 0.4, axis=1)  # dense: many entries within 1 of tau
    tin = np.full((1, m), -1, np.int64)
    hi_slots = rng.choice(np.arange(5, 40), size=16, replace=False)
    tin[0, hi_slots] = np.arange(16, 32)  # queries 16..31: high keys enter
    tin[0, m - 16:] = np.arange(16)  # queries 0..15: keys enter at the very bottom (past the cap)
    s = np.zeros((1, bq), np.int64)
    last = np.full((1, bq), m - 40, np.int64)
    last[0, :16] = m - 20 - np.arange(16)  # the cap drops one entry per query
    active = np.ones((1, bq), bool)
    theta = np.zeros((1, bq))
    for i in range(bq):
        vis = np.nonzero((np.arange(m) <= last[0, i]) & (tin[0] <= i))[0]
        theta[0, i] = z[0, vis[k - 1]]
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    tau, steps, starts = (np.asarray(a) for a in list_threshold(*args, k=k, interpret=True, return_passes=True,
                                                                  start_steps=start_steps))
    want = _expected(z, tin, s, last, active, theta, k)
    np.testing.assert_allclose(tau, want, atol=2e-6, rtol=0)
    root = want + theta  # tau itself (the kernel returns tau - theta)
    assert np.all(np.diff(root[0, :16]) < 0) and np.all(np.diff(root[0, 17:]) > 0)
    assert starts[0] == 1 and steps[0] > bq  # one start, the rest walked
    # the entering keys' list indices given by the caller (as the selection does): the same
    spos = np.full((1, bq), m, np.int64)
    spos[0, tin[0][tin[0] >= 0]] = np.nonzero(tin[0] >= 0)[0]
    for algorithm in ("walk", "search"):
        np.testing.assert_array_equal(
            np.asarray(list_threshold(*args, k=k, interpret=True, start_steps=start_steps, algorithm=algorithm)
                       if algorithm == "walk" else list_threshold(*args, k=k, interpret=True, algorithm=algorithm)),
            np.asarray(list_threshold(*args, k=k, interpret=True, algorithm=algorithm,
                                      spos=jnp.asarray(spos, jnp.int32),
                                      **({"start_steps": start_steps} if algorithm == "walk" else {}))))
    with pytest.raises(ValueError, match="spos must be int32"):
        list_threshold(*args, k=k, interpret=True, spos=jnp.asarray(spos[:, :8], jnp.int32))


@pytest.mark.parametrize("clip,fallback", [(8.0, False), (0.25, True)])
def test_exact_fallback(clip, fallback):
    """The cheap sorted search settles typical rows alone; with prefix sums clipped too tightly
    (clip 0.25: free entries fall outside) its segments fail the exact check and the exact
    iteration must take over, with the same results."""
    rng = np.random.default_rng(5)
    k = 12
    z, tin, s, last, active, theta = _lists(rng, 3, 16, 64, k)
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    tau, steps, passes = (np.asarray(a) for a in list_threshold(*args, k=k, chunk=32, clip=clip, algorithm="search",
                                                                  interpret=True, return_passes=True))
    assert (passes > 0).any() == fallback and (steps > 0).all()
    np.testing.assert_allclose(tau, _expected(z, tin, s, last, active, theta, k), atol=2e-5, rtol=0)


def test_root_at_a_breakpoint_ends_the_search():
    """A row of a real block list (the SparseK layer at T = 32k, k = 1024, captured on an H100)
    whose root lies within rounding of a breakpoint: its segment's closed form lands 6e-8 past
    the segment's end, so "closed form inside its segment" never holds and, before the bracket
    width stop, the exact fallback ran all 64 passes (the list tripled the kernel's time)."""
    data = np.load(os.path.join(os.path.dirname(__file__), "threshold_stall_list.npz"))
    z, tin, s, last, active, theta = (data[n][None] for n in ("z", "tin", "s", "last", "active", "theta"))
    k = 1024
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    tau, steps, passes = (np.asarray(a) for a in list_threshold(*args, k=k, interpret=True, return_passes=True,
                                                                  algorithm="search"))
    assert 0 < passes[0] < 30, passes  # the exact fallback is needed, and ends well before max_passes (64)
    want = _expected(z, tin, s, last, active, theta, k)
    np.testing.assert_allclose(tau, want, atol=1e-6, rtol=0)
    xla = np.asarray(list_threshold_reference(*args, k=k))  # the same stop rule in the XLA solver
    np.testing.assert_allclose(xla, tau, atol=1e-6, rtol=0)
    # the walk settles the same row as any other: the root is where its segment's closed form says
    np.testing.assert_allclose(np.asarray(list_threshold(*args, k=k, interpret=True)), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("return_passes,rows_per_program,arity,algorithm", [
    (False, None, 8, "search"), (True, None, 8, "search"), (True, 64, 2, "search"), (False, None, 16, "search"),
    (False, None, None, "walk"), (True, None, None, "walk")])
def test_lowers_to_triton_for_an_h100(return_passes, rows_per_program, arity, algorithm):
    """The Pallas -> Triton lowering runs on the CPU machine (jaxlib's Triton dialect): a
    construct Triton cannot take fails here, not first on the GPU."""
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    sds = jax.ShapeDtypeStruct
    n, m, bq = 4, 2112, 64
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(lambda *a: list_threshold(*a, k=1024, chunk=64, return_passes=return_passes,
                                                 rows_per_program=rows_per_program,
                                                 search_arity=arity, algorithm=algorithm)).trace(
            sds((n, m), jnp.float32), sds((n, m), jnp.int32), sds((n, bq), jnp.int32), sds((n, bq), jnp.int32),
            sds((n, bq), jnp.bool_), sds((n, bq), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"]
    assert ("sparsek_list_threshold_walk" in text) == (algorithm == "walk") and "sparsek_list_threshold" in text


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("bq,m,k,ties", [(64, 2112, 1024, False), (16, 100, 7, True), (128, 700, 300, False)])
def test_compiled_matches_float64_solver(bq, m, k, ties):
    rng = np.random.default_rng(bq + m)
    z, tin, s, last, active, theta = _lists(rng, 3, bq, m, k, ties=ties)
    args = (jnp.asarray(z, jnp.float32), jnp.asarray(tin, jnp.int32), jnp.asarray(s, jnp.int32),
            jnp.asarray(last, jnp.int32), jnp.asarray(active), jnp.asarray(theta, jnp.float32))
    want = _expected(z, tin, s, last, active, theta, k)
    walk = np.asarray(jax.jit(lambda *a: list_threshold(*a, k=k))(*args))
    np.testing.assert_allclose(walk, want, atol=2e-5, rtol=0)
    got = np.asarray(jax.jit(lambda *a: list_threshold(*a, k=k, algorithm="search"))(*args))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # binary searches: the same indices; the compiled reductions may round differently
    binary = np.asarray(jax.jit(lambda *a: list_threshold(*a, k=k, search_arity=2, rows_per_program=16,
                                                          algorithm="search"))(*args))
    np.testing.assert_allclose(got, binary, atol=2e-6, rtol=0)



# ------------------------------------------------------------------ list_select (cap mode)
def _run_lists(rng, rows, bq, m, k, *, ties=False):
    """Random block lists with one or two runs and padding queries: each query sees its run's
    range [s, e) of the list minus the keys entering after it."""
    z = np.zeros((rows, m))
    tin = np.full((rows, m), -1, np.int64)
    s = np.zeros((rows, bq), np.int64)
    e = np.zeros((rows, bq), np.int64)
    spos = np.full((rows, bq), m, np.int64)
    for r in range(rows):
        r2 = rng.integers(m * 3 // 4, m + 1)  # entries past r2: no key (EMPTY)
        r1 = rng.integers(r2 // 3, r2) if rng.random() < 0.5 else r2  # two runs: [0, r1), [r1, r2)
        if r == 0:  # a first run of about k entries: its queries keep everything until keys enter
            r1 = min(r2 - 1, k - 1 + rng.integers(0, 3))
        for lo, hi in ((0, r1), (r1, r2)):
            zz = rng.normal(size=hi - lo) * rng.uniform(0.2, 3.0)
            z[r, lo:hi] = -np.sort(-(np.round(zz * 4) / 4 if ties else zz))
        i0 = rng.integers(bq // 2, bq + 1) if r1 < r2 else bq  # queries >= i0: the second run
        npad = rng.integers(0, 3)
        for i in range(bq):
            s[r, i], e[r, i] = (0, r1) if i < i0 else (r1, r2)
            if i >= bq - npad:
                s[r, i] = e[r, i] = r2  # padding queries see nothing
        n_enter = rng.integers(bq // 2, bq + 1)
        at = rng.choice(r2, size=n_enter, replace=False)
        q = rng.permutation(bq)[:n_enter]  # at most one key enters per query
        tin[r, at] = q
        spos[r, q] = at
    return z, tin, s, e, spos


def _expected_select(z, tin, s, e, k, cap, tau_s):
    """Brute force per query: the structure, the float64 root, and (given the kernel's float32
    tau_s) the free range and the first target entry under the dense VJP's float32 rounding."""
    rows, bq = s.shape
    z32 = z.astype(np.float32)
    names = ("kpos", "last", "nxt", "nvis", "free_lo", "free_hi", "n_free", "first")
    want = {n: np.zeros((rows, bq), np.int64) for n in names}
    root = np.zeros((rows, bq))
    mm = np.arange(z.shape[1])
    for r in range(rows):
        for i in range(bq):
            vis = (mm >= s[r, i]) & (mm < e[r, i]) & (tin[r] <= i)
            idx = np.nonzero(vis)[0]
            nv = len(idx)
            kpos = idx[min(nv, k) - 1] if nv else s[r, i] - 1
            last = idx[min(nv, cap) - 1] if nv else s[r, i] - 1
            act = nv > k
            fa = fb = s[r, i]
            nf = 0
            if act:
                theta = z32[r, kpos]
                cand = idx[:cap]
                root[r, i] = _exact_root(z[r, cand] - z[r, kpos], k)
                x = (z32[r] - theta) - np.float32(tau_s[r, i])
                rng_ = np.arange(s[r, i], last + 1)
                fa = next((m for m in rng_ if not x[m] >= 1), last + 1)
                fb = next((m for m in rng_ if m >= fa and not x[m] > 0), last + 1)
                nf = int(np.sum(vis[fa:fb]))
            first = -1
            if (act and nf == 0) or (not act and nv > 0):
                target = z32[r, kpos] if act else z32[r, last]
                m0 = next(m for m in range(s[r, i], last + 1) if z32[r, m] <= target)
                first = next(m for m in range(m0, last + 1) if vis[m])
            vals = (kpos, last, idx[cap] if nv > cap else -1, nv, fa, fb, nf, first)
            for n, v in zip(names, vals):
                want[n][r, i] = v
    return want, root


@pytest.mark.parametrize("rows,bq,m,k,cap,ties", [
    (3, 16, 90, 20, 40, False),    # M not a multiple of the chunk; caps bind
    (2, 16, 100, 7, 7, True),      # ties; C = k
    (2, 5, 40, 4, 12, False),      # a block of 5 queries (padded to 16 inside)
    (2, 32, 300, 60, 200, False),  # long free ranges holding hidden keys
])
def test_list_select_matches_brute_force(rows, bq, m, k, cap, ties):
    from sea_jax.kernels.gpu_sparsek_threshold import list_select

    rng = np.random.default_rng(rows * 7 + m + k)
    z, tin, s, e, spos = _run_lists(rng, rows, bq, m, k, ties=ties)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    got = list_select(jnp.asarray(z, jnp.float32), i32(tin), i32(s), i32(e), i32(spos), k=k, cap=cap,
                      chunk=32, interpret=True)
    tau_s = np.asarray(got.tau_s)
    want, root = _expected_select(z, tin, s, e, k, cap, tau_s)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), w, err_msg=name)
    # the free ranges' fix-up from the range's start or end (every entry a step, both directions of
    # both bounds) finds the same ranges as from the walk's pointers (which differ from them only at
    # ties with x = 1 and by rounding)
    for start in ("range_start", "range_end"):
        other = list_select(jnp.asarray(z, jnp.float32), i32(tin), i32(s), i32(e), i32(spos), k=k, cap=cap,
                            chunk=32, interpret=True, _free_start=start)
        for name in ("free_lo", "free_hi", "n_free", "first"):
            np.testing.assert_array_equal(np.asarray(getattr(other, name)), want[name], err_msg=f"{name} {start}")
    active = want["nvis"] > k
    np.testing.assert_allclose(tau_s, np.where(active, root, 0), atol=2e-5, rtol=0)
    # return_passes: the same results and each list's walk steps and fresh starts (one start per
    # run range holding an active query, at least)
    res, steps, starts = list_select(jnp.asarray(z, jnp.float32), i32(tin), i32(s), i32(e), i32(spos), k=k,
                                     cap=cap, chunk=32, interpret=True, return_passes=True)
    np.testing.assert_array_equal(np.asarray(res.tau_s), tau_s)
    assert (np.asarray(starts) >= active.any(axis=1)).all() and (np.asarray(steps) >= 0).all()
    # every kind of row occurs: solved with and without a free set, keeping all, seeing none,
    # capped (nvis > C) and moved pointers (queries after the first of their range)
    assert active.any() and (~active & (want["nvis"] > 0)).any() and (want["nvis"] == 0).any()
    assert (want["nvis"] > cap).any() and (want["first"] >= 0).any()
    assert (want["n_free"] > 0).any() == (cap > k)  # C = k: the k candidates all weigh 1


def test_list_select_lowers_to_triton_for_an_h100():
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    from sea_jax.kernels.gpu_sparsek_threshold import list_select

    sds = jax.ShapeDtypeStruct
    n, m, bq = 4, 2176, 128
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(lambda *a: list_select(*a, k=1024, cap=2048)).trace(
            sds((n, m), jnp.float32), sds((n, m), jnp.int32), sds((n, bq), jnp.int32), sds((n, bq), jnp.int32),
            sds((n, bq), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"] and "sparsek_list_select" in text


def test_list_select_bad_arguments():
    from sea_jax.kernels.gpu_sparsek_threshold import list_select

    z = jnp.zeros((2, 64), jnp.float32)
    tin = jnp.zeros((2, 64), jnp.int32)
    s = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match="z must be float32"):
        list_select(z.astype(jnp.float16), tin, s, s, s, k=4, cap=8, interpret=True)
    with pytest.raises(ValueError, match="e must be int32"):
        list_select(z, tin, s, s[:, :8], s, k=4, cap=8, interpret=True)
    with pytest.raises(ValueError, match="spos must be int32"):
        list_select(z, tin, s, s, s.astype(jnp.float32), k=4, cap=8, interpret=True)
    with pytest.raises(ValueError, match="cap must be an int >= k=4"):
        list_select(z, tin, s, s, s, k=4, cap=3, interpret=True)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        list_select(z, tin, s, s, s, k=0, cap=3, interpret=True)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("rows,bq,m,k,cap,ties", [(3, 128, 2176, 1024, 2048, False), (4, 16, 100, 7, 7, True),
                                                  (3, 64, 700, 200, 400, False)])
def test_list_select_compiled_matches_brute_force(rows, bq, m, k, cap, ties):
    from sea_jax.kernels.gpu_sparsek_threshold import list_select

    rng = np.random.default_rng(rows + m)
    z, tin, s, e, spos = _run_lists(rng, rows, bq, m, k, ties=ties)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    got = jax.jit(lambda *a: list_select(*a, k=k, cap=cap))(jnp.asarray(z, jnp.float32), i32(tin), i32(s), i32(e),
                                                            i32(spos))
    want, root = _expected_select(z, tin, s, e, k, cap, np.asarray(got.tau_s))
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), w, err_msg=name)
    np.testing.assert_allclose(np.asarray(got.tau_s), np.where(want["nvis"] > k, root, 0), atol=2e-5, rtol=0)


def _hidden_sums_case(rng, rows, bq, m):
    """Random ranges within [0, m) (some empty), entering positions (some m: none) and values."""
    lo = rng.integers(0, m, (rows, bq))
    hi = np.minimum(lo + rng.integers(0, m // 2 + 1, (rows, bq)), m)
    hi[:, ::5] = lo[:, ::5]  # empty ranges
    spos = rng.integers(0, m + 1, (rows, bq))
    spos[:, 1::7] = m  # no entering key
    val = rng.standard_normal((rows, bq))
    return spos, lo, hi, val


def _hidden_sums_brute_force(spos, lo, hi, val):
    rows, bq = spos.shape
    out = np.zeros((rows, bq))
    for r in range(rows):
        for t in range(bq):
            for i in range(t):
                if lo[r, i] <= spos[r, t] < hi[r, i]:
                    out[r, t] += val[r, i]
    return out


def _hidden_sums_check(got, spos, lo, hi, val):
    want = _hidden_sums_brute_force(spos, lo, hi, val)
    assert (want != 0).mean() > 0.15  # many keys hidden in some earlier range: the sums matter
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,bq,m", [(3, 128, 300), (2, 5, 9), (4, 40, 2176)])
def test_hidden_range_sums_matches_brute_force(rows, bq, m):
    from sea_jax.kernels.gpu_sparsek_threshold import hidden_range_sums

    spos, lo, hi, val = _hidden_sums_case(np.random.default_rng(rows * bq + m), rows, bq, m)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    got = hidden_range_sums(i32(spos), i32(lo), i32(hi), jnp.asarray(val, jnp.float32), interpret=True)
    assert got.shape == (rows, bq) and got.dtype == jnp.float32
    _hidden_sums_check(got, spos, lo, hi, val)


def test_hidden_range_sums_bad_arguments_and_lowering():
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    from sea_jax.kernels.gpu_sparsek_threshold import hidden_range_sums

    a = jnp.zeros((2, 16), jnp.int32)
    v = jnp.zeros((2, 16), jnp.float32)
    with pytest.raises(ValueError, match="val must be float32"):
        hidden_range_sums(a, a, a, a, interpret=True)
    with pytest.raises(ValueError, match="hi must be int32"):
        hidden_range_sums(a, a, a[:, :8], v, interpret=True)
    sds = jax.ShapeDtypeStruct
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(hidden_range_sums).trace(
            *[sds((8, 128), jnp.int32)] * 3, sds((8, 128), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"] and "sparsek_hidden_range_sums" in text


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
def test_hidden_range_sums_compiled_matches_brute_force():
    from sea_jax.kernels.gpu_sparsek_threshold import hidden_range_sums

    spos, lo, hi, val = _hidden_sums_case(np.random.default_rng(7), 6, 128, 2176)
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    got = jax.jit(hidden_range_sums)(i32(spos), i32(lo), i32(hi), jnp.asarray(val, jnp.float32))
    _hidden_sums_check(got, spos, lo, hi, val)
