"""SparseK operator against an independent bisection solver (float64 NumPy), plus VJP checks.

Tolerances: float32 computations against the float64 reference, |dp| <= 2e-5 (the operator
shifts by the k-th value, so only the band around the threshold matters, at any scale);
float64 runs <= 1e-9; finite differences at float64 with eps 1e-6, <= 1e-6 abs.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.ops.sparsek import sparsek, sparsek_given_kth
from x64 import enable_x64


def bisect_capped_simplex(z, k, valid=None, iters=200):
    """p = clip(z - tau, 0, 1), sum p = k over valid entries; plain bisection on tau.

    Rows with <= k valid entries: p = 1 on the valid entries. Returns (p, tau) float64; tau is
    NaN for those prefix-rule rows (not compared).
    """
    z = np.asarray(z, np.float64)
    valid = np.isfinite(z) if valid is None else (np.asarray(valid, bool) & np.isfinite(z))
    n_valid = valid.sum()
    if n_valid <= k:
        return valid.astype(np.float64), np.nan
    zv = z[valid]
    lo, hi = zv.min() - 1.0, zv.max()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.clip(zv - mid, 0, 1).sum() >= k:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    p = np.where(valid, np.clip(np.where(valid, z, 0) - tau, 0, 1), 0.0)
    return p, tau


def reference_rows(z, k, valid=None):
    z2 = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    v2 = None if valid is None else np.broadcast_to(valid, z.shape).reshape(-1, z.shape[-1])
    ps, taus = zip(*[bisect_capped_simplex(z2[i], k, None if v2 is None else v2[i]) for i in range(len(z2))])
    return np.stack(ps).reshape(z.shape), np.asarray(taus).reshape(z.shape[:-1])


def _free_set_nonempty(p):
    return ((p > 1e-6) & (p < 1 - 1e-6)).any(-1)


@pytest.mark.parametrize("method", ["bracket", "sort"])
def test_matches_bisection_many_sizes(method):
    # rows of every length 2..33 (the rest of a 33-wide row masked out), one compile per k
    rng = np.random.default_rng(0)
    width = 33
    lengths = np.arange(2, width + 1)
    for k in (1, 2, 5, 16, 32):
        n = lengths[lengths > k]
        z = (rng.standard_normal((len(n), width)) * rng.choice([0.1, 1.0, 3.0], (len(n), 1))).astype(np.float32)
        valid = np.arange(width)[None, :] < n[:, None]
        if k == 1:  # one exact-width call without a mask as well
            out = sparsek(jnp.asarray(z), k, method=method)
            p_ref, _ = reference_rows(z, k)
            np.testing.assert_allclose(out.p, p_ref, atol=2e-5)
        out = sparsek(jnp.asarray(z), k, valid=jnp.asarray(valid), method=method)
        p_ref, tau_ref = reference_rows(z, k, valid)
        assert out.p.dtype == jnp.float32 and out.tau.shape == (len(n),)
        np.testing.assert_allclose(out.p, p_ref, atol=2e-5, err_msg=f"k={k}")
        np.testing.assert_allclose(np.asarray(out.p, np.float64).sum(-1), k, atol=1e-4)
        assert (np.asarray(out.p) >= 0).all() and (np.asarray(out.p) <= 1).all()
        assert (np.asarray(out.p)[~valid] == 0).all()
        has_free = _free_set_nonempty(p_ref)
        np.testing.assert_allclose(np.asarray(out.tau)[has_free], tau_ref[has_free], atol=2e-5)
        # tau lies in the bracket [z_(k) - 1, z_(k))
        zk = -np.sort(-np.where(valid, z, -np.inf), axis=-1)[:, k - 1]
        assert (np.asarray(out.tau) >= zk - 1 - 1e-6).all() and (np.asarray(out.tau) < zk).all()


@pytest.mark.parametrize("method", ["bracket", "sort"])
def test_ties_scales_and_inf(method):
    rng = np.random.default_rng(1)
    rows = [
        np.zeros(9),  # all tied: p = k / n
        np.array([2.0, 2.0, 2.0, 0.5, 0.5, -1.0, -1.0, 3.0]),  # ties at and around the threshold
        np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # exact saturation (free set empty)
        rng.standard_normal(12) * 1e4,  # huge scale: hard top-k
        rng.standard_normal(12) * 1e-4,  # tiny scale: nearly uniform k / n
        1e6 + rng.standard_normal(12),  # large offset: the shift must keep precision
        np.array([0.3, -np.inf, 1.2, -np.inf, 0.7, 0.1, -np.inf, 2.0]),  # -inf entries are invalid
    ]
    # pad every row to 12 with -inf (invalid entries, also under test)
    z = np.stack([np.pad(r, (0, 12 - len(r)), constant_values=-np.inf) for r in rows]).astype(np.float32)
    for k in (1, 2, 4):
        out = sparsek(jnp.asarray(z), k, method=method)
        p_ref, _ = reference_rows(z, k)
        # the reference sees the same float32-rounded scores, and the operator shifts by the
        # k-th value before any arithmetic, so even the 1e6 offset keeps full precision
        np.testing.assert_allclose(out.p, p_ref, atol=2e-5, err_msg=f"k={k}")
        assert np.isfinite(np.asarray(out.p)).all() and np.isfinite(np.asarray(out.tau)).all()
        np.testing.assert_allclose(np.asarray(out.p, np.float64).sum(-1), k, atol=1e-4)
        assert (np.asarray(out.p)[~np.isfinite(z)] == 0).all()
    np.testing.assert_allclose(sparsek(jnp.asarray(z), 4, method=method).p[0, :9], 4 / 9, atol=1e-6)


@pytest.mark.parametrize("method", ["bracket", "sort"])
def test_valid_mask_and_prefix_rule(method):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((6, 10)).astype(np.float32)
    valid = np.ones((6, 10), bool)
    valid[0, 3:] = False  # 3 valid, k = 4: prefix rule, all selected with weight 1
    valid[1, 4:] = False  # 4 valid = k: p = 1
    valid[2, :] = False  # nothing valid: p = 0, tau = 0
    valid[3, ::2] = False
    out = sparsek(jnp.asarray(z), 4, valid=jnp.asarray(valid), method=method)
    p_ref, tau_ref = reference_rows(z, 4, valid)
    np.testing.assert_allclose(out.p, p_ref, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out.p)[0], valid[0].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out.p)[2], 0)
    assert float(out.tau[2]) == 0
    # prefix-rule tau = min(valid z) - 1 (the largest tau that keeps every valid p = 1)
    np.testing.assert_allclose(float(out.tau[0]), z[0, :3].min() - 1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.tau)[4:], tau_ref[4:], atol=2e-5)


def test_bracket_and_sort_agree_and_given_kth():
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((5, 7, 40)) * rng.choice([0.3, 2.0], (5, 7, 1)), jnp.float32)
    valid = jnp.asarray(rng.random((5, 7, 40)) < 0.8)
    a = sparsek(z, 6, valid=valid, method="bracket")
    b = sparsek(z, 6, valid=valid, method="sort")
    np.testing.assert_allclose(a.p, b.p, atol=1e-5)
    np.testing.assert_allclose(a.tau, b.tau, atol=1e-5)
    kth = jax.lax.top_k(jnp.where(valid, z, -jnp.inf), 6)[0][..., -1]
    c = sparsek_given_kth(z, valid, kth, 6)
    np.testing.assert_allclose(a.p, c.p, atol=1e-6)
    np.testing.assert_allclose(a.tau, c.tau, atol=1e-6)


def test_bf16_input_computes_in_float32():
    z = jax.random.normal(jax.random.key(0), (3, 16), jnp.bfloat16)
    out = sparsek(z, 5)
    assert out.p.dtype == jnp.float32 and out.tau.dtype == jnp.float32
    p_ref, _ = reference_rows(np.asarray(z.astype(jnp.float32)), 5)
    np.testing.assert_allclose(out.p, p_ref, atol=2e-5)


@pytest.mark.parametrize("method", ["bracket", "sort"])
def test_vjp_against_float64_finite_differences(method):
    rng = np.random.default_rng(4)
    k, n = 3, 9
    with enable_x64():
        z = rng.standard_normal((5, n)) * rng.choice([0.3, 1.0], (5, 1))
        # row 4: exactly saturated (3 entries at 1, the rest at 0): tau = z_(3) - 1 moves with z_(3)
        z[4] = [3.0, 0.5, 2.5, 0.1, 2.2, -1.0, 0.3, -0.4, 0.0]
        z = jnp.asarray(z, jnp.float64)
        valid = np.ones((5, n), bool)
        valid[0, 1] = False  # a masked entry gets no gradient
        valid[1, 5:] = False  # 5 valid entries
        valid[2, 3:] = False  # 3 valid = k: prefix rule, p == 1, tau = min - 1
        valid = jnp.asarray(valid)
        g_p = jnp.asarray(rng.standard_normal((5, n)), jnp.float64)
        g_t = jnp.asarray(rng.standard_normal(5), jnp.float64)

        @jax.jit
        def loss(z):
            out = sparsek(z, k, valid=valid, method=method)
            assert out.p.dtype == jnp.float64
            return jnp.vdot(out.p, g_p) + jnp.vdot(out.tau, g_t)

        grad = np.asarray(jax.grad(loss)(z))
        eps = 1e-6
        steps = eps * jnp.eye(5 * n, dtype=jnp.float64).reshape(5 * n, 5, n)
        fd = np.asarray((jax.vmap(loss)(z + steps) - jax.vmap(loss)(z - steps)) / (2 * eps)).reshape(5, n)
        np.testing.assert_allclose(grad, fd, atol=1e-6)
        assert (grad[~np.asarray(valid)] == 0).all()
        np.testing.assert_allclose(grad[4], np.where(np.arange(n) == 4, g_t[4], 0), atol=1e-12)
        # the free set is non-empty in the active rows, so the check above is not vacuous
        p = np.asarray(sparsek(z, k, valid=valid, method=method).p)
        assert ((p > 0) & (p < 1)).any(-1)[[0, 1, 3]].all()
        # closed form: g - mean_S g on the free set S, zero elsewhere (row 3, tau-free loss)
        gp_only = np.asarray(jax.grad(lambda z: jnp.vdot(sparsek(z, k, method=method).p, g_p))(z))
        free = (p[3] > 0) & (p[3] < 1)
        expect = np.where(free, np.asarray(g_p[3]) - np.asarray(g_p[3])[free].mean(), 0)
        np.testing.assert_allclose(gp_only[3], expect, atol=1e-12)


def test_prefix_rule_gradient_only_through_tau_min():
    with enable_x64():
        z = jnp.asarray([0.5, -0.2, 0.9], jnp.float64)
        gp = jax.grad(lambda z: jnp.sum(sparsek(z, 3).p * jnp.arange(3.0)))(z)
        np.testing.assert_array_equal(gp, 0)
        gt = jax.grad(lambda z: sparsek(z, 4 - 1).tau)(z)
        np.testing.assert_array_equal(gt, [0, 1, 0])  # tau = min(z) - 1


def test_jit_vmap_grad_compose():
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.standard_normal((4, 3, 12)), jnp.float32)
    f = lambda z: sparsek(z, 3).p
    direct = f(z)
    np.testing.assert_allclose(jax.jit(f)(z), direct, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.vmap(f))(z), direct, atol=1e-6)
    w = jnp.asarray(rng.standard_normal(12), jnp.float32)
    g = jax.jit(jax.grad(lambda z: jnp.sum(f(z) * w)))(z)
    g2 = jax.vmap(jax.grad(lambda zz: jnp.sum(f(zz) * w)))(z)
    np.testing.assert_allclose(g, g2, atol=1e-6)
    # rows are independent and the gradient sums to zero along a row (sum p = k is constant)
    np.testing.assert_allclose(np.asarray(g).sum(-1), 0, atol=1e-5)


def test_bad_inputs():
    z = jnp.zeros((2, 5))
    for k in (0, -1, 6, 2.0, True):
        with pytest.raises(ValueError, match="k"):
            sparsek(z, k)
    with pytest.raises(ValueError, match="floating"):
        sparsek(jnp.zeros((2, 5), jnp.int32), 2)
    with pytest.raises(ValueError, match="method"):
        sparsek(z, 2, method="heap")
    with pytest.raises(ValueError, match="valid"):
        sparsek(z, 2, valid=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="valid"):
        sparsek(z, 2, valid=jnp.ones((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="non-empty"):
        sparsek(jnp.zeros((2, 0)), 1)
