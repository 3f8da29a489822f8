"""The model as flat dictionaries of arrays, the form the train step, optimizer and checkpoints use.

An NNX model splits into a static ``graphdef`` plus two groups of arrays:

* ``params``: every ``nnx.Param`` (trained; sharded by logical axis names);
* ``rest``: every other variable (e.g. Performer's fixed random projections; replicated).

Both are flat ``{"stages.0.blocks.attn.q_proj": array}`` dicts: string keys read well in
logs, optimizer groups (regexes over the keys), orbax checkpoints and ``.npz`` exports.
:meth:`ModelParts.merge` rebuilds a module from them (also inside ``jax.jit``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from sea_jax.model.config import LMConfig
from sea_jax.model.partitioning import logical_axes
from sea_jax.model.transformer import LanguageModel

Flat = dict[str, jax.Array]


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _flatten(state: nnx.State) -> tuple[Flat, dict[str, tuple]]:
    flat, paths = {}, {}
    for path, value in nnx.to_flat_state(state):
        key = _key(path)
        flat[key] = value.get_value() if isinstance(value, nnx.Variable) else value
        paths[key] = path
    return flat, paths


def _nest(flat: Flat, paths: dict[str, tuple]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        path = paths[key]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """Static description of a model: graphdef, flat key -> path tables, shapes and logical axes.

    Built from the abstract model (``nnx.eval_shape``): no parameter memory is allocated."""

    config: LMConfig
    graphdef: Any
    param_paths: dict[str, tuple]
    rest_paths: dict[str, tuple]
    param_shapes: dict[str, jax.ShapeDtypeStruct]
    rest_shapes: dict[str, jax.ShapeDtypeStruct]
    param_logical: dict[str, tuple]

    @classmethod
    def build(cls, config: LMConfig) -> "ModelParts":
        abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        param_flat, param_paths = _flatten(params)
        rest_flat, rest_paths = _flatten(rest)
        logical_flat, _ = _flatten_tuples(logical_axes(abstract))
        return cls(
            config=config,
            graphdef=graphdef,
            param_paths=param_paths,
            rest_paths=rest_paths,
            param_shapes={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in param_flat.items()},
            rest_shapes={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rest_flat.items()},
            param_logical=logical_flat,
        )

    def merge(self, params: Flat, rest: Flat) -> LanguageModel:
        """A module whose variables are ``params`` and ``rest`` (arrays or tracers)."""
        missing = sorted(set(self.param_paths) - set(params))
        if missing:
            raise ValueError(f"params lack {len(missing)} keys, e.g. {missing[:3]}")
        return nnx.merge(
            self.graphdef,
            nnx.State(_nest(params, self.param_paths)),
            nnx.State(_nest(rest, self.rest_paths)),
        )

    def init_fn(self, seed: int) -> Callable[[], tuple[Flat, Flat]]:
        """A function building (params, rest) from ``seed``; jit it with out_shardings to create
        the parameters directly in their sharded layout."""

        def init():
            model = LanguageModel(self.config, rngs=nnx.Rngs(seed))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return _flatten(params)[0], _flatten(rest)[0]

        return init

    def param_count(self) -> int:
        return sum(int(s.size) for s in self.param_shapes.values())


def split_model(model: nnx.Module) -> tuple[Flat, Flat]:
    """(params, rest) flat dicts of a concrete model."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return _flatten(params)[0], _flatten(rest)[0]


def _flatten_tuples(logical_state) -> tuple[dict[str, tuple], dict[str, tuple]]:
    flat, paths = {}, {}
    leaves = jax.tree_util.tree_flatten_with_path(logical_state, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, names in leaves:
        parts = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path)
        key = _key(parts)
        flat[key] = tuple(names)
        paths[key] = parts
    return flat, paths
