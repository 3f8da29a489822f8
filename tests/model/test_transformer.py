"""The Llama-shaped LM: causality, cached decoding, scan vs unrolled, parameter count, RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel, count_params
from sea_jax.ops.rope import apply_rope

# a mixed stack: exercises stages of different cores, GQA 2 and 3, odd head counts
MIXED = dict(
    vocab_size=61, width=24, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=8, mlp_dim=40,
    layer_attention=("dense", "sliding", "sliding", "performer"),
    attention_options={"sliding": {"window": 3, "chunk": 4}, "performer": {"chunk": 3}},
)


def _model(seed=0, **overrides):
    cfg = LMConfig(**{**MIXED, **overrides})
    return LanguageModel(cfg, rngs=nnx.Rngs(seed))


def _tokens(seed, B, T, V):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V, dtype=jnp.int32)


@pytest.mark.parametrize("overrides", [{}, {"num_heads": 3, "num_kv_heads": 1, "tie_embeddings": False, "num_layers": 1, "layer_attention": None}], ids=["mixed", "mqa-untied"])
def test_causality(overrides):
    """Changing token t+1 never changes the logits at positions <= t."""
    model = _model(**overrides)
    B, T = 2, 11
    tokens = _tokens(1, B, T, model.cfg.vocab_size)
    logits = nnx.jit(lambda model, tokens: model(tokens).logits)  # one compile for the four calls
    base = logits(model, tokens)
    for t in (0, 4, T - 2):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % model.cfg.vocab_size)
        out = logits(model, changed)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
        # the test can fail: the changed position itself must move
        assert not np.allclose(np.asarray(out[:, t + 1]), np.asarray(base[:, t + 1]))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_cached_decoding_matches_full_forward(scan_layers):
    """Prefill a prompt through the cache, then one token at a time: logits equal the full pass."""
    model = _model(scan_layers=scan_layers)
    B, T, P = 2, 10, 3
    tokens = _tokens(2, B, T, model.cfg.vocab_size)
    full = model(tokens).logits
    cache = model.init_cache(B, T)
    out = model(tokens[:, :P], cache=cache)
    steps = [out.logits]
    cache = out.cache
    step = nnx.jit(lambda model, token, cache: model(token, cache=cache))  # one compile for the T - P steps
    for t in range(P, T):
        out = step(model, tokens[:, t : t + 1], cache)
        cache = out.cache
        steps.append(out.logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5, rtol=2e-5)


def test_scan_and_unrolled_share_parameters_and_outputs():
    """The same parameters run unrolled, and with nnx.scan + full remat, give the same logits and
    gradients."""
    unrolled = _model(seed=3)
    scanned = _model(seed=4, scan_layers=True, remat="full")
    nnx.update(scanned, nnx.state(unrolled))  # identical structure by construction
    tokens = _tokens(3, 2, 9, unrolled.cfg.vocab_size)
    forward = nnx.jit(lambda model, tokens: model(tokens, return_hidden=True))
    a = forward(unrolled, tokens)
    b = forward(scanned, tokens)
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a.hidden), np.asarray(b.hidden), atol=1e-5, rtol=1e-5)
    assert a.hidden.shape == (4, 2, 9, 24)

    def loss(model):
        return jnp.mean(model(tokens).logits ** 2)

    grad = nnx.jit(nnx.grad(loss))
    ga = nnx.state(grad(unrolled), nnx.Param)
    gb = nnx.state(grad(scanned), nnx.Param)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-4)


def _expected_params(V, E, L, H, K, D, F, tied):
    """Written out independently of LMConfig.dense_param_count."""
    attention = E * (H * D) + E * (K * D) * 2 + (H * D) * E
    mlp = E * F * 3  # gate, up, down
    norms = 2 * E
    return V * E + (0 if tied else E * V) + L * (attention + mlp + norms) + E  # + final norm


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count(tied):
    model = _model(tie_embeddings=tied)
    expected = _expected_params(61, 24, 4, 6, 2, 8, 40, tied)
    # performer's random projection is a buffer, not a parameter
    assert count_params(model) == expected == model.cfg.dense_param_count()


def test_parameter_count_smollm2_shape():
    """SmolLM2-135M's shape has 134,515,008 parameters (its published count)."""
    cfg = LMConfig(vocab_size=49152, width=576, num_layers=30, num_heads=9, num_kv_heads=3,
                   head_dim=64, mlp_dim=1536, rope_base=1e5)
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == cfg.dense_param_count() == 134_515_008


def test_every_parameter_has_logical_axes():
    model = _model(scan_layers=True)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
            assert names is not None and len(names) == var[...].ndim, (path, names, var[...].shape)


def test_bf16_compute_close_to_fp32():
    """bf16 compute with fp32 master weights: logits within bf16 tolerance of the fp32 model."""
    f32 = _model(seed=7, num_layers=2, layer_attention=("dense", "sliding"))
    b16 = _model(seed=8, num_layers=2, layer_attention=("dense", "sliding"), dtype="bfloat16")
    nnx.update(b16, nnx.state(f32))
    tokens = _tokens(5, 2, 8, f32.cfg.vocab_size)
    a, b = f32(tokens).logits, b16(tokens).logits
    assert b.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: logits of this size agree to ~2e-2
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-2, rtol=3e-2)


def test_rope_matches_complex_rotation_and_is_relative():
    """Rotate-half RoPE == multiplying (x_i + i x_{i+D/2}) by exp(i pos theta_i); q.k depends only
    on the position difference."""
    B, T, H, D, base = 1, 5, 2, 8, 500.0
    x = jax.random.normal(jax.random.key(0), (B, T, H, D))
    pos = jnp.array([[0, 3, 7, 11, 100]])
    out = np.asarray(apply_rope(x, pos, base))
    xn = np.asarray(x, np.float64)
    theta = base ** (-np.arange(0, D, 2) / D)
    z = (xn[..., : D // 2] + 1j * xn[..., D // 2 :]) * np.exp(1j * np.asarray(pos)[..., None, None] * theta)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=1e-5)

    q = jax.random.normal(jax.random.key(1), (1, 1, 1, D))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, D))
    dot = lambda i, j: float(jnp.sum(apply_rope(q, jnp.array([[i]]), base) * apply_rope(k, jnp.array([[j]]), base)))  # noqa: E731
    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4, abs=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 3), rel=1e-3)
