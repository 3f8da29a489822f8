"""sea_jax: learned sparse attention (SEA, SparseK) for long-context LMs in JAX / Flax NNX.

    import sea_jax
    cfg = sea_jax.LMConfig(attention="sparsek", layer_attention=None)
    model = sea_jax.LanguageModel(cfg, rngs=flax.nnx.Rngs(0))
    core = sea_jax.make_attention("sliding", sea_jax.AttentionDims(8, 2, 64, 512), {"window": 256})

Heavier entry points (checkpoints, pretrained weights, the training script) are imported on
first use, so ``import sea_jax`` stays light.
"""

from __future__ import annotations

import importlib

from sea_jax.attention.base import (
    AttentionDims,
    AttentionOutput,
    attention_names,
    make_attention,
    make_options,
    register_attention,
)
from sea_jax.attention.self_attention import SelfAttention
from sea_jax.model.config import LMConfig
from sea_jax.model.generate import SamplingConfig, generate
from sea_jax.model.transformer import LanguageModel, LMOutput, count_params

__version__ = "0.1.0"

# name -> module that defines it, imported lazily (orbax, draccus, gguf are slow to import)
_LAZY = {
    "load_checkpoint": "sea_jax.train.checkpoint",
    "export_params": "sea_jax.train.checkpoint",
    "load_pretrained": "sea_jax.pretrained",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sea_jax' has no attribute {name!r}")


__all__ = [
    "AttentionDims", "AttentionOutput", "LMConfig", "LMOutput", "LanguageModel", "SamplingConfig",
    "SelfAttention", "attention_names", "count_params", "export_params", "generate", "load_checkpoint",
    "load_pretrained", "make_attention", "make_options", "register_attention",
]
