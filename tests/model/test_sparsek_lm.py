"""SparseK as an attention choice of the LM: forward, causality, cached decoding, scorer gradient.

Tolerances (float32): causality 1e-6 (the sorted candidate order of a block may change when a
later key changes, which reorders sums), cached decoding vs full pass 2e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sea_jax.attention.sparsek import SparseKAttention
from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel

CFG = dict(
    vocab_size=53, width=24, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, mlp_dim=40,
    layer_attention=("dense", "sparsek", "sparsek"),
    attention_options={"sparsek": {"k": 3, "window": 2, "extra": 2, "block_q": 4}},
    scan_layers=True,
)


def _tokens(seed, B, T, V):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V, dtype=jnp.int32)


def test_lm_with_sparsek_layers_is_causal_and_decodes_like_the_full_pass():
    model = LanguageModel(LMConfig(**CFG), rngs=nnx.Rngs(0))
    cores = [m for _, m in nnx.iter_graph(model) if isinstance(m, SparseKAttention)]
    assert cores, "no SparseK core in the LM"
    B, T, P = 2, 13, 3
    V = model.cfg.vocab_size
    tokens = _tokens(1, B, T, V)
    fwd = nnx.jit(lambda m, t: m(t, return_aux=True))
    base = fwd(model, tokens)
    assert base.logits.shape == (B, T, V) and np.all(np.isfinite(np.asarray(base.logits)))
    # the SparseK layers report their selection (k = 3 of up to 10 selectable keys)
    aux = [a for a in base.aux if "sparsek_mask" in a]
    assert len(aux) == 2 and int(np.asarray(aux[0]["sparsek_mask"]).sum(-1).max()) == 3

    # causality: changing token t + 1 leaves logits <= t unchanged (and moves position t + 1)
    for t in (0, 5, T - 2):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % V)
        out = fwd(model, changed).logits
        np.testing.assert_allclose(np.asarray(out[:, : t + 1]), np.asarray(base.logits[:, : t + 1]), atol=1e-6, rtol=0)
        assert not np.allclose(np.asarray(out[:, t + 1]), np.asarray(base.logits[:, t + 1]))

    # cached generation: prefill P tokens, then one token at a time
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    out = step(model, tokens[:, :P], model.init_cache(B, T))
    logits, cache = [out.logits], out.cache
    for t in range(P, T):
        out = step(model, tokens[:, t : t + 1], cache)
        logits.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), np.asarray(base.logits), atol=2e-5, rtol=0)

    # the LM loss reaches the scorer of every SparseK layer
    def loss(m):
        return jnp.mean(m(tokens).logits ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    w = [np.asarray(a) for path, a in leaves if "w_score" in jax.tree_util.keystr(path)]
    assert len(w) == 1 and w[0].shape == (2, 24, 2)  # one stacked stage of 2 SparseK layers
    assert all(np.abs(a).max() > 0 for a in w[0])
