"""The training loop: config -> mesh -> model -> step -> loop.

Read top to bottom::

    mesh        = make_mesh(cfg.mesh)                      # devices as (data, fsdp, tensor)
    parts       = ModelParts.build(cfg.model)              # graphdef + parameter table
    opt         = make_optimizer(cfg.optim, ...)           # AdamW per group
    train_step  = make_train_step(...)                     # jitted, sharded, donated
    data        = build_pipeline(cfg.data, ...)            # grain, per host
    state       = restore(latest) or init_state(seed)
    for step in range(start, steps):
        state, m = train_step(state, next(batches))
        log / evaluate / checkpoint
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.train import mesh as mesh_lib
from sea_jax.train.checkpoint import Checkpointer
from sea_jax.train.config import Config, ConfigError, describe
from sea_jax.train.data import DataPipeline, build_pipeline
from sea_jax.train.metrics import MetricsWriter, Throughput, peak_flops_per_device
from sea_jax.train.optim import Optimizer, make_optimizer
from sea_jax.train.params import ModelParts
from sea_jax.train.state import abstract_state, init_state, state_shardings
from sea_jax.train.step import BATCH_KEYS, make_eval_step, make_train_step, model_flops_per_token


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state and every logged record."""

    state: dict[str, Any]
    history: list[dict[str, Any]]
    parts: ModelParts
    mesh: jax.sharding.Mesh


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step (shared with compile-only mode)."""

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


def build_setup(cfg: Config, devices=None) -> Setup:
    """Mesh, model table, optimizer and shardings for ``cfg`` on ``devices`` (default: all)."""
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


def _global_batch(local: dict[str, np.ndarray], setup: Setup) -> dict[str, jax.Array]:
    """Assemble this host's rows into global arrays [accum, global_micro, seq]."""
    shape = setup.batch_shape
    return {
        k: jax.make_array_from_process_local_data(setup.batch_sharding, local[k], shape) for k in BATCH_KEYS
    }


def _evaluate(eval_step, state, batches) -> dict[str, float]:
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        l, c = eval_step(state["params"], state["rest"], batch)
        loss_sum += float(l)
        count += float(c)
    mean = loss_sum / max(count, 1.0)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 80.0)), "eval_tokens": count}


def _memory_line(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return "memory analysis unavailable"
    if m is None:
        return "memory analysis unavailable"
    gib = 1024**3
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return (
        f"per device: {total / gib:.3f} GiB (arguments {m.argument_size_in_bytes / gib:.3f}, "
        f"outputs {m.output_size_in_bytes / gib:.3f}, aliased {m.alias_size_in_bytes / gib:.3f}, "
        f"temporaries {m.temp_size_in_bytes / gib:.3f})"
    )


def train(cfg: Config, *, max_steps_this_run: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. ``max_steps_this_run`` stops early after that
    many steps of this invocation (tests use it to simulate interruptions)."""
    mesh_lib.maybe_initialize_distributed(cfg.mesh.distributed)
    setup = build_setup(cfg)
    mesh, parts, opt, shardings = setup.mesh, setup.parts, setup.opt, setup.shardings
    is_main = jax.process_index() == 0

    data: DataPipeline = build_pipeline(
        cfg.data,
        global_batch_size=cfg.train.global_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        eval_batches=cfg.train.eval_batches if cfg.train.eval_every else 0,
        model_vocab_size=cfg.model.vocab_size,
    )

    ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"checkpoint.directory: {ckpt.directory} already holds steps {ckpt.all_steps()}; pass --resume to "
            "continue that run, or choose another output_dir"
        )
    if latest is not None:
        state = ckpt.restore(latest, abstract_state(parts, opt, shardings), data.train_iter)
    else:
        state = init_state(parts, opt, shardings, cfg.train.seed)
    start = int(state["step"])

    train_step = make_train_step(parts, opt, mesh, shardings, setup.batch_sharding)
    compiled = train_step.lower(abstract_state(parts, opt, shardings), setup.abstract_batch()).compile()
    eval_step = make_eval_step(parts, mesh, shardings, setup.batch_sharding) if data.validation else None
    validation = [_global_batch(b, setup) for b in data.validation]

    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    peak = cfg.metrics.peak_flops_per_device or peak_flops_per_device()
    throughput = Throughput(model_flops_per_token(parts, cfg.data.seq_len), mesh.size, peak)
    writer = MetricsWriter(
        cfg.output_dir, total_steps=cfg.train.steps, start_step=start, progress_bar=cfg.metrics.progress_bar,
        jsonl=cfg.metrics.jsonl, tensorboard=cfg.metrics.tensorboard,
    )
    if is_main:
        writer.message(
            f"sea-train: {parts.param_count() / 1e6:.2f}M parameters, attention {cfg.model.layer_names()}, "
            f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s), "
            f"{tokens_per_step} tokens/step, {'resuming at step ' + str(start) if start else 'fresh start'}"
        )
        writer.message(f"compiled train step, {_memory_line(compiled)}")

    history: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []
    end = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start + max_steps_this_run)
    every_ckpt = cfg.checkpoint.every_steps
    for step in range(start, end):
        batch = _global_batch(next(data.train_iter), setup)
        state, metrics = compiled(state, batch)
        pending.append(metrics)
        throughput.add(tokens_per_step)
        done = step + 1

        if done % cfg.train.log_every == 0 or done == end:
            losses = [float(m["loss"]) for m in pending]  # blocks: the interval's work is finished
            record = {
                "loss": float(np.mean(losses)),
                "grad_norm": float(pending[-1]["grad_norm"]),
                **{f"lr/{name}": lr for name, lr in opt.learning_rates(step).items()},
                **throughput.measure(),
            }
            pending.clear()
            history.append({"step": done, **record})
            writer.write(done, record)
            shown = {"loss": record["loss"], "tok/s": record["tokens_per_s"]}
            if "mfu" in record:
                shown["mfu"] = record["mfu"]
            writer.progress(done, shown)

        if eval_step is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
            record = _evaluate(eval_step, state, validation)
            history.append({"step": done, **record})
            writer.write(done, record)
            writer.message(f"step {done}: validation loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.3f}")
            throughput.reset()

        if (every_ckpt and done % every_ckpt == 0) or done == cfg.train.steps:
            ckpt.save(done, state, data.train_iter, cfg)

    ckpt.wait()
    ckpt.close()
    writer.close()
    return TrainResult(state, history, parts, mesh)


def print_config(cfg: Config) -> None:
    if jax.process_index() == 0:
        print(describe(cfg), flush=True)
