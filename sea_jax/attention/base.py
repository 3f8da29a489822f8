"""The one interface every attention module implements.

An attention *core* maps already-projected, already-rotated queries, keys and values to
per-head outputs. Projections (Q/K/V/O) and RoPE live outside the core, in
:class:`sea_jax.attention.SelfAttention`, so that swapping the core (dense -> SEA, dense ->
SparseK) keeps a pretrained model's Q/K/V/O weights; a core only owns its *extra* parameters
(SEA's estimator, SparseK's scorer).

Shapes (B batch, T query length, S key length, H query heads, K kv heads, D head dim, E width):

* ``q``: [B, T, H, D]; ``k``, ``v``: [B, T, K, D] with ``H % K == 0`` (GQA: query head ``h``
  reads kv head ``h // (H // K)``).
* ``x``: [B, T, E], the layer's normalised input hidden states (scorers read it; most cores
  ignore it).
* ``segment_ids``: optional [B, T] int32. Tokens attend only to tokens of the same segment
  id; id 0 marks padding (padding queries produce zeros, padding keys are never attended).
* ``cache``: ``None`` for a full (training/prefill-free) pass, else the pytree returned by
  ``init_cache``; the call then appends the T new tokens and returns the updated cache.

Causality follows token order within the call (and the cache's length for decoding); RoPE
positions only rotate q and k outside the core.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx


class AttentionOutput(NamedTuple):
    """What every core returns.

    out:   [B, T, H, D] per-head attention output (before the output projection).
    cache: the updated decode cache (``None`` when called without one).
    aux:   auxiliary arrays requested with ``return_aux=True`` (SEA's estimate, SparseK's
           selection, ...); an empty dict otherwise.
    """

    out: jax.Array
    cache: Any
    aux: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionDims:
    """Head layout shared by every core of a layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int  # width E of the hidden states ``x`` (scorers read it)

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@runtime_checkable
class AttentionCore(Protocol):
    """Protocol of an attention core (an ``nnx.Module``)."""

    dims: AttentionDims

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        x: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Any = None,
        return_aux: bool = False,
    ) -> AttentionOutput: ...

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> Any: ...


# --------------------------------------------------------------------------------------
# registry: cores are selected by name from config
# --------------------------------------------------------------------------------------

# name -> (factory(dims, options: dict, rngs) -> core, options dataclass or None)
_REGISTRY: dict[str, tuple[Callable[..., nnx.Module], type | None]] = {}


def register_attention(name: str, options_cls: type | None = None):
    """Class decorator: make a core constructible by name.

    The class is constructed as ``cls(dims, options_cls(**options), rngs=rngs)`` (or
    ``cls(dims, rngs=rngs)`` when ``options_cls`` is None).
    """

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"attention {name!r} registered twice")
        _REGISTRY[name] = (cls, options_cls)
        cls.registered_name = name
        return cls

    return wrap


def attention_names() -> list[str]:
    _import_builtin_cores()
    return sorted(_REGISTRY)


def make_options(name: str, options: dict | Any | None):
    """Build the options dataclass of core ``name`` from a dict, naming unknown keys."""
    _import_builtin_cores()
    if name not in _REGISTRY:
        raise ValueError(f"attention={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    _, options_cls = _REGISTRY[name]
    if options_cls is None:
        if options:
            raise ValueError(f"attention {name!r} takes no options, got {options!r}")
        return None
    if options is None:
        return options_cls()
    if isinstance(options, options_cls):
        return options
    if not isinstance(options, dict):
        raise ValueError(
            f"attention options for {name!r} must be a dict or {options_cls.__name__}, "
            f"got {type(options).__name__}"
        )
    allowed = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for attention {name!r}; allowed: {sorted(allowed)}"
        )
    return options_cls(**options)


def make_attention(name: str, dims: AttentionDims, options=None, *, rngs: nnx.Rngs):
    """Construct the attention core registered as ``name``."""
    opts = make_options(name, options)
    cls, options_cls = _REGISTRY[name]
    if options_cls is None:
        return cls(dims, rngs=rngs)
    return cls(dims, opts, rngs=rngs)


def _import_builtin_cores():
    # Importing the modules runs their @register_attention decorators. Cores that are
    # not yet written are skipped, so the registry only lists what exists.
    import importlib

    for mod in ("dense", "sliding", "performer", "sea", "sparsek"):
        try:
            importlib.import_module(f"sea_jax.attention.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"sea_jax.attention.{mod}":
                raise


# --------------------------------------------------------------------------------------
# shared argument checks
# --------------------------------------------------------------------------------------

def check_qkv(dims: AttentionDims, q, k, v, x=None, segment_ids=None):
    """Validate ranks, head counts and dtypes; raise ValueError naming the argument."""
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {arr.shape}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {arr.dtype}")
    B, T, H, D = q.shape
    if H != dims.num_heads or D != dims.head_dim:
        raise ValueError(
            f"q has {H} heads of dim {D}; the layer expects num_heads={dims.num_heads}, "
            f"head_dim={dims.head_dim}"
        )
    for name, arr in (("k", k), ("v", v)):
        if arr.shape != (B, T, dims.num_kv_heads, D):
            raise ValueError(
                f"{name} must have shape {(B, T, dims.num_kv_heads, D)} "
                f"(batch, seq, num_kv_heads, head_dim), got {arr.shape}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if x is not None and (x.ndim != 3 or x.shape[:2] != (B, T) or x.shape[2] != dims.embed_dim):
        raise ValueError(f"x must have shape {(B, T, dims.embed_dim)}, got {x.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must have shape {(B, T)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer, got dtype {segment_ids.dtype}")


def repeat_kv(x: jax.Array, group_size: int) -> jax.Array:
    """[B, S, K, D] -> [B, S, K * group_size, D] (query head h reads kv head h // group)."""
    if group_size == 1:
        return x
    return jnp.repeat(x, group_size, axis=2)
