"""SEAAttention: estimator, CNN, whole module against slow references written here.

References are explicit loops in float64 NumPy (tests/reference_attention.py for the masked
softmax). Tolerances: float32 module vs float64 reference 5e-5 absolute (inputs ~N(0,1),
D = 8; the estimator's position signal goes through cos/sin of ~t_m-sized angles in float32,
hence slightly above the 2e-5 of pure attention); bfloat16 inputs 5e-2 (8 mantissa bits,
accumulation in float32, compared with the float64 reference of the same bf16-rounded
inputs and of the bf16 run's own selection). Decoding vs full pass: 1e-5 (same float32 ops in
a different order).

Every jitted function is built once per configuration (``functools.cache``): compiling the
module dominates the run time on CPU.
"""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpr_memory import big_arrays
from reference_attention import masked_softmax_attention, segment_rows
from sea_jax.attention.base import AttentionDims, make_attention
from sea_jax.attention.sea import SEAAttention, SEAOptions
from sea_jax.ops import sea_estimate as est
from sea_jax.ops.random_features import draw_projection, feature_map

B, H, K, D, E = 2, 4, 2, 8, 32
DIMS = AttentionDims(H, K, D, E)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def ref_cell(o, L, t_m):
    """Nearest-neighbour cell of key offset o in a prefix of length L: floor((o + .5) / L t_m)."""
    return int(Fraction(2 * o + 1, 2 * L) * t_m)


def ref_mask(selection, start, length, S):
    """Token mask [B, H, T, S] of a cell selection [B, T, H, t_m] by explicit loops."""
    Bn, T, Hn, M = selection.shape
    mask = np.zeros((Bn, Hn, T, S), bool)
    for b, t in np.ndindex(Bn, T):
        L = length[b, t]
        for o in range(L):
            mask[b, :, t, start[b, t] + o] = selection[b, t, :, ref_cell(o, L, M)]
    return mask


def ref_mean(v, start, length, Hn):
    """Mean of V over every row's prefix [B, T, H, D] (kv head h // G)."""
    v = np.asarray(v, np.float64)
    Bn, T, Kn, Dn = v.shape
    out = np.zeros((Bn, T, Hn, Dn))
    for b, t in np.ndindex(Bn, T):
        if length[b, t]:
            m = v[b, start[b, t] : start[b, t] + length[b, t]].mean(0)
            out[b, t] = m[np.arange(Hn) // (Hn // Kn)]
    return out


def inputs(seed, T, dtype=jnp.float32, batch=B):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (batch, T, H, D), dtype),
            jax.random.normal(ks[1], (batch, T, K, D), dtype),
            jax.random.normal(ks[2], (batch, T, K, D), dtype))


def segments(T):
    """Two packed rows: [1]*7 [2]*(T-10) [0]*3 and [1]*T."""
    seg = np.ones((B, T), np.int32)
    seg[0, 7:] = 2
    seg[0, T - 3 :] = 0
    return seg


def make_module(**opts):
    """A SEA core with random gate weights (so the gates differ per row and head)."""
    m = SEAAttention(DIMS, SEAOptions(**opts), rngs=nnx.Rngs(0))
    m.gate_w[...] = 0.5 * jax.random.normal(jax.random.PRNGKey(7), m.gate_w[...].shape)
    return m


@functools.cache
def jitted(opts: tuple):
    """(module, jit(q, k, v, seg) -> AttentionOutput with aux) for options ``dict(opts)``."""
    m = make_module(**dict(opts))
    g, state = nnx.split(m)

    @jax.jit
    def run(q, k, v, seg):
        return nnx.merge(g, state)(q, k, v, segment_ids=seg, return_aux=True)

    return m, run


