"""dense, sliding and performer cores against slow references built in the tests.

Tolerances: float32 inputs vs a float64 NumPy reference: atol 2e-5 (dense, sliding), 5e-5
(performer); bfloat16 inputs (the reference sees the same bf16-rounded values): atol 3e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from x64 import enable_x64
from jax.test_util import check_grads

from reference_attention import causal_mask, linear_attention_loop, masked_softmax_attention
from sea_jax.attention.base import AttentionDims, make_attention
from sea_jax.ops.random_features import feature_map

SHAPES = [  # (B, T, H, K, D)
    (1, 1, 3, 1, 8),
    (2, 7, 3, 3, 8),  # GQA ratio 1
    (2, 13, 6, 2, 16),  # ratio 3, odd length
    (1, 33, 8, 2, 8),  # ratio 4
]


def _inputs(seed, B, T, H, K, D, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), dtype)
    return q, k, v


def _core(name, H, K, D, **options):
    return make_attention(name, AttentionDims(H, K, D, 16), options, rngs=nnx.Rngs(0))


def _reference(name, core, q, k, v, segment_ids=None, window=None):
    T = q.shape[1]
    if name in ("dense", "sliding"):
        return masked_softmax_attention(q, k, v, causal_mask(T, window, segment_ids))
    proj = core.projection[...]
    fq = feature_map(core.options.features, q, proj, is_query=True, scale=q.shape[-1] ** -0.5)
    fk = feature_map(core.options.features, k, proj, is_query=False, scale=q.shape[-1] ** -0.5)
    return linear_attention_loop(fq, fk, v, segment_ids)


CASES = [
    ("dense", {}),
    ("sliding", {"window": 1, "chunk": 4}),
    ("sliding", {"window": 5, "chunk": 3}),
    ("sliding", {"window": 40, "chunk": 8}),
    ("performer", {"features": "relu", "chunk": 4}),
    ("performer", {"features": "favor", "chunk": 5}),
]


@pytest.mark.parametrize("name,options", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fp32(name, options, shape):
    B, T, H, K, D = shape
    core = _core(name, H, K, D, **options)
    q, k, v = _inputs(hash((name, shape)) % 1000, *shape)
    out = core(q, k, v).out
    ref = _reference(name, core, q, k, v, window=options.get("window"))
    atol = 5e-5 if name == "performer" else 2e-5
    np.testing.assert_allclose(np.asarray(out), ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name,options", CASES[:1] + CASES[2:3] + CASES[4:5], ids=str)
def test_forward_bf16(name, options):
    B, T, H, K, D = 2, 13, 6, 2, 16
    core = _core(name, H, K, D, **options)
    q, k, v = _inputs(5, B, T, H, K, D, jnp.bfloat16)
    out = core(q, k, v).out
    assert out.dtype == jnp.bfloat16
    ref = _reference(name, core, q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                     window=options.get("window"))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_segments_and_padding(name, options):
    B, T, H, K, D = 2, 12, 4, 2, 8
    core = _core(name, H, K, D, **options)
    q, k, v = _inputs(11, B, T, H, K, D)
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [0] * 2 + [3] * 10], jnp.int32)
    out = np.asarray(core(q, k, v, segment_ids=seg).out)
    ref = _reference(name, core, q, k, v, segment_ids=seg, window=options.get("window"))
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=1e-4)
    assert np.all(out[np.asarray(seg) == 0] == 0), "padding queries must output zeros"
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_decode_matches_full(name, options):
    B, T, H, K, D = 2, 11, 4, 2, 8
    core = _core(name, H, K, D, **options)
    q, k, v = _inputs(3, B, T, H, K, D)
    full = core(q, k, v).out
    cache = core.init_cache(B, T, jnp.float32)
    outs = []
    # a prefill of 4 tokens, then one token at a time
    for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
        res = core(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache=cache)
        cache = res.cache
        outs.append(res.out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", [CASES[0], CASES[2], CASES[4], CASES[5]], ids=str)
def test_gradients_finite_differences(name, options):
    B, T, H, K, D = 1, 6, 4, 2, 4
    with enable_x64():
        core = _core(name, H, K, D, **options)
        q, k, v = _inputs(7, B, T, H, K, D, jnp.float64)

        def f(q, k, v):
            return jnp.sum(jnp.sin(core(q, k, v).out))

        # jax.nn.dot_product_attention's XLA path takes its softmax in float32 even for
        # float64 inputs, so the dense core is only float32-accurate
        tol = 1e-3 if name == "dense" else 1e-5
        check_grads(f, (q, k, v), order=1, modes=["rev"], atol=tol, rtol=tol)


def test_performer_favor_approximates_softmax():
    """With many orthogonal features FAVOR+ estimates softmax attention (unbiased kernel)."""
    B, T, H, K, D = 1, 16, 2, 2, 8
    core = _core("performer", H, K, D, features="favor", num_features=4096)
    q, k, v = _inputs(0, B, T, H, K, D)
    q, k = 0.5 * q, 0.5 * k
    ref = masked_softmax_attention(q, k, v, causal_mask(T))
    np.testing.assert_allclose(np.asarray(core(q, k, v).out), ref, atol=0.08)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_performer_favor_gradients_finite_with_massive_activation(dtype):
    """LLMs carry a few huge-norm keys ("massive activations", ~3e4 in SmolLM2). Their FAVOR+
    features, and whole rows' normalisers, underflow to tiny positive values; the gradients must
    stay finite (they once overflowed 1/den^2 to inf, then NaN) and the output must not blow up."""
    B, T, H, K, D = 1, 12, 2, 1, 8
    core = _core("performer", H, K, D, features="favor", num_features=32)
    q, k, v = _inputs(3, B, T, H, K, D)

    def loss(q, k, v):
        return jnp.sum(core(q, k, v).out.astype(jnp.float32) ** 2)

    # key norms 18-25 (D = 8) put exp(w.k - |k|^2 / 2) in float32's subnormal range: the
    # normaliser is tiny but positive (norm 30 underflows it to exactly 0, handled separately)
    for norm in (18.0, 20.0, 25.0, 30.0):
        kn = (k / jnp.linalg.norm(k, axis=-1, keepdims=True) * norm).astype(dtype)
        qd, vd = q.astype(dtype), v.astype(dtype)
        out = core(qd, kn, vd).out.astype(jnp.float32)
        assert bool(jnp.all(jnp.isfinite(out))), norm
        assert float(jnp.max(jnp.abs(out))) <= float(jnp.max(jnp.abs(vd.astype(jnp.float32)))) * 1.01
        for g in jax.grad(loss, argnums=(0, 1, 2))(qd, kn, vd):
            assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), norm


def test_sliding_never_materialises_txt():
    T, w = 4096, 128
    core = _core("sliding", 2, 1, 8, window=w, chunk=128)
    q, k, v = (jax.ShapeDtypeStruct((1, T, h, 8), jnp.float32) for h in (2, 1, 1))
    jaxpr = jax.make_jaxpr(lambda q, k, v: core(q, k, v).out)(q, k, v)
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            big = [s for s in getattr(var.aval, "shape", ()) if s >= T]
            assert len(big) < 2, f"{eqn.primitive} makes a T x T array {var.aval.shape}"
