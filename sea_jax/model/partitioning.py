"""Logical axis names on parameters (names only; the training mesh maps them to mesh axes).

Every parameter of the library is created through :func:`logical_param`, which records a
tuple of logical axis names, one per array axis, e.g. ``("embed", "q_heads", "head_dim")``.
Stacked (scanned) layers add a leading ``"layers"`` axis. :func:`logical_axes` reads the names
back as a pytree of tuples matching ``nnx.state(model, nnx.Param)``.

Logical names used: vocab, embed, q_heads, kv_heads, head_dim, mlp, layers, and ``None`` for
small axes never sharded.
"""

from __future__ import annotations

import jax
from flax import nnx

_META_KEYS = ("out_sharding", "sharding_names", "sharding")


def logical_param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    """An ``nnx.Param`` annotated with logical axis ``names`` (never sharded eagerly)."""
    if len(names) != value.ndim:
        raise ValueError(f"names {names} do not match the rank of a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def variable_axes(variable: nnx.Variable) -> tuple | None:
    """The logical axis names recorded on ``variable`` (None if it has none)."""
    meta = variable.get_metadata()
    for key in _META_KEYS:
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def logical_axes(module: nnx.Module, filter_=nnx.Param):
    """Pytree (same structure as ``nnx.state(module, filter_)``) of logical-name tuples."""
    state = nnx.state(module, filter_)
    return jax.tree.map(
        lambda v: variable_axes(v) or (None,) * v.get_value().ndim,
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
