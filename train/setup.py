"""What a run is built from before its first step: mesh, model table, optimizer, shardings.

Shared by the training loop (train/loop.py) and ahead-of-time compilation (train/aot.py); it
imports neither the data pipeline nor checkpoints, so compile-only mode needs only jax, flax,
optax and draccus.

With ``init_from`` the architecture comes from the pretrained checkpoint
(:func:`resolve_pretrained`); the attention choices and execution settings stay those of
``cfg.model``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sea_jax.train import mesh as mesh_lib
from sea_jax.train.config import Config, ConfigError
from sea_jax.train.optim import Optimizer, make_optimizer
from sea_jax.train.params import ModelParts
from sea_jax.train.state import state_shardings
from sea_jax.train.step import BATCH_KEYS

# LMConfig fields that init_from takes from cfg.model (everything else comes from the checkpoint)
_EXECUTION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


@dataclasses.dataclass
class Setup:
    """Mesh, model table, optimizer and shardings of a run.

    batch_shape: (grad_accum_steps, global micro-batch, seq_len) of every batch array."""

    cfg: Config
    mesh: jax.sharding.Mesh
    parts: ModelParts
    opt: Optimizer
    shardings: dict[str, Any]
    batch_sharding: jax.sharding.NamedSharding

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        c = self.cfg
        return (c.train.grad_accum_steps, c.micro_batch_size, c.data.seq_len)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding) for k in BATCH_KEYS}


def resolve_pretrained(cfg: Config):
    """(cfg with model = the pretrained architecture, pretrained model or None).

    With ``cfg.init_from`` unset this returns ``(cfg, None)``. Otherwise the weights are loaded
    by ``sea_jax.pretrained.load_pretrained`` with cfg.model's attention choices and execution
    settings, and cfg.model is replaced by the loaded LMConfig (so checkpoints record the real
    architecture)."""
    if cfg.init_from is None:
        return cfg, None
    from sea_jax.pretrained import load_pretrained

    m = cfg.model
    if cfg.init_from == "smollm2" and cfg.data.source != "synthetic" and cfg.data.tokenizer != "smollm2":
        raise ConfigError(
            f"data.tokenizer: init_from='smollm2' needs data.tokenizer='smollm2' (got {cfg.data.tokenizer!r})"
        )
    try:
        loaded = load_pretrained(
            cfg.init_from,
            attention=m.attention,
            layer_attention=m.layer_attention,
            attention_options=m.attention_options,
            seed=cfg.train.seed,
            **{name: getattr(m, name) for name in _EXECUTION_FIELDS},
        )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init_from: {e}") from e
    return dataclasses.replace(cfg, model=loaded.config), loaded.model


def build_setup(cfg: Config, devices: Sequence[Any] | None = None) -> Setup:
    """Mesh, model table, optimizer and shardings for ``cfg`` on ``devices`` (default: all;
    for ahead-of-time compilation the devices of a TPU topology). ``cfg.model`` must already
    be the final architecture (see :func:`resolve_pretrained`)."""
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = mesh_lib.merged_rules(cfg.mesh.rules)
    parts = ModelParts.build(cfg.model)
    opt = make_optimizer(cfg.optim, parts.param_shapes, cfg.train.steps)
    divisor = mesh_lib.batch_divisor(mesh)
    if cfg.micro_batch_size % divisor:
        raise ConfigError(
            f"train.global_batch_size: the micro-batch of {cfg.micro_batch_size} sequences "
            f"(global_batch_size / grad_accum_steps) must be a multiple of the data x fsdp devices ({divisor})"
        )
    shardings = state_shardings(parts, opt, mesh, rules)
    return Setup(cfg, mesh, parts, opt, shardings, mesh_lib.batch_sharding(mesh))


def make_objective(cfg: Config, setup: Setup):
    """(loss_fn, extra) for ``cfg.objective``: (lm_loss, None) for "lm"; for "distill" whatever ``sea_jax.train.distill.make_distill_loss(cfg,
    parts, mesh)`` returns (imported only here, so the lm objective works without it)."""
    if cfg.objective == "lm":
        from sea_jax.train.step import lm_loss

        return lm_loss(setup.parts, setup.mesh, cfg.data.document_mask), None
    try:
        from sea_jax.train.distill import make_distill_loss
    except ModuleNotFoundError as e:
        if e.name != "sea_jax.train.distill":
            raise
        raise ConfigError("objective: 'distill' needs sea_jax.train.distill, which is not installed") from e
    return make_distill_loss(cfg, setup.parts, setup.mesh)


def memory_line(compiled) -> str:
    """Per-device memory of a compiled step (arguments + outputs - aliased + temporaries)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        m = None
    if m is None:
        return "memory analysis unavailable"
    gib = 1024**3
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return (
        f"per device: {total / gib:.3f} GiB (arguments {m.argument_size_in_bytes / gib:.3f}, "
        f"outputs {m.output_size_in_bytes / gib:.3f}, aliased {m.alias_size_in_bytes / gib:.3f}, "
        f"temporaries {m.temp_size_in_bytes / gib:.3f})"
    )
