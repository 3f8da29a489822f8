"""SparseKAttention against a dense masked reference built here (explicit T x T, float64).

The reference is written independently of sea_jax.ops.sparsek / sparsek_select:

* scores u_j = x_j . w_score + slope * j (NumPy float64);
* query i (segment ids equal and non-zero) attends the window {i - w < j <= i} at weight 1 and
  selects from the prefix P_i = {j <= i - w}: candidates = the top-C of P_i by (u_j, j)
  (C = k + extra), tau_i = the capped-simplex threshold of the candidates by plain bisection
  (sum_j clip(u_j - tau, 0, 1) = k), the top-k candidates carry m_ij = clip(u_j - tau_i, 0, 1);
  a prefix of <= k candidates is selected whole at weight 1; overflow_i = the (C+1)-th key of
  P_i scores above tau_i;
* one softmax over the union: "gate" o_i = sum_j softmax_j(q_i.k_j / sqrt(D)) m_ij v_j (no
  renormalisation, research/sparsek.md 2.3), "log" o_i = sum_j softmax_j(q_i.k_j / sqrt(D) +
  log m_ij) v_j.

Tolerances: float32 module vs float64 reference |diff| <= 2e-5 (outputs, weights, tau);
bfloat16 inputs <= 3e-2 absolute (bf16 output rounding, 8 mantissa bits); float64 gradients
vs the float64 reference's autodiff <= 1e-9 relative, vs central finite differences <= 1e-6;
decode vs full pass <= 2e-5 (float32, different summation order); Pallas (interpret) vs XLA
<= 2e-5 (outputs) and 1e-4 (gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpr_memory import big_arrays
from reference_attention import causal_mask, masked_softmax_attention
from sea_jax.attention.base import AttentionDims, make_attention
from sea_jax.attention.sparsek import SparseKAttention, SparseKCache, SparseKOptions
from x64 import enable_x64


# --------------------------------------------------------------------------------------
# the independent reference
# --------------------------------------------------------------------------------------

def ref_scores(x, w_score, slope, offset=0):
    """u: [B, T, K] float64."""
    x = np.asarray(x, np.float64)
    T = x.shape[1]
    pos = offset + np.arange(T, dtype=np.float64)
    return x @ np.asarray(w_score, np.float64) + slope * pos[None, :, None]


def bisect_tau(z, k, iters=200):
    """tau with sum_j clip(z_j - tau, 0, 1) = k (len(z) > k), plain bisection in float64."""
    z = np.asarray(z, np.float64)
    lo, hi = z.min() - 1.0, z.max()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.clip(z - mid, 0, 1).sum() >= k else (lo, mid)
    return 0.5 * (lo + hi)


def ref_select(u, k, window, extra, seg):
    """Per (b, kv head, i): the selection as dense [B, K, T, T] arrays.

    Returns dict with sel (bool), weight (m_ij on selected, 0 elsewhere), free (candidates with
    0 < clip(u - tau) < 1), n_up (#candidates with u - tau >= 1), tau ([B, K, T], nan for
    prefix-rule rows), rule (prefix-rule rows), overflow ([B, K, T] bool), win ([B, T, T]).
    """
    B, T, K = u.shape
    C = k + extra
    sel = np.zeros((B, K, T, T), bool)
    free = np.zeros((B, K, T, T), bool)
    weight = np.zeros((B, K, T, T))
    n_up = np.zeros((B, K, T))
    tau = np.full((B, K, T), np.nan)
    rule = np.zeros((B, K, T), bool)
    overflow = np.zeros((B, K, T), bool)
    win = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            if seg[b, i] == 0:  # padding query: selects nothing (prefix rule on an empty prefix)
                rule[b, :, i] = True
                continue
            same = [j for j in range(T) if seg[b, j] == seg[b, i]]
            for j in same:
                if i - window < j <= i:
                    win[b, i, j] = True
            prefix = [j for j in same if j <= i - window]
            for h in range(K):
                order = sorted(prefix, key=lambda j: (u[b, j, h], j), reverse=True)
                cand = order[:C]
                if len(cand) <= k:
                    rule[b, h, i] = True
                    sel[b, h, i, cand] = True
                    weight[b, h, i, cand] = 1.0
                    # extra = 0: more keys than candidates; inexact if the next one clears the
                    # reported tau = min(candidates) - 1
                    overflow[b, h, i] = len(order) > len(cand) and u[b, order[len(cand)], h] > u[b, cand[-1], h] - 1
                    continue
                t = bisect_tau(u[b, cand, h], k)
                tau[b, h, i] = t
                x = u[b, cand, h] - t
                p = np.clip(x, 0, 1)
                top = cand[:k]
                sel[b, h, i, top] = True
                weight[b, h, i, top] = p[:k]
                free[b, h, i, cand] = (x > 0) & (x < 1)
                n_up[b, h, i] = np.sum(x >= 1)
                overflow[b, h, i] = len(order) > C and u[b, order[C], h] > t
    return dict(sel=sel, weight=weight, free=free, n_up=n_up, tau=tau, rule=rule,
                overflow=overflow, win=win)


def ref_attention(q, k, v, ref, weight_mode):
    """Loops over (b, query head, i); explicit softmax over window U selected keys (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            kh = h // G
            for i in range(T):
                keys = np.nonzero(ref["win"][b, i] | ref["sel"][b, kh, i])[0]
                if len(keys) == 0:
                    continue
                m = np.where(ref["win"][b, i, keys], 1.0, ref["weight"][b, kh, i, keys])
                s = k[b, keys, kh] @ q[b, i, h] / np.sqrt(D)
                if weight_mode == "log":
                    keep = m > 0
                    s, m, keys = s[keep] + np.log(m[keep]), np.ones(keep.sum()), keys[keep]
                a = np.exp(s - s.max())
                a /= a.sum()
                out[b, i, h] = (a * m) @ v[b, keys, kh]
    return out


def ref_attention_jnp(q, k, v, x, w_score, ref, slope, k_budget, weight_mode):
    """The same attention as a differentiable dense float64 jnp function of (q, k, v, x,
    w_score): the selection sets / free sets are fixed (piecewise constant), the weights use
    tau's closed form on the reference's free set, tau = (sum_S u + #U - k) / |S|."""
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    u = jnp.einsum("bte,ek->bkt", x, w_score) + slope * jnp.arange(T, dtype=x.dtype)  # [B, K, T]
    free = jnp.asarray(ref["free"])
    nfree = free.sum(-1)
    tau_closed = (jnp.sum(jnp.where(free, u[:, :, None, :], 0), -1) + ref["n_up"] - k_budget) / jnp.maximum(nfree, 1)
    tau = jnp.where(nfree > 0, tau_closed, jnp.nan_to_num(jnp.asarray(ref["tau"])))
    m = jnp.clip(u[:, :, None, :] - tau[..., None], 0, 1)
    m = jnp.where(jnp.asarray(ref["rule"])[..., None], 1.0, m)
    m = jnp.where(jnp.asarray(ref["sel"]), m, 0)
    win = jnp.asarray(ref["win"])[:, None]  # [B, 1, T, T]
    m = jnp.where(win, 1.0, m)  # [B, K, T, T]
    allowed = win | jnp.asarray(ref["sel"])
    qg = q.reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(D)
    mg = m[:, :, None]
    ag = allowed[:, :, None]
    if weight_mode == "log":
        ag = ag & (mg > 0)
        s = s + jnp.log(jnp.where(ag, mg, 1))
        mg = jnp.ones_like(mg)
    s = jnp.where(ag, s, -jnp.inf)
    mx = jnp.max(jnp.where(ag, s, -1e300), -1, keepdims=True)
    e = jnp.where(ag, jnp.exp(s - jax.lax.stop_gradient(mx)), 0)
    a = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
    o = jnp.einsum("bkgts,bskd->btkgd", a * mg, v)
    return o.reshape(B, T, H, D)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def inputs(seed, B, T, H, K, D, E, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32).astype(dtype)
    x = jax.random.normal(ks[3], (B, T, E), jnp.float32).astype(dtype)
    return q, k, v, x


def module(H, K, D, E, seed=0, param_dtype=jnp.float32, score_scale=1.0, **opts):
    m = SparseKAttention(AttentionDims(H, K, D, E), SparseKOptions(**opts), rngs=nnx.Rngs(seed),
                         param_dtype=param_dtype)
    if score_scale != 1.0:
        m.w_score[...] = m.w_score[...] * score_scale
    return m


def layer_grads(m, q, k, v, x, seg, ct):
    """(out, [d w_score, dq, dk, dv, dx]) of sum(out * ct) through the module m."""
    g, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(p, q, k, v, x):
        r = nnx.merge(g, p, rest)(q, k, v, x=x, segment_ids=seg)
        return jnp.sum(r.out * ct), r.out

    (_, out), gr = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(params, q, k, v, x)
    return out, [gr[0]["w_score"][...]] + list(gr[1:])


def run_full(m, q, k, v, x, seg=None):
    fn = jax.jit(lambda q, k, v, x, seg: m(q, k, v, x=x, segment_ids=seg, return_aux=True))
    return fn(q, k, v, x, seg)


def check_aux(aux, ref, T, block_q, tol):
    """Selected positions, weights, tau and overflow flags of the module's aux = the reference."""
    idx = np.asarray(aux["sparsek_index"])  # [B, K, nQ, U]
    mask, weight = np.asarray(aux["sparsek_mask"]), np.asarray(aux["sparsek_weight"], np.float64)
    tau, overflow = np.asarray(aux["sparsek_tau"], np.float64), np.asarray(aux["sparsek_overflow"])
    B, K = idx.shape[:2]
    bq = min(block_q, T)
    for b in range(B):
        for h in range(K):
            for i in range(T):
                row = idx[b, h, i // bq]
                slots = np.nonzero(mask[b, h, i])[0]
                got = dict(zip(row[slots].tolist(), weight[b, h, i, slots].tolist()))
                want_pos = np.nonzero(ref["sel"][b, h, i])[0]
                assert sorted(got) == want_pos.tolist(), (b, h, i, sorted(got), want_pos)
                for j in want_pos:
                    assert abs(got[j] - ref["weight"][b, h, i, j]) <= tol, (b, h, i, j)
                if not ref["rule"][b, h, i]:
                    assert abs(tau[b, h, i] - ref["tau"][b, h, i]) <= tol, (b, h, i)
                elif len(want_pos):  # prefix rule: tau reported as min(u) - 1 (doc convention)
                    assert abs(tau[b, h, i] - (ref["u"][b, want_pos, h].min() - 1)) <= tol
    np.testing.assert_array_equal(overflow, ref["overflow"])
    assert int(aux["sparsek_overflow_count"]) == int(ref["overflow"].sum())


def make_ref(m, x, k, window, extra, seg, T, B):
    o = m.options
    u = ref_scores(np.asarray(x).astype(np.float64), m.w_score[...], o.position_slope)
    seg = np.ones((B, T), int) if seg is None else np.asarray(seg)
    ref = ref_select(u, k, window, extra, seg)
    ref["u"] = u
    return ref


# --------------------------------------------------------------------------------------
# forward + aux against the reference
# --------------------------------------------------------------------------------------

FORWARD_CASES = [
    # B, T, H, K, k, window, extra, block_q, weight_mode, segments, score_scale
    (2, 37, 4, 4, 5, 3, 64, 8, "gate", False, 1.0),   # G=1, odd T, T % block_q != 0, exact
    (1, 50, 6, 2, 7, 0, 64, 16, "log", False, 1.0),   # G=3, no window, log mode
    (1, 37, 4, 1, 4, 5, 2, 4, "gate", True, 1.0),     # G=4, segments, small extra
    (1, 29, 2, 2, 3, 2, 1, 5, "gate", False, 0.1),    # extra=1, close scores: overflow
]


@pytest.mark.parametrize("B,T,H,K,k,window,extra,block_q,mode,segments,scale", FORWARD_CASES,
                         ids=["gqa1-odd", "gqa3-log-w0", "gqa4-seg", "overflow"])
def test_forward_and_aux_match_dense_reference(B, T, H, K, k, window, extra, block_q, mode, segments, scale):
    D, E = 8, 12
    m = module(H, K, D, E, k=k, window=window, extra=extra, block_q=block_q, weight_mode=mode,
               score_scale=scale, seed=T)
    q, k_, v, x = inputs(T, B, T, H, K, D, E)
    seg = None
    if segments:
        seg = jnp.asarray(np.array([[1] * 14 + [2] * 19 + [0] * (T - 33)], np.int32))
    r = run_full(m, q, k_, v, x, seg)
    ref = make_ref(m, x, k, window, extra, seg, T, B)
    want = ref_attention(q, k_, v, ref, mode)
    np.testing.assert_allclose(np.asarray(r.out, np.float64), want, atol=2e-5, rtol=0)
    check_aux(r.aux, ref, T, block_q, 2e-5)
    np.testing.assert_allclose(np.asarray(r.aux["sparsek_scores"]), ref["u"], atol=1e-5, rtol=1e-6)
    # the tests can fail: the case exercises real selection (not everything selected) and
    # soft weights strictly inside (0, 1)
    assert (~ref["rule"]).any()
    w = ref["weight"][ref["sel"]]
    assert ((w > 0.01) & (w < 0.99)).any()
    if extra >= T:
        assert int(r.aux["sparsek_overflow_count"]) == 0
    if scale != 1.0:
        assert int(r.aux["sparsek_overflow_count"]) > 0  # provoked: exposed in aux
    if segments:  # padding queries give zeros
        assert np.all(np.asarray(r.out)[:, 33:] == 0)


def test_k_beyond_every_prefix_is_dense_causal_and_bf16():
    """k larger than every prefix: every key selected at weight 1 = dense causal attention
    (the shared tests/reference_attention.py); bf16 inputs within 3e-2 of the float64 reference
    of the same (bf16-rounded) values."""
    B, T, H, K, D, E = 2, 21, 4, 2, 8, 12
    q, k, v, x = inputs(5, B, T, H, K, D, E)
    m = module(H, K, D, E, k=40, window=3, block_q=8)
    r = run_full(m, q, k, v, x)
    want = masked_softmax_attention(q, k, v, causal_mask(T))
    np.testing.assert_allclose(np.asarray(r.out), want, atol=2e-5)
    assert np.all(np.asarray(r.aux["sparsek_weight"])[np.asarray(r.aux["sparsek_mask"])] == 1)
    # bf16, a real selection with a window
    m = module(H, K, D, E, k=4, window=3, block_q=8, seed=1)
    qb, kb, vb, xb = inputs(6, B, T, H, K, D, E, jnp.bfloat16)
    r = run_full(m, qb, kb, vb, xb)
    assert r.out.dtype == jnp.bfloat16
    ref = make_ref(m, xb, 4, 3, 4, None, T, B)
    want = ref_attention(qb.astype(jnp.float32), kb.astype(jnp.float32), vb.astype(jnp.float32), ref, "gate")
    np.testing.assert_allclose(np.asarray(r.out, np.float64), want, atol=3e-2, rtol=0)
    assert (~ref["rule"]).any()


# --------------------------------------------------------------------------------------
# gradients (float64)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,window,extra,H,K", [("gate", 3, 1, 4, 2), ("log", 0, 3, 3, 1)], ids=["gate", "log"])
def test_gradients_match_reference_autodiff_and_finite_differences(mode, window, extra, H, K):
    """Gradients w.r.t. q, k, v, x and the scorer w_score (float64) equal jax.grad of the
    dense float64 reference (closed-form tau on the reference's free sets) and central finite
    differences of the module along a random direction."""
    B, T, D, E, kb, bq = 1, 19, 4, 6, 3, 4
    with enable_x64():
        m = module(H, K, D, E, param_dtype=jnp.float64, k=kb, window=window, extra=extra,
                   block_q=bq, weight_mode=mode, seed=3)
        q, k, v, x = (a.astype(jnp.float64) for a in inputs(11, B, T, H, K, D, E))
        g, params, rest = nnx.split(m, nnx.Param, ...)
        ct = jax.random.normal(jax.random.key(12), (B, T, H, D), jnp.float64)
        ref = make_ref(m, x, kb, window, extra, None, T, B)
        assert ref["free"].any() and (~ref["rule"]).any()

        @jax.jit
        def loss_mod(p, q, k, v, x):
            return jnp.sum(nnx.merge(g, p, rest)(q, k, v, x=x).out * ct)

        def loss_ref(w, q, k, v, x):
            o = ref_attention_jnp(q, k, v, x, w, ref, m.options.position_slope, kb, mode)
            return jnp.sum(o * ct)

        got = jax.jit(jax.grad(loss_mod, argnums=(0, 1, 2, 3, 4)))(params, q, k, v, x)
        w = params["w_score"][...]
        want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(w, q, k, v, x)
        np.testing.assert_allclose(float(loss_mod(params, q, k, v, x)), float(loss_ref(w, q, k, v, x)), rtol=1e-10)
        got_list = [got[0]["w_score"][...]] + list(got[1:])
        for name, a, b in zip(("w_score", "q", "k", "v", "x"), got_list, want):
            b = np.asarray(b)
            assert np.abs(b).max() > 0, name
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-9 * np.abs(b).max(), err_msg=name)

        # finite differences of the module itself along one random direction of all inputs
        dirs = [jax.random.normal(jax.random.key(20 + i), a.shape, jnp.float64) for i, a in enumerate((w, q, k, v, x))]
        eps = 1e-6

        def at(sign):
            p2 = jax.tree.map(lambda a: a + sign * eps * dirs[0], params)
            return float(loss_mod(p2, *(a + sign * eps * d for a, d in zip((q, k, v, x), dirs[1:]))))

        fd = (at(1) - at(-1)) / (2 * eps)
        an = sum(float(jnp.sum(a * d)) for a, d in zip(got_list, dirs))
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (fd, an)
        # the scorer's own directional derivative is non-zero (gradient reaches w_score)
        assert abs(float(jnp.sum(got_list[0] * dirs[0]))) > 1e-6


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,extra", [(3, 1), (0, None)], ids=["window-extra1", "w0"])
def test_decode_token_by_token_and_chunked_equals_full_pass(window, extra):
    """init_cache + one token at a time, 3 tokens at a time after a 2-token prefill, and a
    10-token prefill then 4 tokens give the full pass's outputs position by position; the cache holds k + c + w entries per KV head
    whatever max_len is."""
    B, T, H, K, D, E, kb = 2, 14, 4, 2, 8, 12, 3
    m = module(H, K, D, E, k=kb, window=window, extra=extra, block_q=4, seed=7)
    q, k, v, x = inputs(8, B, T, H, K, D, E)
    full = run_full(m, q, k, v, x)
    step = jax.jit(lambda q, k, v, x, c: m(q, k, v, x=x, cache=c, return_aux=True))

    c_small = m.init_cache(B, 16, jnp.float32)
    c_big = m.init_cache(B, 1 << 20, jnp.float32)
    assert jax.tree.map(jnp.shape, c_small) == jax.tree.map(jnp.shape, c_big)
    C = kb + (kb if extra is None else extra)
    assert c_small.cand_k.shape == (B, K, C, D) and c_small.win_k.shape == (B, K, window, D)

    for chunks in ([1] * T, [2] + [3] * 4, [10, 4]):  # 10 > block_q: several blocks per call
        cache, outs, ovf = c_small, [], []
        t = 0
        for n in chunks:
            sl = slice(t, t + n)
            r = step(q[:, sl], k[:, sl], v[:, sl], x[:, sl], cache)
            cache = r.cache
            outs.append(r.out)
            ovf.append(r.aux["sparsek_overflow"])
            t += n
        assert t == T and int(cache.length) == T
        np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full.out), atol=2e-5, rtol=0)
        np.testing.assert_array_equal(np.concatenate(ovf, -1), np.asarray(full.aux["sparsek_overflow"]))


