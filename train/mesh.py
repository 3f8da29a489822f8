"""The device mesh, the logical-axis rules, and the multi-host start.

Mesh axes (outer to inner):

* ``data``   - pure data parallelism (parameters replicated);
* ``fsdp``   - data parallelism whose parameters and optimizer state are sharded (ZeRO-3);
* ``tensor`` - tensor (model) parallelism over heads, MLP hidden units and the vocabulary.

The batch is split over ``data`` x ``fsdp``. Parameters carry logical axis names
(sea_jax.model.partitioning); :data:`DEFAULT_RULES` maps each name to mesh axes. An axis whose
size does not divide evenly by its mesh axes is replicated instead (e.g. 2 KV heads on a
tensor axis of 4); :func:`param_shardings` reports every such fallback.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sea_jax.train.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes (tuple; empty = replicated)
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
}


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-process job.

    mode "auto": initialise when the environment names a coordinator
    (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` > 1), a SLURM job with more than one
    task, or a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` listing several hosts); a no-op on
    one process. "on": always (jax auto-detects the cluster). "off": never.
    Returns True when the distributed runtime is (now) initialised.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mode must be 'auto', 'on' or 'off', got {mode!r}")
    if _distributed_is_initialized():
        return True
    if mode == "off":
        return False
    env = os.environ
    if mode == "on":
        jax.distributed.initialize()
        return True
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


def _distributed_is_initialized() -> bool:
    try:
        return jax.distributed.is_initialized()
    except AttributeError:  # older jax: fall back to the global state object
        from jax._src import distributed

        return distributed.global_state.client is not None


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 axis; raise naming ``mesh`` when the sizes do not multiply to the device
    count."""
    shape = list(cfg.shape())
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes {dict(zip(AXES, shape))} use {fixed} devices, which does not divide "
                f"the {num_devices} available devices"
            )
        shape[shape.index(-1)] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh: {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but {num_devices} are available "
            "(set one axis to -1 to fill)"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over ``devices`` (default: all devices).

    For real devices ``jax.make_mesh`` picks a topology-aware order (ICI rings on TPU); device
    lists from an AOT topology go through ``mesh_utils.create_device_mesh`` likewise.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU and odd shapes: a plain row-major layout is as good as any
        array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(array, AXES)


def merged_rules(overrides: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES with ``overrides`` (from ``mesh.rules``) applied and checked."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        axes = tuple(axes)
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axes {bad}; allowed: {list(AXES)}")
        rules[name] = axes
    return rules


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, tuple[str, ...]],
    fallbacks: list[str] | None = None,
    where: str = "",
) -> P:
    """PartitionSpec for an array whose axes carry logical ``names``.

    A mesh axis is used at most once per array (first come, first served) and only where it
    divides the array axis; otherwise that axis is replicated and a note is added to
    ``fallbacks``."""
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{where}: logical axis {name!r} has no mesh rule; known: {sorted(rules)}")
        axes = tuple(a for a in rules[name] if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            if fallbacks is not None:
                fallbacks.append(f"{where} axis {dim} ({name}, size {size}) not divisible by {axes}={ways}: replicated")
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(
    shapes: Mapping[str, Sequence[int]],
    logical: Mapping[str, Sequence[str | None]],
    mesh: Mesh,
    rules: Mapping[str, tuple[str, ...]] | None = None,
    warn: bool = True,
) -> dict[str, NamedSharding]:
    """NamedSharding per flat parameter key from its logical axis names."""
    rules = DEFAULT_RULES if rules is None else rules
    fallbacks: list[str] = []
    out = {
        key: NamedSharding(mesh, logical_to_spec(logical[key], shape, mesh, rules, fallbacks, key))
        for key, shape in shapes.items()
    }
    if fallbacks and warn and jax.process_index() == 0:
        warnings.warn("some parameter axes are replicated instead of sharded:\n  " + "\n  ".join(fallbacks), stacklevel=2)
    return out


def batch_sharding(mesh: Mesh, leading_axes: int = 1, rank: int = 3) -> NamedSharding:
    """Sharding of a batch array [accum, batch, seq] (``leading_axes`` = 1 unsharded axis
    before the batch axis) with the batch split over data x fsdp."""
    spec = [None] * leading_axes + [BATCH_AXES] + [None] * (rank - leading_axes - 1)
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The batch must be a multiple of this (devices along data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
