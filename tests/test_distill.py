"""SEA distillation losses against hand computations and explicit loops.

Tolerances: float32 vs float64 NumPy loops 1e-5 relative / 1e-6 absolute (small sums of
probabilities); pooled vs dense estimate loss compared in float64 at 1e-10 (they are the
same quantity up to terms computed here by hand); float64 finite differences 1e-5.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference_attention import segment_rows
from x64 import enable_x64

from sea_jax import distill

B, H, K, D = 2, 4, 2, 8


def ref_cell(o, L, t_m):
    return int(Fraction(2 * o + 1, 2 * L) * t_m)


def segs(T):
    seg = np.ones((B, T), np.int32)
    seg[0, 5:] = 2
    seg[0, T - 2 :] = 0
    return seg


def dense_probs(q, k, start, length):
    """float64 loops: softmax(q.k / sqrt(D)) of every row over its prefix [B, H, T, S]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    Bn, T, Hn, Dn = q.shape
    S, G = k.shape[1], Hn // k.shape[2]
    P = np.zeros((Bn, Hn, T, S))
    for b, h, t in np.ndindex(Bn, Hn, T):
        js = np.arange(start[b, t], start[b, t] + length[b, t])
        if len(js) == 0:
            continue
        s = np.array([q[b, t, h] @ k[b, j, h // G] for j in js]) / np.sqrt(Dn)
        p = np.exp(s - s.max())
        P[b, h, t, js] = p / p.sum()
    return P


def pool_loop(P, start, length, t_m):
    """Sum of each row's probabilities over each cell's keys [B, T, H, t_m]."""
    Bn, Hn, T, S = P.shape
    out = np.zeros((Bn, T, Hn, t_m))
    for b, t in np.ndindex(Bn, T):
        L = length[b, t]
        for o in range(L):
            out[b, t, :, ref_cell(o, L, t_m)] += P[b, :, t, start[b, t] + o]
    return out


def rand(seed, *shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


# --------------------------------------------------------------------------------------
# hand computations
# --------------------------------------------------------------------------------------

def test_kl_mse_and_global_terms_by_hand():
    student = jnp.array([[[[1.0, 0.0], [0.3, 0.7]]]])  # [B=1, H=1, T=2, S=2]
    teacher = jnp.array([[[[1.0, 0.0], [0.5, 0.5]]]])
    got = distill.attention_loss_dense(student, teacher)
    kl = (0.5 * np.log(0.5 / 0.3) + 0.5 * np.log(0.5 / 0.7)) / 2  # batchmean over 2 rows
    mse = (0.2**2 + 0.2**2) / 4  # mean over 4 entries
    np.testing.assert_allclose(float(got["kl"]), kl, rtol=1e-6)
    np.testing.assert_allclose(float(got["mse"]), mse, rtol=1e-6)

    logits = jnp.array([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    targets = jnp.array([[1, 2]])
    mask = jnp.array([[1, 0]])
    ce0 = -(2.0 - np.log(np.exp(1) + np.exp(2) + 1))
    np.testing.assert_allclose(float(distill.lm_loss(logits, targets)), (ce0 + np.log(3)) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(distill.lm_loss(logits, targets, mask)), ce0, rtol=1e-6)

    teacher_logits = jnp.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    pt = np.exp([[0.0, 0, 0], [1, 0, 0]])
    pt /= pt.sum(-1, keepdims=True)
    ps = np.exp(np.asarray(logits[0], np.float64))
    ps /= ps.sum(-1, keepdims=True)
    rows = (pt * np.log(pt / ps)).sum(-1)
    np.testing.assert_allclose(float(distill.logit_kl(logits, teacher_logits)), rows.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(distill.logit_kl(logits, teacher_logits, mask)), rows[0], rtol=1e-6)

    a, b_ = [jnp.ones((1, 2, 3)), jnp.zeros((1, 2, 3))], [jnp.zeros((1, 2, 3)), jnp.full((1, 2, 3), 2.0)]
    np.testing.assert_allclose(float(distill.hidden_mse(a, b_)), (1.0 + 4.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(distill.context_loss(a[0], b_[1])), 1.0, rtol=1e-6)

    w = distill.DistillWeights()
    assert (w.estimate_kl, w.estimate_mse, w.attention_kl, w.attention_mse, w.context_mse) == (0.1, 1, 0.1, 1, 1)
    assert (w.lm, w.hidden_mse, w.logit_kl) == (0.1, 5.0, 0.2)
    total, terms = distill.distillation_loss([jnp.float32(1.0), jnp.float32(3.0)], jnp.float32(2.0),
                                             jnp.float32(0.5), jnp.float32(4.0))
    np.testing.assert_allclose(float(total), 0.1 * 2 + 5 * 0.5 + 0.2 * 4 + 2.0, rtol=1e-6)
    assert float(terms["layers"]) == 2.0


# --------------------------------------------------------------------------------------
# pooled teacher attention and the estimate loss
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_pool_attention_matches_loop(causal):
    T, t_m = 13, 8  # rows shorter and longer than t_m (empty cells), blocks of 4 with a tail
    q, k = rand(1, B, T, H, D), rand(2, B, T, K, D)
    start, length = segment_rows(segs(T), causal)
    got = jax.jit(lambda q, k: distill.pool_attention(q, k, jnp.asarray(start), jnp.asarray(length), t_m,
                                                      block_q=4))(q, k)
    want = pool_loop(dense_probs(q, k, start, length), start, length, t_m)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    sums = np.asarray(got).sum(-1)
    np.testing.assert_allclose(sums, np.broadcast_to(np.where(length > 0, 1.0, 0.0)[:, :, None], sums.shape),
                               atol=1e-5)


def _within_cell_terms(P, start, length, t_m):
    """The estimate-independent parts by which the dense loss exceeds the pooled one:
    sum_c sum_{j in c} a_j log(a_j n_c / A_c) (KL) and the within-cell sum of squares (MSE)."""
    Bn, Hn, T, S = P.shape
    kl = sq = 0.0
    for b, h, t in np.ndindex(Bn, Hn, T):
        L = length[b, t]
        cells = {}
        for o in range(L):
            cells.setdefault(ref_cell(o, L, t_m), []).append(P[b, h, t, start[b, t] + o])
        for a in cells.values():
            a = np.array(a)
            A, n = a.sum(), len(a)
            kl += sum(x * np.log(x * n / A) for x in a if x > 0)
            sq += ((a - A / n) ** 2).sum()
    return kl / (Bn * Hn * T), sq / (Bn * Hn * T * S)


@pytest.mark.parametrize("causal", [True, False])
def test_pooled_estimate_loss_equals_dense_form_where_it_must(causal):
    """Same gradient w.r.t. the estimate always; the values differ exactly by the within-cell
    terms, so they agree when the teacher is uniform inside every cell."""
    T, t_m = 11, 4
    start, length = segment_rows(segs(T), causal)
    with enable_x64():
        q, k = rand(3, B, T, H, D, dtype=jnp.float64), rand(4, B, T, K, D, dtype=jnp.float64)
        est = rand(5, B, T, H, t_m, dtype=jnp.float64)
        st, ln = jnp.asarray(start), jnp.asarray(length)
        P = dense_probs(q, k, start, length)
        pooled = distill.pool_attention(q, k, st, ln, t_m, block_q=4)

        def both(e, teacher_pooled, teacher_probs):
            a = distill.estimate_loss(e, teacher_pooled, ln, key_length=T)
            d = distill.estimate_loss_dense(e, teacher_probs, st, ln)
            return a, d

        run = jax.jit(lambda e, tp, tprobs: (both(e, tp, tprobs), jax.grad(
            lambda e: 0.1 * both(e, tp, tprobs)[0]["kl"] + both(e, tp, tprobs)[0]["mse"])(e), jax.grad(
            lambda e: 0.1 * both(e, tp, tprobs)[1]["kl"] + both(e, tp, tprobs)[1]["mse"])(e)))
        (pool_l, dense_l), g_pool, g_dense = run(est, pooled, jnp.asarray(P))
        kl_extra, mse_extra = _within_cell_terms(P, start, length, t_m)
        assert kl_extra > 1e-3 and mse_extra > 1e-6  # the general case really differs
        np.testing.assert_allclose(float(dense_l["kl"]), float(pool_l["kl"]) + kl_extra, rtol=1e-10)
        np.testing.assert_allclose(float(dense_l["mse"]), float(pool_l["mse"]) + mse_extra, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(g_pool), np.asarray(g_dense), atol=1e-12)

        # teacher uniform inside each cell: spread the pooled mass evenly over the cell's keys
        U = np.zeros_like(P)
        A = np.asarray(pooled)
        for b, t in np.ndindex(B, T):
            L = length[b, t]
            n = np.bincount([ref_cell(o, L, t_m) for o in range(L)], minlength=t_m)
            for o in range(L):
                c = ref_cell(o, L, t_m)
                U[b, :, t, start[b, t] + o] = A[b, t, :, c] / n[c]
        (pool_u, dense_u), _, _ = run(est, pooled, jnp.asarray(U))
        np.testing.assert_allclose(float(dense_u["kl"]), float(pool_u["kl"]), rtol=1e-10)
        np.testing.assert_allclose(float(dense_u["mse"]), float(pool_u["mse"]), rtol=1e-10)


def test_estimate_loss_hand_value_and_float64_gradients():
    """One row, t_m = 4, L = 6 (cells of 1, 2, 1, 2 keys): KL and MSE of the pooled form by
    hand; finite differences of the loss w.r.t. the estimate and of the pooled teacher
    w.r.t. q, k at float64."""
    t_m = 4
    n = np.array([1, 2, 1, 2])
    assert [ref_cell(o, 6, t_m) for o in range(6)] == [0, 1, 1, 2, 3, 3]
    e = np.array([0.5, -1.0, 2.0, 0.0])
    A = np.array([0.1, 0.2, 0.3, 0.4])
    R = n * np.exp(e) / (n * np.exp(e)).sum()
    got = distill.estimate_loss(jnp.asarray(e, jnp.float32).reshape(1, 1, 1, 4),
                                jnp.asarray(A, jnp.float32).reshape(1, 1, 1, 4),
                                jnp.array([[6]], jnp.int32), key_length=6)
    np.testing.assert_allclose(float(got["kl"]), (A * np.log(A / R)).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(got["mse"]), ((R - A) ** 2 / n).sum() / 6, rtol=1e-5)

    T = 7
    start, length = segment_rows(np.ones((1, T), np.int32), True)
    st, ln = jnp.asarray(start), jnp.asarray(length)
    with enable_x64():
        q, k = rand(6, 1, T, 2, 4, dtype=jnp.float64), rand(7, 1, T, 1, 4, dtype=jnp.float64)
        est = rand(8, 1, T, 2, t_m, dtype=jnp.float64)

        @jax.jit
        def f(est, q, k):
            pooled = distill.pool_attention(q, k, st, ln, t_m, block_q=4)
            out = distill.estimate_loss(est, pooled, ln)
            return 0.1 * out["kl"] + out["mse"]

        assert f(est, q, k).dtype == jnp.float64
        check_grads(f, (est, q, k), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# student attention loss, layer loss
# --------------------------------------------------------------------------------------

def test_attention_loss_blockwise_equals_dense_and_gradients():
    T = 13
    start, length = segment_rows(segs(T), True)
    st, ln = jnp.asarray(start), jnp.asarray(length)
    qs, ks, qt, kt = rand(10, B, T, H, D), rand(11, B, T, K, D), rand(12, B, T, H, D), rand(13, B, T, 1, D)

    @jax.jit
    def run(qs, ks):
        blk = lambda qs, ks: distill.attention_loss(qs, ks, qt, kt, st, ln, block_q=4)  # noqa: E731
        den = lambda qs, ks: distill.attention_loss_dense(  # noqa: E731
            distill.attention_probs(qs, ks, st, ln), distill.attention_probs(qt, kt, st, ln))
        tot = lambda fn: lambda *a: 0.1 * fn(*a)["kl"] + fn(*a)["mse"]  # noqa: E731
        return blk(qs, ks), den(qs, ks), jax.grad(tot(blk), (0, 1))(qs, ks), jax.grad(tot(den), (0, 1))(qs, ks)

    blk, den, g_blk, g_den = run(qs, ks)
    Ps, Pt = dense_probs(qs, ks, start, length), dense_probs(qt, kt, start, length)
    kl = np.where(Pt > 0, Pt * np.log(np.where(Pt > 0, Pt, 1) / np.where(Ps > 0, Ps, 1)), 0).sum() / (B * H * T)
    mse = ((Ps - Pt) ** 2).sum() / (B * H * T * T)
    for got in (blk, den):
        np.testing.assert_allclose(float(got["kl"]), kl, rtol=1e-5)
        np.testing.assert_allclose(float(got["mse"]), mse, rtol=1e-5)
    for a, b_ in zip(g_blk, g_den):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6)


def test_layer_loss_combines_weighted_terms():
    T, t_m = 9, 4
    start, length = segment_rows(np.ones((B, T), np.int32), True)
    aux = {"estimate": rand(20, B, T, H, t_m), "row_start": jnp.asarray(start), "row_length": jnp.asarray(length),
           "q": rand(21, B, T, H, D), "k": rand(22, B, T, K, D)}
    out, tq, tk, tout = rand(23, B, T, H, D), rand(24, B, T, H, D), rand(25, B, T, K, D), rand(26, B, T, H, D)
    w = distill.DistillWeights(estimate_kl=0.3, estimate_mse=2.0, attention_kl=0.7, attention_mse=1.5, context_mse=4.0)
    total, terms = jax.jit(lambda: distill.layer_loss(aux, out, tq, tk, tout, w, block_q=4))()
    e = distill.estimate_loss(aux["estimate"], distill.pool_attention(tq, tk, aux["row_start"], aux["row_length"], t_m),
                              aux["row_length"])
    np.testing.assert_allclose(float(terms["estimate_kl"]), float(e["kl"]), rtol=1e-5)
    np.testing.assert_allclose(float(terms["context_mse"]), float(jnp.mean((out - tout) ** 2)), rtol=1e-5)
    want = sum(getattr(w, n) * float(v) for n, v in terms.items())
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert set(terms) == {"estimate_kl", "estimate_mse", "attention_kl", "attention_mse", "context_mse"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="estimate_kl must be"):
        distill.DistillWeights(estimate_kl=-1.0)
    e = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="teacher_pooled must"):
        distill.estimate_loss(e, jnp.zeros((1, 3, 2, 8)), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="row_length must be"):
        distill.estimate_loss(e, e, jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="q and k must have rank 4"):
        distill.pool_attention(jnp.zeros((3, 2, 4)), jnp.zeros((1, 3, 1, 4)), jnp.zeros((1, 3), jnp.int32),
                               jnp.ones((1, 3), jnp.int32), 4)
    with pytest.raises(ValueError, match="H % K == 0"):
        distill.pool_attention(jnp.zeros((1, 3, 3, 4)), jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3), jnp.int32),
                               jnp.ones((1, 3), jnp.int32), 4)
    with pytest.raises(ValueError, match="aux lacks"):
        distill.layer_loss({"estimate": e}, e, e, e, e)
    with pytest.raises(ValueError, match="T \\* S must be"):
        distill.attention_probs(jnp.zeros((1, 2048, 1, 4)), jnp.zeros((1, 2048, 1, 4)),
                                jnp.zeros((1, 2048), jnp.int32), jnp.ones((1, 2048), jnp.int32))
    with pytest.raises(ValueError, match="logits must be"):
        distill.lm_loss(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="same non-zero number"):
        distill.hidden_mse([jnp.zeros(2)], [])
    with pytest.raises(ValueError, match="layer_losses must not be empty"):
        distill.distillation_loss([], 0.0, 0.0, 0.0)
