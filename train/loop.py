"""The training loop: config -> mesh -> model -> step -> loop.

Read top to bottom::

    cfg, pretrained = resolve_pretrained(cfg)              # init_from: architecture + weights
    setup       = build_setup(cfg)                         # mesh, parameter table, AdamW groups
    loss_fn, extra = make_objective(cfg, setup)            # lm, or distill (teacher in extra)
    train_step  = make_train_step(...)                     # jitted, sharded, donated
    data        = build_pipeline(cfg.data, ...)            # grain, per host
    state       = restore(latest) or init_state(seed / pretrained)
    for step in range(start, steps):
        state, m = train_step(state, next(batches), extra)
        log / evaluate / checkpoint

Determinism: the state, the data iterator position and the config are checkpointed together;
the model has no dropout and the state's ``rng`` never changes, so a resumed run computes the
same steps as an uninterrupted one.
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
from sea_jax.train.params import ModelParts, split_model
from sea_jax.train.setup import Setup, build_setup, make_objective, memory_line, resolve_pretrained
from sea_jax.train.state import abstract_state, init_state, state_from_params
from sea_jax.train.step import BATCH_KEYS, lm_loss, make_eval_step, make_train_step, model_flops_per_token


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state and every logged record."""

    state: dict[str, Any]
    history: list[dict[str, Any]]
    parts: ModelParts
    mesh: jax.sharding.Mesh


def _global_batch(local: dict[str, np.ndarray], setup: Setup) -> dict[str, jax.Array]:
    """Assemble this host's rows into global arrays [accum, global_micro, seq]."""
    shape = setup.batch_shape
    return {
        k: jax.make_array_from_process_local_data(setup.batch_sharding, local[k], shape) for k in BATCH_KEYS
    }


def _evaluate(eval_lm, eval_objective, state, batches, extra) -> dict[str, float]:
    """Validation: LM loss and perplexity always; with a custom objective also its loss and
    metrics (``eval_objective_loss``, ``eval_<metric>``)."""
    totals: dict[str, float] = {}
    for batch in batches:
        l, c, _ = eval_lm(state["params"], state["rest"], batch, None)
        totals["lm"] = totals.get("lm", 0.0) + float(l)
        totals["count"] = totals.get("count", 0.0) + float(c)
        if eval_objective is not None:
            l, c, m = eval_objective(state["params"], state["rest"], batch, extra)
            totals["objective"] = totals.get("objective", 0.0) + float(l)
            totals["objective_count"] = totals.get("objective_count", 0.0) + float(c)
            for k, v in m.items():
                totals[f"m/{k}"] = totals.get(f"m/{k}", 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    mean = totals.get("lm", 0.0) / count
    record = {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 80.0)), "eval_tokens": totals.get("count", 0.0)}
    if eval_objective is not None:
        ocount = max(totals["objective_count"], 1.0)
        record["eval_objective_loss"] = totals["objective"] / ocount
        record.update({f"eval_{k[2:]}": v / ocount for k, v in totals.items() if k.startswith("m/")})
    return record


def train(cfg: Config, *, max_steps_this_run: int | None = None, devices=None) -> TrainResult:
    """Run (or resume) training as configured. ``max_steps_this_run`` stops early after that
    many steps of this invocation, without a final checkpoint (tests use it to simulate an
    interruption); ``devices`` restricts the mesh to those devices (default: all)."""
    mesh_lib.maybe_initialize_distributed(cfg.mesh.distributed)
    cfg, pretrained = resolve_pretrained(cfg)
    setup = build_setup(cfg, devices)
    mesh, parts, opt, shardings = setup.mesh, setup.parts, setup.opt, setup.shardings
    is_main = jax.process_index() == 0

    data: DataPipeline = build_pipeline(
        cfg.data,
        global_batch_size=cfg.train.global_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        eval_batches=cfg.train.eval_batches if cfg.train.eval_every else 0,
        model_vocab_size=cfg.model.vocab_size,
    )
    loss_fn, extra = make_objective(cfg, setup)

    ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"checkpoint.directory: {ckpt.directory} already holds steps {ckpt.all_steps()}; pass --resume to "
            "continue that run, or choose another output_dir"
        )
    if latest is not None:
        state = ckpt.restore(latest, abstract_state(parts, opt, shardings), data.train_iter)
    elif pretrained is not None:
        state = state_from_params(*split_model(pretrained), opt, shardings, cfg.train.seed)
    else:
        state = init_state(parts, opt, shardings, cfg.train.seed)
    del pretrained
    start = int(state["step"])

    with jax.set_mesh(mesh):
        train_step = make_train_step(parts, opt, mesh, shardings, setup.batch_sharding, loss_fn=loss_fn, extra=extra)
        compiled = train_step.lower(abstract_state(parts, opt, shardings), setup.abstract_batch(), extra).compile()
        eval_lm = eval_objective = None
        if data.validation:
            eval_lm = make_eval_step(
                parts, mesh, shardings, setup.batch_sharding, loss_fn=lm_loss(parts, mesh, cfg.data.document_mask)
            )
            if cfg.objective != "lm":
                eval_objective = make_eval_step(parts, mesh, shardings, setup.batch_sharding, loss_fn=loss_fn, extra=extra)
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
            f"objective {cfg.objective}, mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} "
            f"device(s), {tokens_per_step} tokens/step, "
            f"{'resuming at step ' + str(start) if start else 'fresh start'}"
        )
        writer.message(f"compiled train step, {memory_line(compiled)}")

    history: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []
    end = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start + max_steps_this_run)
    every_ckpt = cfg.checkpoint.every_steps
    try:
        for step in range(start, end):
            batch = _global_batch(next(data.train_iter), setup)
            state, metrics = compiled(state, batch, extra)
            pending.append(metrics)
            throughput.add(tokens_per_step)
            done = step + 1

            if done % cfg.train.log_every == 0 or done == end:
                fetched = jax.device_get(pending)  # blocks: the interval's work is finished
                record = {
                    "loss": float(np.mean([m["loss"] for m in fetched])),
                    "grad_norm": float(fetched[-1]["grad_norm"]),
                    **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k not in ("loss", "grad_norm", "tokens")},
                    **{f"lr/{name}": lr for name, lr in opt.learning_rates(step).items()},
                    **throughput.measure(),
                }
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"step {done}: the loss is {record['loss']} (lower optim.lr?)")
                pending.clear()
                history.append({"step": done, **record})
                writer.write(done, record)
                shown = {"loss": record["loss"], "tok/s": record["tokens_per_s"]}
                if "mfu" in record:
                    shown["mfu"] = record["mfu"]
                writer.progress(done, shown)

            if eval_lm is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                record = _evaluate(eval_lm, eval_objective, state, validation, extra)
                history.append({"step": done, **record})
                writer.write(done, record)
                writer.message(
                    f"step {done}: validation loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.3f}"
                )
                throughput.reset()

            if (every_ckpt and done % every_ckpt == 0) or done == cfg.train.steps:
                # the iterator now points at the batch of step done + 1: exactly what a resume needs
                ckpt.save(done, state, data.train_iter, cfg)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return TrainResult(state, history, parts, mesh)


def print_config(cfg: Config) -> None:
    if jax.process_index() == 0:
        print(describe(cfg), flush=True)
