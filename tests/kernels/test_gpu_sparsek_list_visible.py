"""Each query's visible entries of a SparseK block list (kernels/gpu_sparsek_list_visible.py).

Interpret mode on CPU against a NumPy count written here (list the visible entries of each
query's range and index them); the selection-level tests (tests/ops/test_sparsek_select.py,
schedule "fused") check the selection built from it against the other schedules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_sparsek_list_visible import list_visible


def _case(rng, rows, bq, m, k, c):
    """Random lists: entering entries (one per query index) and run ranges, some empty; the
    visible counts spread around k and C."""
    tin = np.full((rows, m), -1, np.int64)
    s = np.zeros((rows, bq), np.int64)
    e = np.zeros((rows, bq), np.int64)
    for r in range(rows):
        n_enter = rng.integers(0, min(bq, m) + 1)
        tin[r, rng.choice(m, size=n_enter, replace=False)] = rng.permutation(bq)[:n_enter]
        for i in range(bq):
            s[r, i] = rng.integers(0, 4)
            e[r, i] = s[r, i] if rng.random() < 0.1 else rng.integers(min(s[r, i] + k - 2, m), m + 1)
            e[r, i] = max(e[r, i], s[r, i])
    return tin, s, e


def _entering(tin, bq):
    """The kernel's inputs: the entering keys' list indices (ascending) and query indices,
    padded with keys past the list."""
    rows, m = tin.shape
    pos = np.full((rows, bq), m, np.int64)
    query = np.zeros((rows, bq), np.int64)
    for r in range(rows):
        at = np.nonzero(tin[r] >= 0)[0]
        pos[r, :len(at)] = at
        query[r, :len(at)] = tin[r, at]
        query[r, len(at):] = np.arange(bq - len(at))  # (where no key enters: position m, never hidden)
    return jnp.asarray(pos, jnp.int32), jnp.asarray(query, jnp.int32)


def _expected(tin, s, e, k, c):
    rows, bq = s.shape
    out = [np.zeros((rows, bq), np.int64) for _ in range(4)]
    for r in range(rows):
        for i in range(bq):
            idx = np.arange(s[r, i], e[r, i])
            vis = idx[tin[r, idx] <= i]
            n = len(vis)
            pick = lambda j: vis[j - 1] if j > 0 else s[r, i] - 1  # noqa: E731  (1-based; 0: none)
            out[0][r, i] = n
            out[1][r, i] = pick(min(n, k))
            out[2][r, i] = pick(min(n, c))
            out[3][r, i] = vis[c] if n > c else e[r, i]
    return out


@pytest.mark.parametrize("rows,bq,m,k,c,rpp", [
    (3, 16, 40, 5, 9, 16),
    (2, 24, 100, 20, 20, 16),    # block_q not a power of two nor a multiple of the rows per program; k = C
    (2, 64, 300, 90, 200, 32),
])
def test_matches_numpy(rows, bq, m, k, c, rpp):
    rng = np.random.default_rng(rows * 1000 + m)
    tin, s, e = _case(rng, rows, bq, m, k, c)
    want = _expected(tin, s, e, k, c)
    f = jax.jit(lambda *a: list_visible(*a, k=k, c=c, rows_per_program=rpp, interpret=True))
    got = f(*_entering(tin, bq), jnp.asarray(s, jnp.int32), jnp.asarray(e, jnp.int32))
    for name, g, w in zip(("nvis", "kpos", "last", "nxt"), got, want):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
    n = want[0]
    # every regime met: empty rows, fewer than k, between k and C (when k < C), more than C
    assert (n == 0).any() and ((n > 0) & (n < k)).any() and (n > c).any()
    assert k == c or ((n > k) & (n <= c)).any()


def test_bad_arguments():
    p = jnp.zeros((2, 16), jnp.int32)
    s = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match="enter_pos must be int32"):
        list_visible(p.astype(jnp.float32), p, s, s, k=2, c=4)
    with pytest.raises(ValueError, match="enter_query must have enter_pos's shape"):
        list_visible(p, p[:, :3], s, s, k=2, c=4)
    with pytest.raises(ValueError, match="e must be int32"):
        list_visible(p, p, s, s[:, :3], k=2, c=4)
    with pytest.raises(ValueError, match="k must be an int"):
        list_visible(p, p, s, s, k=0, c=4)
    with pytest.raises(ValueError, match="c must be >= k"):
        list_visible(p, p, s, s, k=5, c=4)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        list_visible(p, p, s, s, k=2, c=4, rows_per_program=24)


def test_lowers_to_triton_for_an_h100():
    """The Pallas -> Triton lowering (the cumulative sum included) runs on the CPU machine."""
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    sds = jax.ShapeDtypeStruct
    n, bq = 4, 128
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(lambda *a: list_visible(*a, k=1024, c=2048)).trace(
            *[sds((n, bq), jnp.int32)] * 4).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"]
    assert "sparsek_list_visible" in text


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("bq,m,k,c", [(128, 1152, 1024, 1024), (24, 100, 20, 40)])
def test_compiled_matches_numpy(bq, m, k, c):
    rng = np.random.default_rng(bq + m)
    tin, s, e = _case(rng, 3, bq, m, k, c)
    want = _expected(tin, s, e, k, c)
    got = jax.jit(lambda *a: list_visible(*a, k=k, c=c))(
        *_entering(tin, bq), jnp.asarray(s, jnp.int32), jnp.asarray(e, jnp.int32))
    for name, g, w in zip(("nvis", "kpos", "last", "nxt"), got, want):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
