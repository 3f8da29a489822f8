"""Autoregressive generation with a KV cache (greedy or sampling), compiled with jax.jit."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.model.transformer import LanguageModel


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature: 0 -> greedy (argmax). top_k: keep the k most likely tokens (0 = all).
    top_p: nucleus sampling mass (1.0 = off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits: [B, V] -> tokens [B] int32."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest logit still inside the nucleus (the first token is always kept)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < cfg.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: LanguageModel,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """Continue ``prompt`` ([B, P] int, equal-length prompts) by ``max_new_tokens`` tokens.

    The prompt is prefilled through the cache in one call; then one token per step inside a
    ``lax.fori_loop``. After ``eos_id`` a row keeps emitting ``eos_id``. Returns [B, P + N].
    """
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an int array [batch, length], got {prompt.dtype} {prompt.shape}")
    if prompt.shape[1] < 1:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if sampling.temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, key, max_new_tokens, sampling, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, key, max_new_tokens, sampling, eos_id):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    total = P + max_new_tokens
    cache = model.init_cache(B, total)
    out = model(prompt, cache=cache)
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt.astype(jnp.int32))
    if max_new_tokens == 0:
        return tokens
    key, sub = jax.random.split(key)
    first = sample_token(out.logits[:, -1], sub, sampling)
    tokens = tokens.at[:, P].set(first)
    done = jnp.zeros((B,), bool) if eos_id is None else first == eos_id

    def step(i, carry):
        tokens, cache, key, done, state = carry
        pos = P + i  # position of the token fed in this step
        last = jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1)
        step_model = nnx.merge(graphdef, state)
        res = step_model(last, positions=jnp.full((B, 1), pos, jnp.int32), cache=cache)
        key, sub = jax.random.split(key)
        nxt = sample_token(res.logits[:, -1], sub, sampling)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1)
        return tokens, res.cache, key, done, state

    # the parameters ride in the carry so that the loop body rebuilds the module from its own
    # tracers (NNX modules and variables must not cross trace levels)
    carry = (tokens, out.cache, key, done, state)
    tokens, *_ = jax.lax.fori_loop(0, max_new_tokens - 1, step, carry)
    return tokens
