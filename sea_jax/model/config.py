"""Configuration of the Llama-shaped decoder LM."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sea_jax.attention.base import AttentionDims, make_options

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A Llama-shaped decoder: RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings.

    attention: the default attention core of every layer (a registered name: dense,
        sliding, performer, sea, sparsek).
    layer_attention: optional per-layer names (length num_layers) overriding ``attention``,
        e.g. ("dense",) + ("sparsek",) * 11 keeps the first layer dense.
    attention_options: options per core name, e.g. {"sliding": {"window": 128}}.
    scan_layers: run consecutive layers that share a core with ``nnx.scan`` (faster compile);
        parameters are stacked the same way either way, so checkpoints do not depend on it.
    remat: "none" | "full" | "dots" | "dots_no_batch" (jax.checkpoint policy per layer).
    dtype: compute dtype; parameters are kept in param_dtype (float32 master weights).
    """

    vocab_size: int = 256
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 384
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "dense"
    layer_attention: tuple[str, ...] | None = None
    attention_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    scan_layers: bool = False
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE), got {self.head_dim}")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.remat not in _REMAT:
            raise ValueError(f"remat must be one of {_REMAT}, got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.layer_attention is not None:
            if len(self.layer_attention) != self.num_layers:
                raise ValueError(
                    f"layer_attention has {len(self.layer_attention)} entries; num_layers is {self.num_layers}"
                )
            object.__setattr__(self, "layer_attention", tuple(self.layer_attention))
        # validate names and options now, so a typo fails before any parameter is built
        for name in set(self.layer_names()):
            make_options(name, self.attention_options.get(name))
        for name in self.attention_options:
            make_options(name, self.attention_options[name])

    def __hash__(self):
        # attention_options is a dict; the config is still used as a static jit argument
        return hash(repr(self))

    def layer_names(self) -> tuple[str, ...]:
        return self.layer_attention or (self.attention,) * self.num_layers

    def stages(self) -> list[tuple[str, int]]:
        """Consecutive runs of layers sharing a core: [(name, count), ...]."""
        runs: list[tuple[str, int]] = []
        for name in self.layer_names():
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1] + 1)
            else:
                runs.append((name, 1))
        return runs

    @property
    def attention_dims(self) -> AttentionDims:
        return AttentionDims(self.num_heads, self.num_kv_heads, self.head_dim, self.width)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weights_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)

    def dense_param_count(self) -> int:
        """Parameter count of the backbone (embeddings, projections, MLPs, norms), excluding
        the extra parameters of SEA/SparseK cores."""
        E, H, K, D, F, V, L = (
            self.width, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim,
            self.vocab_size, self.num_layers,
        )
        per_layer = E * H * D + 2 * E * K * D + H * D * E + 3 * E * F + 2 * E
        head = 0 if self.tie_embeddings else E * V
        return V * E + head + L * per_layer + E
