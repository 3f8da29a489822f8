"""The train state: what one optimizer step reads and writes, with its shardings.

The state is a plain dict (orbax saves it as is)::

    step       int32 []      optimizer steps taken
    params     {key: f32}    nnx.Param arrays (master weights, sharded by logical axis rules)
    rest       {key: array}  non-trained model variables (replicated)
    opt_state  optax state   Adam moments sharded like their parameters
    rng        uint32 [2]    base PRNG key data; step ``s`` uses ``fold_in(rng, s)``

Everything is created directly in its sharded layout by a jitted initializer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from sea_jax.train import mesh as mesh_lib
from sea_jax.train.optim import Optimizer, opt_state_shardings
from sea_jax.train.params import ModelParts


def state_shardings(parts: ModelParts, opt: Optimizer, mesh: Mesh, rules=None, warn: bool = True) -> dict[str, Any]:
    """NamedSharding tree matching the train state."""
    rules = mesh_lib.DEFAULT_RULES if rules is None else rules
    param_sh = mesh_lib.param_shardings(
        {k: s.shape for k, s in parts.param_shapes.items()}, parts.param_logical, mesh, rules, warn=warn
    )
    rep = mesh_lib.replicated(mesh)
    opt_shapes = jax.eval_shape(opt.tx.init, parts.param_shapes)
    return {
        "step": rep,
        "params": param_sh,
        "rest": {k: rep for k in parts.rest_shapes},
        "opt_state": opt_state_shardings(opt_shapes, param_sh, rep),
        "rng": rep,
    }


def abstract_state(parts: ModelParts, opt: Optimizer, shardings: dict[str, Any]) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of the train state: the restore target of a
    checkpoint and the input of ahead-of-time compilation."""
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": parts.param_shapes,
        "rest": parts.rest_shapes,
        "opt_state": jax.eval_shape(opt.tx.init, parts.param_shapes),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(parts: ModelParts, opt: Optimizer, shardings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A fresh train state (parameters from ``seed``), created sharded by one jitted call."""
    init_model = parts.init_fn(seed)

    def init():
        params, rest = init_model()
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt_state": opt.tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        }

    return jax.jit(init, out_shardings=shardings)()


def describe_shardings(shardings: dict[str, Any]) -> list[str]:
    """One line per parameter: key and PartitionSpec (printed by --compile-only)."""
    return [f"{k}: {s.spec}" for k, s in shardings["params"].items() if isinstance(s, NamedSharding)]


def state_from_params(params: dict, rest: dict, opt: Optimizer, shardings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A fresh train state around given (e.g. pretrained) ``params`` and ``rest``, laid out in
    ``shardings`` (step 0, new optimizer moments)."""
    missing = sorted(set(shardings["params"]) ^ set(params)) + sorted(set(shardings["rest"]) ^ set(rest))
    if missing:
        raise ValueError(f"params/rest do not match the model's variables; differing keys: {missing[:5]}")

    def build(params, rest):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,
            "opt_state": opt.tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        }

    return jax.jit(build, out_shardings=shardings)(params, rest)
