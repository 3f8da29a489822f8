"""Subprocess driver of the training tests (not collected by pytest).

    python train_driver.py <scenario> <out_dir> [json args]

Every scenario runs in a fresh process, because the number of fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by the caller) is fixed when jax
starts. Results go to ``<out_dir>/result.json`` and ``.npz`` files of parameters.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np


def tiny_overrides(out: str, **extra) -> list[str]:
    """A smaller-than-tiny run (2 layers, width 64, rows of 32 bytes) on the wiki corpus."""
    values = {
        "model.width": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.head_dim": 16, "model.mlp_dim": 128, "data.seq_len": 32, "train.global_batch_size": 8,
        "train.steps": 6, "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 1,
        "optim.warmup_steps": 2, "checkpoint.every_steps": 2, "metrics.progress_bar": False,
        "metrics.tensorboard": False, "output_dir": out,
    }
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def config(out: str, **extra):
    from sea_jax.train.config import parse_config

    return parse_config(tiny_overrides(out, **extra), preset="tiny")


def losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def evals(history) -> list[float]:
    return [h["eval_loss"] for h in history if "eval_loss" in h]


def spec_lists(params) -> dict[str, list]:
    """PartitionSpec of every parameter as a JSON list (None, an axis name, or a list of names)."""
    return {k: [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec] for k, v in params.items()}


def host_params(state) -> dict[str, np.ndarray]:
    import jax

    return {k: np.asarray(jax.device_get(v)) for k, v in state["params"].items()}


def write(out: str, result: dict) -> None:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------


def scenario_meshes(out: str, args: dict) -> None:
    """The same run on 1 device and on meshes (8,1,1), (2,4,1), (1,4,2), (2,2,2); plus
    gradient accumulation (2 micro-batches) on (2,2,2). The (2,4,1) run keeps its checkpoint."""
    import jax

    from sea_jax.train.loop import train

    result = {}
    runs = [("1dev", (1, 1, 1), 1, 1), ("8_1_1", (8, 1, 1), 8, 1), ("2_4_1", (2, 4, 1), 8, 1),
            ("1_4_2", (1, 4, 2), 8, 1), ("2_2_2", (2, 2, 2), 8, 1), ("2_2_2_accum2", (2, 2, 2), 8, 2)]
    for name, (d, f, t), ndev, accum in runs:
        run_dir = os.path.join(out, name)
        cfg = config(run_dir, **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "train.grad_accum_steps": accum,
                                 "train.global_batch_size": 16 if accum > 1 else 8})
        res = train(cfg, devices=jax.devices()[:ndev])
        specs = spec_lists(res.state["params"])
        result[name] = {"losses": losses(res.history), "evals": evals(res.history), "specs": specs,
                        "mesh": dict(res.mesh.shape)}
        np.savez(os.path.join(out, f"{name}.npz"), **host_params(res.state))
    # reference for the accumulation run: 16 rows per step in one micro-batch
    cfg = config(os.path.join(out, "2_2_2_b16"), **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                    "train.global_batch_size": 16})
    res = train(cfg, devices=jax.devices()[:8])
    result["2_2_2_b16"] = {"losses": losses(res.history), "evals": evals(res.history)}
    np.savez(os.path.join(out, "2_2_2_b16.npz"), **host_params(res.state))
    write(out, result)


def scenario_restore(out: str, args: dict) -> None:
    """Restore the (2,4,1) checkpoint of scenario_meshes on this process's devices (2), check
    every array, then resume training for two more steps."""
    import jax

    from sea_jax.train.checkpoint import Checkpointer, load_checkpoint
    from sea_jax.train.data import build_pipeline
    from sea_jax.train.loop import train
    from sea_jax.train.setup import build_setup
    from sea_jax.train.state import abstract_state

    src = args["source"]
    cfg = config(src, **{"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "checkpoint.resume": True})
    setup = build_setup(cfg)
    data = build_pipeline(cfg.data, global_batch_size=8, grad_accum_steps=1, eval_batches=0,
                          model_vocab_size=cfg.model.vocab_size)
    ckpt = Checkpointer(cfg.checkpoint_dir, keep=2)
    step = ckpt.latest_step()
    state = ckpt.restore(step, abstract_state(setup.parts, setup.opt, setup.shardings), data.train_iter)
    ckpt.close()
    saved = np.load(os.path.join(args["saved_npz"]))
    exact = all(np.array_equal(saved[k], np.asarray(jax.device_get(v))) for k, v in state["params"].items())
    specs = spec_lists(state["params"])
    num_devices = {k: len(v.sharding.device_set) for k, v in state["params"].items()}
    # the inference loader: latest step, first device
    model, lm_config = load_checkpoint(cfg.checkpoint_dir)
    import flax.nnx as nnx

    loaded = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    loader_exact = all(np.array_equal(saved[k], loaded[k]) for k in saved.files)
    # continue the run on 2 devices for two more steps
    cfg2 = config(src, **{"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "checkpoint.resume": True,
                          "train.steps": step + 2})
    res = train(cfg2)
    write(out, {"step": int(step), "exact": exact, "loader_exact": loader_exact, "specs": specs,
                "num_devices": num_devices, "resumed_losses": losses(res.history),
                "devices": jax.device_count()})


class _Killer:
    """SIGKILL this process at the ``at``-th training batch (kill_at_batch) or in the middle of
    saving step ``save_step`` (after the arrays were handed to the async writer, before the
    checkpoint is finalised)."""

    @staticmethod
    def install(args: dict) -> None:
        if "kill_at_batch" in args:
            import sea_jax.train.loop as loop

            original, count = loop._global_batch, [0]

            def counting(local, setup):
                count[0] += 1
                if count[0] == args["kill_at_batch"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(local, setup)

            loop._global_batch = counting
        if "kill_during_save" in args:
            from sea_jax.train.checkpoint import DataIteratorHandler

            original_save = DataIteratorHandler.save

            def save(self, directory, *a, **kw):
                result = original_save(self, directory, *a, **kw)
                if directory.parent.name.split(".")[0] == str(args["kill_during_save"]):
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            DataIteratorHandler.save = save


def scenario_run(out: str, args: dict) -> None:
    """Train (or resume) the tiny run in ``args['dir']``, optionally killed on the way."""
    from sea_jax.train.loop import train

    _Killer.install(args)
    cfg = config(args["dir"], **args.get("overrides", {}))
    res = train(cfg)
    np.savez(os.path.join(out, "params.npz"), **host_params(res.state))
    write(out, {"history": res.history, "losses": losses(res.history)})


def scenario_distributed(out: str, args: dict) -> None:
    """One of two processes on localhost (jax.distributed from JAX_* variables, gloo CPU
    collectives), each with 2 CPU devices: a (2, 2, 1) mesh over both hosts."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax.experimental import multihost_utils

    from sea_jax.train.loop import train

    cfg = config(args["dir"], **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1, "train.steps": 4,
                                 "train.eval_every": 4, "checkpoint.every_steps": 4})
    res = train(cfg)
    gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in res.state["params"].items()}
    np.savez(os.path.join(out, f"params_{jax.process_index()}.npz"), **gathered)
    write_name = f"result_{jax.process_index()}.json"
    with open(os.path.join(out, write_name), "w") as f:
        json.dump({"losses": losses(res.history), "evals": evals(res.history), "process_count": jax.process_count(),
                   "devices": jax.device_count(), "mesh": dict(res.mesh.shape)}, f)


SCENARIOS = {
    "meshes": scenario_meshes,
    "restore": scenario_restore,
    "run": scenario_run,
    "distributed": scenario_distributed,
}

if __name__ == "__main__":
    name, out_dir = sys.argv[1], sys.argv[2]
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    os.makedirs(out_dir, exist_ok=True)
    SCENARIOS[name](out_dir, arguments)
