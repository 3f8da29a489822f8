"""The on-chip gradient of the SparseK list thresholds (kernels/gpu_sparsek_threshold_grad.py).

Checked in interpret mode on CPU against the SparseK VJP's rule written out here in NumPy, row
by row (free set of each query's visible candidates, its mean cotangent, the tie entry of rows
without a free set); the selection-level tests (tests/ops/test_sparsek_select.py, schedule
"fused") check it again against the dense operator's VJP.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_sparsek_threshold_grad import list_threshold_grad


def _lists(rng, rows, bq, m, k, *, ties=False):
    """Random block lists in the selection's structure: scores sorted (descending) on every
    run range, entering entries (one per query index), per-query ranges, active / inactive /
    empty rows, thresholds tau - theta in [-1, 0]."""
    out = {n: np.zeros((rows, bq), dt) for n, dt in
           (("s", np.int64), ("end", np.int64), ("last", np.int64), ("nvis", np.int64), ("theta", np.float32),
            ("tau", np.float32), ("g", np.float32))}
    z = -np.sort(-rng.normal(size=(rows, m)) * rng.uniform(0.2, 3.0, size=(rows, 1)), axis=1)
    if ties:  # integer scores: long runs of equal entries, some of them entering keys
        z = np.round(z)
    z = z.astype(np.float32)
    tin = np.full((rows, m), -1, np.int64)
    for r in range(rows):
        n_enter = rng.integers(0, min(bq, m) + 1)
        at = rng.choice(m, size=n_enter, replace=False)
        if ties:  # entering keys at the head of tie runs: a hidden one ahead of a row's tie entry
            starts = np.nonzero(np.diff(z[r], prepend=np.inf) < 0)[0]
            at = np.unique(np.concatenate([starts[:n_enter // 2], at]))[:n_enter]
        tin[r, at] = rng.permutation(bq)[:len(at)]
        for i in range(bq):
            s = rng.integers(0, 3) if rng.random() < 0.3 else 0
            e = m if rng.random() < 0.7 else rng.integers(s, m + 1)
            vis = np.nonzero((np.arange(m) >= s) & (np.arange(m) < e) & (tin[r] <= i))[0]
            if rng.random() < 0.1:
                vis = vis[:0]  # sees nothing
            elif rng.random() < 0.2:
                vis = vis[:rng.integers(1, k + 1)]  # keeps everything it sees
            nvis = len(vis)
            if nvis == 0:
                e = s
            cap = rng.integers(k, nvis + 1) if nvis > k else nvis  # candidates: the first cap visible
            last = vis[cap - 1] if nvis else s
            out["s"][r, i], out["nvis"][r, i], out["last"][r, i] = s, nvis, last
            out["end"][r, i] = min(e, last + 1) if nvis else s
            if nvis > k:
                out["theta"][r, i] = z[r, vis[k - 1]]
                # tau - theta in [-1, 0]; with integer scores, -1 or 0 leaves no free entry
                # (saturated rows: the tie entry takes the cotangent)
                out["tau"][r, i] = rng.choice([-1.0, 0.0]) if ties and rng.random() < 0.5 else -rng.random()
            out["g"][r, i] = rng.normal()
    return z, tin, out


def _expected(z, tin, a, k):
    """The SparseK VJP of tau, query by query (float32 rounding of x as the forward's), and
    counts of the cases met: rows with a free set, saturated rows, tie entries behind a
    hidden entry of the same score."""
    rows, m = z.shape
    dz = np.zeros((rows, m), np.float64)
    seen = {"free": 0, "saturated": 0, "hidden_tie": 0}
    for r in range(rows):
        for i in range(a["s"].shape[1]):
            s, end, nvis = a["s"][r, i], a["end"][r, i], a["nvis"][r, i]
            if nvis == 0:
                continue
            idx = np.arange(s, end)
            cand = idx[tin[r, idx] <= i]
            g = np.float32(a["g"][r, i])
            if nvis > k:
                x = (z[r, cand] - a["theta"][r, i]) - a["tau"][r, i]  # float32, the forward's rounding
                free = cand[(x > 0) & (x < 1)]
                if len(free):
                    dz[r, free] += np.float32(g / np.float32(len(free)))
                    seen["free"] += 1
                    continue
                seen["saturated"] += 1
                target = a["theta"][r, i]
            else:
                target = z[r, a["last"][r, i]]
            tie = cand[np.nonzero(z[r, cand] == target)[0][0]]
            dz[r, tie] += g
            seen["hidden_tie"] += int((z[r, s:tie] == target).any())
    return dz, seen


def _args(z, tin, a):
    """The kernel's inputs; the entering keys in list order (padded with keys past the list)."""
    rows, m = tin.shape
    bq = a["s"].shape[1]
    pos = np.full((rows, bq), m, np.int64)
    query = np.zeros((rows, bq), np.int64)
    for r in range(rows):
        at = np.nonzero(tin[r] >= 0)[0]
        pos[r, :len(at)] = at
        query[r, :len(at)] = tin[r, at]
        query[r, len(at):] = np.arange(bq - len(at))
    args = [jnp.asarray(z), jnp.asarray(pos, jnp.int32), jnp.asarray(query, jnp.int32)]
    args += [jnp.asarray(a[n], jnp.int32) for n in ("s", "end", "last", "nvis")]
    return args + [jnp.asarray(a[n], jnp.float32) for n in ("theta", "tau", "g")]


def _run(z, tin, a, k, **kw):
    f = lambda *x: list_threshold_grad(*x, k=k, interpret=True, **kw)  # noqa: E731
    return np.asarray(jax.jit(f)(*_args(z, tin, a)))


@pytest.mark.parametrize("rows,bq,m,k,rpp,ties", [
    (3, 16, 40, 5, 16, False),
    (2, 24, 100, 20, 16, True),    # block_q not a multiple of the rows per program; ties: saturated rows
    (2, 64, 300, 90, 32, False),
])
def test_matches_numpy_vjp(rows, bq, m, k, rpp, ties):
    rng = np.random.default_rng(rows * 1000 + m)
    z, tin, a = _lists(rng, rows, bq, m, k, ties=ties)
    want, seen = _expected(z, tin, a, k)
    got = _run(z, tin, a, k, rows_per_program=rpp)
    assert got.shape == z.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the cases exercise free sets, empty rows, rows keeping all, entering keys and (integer
    # scores) saturated rows and tie entries behind hidden entries of the same score
    assert seen["free"] > 0 and (a["nvis"] == 0).any() and ((a["nvis"] > 0) & (a["nvis"] <= k)).any()
    assert (tin >= 0).any()
    if ties:
        assert seen["saturated"] > 0 and seen["hidden_tie"] > 0, seen


def test_bad_arguments():
    z = jnp.zeros((2, 32), jnp.float32)
    r_i = jnp.zeros((2, 16), jnp.int32)
    r_f = jnp.zeros((2, 16), jnp.float32)
    ok = (z, r_i, r_i, r_i, r_i, r_i, r_i, r_f, r_f, r_f)
    with pytest.raises(ValueError, match="z must be float32"):
        list_threshold_grad(z.astype(jnp.bfloat16), *ok[1:], k=4)
    with pytest.raises(ValueError, match="enter_query must be int32"):
        list_threshold_grad(z, r_i, r_i[:, :5], *ok[3:], k=4)
    with pytest.raises(ValueError, match="nvis must be int32"):
        list_threshold_grad(*ok[:6], r_f, *ok[7:], k=4)
    with pytest.raises(ValueError, match="tau must be float32"):
        list_threshold_grad(*ok[:8], r_f[:, :3], ok[9], k=4)
    with pytest.raises(ValueError, match="k must be an int"):
        list_threshold_grad(*ok, k=0)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        list_threshold_grad(*ok, k=4, rows_per_program=24)


def test_lowers_to_triton_for_an_h100():
    """The Pallas -> Triton lowering runs on the CPU machine: a construct Triton cannot take
    fails here, not first on the GPU."""
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    sds = jax.ShapeDtypeStruct
    n, m, bq = 4, 1152, 128
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    rows = [sds((n, bq), jnp.int32)] * 6 + [sds((n, bq), jnp.float32)] * 3
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(lambda *a: list_threshold_grad(*a, k=1024)).trace(
            sds((n, m), jnp.float32), *rows).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"]
    assert "sparsek_list_threshold_grad" in text


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("bq,m,k,ties", [(128, 1152, 1024, False), (24, 100, 20, True)])
def test_compiled_matches_numpy_vjp(bq, m, k, ties):
    rng = np.random.default_rng(bq + m)
    z, tin, a = _lists(rng, 3, bq, m, k, ties=ties)
    want, _ = _expected(z, tin, a, k)
    got = np.asarray(jax.jit(lambda *x: list_threshold_grad(*x, k=k))(*_args(z, tin, a)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