def module_reference(q, k, v, aux, seg, causal):
    """The module's output recomputed from its own selection and gates, in float64 loops."""
    T = q.shape[1]
    seg = np.ones((q.shape[0], T), int) if seg is None else np.asarray(seg)
    start, length = segment_rows(seg, causal)
    np.testing.assert_array_equal(np.asarray(aux["row_start"])[seg != 0], start[seg != 0])
    np.testing.assert_array_equal(np.asarray(aux["row_length"]), length)
    mask = ref_mask(np.asarray(aux["selection"]), start, length, T)
    sparse = masked_softmax_attention(q, k, v, mask)
    g0 = np.asarray(aux["gate_scale"], np.float64)[..., None]
    g1 = np.asarray(aux["gate_mix"], np.float64)[..., None]
    out = g1 * g0 * sparse + (1 - g1) * ref_mean(v, start, length, q.shape[2])
    return np.where((length > 0)[:, :, None, None], out, 0.0), mask


def check_topk(aux, mode):
    """The selection keeps exactly the budget per row (per head in per_head mode) and no
    unselected cell beats a selected one."""
    p = np.asarray(jax.nn.softmax(aux["estimate"], axis=-1))
    sel = np.asarray(aux["selection"])
    budget = np.asarray(aux["budget"])
    Bn, T, Hn, M = p.shape
    groups = [(b, t, slice(None)) for b, t in np.ndindex(Bn, T)] if mode == "shared" else \
        [(b, t, h) for b, t, h in np.ndindex(Bn, T, Hn)]
    for b, t, h in groups:
        pr, sr = p[b, t, h].reshape(-1), sel[b, t, h].reshape(-1)
        assert sr.sum() == budget[b, t]
        if 0 < sr.sum() < sr.size:
            assert pr[sr].min() >= pr[~sr].max() - 1e-7


