"""Bad inputs to the attention interface and the LM config: ValueErrors that name the argument."""

import jax.numpy as jnp
import pytest
from flax import nnx

from sea_jax.attention.base import AttentionDims, attention_names, make_attention, make_options
from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel

DIMS = AttentionDims(num_heads=4, num_kv_heads=2, head_dim=8, embed_dim=16)
CORES = ["dense", "sliding", "performer", "sea", "sparsek"]


def _qkv(B=1, T=5, H=4, K=2, D=8, dtype=jnp.float32):
    return jnp.zeros((B, T, H, D), dtype), jnp.zeros((B, T, K, D), dtype), jnp.zeros((B, T, K, D), dtype)


def test_registry_lists_builtin_cores():
    assert set(CORES) <= set(attention_names())


@pytest.mark.parametrize("name", CORES)
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
        (lambda q, k, v: (q, k[..., None], v), "k must have rank 4"),
        (lambda q, k, v: (q[:, :, :3], k, v), "num_heads=4"),
        (lambda q, k, v: (q, k[:, :, :1], v), "k must have shape"),
        (lambda q, k, v: (q, k, v[:, :4]), "v must have shape"),
        (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), "dtypes differ"),
        (lambda q, k, v: (q.astype(jnp.int32), k, v), "q must be floating point"),
    ],
    ids=["q-rank", "k-rank", "heads", "kv-heads", "v-length", "dtype-mismatch", "int-q"],
)
def test_core_rejects_bad_tensors(name, mutate, match):
    core = make_attention(name, DIMS, {"window": 2} if name == "sliding" else None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        core(*mutate(*_qkv()))


@pytest.mark.parametrize("name", CORES)
def test_core_rejects_bad_segment_ids(name):
    core = make_attention(name, DIMS, rngs=nnx.Rngs(0))
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        core(q, k, v, segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integer"):
        core(q, k, v, segment_ids=jnp.ones((1, 5), jnp.float32))


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("sliding", {"window": -1}, "window must be an int >= 1"),
        ("sliding", {"window": 0}, "window must be an int >= 1"),
        ("sliding", {"chunk": 0}, "chunk"),
        ("sliding", {"windw": 3}, "windw"),
        ("performer", {"features": "cosine"}, "features must be one of"),
        ("performer", {"num_features": 0}, "num_features"),
        ("dense", {"impl": "flash"}, "impl must be one of"),
        ("sparsek", {"k": 0}, "k must be"),
        ("sparsek", {"window": -1}, "window must be"),
        ("sea", {"k": 0}, "k must be"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_options(name, options)


def test_unknown_attention_name():
    with pytest.raises(ValueError, match=r"attention='flash' is unknown; choose one of .*dense"):
        make_attention("flash", DIMS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention='flash' is unknown"):
        LMConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown"):
        LMConfig(layer_attention=("dense", "nope"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=5, num_kv_heads=2), r"num_heads \(5\) must be a multiple of num_kv_heads \(2\)"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(width=0), "width must be a positive int"),
        (dict(num_layers=3, layer_attention=("dense", "dense")), "layer_attention has 2 entries"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(remat="some"), "remat must be one of"),
        (dict(rope_base=1.0), "rope_base"),
        (dict(attention_options={"sliding": {"window": -3}}), "window"),
    ],
)
def test_bad_lm_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kwargs)


def test_lm_rejects_bad_tokens_and_positions():
    model = LanguageModel(LMConfig(num_layers=1, width=16, head_dim=4, mlp_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="positions must have shape"):
        model(jnp.zeros((2, 3), jnp.int32), positions=jnp.zeros((2, 4), jnp.int32))
