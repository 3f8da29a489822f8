"""The Llama-shaped decoder LM in Flax NNX.

Layers that share an attention core form a *stage* whose parameters are stacked along a
leading "layers" axis (created with ``nnx.vmap``). A stage runs either with ``nnx.scan``
(``scan_layers=True``: one compiled layer body) or unrolled by slicing the stack, so both modes
use the same parameters and the same checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention.self_attention import SelfAttention
from sea_jax.model.config import LMConfig
from sea_jax.model.partitioning import logical_param

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32."""

    def __init__(self, width: int, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(jnp.ones((width,), param_dtype), ("embed",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, init_std, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(init_std)
        self.dtype = dtype
        self.gate = logical_param(init(rngs.params(), (width, hidden), param_dtype), ("embed", "mlp"))
        self.up = logical_param(init(rngs.params(), (width, hidden), param_dtype), ("embed", "mlp"))
        self.down = logical_param(init(rngs.params(), (hidden, width), param_dtype), ("mlp", "embed"))

    def __call__(self, x):
        dt = self.dtype
        x = x.astype(dt)
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)


class DecoderBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig, attention: str, *, rngs: nnx.Rngs):
        pd, dt = cfg.weights_dtype, cfg.compute_dtype
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps, pd)
        self.attn = SelfAttention(
            cfg.attention_dims,
            attention,
            cfg.attention_options.get(attention),
            rope_base=cfg.rope_base,
            dtype=dt,
            param_dtype=pd,
            init_std=cfg.init_std,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps, pd)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, dtype=dt, param_dtype=pd, init_std=cfg.init_std, rngs=rngs)

    def __call__(self, x, positions, *, segment_ids=None, cache=None, return_aux=False):
        res = self.attn(self.attn_norm(x), positions, segment_ids=segment_ids, cache=cache, return_aux=return_aux)
        x = x + res.out.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x, res.cache, res.aux


class Stage(nnx.Module):
    """``count`` consecutive decoder blocks sharing one attention core, stacked on axis 0."""

    def __init__(self, cfg: LMConfig, attention: str, count: int, *, rngs: nnx.Rngs):
        self.count = count
        self.attention = attention

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return DecoderBlock(cfg, attention, rngs=rngs)

        self.blocks = make(rngs)

    def layer(self, i: int) -> DecoderBlock:
        """Block i of the stack as its own module (a view with sliced parameters)."""
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def init_cache(self, batch, max_len, dtype):
        caches = [self.layer(i).attn.init_cache(batch, max_len, dtype) for i in range(self.count)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


class LMOutput(NamedTuple):
    """logits: [B, T, V] float32; cache: per-stage stacked caches (or None);
    hidden: [L, B, T, E] output of every layer (when requested, else None);
    aux: per-layer tuple of attention aux dicts (empty dicts unless requested)."""

    logits: jax.Array
    cache: Any
    hidden: jax.Array | None
    aux: tuple


class LanguageModel(nnx.Module):
    """Decoder-only LM. tokens: [B, T] int -> LMOutput."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.weights_dtype
        init = jax.nn.initializers.normal(cfg.init_std)
        self.embed = logical_param(init(rngs.params(), (cfg.vocab_size, cfg.width), pd), ("vocab", "embed"))
        self.stages = nnx.List([Stage(cfg, name, n, rngs=rngs) for name, n in cfg.stages()])
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = logical_param(init(rngs.params(), (cfg.width, cfg.vocab_size), pd), ("embed", "vocab"))

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Decode caches for every layer, grouped per stage (leading axis: layer in stage)."""
        dtype = dtype or self.cfg.compute_dtype
        return tuple(stage.init_cache(batch, max_len, dtype) for stage in self.stages)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache=None,
        return_hidden: bool = False,
        return_aux: bool = False,
    ) -> LMOutput:
        """tokens: [B, T] int; positions: [B, T] (default: 0..T-1, offset by the cache length
        when decoding); segment_ids: [B, T] (0 = padding); cache: from ``init_cache``."""
        cfg = self.cfg
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype} {tokens.shape}")
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache is None else _cache_length(cache)
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        elif positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {positions.shape}")
        if cache is not None and len(cache) != len(self.stages):
            raise ValueError(f"cache has {len(cache)} stages; the model has {len(self.stages)}")

        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
        new_caches, hidden, aux = [], [], []
        for s, stage in enumerate(self.stages):
            x, c, h, a = self._run_stage(
                stage, x, positions, segment_ids, None if cache is None else cache[s], return_aux
            )
            new_caches.append(c)
            if return_hidden:
                hidden.append(h)
            aux.extend(jax.tree.map(lambda t: t[i], a) for i in range(stage.count))
        x = self.final_norm(x)
        w = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum("bte,ev->btv", x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype))
        return LMOutput(
            logits.astype(jnp.float32),
            None if cache is None else tuple(new_caches),
            jnp.concatenate(hidden, axis=0) if return_hidden else None,
            tuple(aux),
        )

    def _run_stage(self, stage: Stage, x, positions, segment_ids, cache, return_aux):
        """Returns (x, stacked caches or None, stacked hidden [n, B, T, E], stacked aux)."""

        def apply(block, x, layer_cache):
            x, new_cache, aux = block(x, positions, segment_ids=segment_ids, cache=layer_cache, return_aux=return_aux)
            return x, new_cache, aux

        if self.cfg.remat != "none":
            apply = nnx.remat(apply, policy=_REMAT_POLICIES[self.cfg.remat])

        if self.cfg.scan_layers:
            if cache is None:

                @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0, 0))
                def run(block, x):
                    x, _, aux = apply(block, x, None)
                    return x, x, aux

                x, hidden, aux = run(stage.blocks, x)
                return x, None, hidden, aux

            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0, 0))
            def run_cached(block, x, layer_cache):
                x, new_cache, aux = apply(block, x, layer_cache)
                return x, new_cache, x, aux

            x, new_cache, hidden, aux = run_cached(stage.blocks, x, cache)
            return x, new_cache, hidden, aux

        caches, hidden, auxs = [], [], []
        for i in range(stage.count):
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
            x, c, a = apply(stage.layer(i), x, layer_cache)
            caches.append(c)
            hidden.append(x)
            auxs.append(a)
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        new_cache = None if cache is None else jax.tree.map(stack, *caches)
        return x, new_cache, jnp.stack(hidden), jax.tree.map(stack, *auxs)


def _cache_length(cache) -> jax.Array:
    """Tokens already in the cache (every core's cache carries ``length``)."""
    first = cache[0]
    return first.length[0]


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