# --------------------------------------------------------------------------------------
# estimator stages
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_estimator_context_matches_loop(causal):
    """Kernel attention over [pos, v]: the position half is the attention-weighted average of
    (cos, sin)(w log((o_j + 1) / R_t)), a relative-position signal; the value half the
    Performer output. Causal: ReLU features, prefix sums; bidirectional: FAVOR+, whole segment."""
    T, t_m, M = 17, 8, 6
    q, k, v = inputs(1, T)
    seg = segments(T)
    proj = draw_projection(jax.random.PRNGKey(3), M, D)
    freqs = est.position_frequencies(est.position_dims(D) // 2, t_m)
    kind = "relu" if causal else "favor"
    start, length = segment_rows(seg, causal)
    offset = np.arange(T)[None] - start
    ctx, _ = jax.jit(lambda q, k, v: est.estimator_context(
        q, k, v, proj, freqs, key_offset=jnp.asarray(offset), reference=jnp.asarray(length),
        features=kind, causal=causal, segment_ids=jnp.asarray(seg), chunk=4))(q, k, v)
    if causal:  # ReLU random features written out here
        fq = np.maximum(np.asarray(q, np.float64) @ np.asarray(proj, np.float64).T, 0) / np.sqrt(M) + 1e-3
        fk = np.maximum(np.asarray(k, np.float64) @ np.asarray(proj, np.float64).T, 0) / np.sqrt(M) + 1e-3
    else:  # FAVOR+ maps are tested with the performer core; reuse them
        fq = np.asarray(feature_map(kind, q, proj, is_query=True, scale=D**-0.5), np.float64)
        fk = np.asarray(feature_map(kind, k, proj, is_query=False, scale=D**-0.5), np.float64)
    w = np.asarray(freqs, np.float64)
    want = np.zeros((B, T, H, 2 * D))
    for b, t, h in np.ndindex(B, T, H):
        if seg[b, t] == 0:
            continue
        js = range(start[b, t], start[b, t] + length[b, t])
        a = np.array([fq[b, t, h] @ fk[b, j, h // 2] for j in js])
        a /= a.sum()
        rel = np.array([np.log((offset[b, j] + 1) / length[b, t]) for j in js])[:, None] * w
        pos = np.concatenate([np.cos(rel), np.sin(rel)], -1)
        want[b, t, h] = a @ np.concatenate([pos, np.asarray(v, np.float64)[b, list(js), h // 2]], -1)
    np.testing.assert_allclose(np.asarray(ctx), want, atol=5e-5)


def test_cnn_matches_loop_and_is_causal():
    """Decoder CNN: two 3x3 convs with query taps t-4, t-2, t inside the segment, ReLU, a 1x1
    conv to 4 sub-columns per column, LayerNorm over t_m, against explicit loops; output row
    t does not change when rows > t change."""
    T, t_m = 12, 8
    W, C = t_m // 4, 2 * H
    params = est.init_estimator_params(jax.random.PRNGKey(0), head_dim=D, num_heads=H, t_m=t_m)
    params = {n: p + 0.3 * jax.random.normal(jax.random.PRNGKey(i), p.shape) for i, (n, p) in enumerate(params.items())}
    rows = jax.random.normal(jax.random.PRNGKey(5), (B, T, W, C))
    seg = np.ones((B, T), np.int32)
    seg[1, 5:] = 2
    seg[1, 10:] = 0
    cnn = jax.jit(lambda r, s: est.cnn_logits(params, r, s, causal=True))
    got = np.asarray(cnn(rows, jnp.asarray(seg)))

    P = {n: np.asarray(p, np.float64) for n, p in params.items()}

    def conv(x, w, bias):
        y = np.zeros(x.shape[:3] + (w.shape[-1],)) + bias
        for b, t, c in np.ndindex(*x.shape[:3]):
            for i, d in enumerate((4, 2, 0)):
                r = t - d
                if r < 0 or seg[b, r] != seg[b, t] or seg[b, t] == 0:
                    continue
                for dc in range(3):
                    if 0 <= c + dc - 1 < W:
                        y[b, t, c] += x[b, r, c + dc - 1] @ w[i, dc]
        return y

    h1 = np.maximum(conv(np.asarray(rows, np.float64), P["conv1_w"], P["conv1_b"]), 0)
    h2 = np.maximum(conv(h1, P["conv2_w"], P["conv2_b"]), 0)
    y3 = h2 @ P["conv3_w"] + P["conv3_b"]  # [B, T, W, 4H]
    out = np.zeros((B, T, H, t_m))
    for b, t, h, c, s in np.ndindex(B, T, H, W, 4):
        out[b, t, h, 4 * c + s] = y3[b, t, c, 4 * h + s]
    mu, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
    want = (out - mu) / np.sqrt(var + 1e-5) * P["ln2_scale"] + P["ln2_bias"]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)

    for t0 in (0, 4, 9):  # causality: perturb rows after t0
        rows2 = rows.at[:, t0 + 1 :].add(jax.random.normal(jax.random.PRNGKey(t0), rows[:, t0 + 1 :].shape))
        got2 = np.asarray(cnn(rows2, jnp.asarray(seg)))
        np.testing.assert_array_equal(got2[:, : t0 + 1], got[:, : t0 + 1])
        assert not np.allclose(got2[:, t0 + 1 :], got[:, t0 + 1 :])


# --------------------------------------------------------------------------------------
# whole module
# --------------------------------------------------------------------------------------

MODULE_CASES = [
    # options, T, with segments
    (dict(k=2, t_m=8, block_q=4, block_k=8), 19, True),
    (dict(k=2, t_m=8, block_q=8, block_k=4, mode="per_head"), 13, False),
    (dict(k=2, t_m=8, block_q=4, block_k=4, causal=False), 15, True),
]


# one configuration shared by the dynamic-k, causality and decode tests (one compile)
SHARED_OPTS = (("block_k", 8), ("block_q", 4), ("k", 2), ("t_m", 8))


@pytest.mark.parametrize("opts,T,with_seg", MODULE_CASES, ids=["causal-seg", "per_head", "bidirectional-seg"])
def test_module_matches_dense_masked_reference(opts, T, with_seg):
    """Output = sigma(s1) sigma(s0) softmax-attention over the expanded selection + (1 -
    sigma(s1)) mean of V over the prefix; the selection is a top-k of the estimate with the
    row budgets; aux mask = the expansion; padding rows give 0. fp32 and bf16."""
    m, run = jitted(tuple(sorted(opts.items())))
    q, k, v = inputs(2, T)
    seg = jnp.asarray(segments(T)) if with_seg else None
    causal = opts.get("causal", True)
    for dtype, tol in ((jnp.float32, 5e-5), (jnp.bfloat16, 5e-2)):
        qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
        res = run(qd, kd, vd, seg)
        assert res.out.dtype == dtype
        want, mask = module_reference(qd, kd, vd, res.aux, seg, causal)
        np.testing.assert_allclose(np.asarray(res.out, np.float64), want, atol=tol)
        np.testing.assert_array_equal(np.asarray(res.aux["mask"]), mask)
        check_topk(res.aux, opts.get("mode", "shared"))
    if with_seg:
        assert np.all(np.asarray(res.out)[np.asarray(seg) == 0] == 0)
    # the expansion is genuinely sparse somewhere (otherwise the test checks dense attention)
    start, length = segment_rows(np.ones((B, T), int) if seg is None else np.asarray(seg), causal)
    assert mask.sum() < H * length.sum()


def test_dynamic_k_and_dense_limit():
    """k changes at inference with the same parameters; with k >= T every row is dense and
    SEA is exact causal attention mixed with the running mean (the limit it must reach)."""
    T = 15
    q, k, v = inputs(3, T)
    m, run = jitted(SHARED_OPTS)
    small = run(q, k, v, None)
    m = nnx.clone(m)  # the cached module stays at k=2
    m.set_k(T)
    assert m.options.k == T
    g, state = nnx.split(m)
    big = jax.jit(lambda q, k, v: nnx.merge(g, state)(q, k, v, return_aux=True))(q, k, v)
    assert np.asarray(big.aux["budget"]).min() == H * 8  # every cell of every row
    assert np.asarray(small.aux["budget"])[:, -1].max() < H * 8
    causal = np.tril(np.ones((T, T), bool))[None, None]
    dense = masked_softmax_attention(q, k, v, causal)
    g0, g1 = (np.asarray(big.aux[n], np.float64)[..., None] for n in ("gate_scale", "gate_mix"))
    start, length = segment_rows(np.ones((B, T), int), True)
    want = g1 * g0 * dense + (1 - g1) * ref_mean(v, start, length, H)
    np.testing.assert_allclose(np.asarray(big.out), want, atol=5e-5)
    assert not np.allclose(np.asarray(small.out), np.asarray(big.out), atol=1e-3)
    with pytest.raises(ValueError, match="k must be"):
        m.set_k(0)


def test_causality_and_decode_equals_full_forward():
    """Rows <= t never depend on tokens > t; a prefill + token-by-token decode with the cache
    reproduces the full pass position by position (output, estimate, selection)."""
    T, P = 15, 6
    m, run = jitted(SHARED_OPTS)
    q, k, v = inputs(4, T)
    full = run(q, k, v, None)
    t0 = 8
    noise = inputs(40, T)
    pert = [x.at[:, t0 + 1 :].add(n[:, t0 + 1 :]) for x, n in zip((q, k, v), noise)]
    other = run(*pert, None)
    np.testing.assert_allclose(np.asarray(other.out)[:, : t0 + 1], np.asarray(full.out)[:, : t0 + 1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(other.aux["selection"])[:, : t0 + 1],
                                  np.asarray(full.aux["selection"])[:, : t0 + 1])
    assert not np.allclose(np.asarray(other.out)[:, t0 + 1 :], np.asarray(full.out)[:, t0 + 1 :])

    g, state = nnx.split(m)
    step = jax.jit(lambda q, k, v, c: nnx.merge(g, state)(q, k, v, cache=c, return_aux=True))
    cache = m.init_cache(B, T + 3, jnp.float32)
    outs, ests, sels = [], [], []
    for lo, hi in [(0, P)] + [(t, t + 1) for t in range(P, T)]:
        r = step(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache)
        cache = r.cache
        outs.append(r.out), ests.append(r.aux["estimate"]), sels.append(r.aux["selection"])
    assert int(cache.length) == T
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full.out), atol=1e-5)
    np.testing.assert_allclose(np.concatenate(ests, 1), np.asarray(full.aux["estimate"]), atol=1e-4)
    np.testing.assert_array_equal(np.concatenate(sels, 1), np.asarray(full.aux["selection"]))


def test_gradients_reach_every_sea_parameter():
    """d(output + estimate terms)/d(param) is finite and non-zero for every SEA parameter
    (the estimator learns through the estimate, the gates through the output); the fixed
    random projection is not a parameter."""
    T = 13
    m = make_module(k=2, t_m=8, block_q=4, block_k=4)
    g, params, rest = nnx.split(m, nnx.Param, ...)
    q, k, v = inputs(5, T)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    target = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(10), (B, T, H, 8)), -1)

    def loss(p, q, k, v):
        r = nnx.merge(g, p, rest)(q, k, v, return_aux=True)
        logp = jax.nn.log_softmax(r.aux["estimate"], -1)
        return jnp.sum(r.out * w) - jnp.sum(target * logp)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, k, v)
    names = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(grads[0])}
    assert len(names) == 18 and not any("projection" in n for n in names)
    for n, x in names.items():
        x = np.asarray(x)
        assert np.all(np.isfinite(x)), n
        assert np.abs(x).max() > 1e-7, f"no gradient reaches {n}"
    for x in grads[1:]:
        assert np.all(np.isfinite(np.asarray(x))) and np.abs(np.asarray(x)).max() > 0


# --------------------------------------------------------------------------------------
# memory: no T x T array at T = 8192
# --------------------------------------------------------------------------------------

def test_no_txt_array_in_forward_backward_and_loss_at_8192():
    """jax.make_jaxpr (no execution) of forward + backward of SEA (k=64, t_m=256) and its
    distillation layer loss at T = 8192: no intermediate has two axes >= T. The scanner is
    checked to find the T x T scores of dense XLA attention."""
    from sea_jax import distill

    T = 8192
    dims = AttentionDims(2, 1, 16, 32)
    m = SEAAttention(dims, SEAOptions(k=64, t_m=256), rngs=nnx.Rngs(0))
    g, params, rest = nnx.split(m, nnx.Param, ...)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    q, kv, tq, to = sds(1, T, 2, 16), sds(1, T, 1, 16), sds(1, T, 2, 16), sds(1, T, 2, 16)

    def loss(p, q, k, v, tq, tk, tout):
        r = nnx.merge(g, p, rest)(q, k, v, return_aux=True)
        total, _ = distill.layer_loss(r.aux, r.out, tq, tk, tout)
        return total

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, kv, kv, tq, kv, to)
    assert big_arrays(jaxpr.jaxpr, T, []) == []
    dense = jax.make_jaxpr(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
    assert big_arrays(dense(q, kv, kv).jaxpr, T, []) != []


# --------------------------------------------------------------------------------------
# kernels, registry, bad inputs
# --------------------------------------------------------------------------------------

def test_impl_resolution_and_pallas_gpu_route_in_interpret_mode():
    """impl="auto": XLA on CPU, Pallas on GPU (either granularity) and on TPU for
    granularity="block" ("token" has no TPU kernel), XLA for blocks the kernels cannot take.
    granularity="block" through sea_jax.kernels.block_sparse_attention (pallas_gpu, interpret
    mode) equals the module's own XLA block path and attends every prefix key of the touched
    blocks (the aux mask)."""
    assert SEAOptions().resolved_impl("cpu") == "xla"
    assert SEAOptions().resolved_impl("gpu") == "pallas_gpu"  # token granularity: the cell-mask kernel
    assert SEAOptions().resolved_impl("tpu") == "xla"
    assert SEAOptions(block_q=24).resolved_impl("gpu") == "xla"
    assert SEAOptions(granularity="block").resolved_impl("gpu") == "pallas_gpu"
    assert SEAOptions(granularity="block").resolved_impl("tpu") == "pallas_tpu"
    assert SEAOptions(granularity="block").resolved_impl("cpu") == "xla"
    T = 40
    base = dict(k=2, t_m=8, block_q=16, block_k=16, granularity="block")
    _, run_xla = jitted(tuple(sorted({**base, "impl": "xla"}.items())))
    _, run_gpu = jitted(tuple(sorted({**base, "impl": "pallas_gpu", "kernel_interpret": True}.items())))
    q, k, v = inputs(6, T, batch=1)
    seg = jnp.asarray(np.array([[1] * 25 + [2] * 12 + [0] * 3], np.int32))
    a, b = run_xla(q, k, v, seg), run_gpu(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(b.out), np.asarray(a.out), atol=2e-5)
    # the same cells (the pallas_gpu route selects them with the radix-select kernel)
    np.testing.assert_array_equal(np.asarray(b.aux["mask"]), np.asarray(a.aux["mask"]))
    # block granularity = dense reference restricted to the aux block mask
    start, length = segment_rows(np.asarray(seg), True)
    sparse = masked_softmax_attention(q, k, v, np.asarray(a.aux["mask"]))
    g0, g1 = (np.asarray(a.aux[n], np.float64)[..., None] for n in ("gate_scale", "gate_mix"))
    want = g1 * g0 * sparse + (1 - g1) * ref_mean(v, start, length, H)
    want = np.where((length > 0)[:, :, None, None], want, 0)
    np.testing.assert_allclose(np.asarray(a.out), want, atol=5e-5)


def test_token_granularity_pallas_gpu_route_equals_xla():
    """granularity="token" through the block-sparse kernel with a CellMask (pallas_gpu,
    interpret mode) gives the XLA token path's selection, output and gradients (packed
    segments with padding, GQA, T not a multiple of the blocks)."""
    T = 45
    base = dict(k=2, t_m=8, block_q=16, block_k=16)
    q, k, v = inputs(7, T, batch=1)
    seg = jnp.asarray(np.array([[1] * 26 + [2] * 16 + [0] * 3], np.int32))
    outs, grads = [], []
    for extra in (dict(impl="xla"), dict(impl="pallas_gpu", kernel_interpret=True)):
        module, run = jitted(tuple(sorted({**base, **extra}.items())))
        outs.append(run(q, k, v, seg))
        loss = lambda q, k, v: jnp.sum(jnp.sin(module(q, k, v, segment_ids=seg).out))  # noqa: B023
        grads.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    a, b = outs
    np.testing.assert_array_equal(np.asarray(b.aux["mask"]), np.asarray(a.aux["mask"]))
    # on a GPU the compiled kernel's float32 dots run at TF32 (the XLA path's at full float32)
    atol = (2e-5, 5e-5) if jax.default_backend() == "cpu" else (5e-3, 2e-2)
    np.testing.assert_allclose(np.asarray(b.out), np.asarray(a.out), atol=atol[0])
    for ga, gb in zip(*grads):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), atol=atol[1])


