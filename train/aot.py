"""Ahead-of-time mode: compile the full train step for a TPU pod on this (CPU) machine.

    sea-train --preset pod_v5p --compile-only --topology v5p:4x4x4

libtpu (``pip install "jax[tpu]"``) describes the topology's devices without any TPU
attached (``jax.experimental.topologies.get_topology_desc``); the mesh, the parameter and
optimizer shardings, the batch sharding and the jitted step are built exactly as for training,
lowered against abstract inputs (no memory is allocated) and compiled by the TPU compiler.
The per-device memory of the compiled step tells whether the run fits before renting the pod.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from sea_jax.train.config import Config, ConfigError
from sea_jax.train.setup import build_setup, make_objective, memory_line, resolve_pretrained
from sea_jax.train.state import abstract_state, describe_shardings
from sea_jax.train.step import make_train_step, model_flops_per_token


@dataclasses.dataclass
class CompileReport:
    """What compile-only mode found: the topology, mesh, memory and FLOP counts."""

    topology: str
    num_devices: int
    mesh_shape: dict[str, int]
    param_count: int
    memory: str
    bytes_per_device: int | None
    flops_per_token: float
    fallbacks: list[str]


def topology_devices(topology: str, platform: str = "tpu") -> list:
    """The devices of a TPU ``topology`` such as "v5p:4x4x4" or "v5e:2x2" (needs libtpu)."""
    if ":" not in topology:
        raise ConfigError(f"topology: expected '<chip>:<shape>' such as 'v5p:4x4x4', got {topology!r}")
    # libtpu probes the host's metadata server unless it is told the accelerator type
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
    # no TPU is opened, so several compile-only processes may share libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's host probe
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform=platform, topology_name=topology)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        raise ConfigError(
            f"topology: cannot describe {topology!r} ({type(e).__name__}: {e}); compile-only needs libtpu "
            "(pip install 'jax[tpu]') and a topology such as v5e:2x2, v5p:4x4x4 or v4:2x2x2"
        ) from e
    return list(desc.devices)


def _accelerator_type(topology: str) -> str:
    chip, shape = topology.split(":", 1)
    chips = 1
    for size in shape.split("x"):
        chips *= int(size) if size.isdigit() else 1
    # TPU_ACCELERATOR_TYPE counts TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e
    cores = chips * (2 if chip in ("v4", "v5p", "v5") else 1)
    name = {"v5e": "v5litepod", "v6e": "v6e"}.get(chip, chip)
    return f"{name}-{cores}"


def compile_for_topology(cfg: Config, *, verbose: bool = True) -> CompileReport:
    """Compile the train step of ``cfg`` for ``cfg.topology``; print and return the report."""
    if not cfg.topology:
        raise ConfigError("topology: compile-only needs a TPU topology such as 'v5p:4x4x4'")
    if cfg.objective != "lm":
        raise ConfigError(
            "objective: compile-only supports objective 'lm' (the distillation teacher needs real weights)"
        )
    devices = topology_devices(cfg.topology)
    cfg, _ = resolve_pretrained(cfg)  # only its architecture is used
    fallbacks: list[str] = []
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup = build_setup(cfg, devices)
    fallbacks = [str(w.message) for w in caught]
    with jax.set_mesh(setup.mesh):
        loss_fn, _ = make_objective(cfg, setup)
        step = make_train_step(setup.parts, setup.opt, setup.mesh, setup.shardings, setup.batch_sharding, loss_fn=loss_fn)
        lowered = step.lower(abstract_state(setup.parts, setup.opt, setup.shardings), setup.abstract_batch(), None)
        compiled = lowered.compile()
    memory = memory_line(compiled)
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    except Exception:
        total = None
    report = CompileReport(
        topology=cfg.topology,
        num_devices=len(devices),
        mesh_shape=dict(setup.mesh.shape),
        param_count=setup.parts.param_count(),
        memory=memory,
        bytes_per_device=total,
        flops_per_token=model_flops_per_token(setup.parts, cfg.data.seq_len),
        fallbacks=fallbacks,
    )
    if verbose:
        print(
            f"compiled the train step for {cfg.topology} ({len(devices)} {devices[0].device_kind} devices), "
            f"mesh {report.mesh_shape}, {report.param_count / 1e6:.1f}M parameters, "
            f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens per step",
            flush=True,
        )
        print(f"memory {memory}", flush=True)
        for note in fallbacks:
            print(f"note: {note}", flush=True)
        for line in describe_shardings(setup.shardings)[:12]:
            print(f"  {line}", flush=True)
    return report


__all__ = ["CompileReport", "compile_for_topology", "topology_devices"]
