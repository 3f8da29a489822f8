"""Llama-family weights (HF layout) -> ``sea_jax.model.transformer.LanguageModel``.

Both loaders (GGUF, safetensors) first bring the checkpoint to HF Llama's naming and layout,
then call :func:`build_language_model`. HF layout, per layer i (``nn.Linear`` weights are
[out, in]; RoPE is the "rotate half" convention, which is also ours):

    model.embed_tokens.weight                    [V, E]
    model.layers.i.input_layernorm.weight        [E]
    model.layers.i.self_attn.{q,k,v}_proj.weight [H*D | K*D, E]
    model.layers.i.self_attn.o_proj.weight       [E, H*D]
    model.layers.i.post_attention_layernorm.weight [E]
    model.layers.i.mlp.{gate,up}_proj.weight     [F, E]
    model.layers.i.mlp.down_proj.weight          [E, F]
    model.norm.weight                            [E]
    lm_head.weight                               [V, E]   (absent when embeddings are tied)

Ours: embed [V, E]; per stage, stacked on axis 0 over its layers: q_proj [E, H, D],
k_proj/v_proj [E, K, D], o_proj [H, D, E], gate/up [E, F], down [F, E], norm scales [E];
lm_head [E, V] when untied. Replacing the attention core (``attention=``) keeps Q/K/V/O and
initialises only the new core's own parameters (SEA's estimator, SparseK's scorer) from ``seed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel


def layer_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}.weight"


def expected_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """HF-layout name -> shape of every tensor a Llama checkpoint with config ``cfg`` has."""
    E, H, K, D, F, V = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    for i in range(cfg.num_layers):
        shapes.update({
            layer_key(i, "input_layernorm"): (E,),
            layer_key(i, "post_attention_layernorm"): (E,),
            layer_key(i, "self_attn.q_proj"): (H * D, E),
            layer_key(i, "self_attn.k_proj"): (K * D, E),
            layer_key(i, "self_attn.v_proj"): (K * D, E),
            layer_key(i, "self_attn.o_proj"): (E, H * D),
            layer_key(i, "mlp.gate_proj"): (F, E),
            layer_key(i, "mlp.up_proj"): (F, E),
            layer_key(i, "mlp.down_proj"): (E, F),
        })
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, E)
    return shapes


def check_tensors(cfg: LMConfig, tensors: Mapping[str, Any], source: str) -> None:
    """ValueError naming every missing tensor, unexpected tensor or wrong shape."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    # rotary inv_freq buffers are derived from the config, not weights
    unexpected = sorted(k for k in set(tensors) - set(shapes) if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensors {unexpected[:6]} (biases, a different architecture or tied "
            "embeddings stored twice are not supported)"
        )
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")


def _stack(tensors, names: list[str], transform) -> np.ndarray:
    return np.stack([transform(np.asarray(tensors[n], dtype=np.float32)) for n in names])


def build_language_model(
    cfg: LMConfig,
    tensors: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    seed: int = 0,
) -> LanguageModel:
    """A LanguageModel with config ``cfg`` holding the HF-layout ``tensors`` (numpy arrays).

    cfg decides the attention core of every layer; Q/K/V/O are loaded whatever the core is.
    seed: initialises the parameters the checkpoint does not have (extra core parameters).
    """
    check_tensors(cfg, tensors, source)
    E, H, K, D = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # built under jit: initialising 100M+ parameters op by op takes several times longer
    model = nnx.jit(lambda: LanguageModel(cfg, rngs=nnx.Rngs(seed)))()
    pd = cfg.weights_dtype

    def put(param, value):
        value = jnp.asarray(value, dtype=pd)
        if param.shape != value.shape:  # the model and expected_shapes disagree: a bug, not bad input
            raise AssertionError(f"shape {value.shape} for a parameter of shape {param.shape}")
        param.set_value(value)

    put(model.embed, tensors["model.embed_tokens.weight"])
    put(model.final_norm.scale, tensors["model.norm.weight"])
    if not cfg.tie_embeddings:
        put(model.lm_head, np.asarray(tensors["lm_head.weight"], dtype=np.float32).T)

    start = 0
    for stage in model.stages:
        layers = list(range(start, start + stage.count))
        start += stage.count
        names = lambda n: [layer_key(i, n) for i in layers]  # noqa: E731
        blocks = stage.blocks
        put(blocks.attn_norm.scale, _stack(tensors, names("input_layernorm"), lambda w: w))
        put(blocks.mlp_norm.scale, _stack(tensors, names("post_attention_layernorm"), lambda w: w))
        put(blocks.attn.q_proj, _stack(tensors, names("self_attn.q_proj"), lambda w: w.reshape(H, D, E).transpose(2, 0, 1)))
        put(blocks.attn.k_proj, _stack(tensors, names("self_attn.k_proj"), lambda w: w.reshape(K, D, E).transpose(2, 0, 1)))
        put(blocks.attn.v_proj, _stack(tensors, names("self_attn.v_proj"), lambda w: w.reshape(K, D, E).transpose(2, 0, 1)))
        put(blocks.attn.o_proj, _stack(tensors, names("self_attn.o_proj"), lambda w: w.T.reshape(H, D, E)))
        put(blocks.mlp.gate, _stack(tensors, names("mlp.gate_proj"), lambda w: w.T))
        put(blocks.mlp.up, _stack(tensors, names("mlp.up_proj"), lambda w: w.T))
        put(blocks.mlp.down, _stack(tensors, names("mlp.down_proj"), lambda w: w.T))
    return model


def make_config(
    base: Mapping[str, Any],
    *,
    attention: str = "dense",
    attention_options: Mapping[str, Mapping[str, Any]] | None = None,
    layer_attention: tuple[str, ...] | None = None,
    **overrides,
) -> LMConfig:
    """LMConfig from the checkpoint's architecture fields ``base`` plus the caller's choices
    (attention core(s) and any other LMConfig field such as dtype, scan_layers, remat)."""
    architecture = {"vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "mlp_dim", "rope_base", "norm_eps", "tie_embeddings"}
    clash = sorted(architecture & set(overrides))
    if clash:
        raise ValueError(f"{clash} are fixed by the checkpoint and cannot be overridden")
    allowed = {f.name for f in dataclasses.fields(LMConfig)} - architecture
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown LMConfig field(s) {unknown}; allowed: {sorted(allowed)}")
    return LMConfig(
        **base,
        attention=attention,
        attention_options={k: dict(v) for k, v in (attention_options or {}).items()},
        layer_attention=tuple(layer_attention) if layer_attention is not None else None,
        **overrides,
    )