# --------------------------------------------------------------------------------------
# memory, kernel route, registration, bad inputs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_no_txt_array_in_forward_and_backward_at_8192(impl):
    """jax.make_jaxpr (nothing runs) of the forward and of forward + backward (w.r.t. w_score,
    q, k, v, x) at T = 8192 (k = 64, w = 64, block_q = 64, bf16): no intermediate has two axes
    >= T; on both the XLA path and the kernel route. The scanner finds dense attention's T x T."""
    T = 8192
    m = module(2, 1, 16, 32, k=64, window=64, block_q=64, impl=impl, interpret=impl != "xla")
    g, params, rest = nnx.split(m, nnx.Param, ...)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    q, kv, x = sds(1, T, 2, 16), sds(1, T, 1, 16), sds(1, T, 32)

    def fwd(p, q, k, v, x):
        return nnx.merge(g, p, rest)(q, k, v, x=x, return_aux=True)

    def loss(p, q, k, v, x):
        return jnp.sum(fwd(p, q, k, v, x).out.astype(jnp.float32))

    assert big_arrays(jax.make_jaxpr(fwd)(params, q, kv, kv, x).jaxpr, T, []) == []
    if impl == "xla":  # the kernel's backward is its own custom_vjp (checked by the kernel tests)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(params, q, kv, kv, x)
        assert big_arrays(jaxpr.jaxpr, T, []) == []
    dense = jax.make_jaxpr(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
    assert big_arrays(dense(q, kv, kv).jaxpr, T, []) != []


def test_pallas_gpu_route_in_interpret_mode_matches_xla():
    """impl="pallas_gpu" (sea_jax.kernels.gathered_attention, Triton interpret mode on CPU)
    gives the XLA path's output and gradients (q, k, v, x, w_score), with segments; impl="auto"
    resolves to the XLA path on CPU."""
    B, T, H, K, D, E = 1, 37, 4, 2, 16, 12
    opts = dict(k=5, window=4, extra=3, block_q=16)
    m_xla = module(H, K, D, E, impl="xla", **opts)
    m_gpu = module(H, K, D, E, impl="pallas_gpu", interpret=True, **opts)
    assert SparseKOptions().resolved_impl() == "xla"  # this CPU machine
    assert [SparseKOptions().resolved_impl(b) for b in ("cpu", "gpu", "tpu")] == ["xla", "pallas_gpu", "pallas_tpu"]
    assert SparseKOptions(impl="xla").resolved_impl("gpu") == "xla"
    # block_q None: 128-query blocks on the GPU kernels (measured, with and without GQA), 64 elsewhere
    assert [SparseKOptions().resolved_block_q(i) for i in ("pallas_gpu", "xla", "pallas_tpu")] == [128, 64, 64]
    assert SparseKOptions(block_q=32).resolved_block_q("pallas_gpu") == 32
    q, k, v, x = inputs(9, B, T, H, K, D, E)
    seg = jnp.asarray(np.array([[1] * 20 + [2] * 14 + [0] * 3], np.int32))
    ct = jax.random.normal(jax.random.key(10), (B, T, H, D))

    grads = lambda m: layer_grads(m, q, k, v, x, seg, ct)  # noqa: E731

    out_x, g_x = grads(m_xla)
    # the kernel path with the CPU default selection schedule ("parallel") and with "fused" (the
    # GPU default: its threshold kernel in interpret mode here), whose selection reaches the
    # kernel factored (the GPU default: SlotSelection) or as dense mask / weight arrays
    m_fast = module(H, K, D, E, impl="pallas_gpu", interpret=True, schedule="fused", **opts)
    m_fast_dense = module(H, K, D, E, impl="pallas_gpu", interpret=True, schedule="fused",
                          selection_form="dense", **opts)
    assert m_fast.options.resolved_selection_form("pallas_gpu") == "factored"
    for m in (m_gpu, m_fast, m_fast_dense):
        out_g, g_g = grads(m)
        np.testing.assert_allclose(np.asarray(out_g), np.asarray(out_x), atol=2e-5, rtol=0)
        for name, a, b in zip(("w_score", "q", "k", "v", "x"), g_g, g_x):
            assert np.abs(np.asarray(b)).max() > 0, name
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.all(np.asarray(out_x)[:, 34:] == 0)
    # the auxiliary outputs of the factored path are the dense ones
    aux = [run_full(m, q, k, v, x, seg).aux for m in (m_fast, m_fast_dense, m_xla)]
    for name in ("sparsek_index", "sparsek_mask", "sparsek_tau", "sparsek_overflow"):
        np.testing.assert_array_equal(np.asarray(aux[0][name]), np.asarray(aux[1][name]), err_msg=name)
    np.testing.assert_allclose(np.asarray(aux[0]["sparsek_weight"]), np.asarray(aux[1]["sparsek_weight"]), atol=1e-6)
    U = aux[2]["sparsek_mask"].shape[-1]  # the GPU path rounds the union up to its slot tile
    np.testing.assert_array_equal(np.asarray(aux[0]["sparsek_mask"])[..., :U], np.asarray(aux[2]["sparsek_mask"]))
    assert not np.asarray(aux[0]["sparsek_mask"])[..., U:].any()


def test_schedule_auto():
    o = SparseKOptions(k=4, window=2)
    assert o.schedule == "auto"
    assert o.resolved_schedule("pallas_gpu") == "fused"
    assert o.resolved_schedule("xla") == "parallel" and o.resolved_schedule("pallas_tpu") == "parallel"
    assert SparseKOptions(k=4, interpret=True).resolved_schedule("pallas_gpu") == "parallel"
    assert SparseKOptions(k=4, schedule="scan").resolved_schedule("pallas_gpu") == "scan"
    assert o.selection_form == "auto"
    assert o.resolved_selection_form("pallas_gpu") == "factored"
    assert o.resolved_selection_form("xla") == "dense" and o.resolved_selection_form("pallas_tpu") == "dense"
    assert SparseKOptions(k=4, interpret=True).resolved_selection_form("pallas_gpu") == "dense"  # parallel
    assert SparseKOptions(k=4, selection_form="dense").resolved_selection_form("pallas_gpu") == "dense"
    with pytest.raises(ValueError, match="resolves to 'parallel'"):
        SparseKOptions(k=4, selection_form="factored").resolved_selection_form("xla")


def test_registered_as_attention_core():
    core = make_attention("sparsek", AttentionDims(4, 2, 8, 12), {"k": 5, "window": 2}, rngs=nnx.Rngs(0))
    assert isinstance(core, SparseKAttention) and core.options.k == 5 and core.options.window == 2
    assert core.w_score[...].shape == (12, 2)
    assert isinstance(core.init_cache(1, 8, jnp.float32), SparseKCache)


@pytest.mark.parametrize(
    "opts,match",
    [
        (dict(k=0), "k must be an int >= 1"),
        (dict(k=-2), "k must be an int >= 1"),
        (dict(k=2.5), "k must be an int >= 1"),
        (dict(window=-1), "window must be an int >= 0"),
        (dict(extra=-1), "extra must be an int >= 0"),
        (dict(block_q=0), "block_q must be an int >= 1"),
        (dict(weight_mode="mul"), "weight_mode must be one of"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(method="heap"), "method must be one of"),
        (dict(schedule="serial"), "schedule must be 'auto' or one of"),
        (dict(selection_form="sparse"), "selection_form must be one of"),
        (dict(selection_form="factored", schedule="scan"), "selection_form='factored' needs schedule"),
        (dict(position_slope="small"), "position_slope must be a finite float"),
        (dict(position_slope=float("nan")), "position_slope must be a finite float"),
        (dict(interpret=1), "interpret must be a bool"),
        (dict(windw=3), "windw"),
    ],
)
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        make_attention("sparsek", AttentionDims(4, 2, 8, 12), opts, rngs=nnx.Rngs(0))


def test_bad_call_arguments_raise():
    B, T, H, K, D, E = 1, 6, 4, 2, 8, 12
    m = module(H, K, D, E, k=2, window=1, block_q=4)
    q, k, v, x = inputs(0, B, T, H, K, D, E)
    cases = [
        (lambda: m(q, k, v), "x .* is required"),
        (lambda: m(q, k, v, x=x[..., :5]), "x must have shape"),
        (lambda: m(q, k, v, x=x[:, :4]), "x must have shape"),
        (lambda: m(q[0], k, v, x=x), "q must have rank 4"),
        (lambda: m(q, k[:, :, :1], v, x=x), "k must have shape"),
        (lambda: m(q, k, v[:, :5], x=x), "v must have shape"),
        (lambda: m(q.astype(jnp.int32), k, v, x=x), "q must be floating point"),
        (lambda: m(q, k, v, x=x, segment_ids=jnp.ones((B, T - 1), jnp.int32)), "segment_ids must have shape"),
        (lambda: m(q, k, v, x=x, segment_ids=jnp.ones((B, T), jnp.float32)), "segment_ids must be integer"),
        (lambda: m(q, k, v, x=x, cache=m.init_cache(B, T, jnp.float32), segment_ids=jnp.ones((B, T), jnp.int32)),
         "segment_ids are not supported together with a decode cache"),
        (lambda: m(q, k, v, x=x, cache={"length": 0}), "cache must be a SparseKCache"),
        (lambda: m(q, k, v, x=x, cache=m.init_cache(B + 1, T, jnp.float32)), "cache does not fit"),
        (lambda: m(q, k, v, x=x.astype(jnp.int32)), "x must be floating point"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    # the Pallas route needs a power-of-two block_q >= 16: named by the kernel's check
    bad = module(H, K, D, E, k=2, window=1, block_q=12, impl="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        bad(q, k, v, x=x)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiled Pallas Triton kernels need a GPU (interpret mode covers them on CPU)")
@pytest.mark.parametrize("block_q,H,K", [(64, 4, 2), (None, 4, 4), (None, 4, 2), (None, 8, 2)])
def test_factored_and_dense_selection_agree_on_gpu(block_q, H, K):
    """The GPU default (fused schedule, factored selection: mask and weights generated in the
    kernel) against the dense form and the XLA path: outputs and gradients of q, k, v, x and
    w_score, with segments, 2000 tokens. block_q None: 128 on the GPU path (the slot kernel on
    whole blocks; with GQA 2 pipeline stages), 64 on the XLA one (the same selection)."""
    B, T, D, E = 1, 2000, 64, 32
    opts = dict(k=96, window=64, block_q=block_q)
    q, k, v, x = inputs(21, B, T, H, K, D, E)
    seg = jnp.asarray(np.array([[1] * 1200 + [2] * 790 + [0] * 10], np.int32))
    ct = jax.random.normal(jax.random.key(22), (B, T, H, D))

    grads = lambda m: layer_grads(m, q, k, v, x, seg, ct)  # noqa: E731

    fact = module(H, K, D, E, impl="pallas_gpu", score_scale=30.0, **opts)
    assert fact.options.resolved_selection_form("pallas_gpu") == "factored"
    out_f, g_f = grads(fact)
    out_d, g_d = grads(module(H, K, D, E, impl="pallas_gpu", selection_form="dense", score_scale=30.0, **opts))
    # the XLA path (serial scan selection, XLA reference attention) at the GPU's default
    # float32 dot precision, as the kernels: under "highest" the scorer's x . w_score alone moves
    # the w_score / x gradients by 12 % (measured on an H100, XLA against itself), so the
    # comparison must hold the precision fixed
    out_x, g_x = grads(module(H, K, D, E, impl="xla", score_scale=30.0, **opts))
    # the two forms run the same kernels on the same selection, the weights rounded
    # differently (z - (theta + tau_s) in the kernel, (z - theta) - tau_s in the dense form)
    errs = {"out": (rel_err_np(out_f, out_d), rel_err_np(out_f, out_x))}
    for name, a, b, c in zip(("w_score", "q", "k", "v", "x"), g_f, g_d, g_x):
        assert np.abs(np.asarray(c)).max() > 0, name
        errs[name] = (rel_err_np(a, b), rel_err_np(a, c))
    print("relative errors (factored vs dense, factored vs XLA):", errs)
    assert all(e[0] < 1e-3 for e in errs.values()) and errs["out"][0] < 1e-4, errs
    assert all(e[1] < 2e-3 for e in errs.values()), errs


def rel_err_np(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