def test_linear_schedule_and_select_impl_change_nothing():
    """linear_schedule="scan" (the sequential linear attention) and select_impl="pallas" (the
    radix-select kernel, interpret mode) give the defaults' selection and, up to float32
    rounding, their outputs and estimate (packed segments with padding, T not a multiple of
    the chunk)."""
    T = 37
    base = dict(k=2, t_m=8, chunk=8)
    q, k, v = inputs(11, T, batch=1)
    seg = jnp.asarray(np.array([[1] * 20 + [2] * 14 + [0] * 3], np.int32))
    _, run = jitted(tuple(sorted(base.items())))
    a = run(q, k, v, seg)
    for extra in (dict(linear_schedule="scan"), dict(select_impl="pallas", kernel_interpret=True)):
        _, run2 = jitted(tuple(sorted({**base, **extra}.items())))
        b = run2(q, k, v, seg)
        np.testing.assert_array_equal(np.asarray(b.aux["mask"]), np.asarray(a.aux["mask"]), err_msg=str(extra))
        np.testing.assert_allclose(np.asarray(b.out), np.asarray(a.out), atol=2e-5, err_msg=str(extra))
        np.testing.assert_allclose(np.asarray(b.aux["estimate"]), np.asarray(a.aux["estimate"]), atol=2e-5)


def test_registered_and_keeps_pretrained_projections():
    """"sea" is a registered core; swapping a SelfAttention's dense core for SEA keeps the
    Q/K/V/O projections and adds only SEA's own parameters (gates start near 1)."""
    from sea_jax.attention.self_attention import SelfAttention

    core = make_attention("sea", DIMS, {"k": 4, "t_m": 16}, rngs=nnx.Rngs(1))
    assert isinstance(core, SEAAttention) and core.options.k == 4
    layer = SelfAttention(DIMS, "dense", rngs=nnx.Rngs(2))
    before = {k_: np.asarray(getattr(layer, k_)[...]) for k_ in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layer.core = core
    for k_, w in before.items():
        np.testing.assert_array_equal(np.asarray(getattr(layer, k_)[...]), w)
    params = nnx.state(layer, nnx.Param)
    core_params = nnx.state(layer.core, nnx.Param)
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_core = sum(x.size for x in jax.tree_util.tree_leaves(core_params))
    assert n_all - n_core == sum(w.size for w in before.values())
    gates = jax.nn.sigmoid(core.gate_b[...])
    assert np.all(np.asarray(gates) > 0.9)


def test_bad_inputs_raise_value_errors():
    for opts, match in [
        (dict(k=0), "k must be"),
        (dict(k=-3), "k must be"),
        (dict(t_m=10), "t_m must be"),
        (dict(t_m=2), "t_m must be"),
        (dict(mode="query"), "mode must be"),
        (dict(impl="cuda"), "impl must be"),
        (dict(impl="pallas_tpu"), "granularity='block'"),
        (dict(impl="pallas_gpu", block_k=48), "impl='pallas_gpu' needs block_k a power of two"),
        (dict(granularity="block", block_q=24), "power of two"),
        (dict(granularity="rows"), "granularity must be"),
        (dict(features="cos"), "features must be"),
        (dict(gate_bias=(1.0,)), "gate_bias"),
        (dict(granularity="block", kernel_options=["always_mask"]), "kernel_options must be"),
        (dict(linear_schedule="serial"), "linear_schedule must be one of"),
        (dict(select_impl="cuda"), "select_impl must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            SEAOptions(**opts)
    with pytest.raises(ValueError, match="unknown option"):
        make_attention("sea", DIMS, {"topk": 3}, rngs=nnx.Rngs(0))
    # tuning knobs are kept as sorted pairs so the options stay hashable (a jit static argument)
    tuned = SEAOptions(granularity="block", kernel_options={"num_warps": 4, "always_mask": True})
    assert tuned.kernel_options == (("always_mask", True), ("num_warps", 4))
    hash(tuned)
    m = SEAAttention(DIMS, SEAOptions(k=2, t_m=8), rngs=nnx.Rngs(0))
    q, k, v = inputs(0, 5)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="select_impl='pallas' runs a Pallas Triton kernel"):
            SEAAttention(DIMS, SEAOptions(k=2, t_m=8, select_impl="pallas"), rngs=nnx.Rngs(0))(q, k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        m(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="q has 3 heads"):
        m(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        m(q, k, v, segment_ids=jnp.ones((B, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids are not supported"):
        m(q, k, v, segment_ids=jnp.ones((B, 5), jnp.int32), cache=m.init_cache(B, 8, jnp.float32))
    with pytest.raises(ValueError, match="t_m \\* sequence length"):
        m.init_cache(1, 2**28, jnp.float32)
    bi = SEAAttention(DIMS, SEAOptions(k=2, t_m=8, causal=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal=True"):
        bi.init_cache(B, 8, jnp.float32)
