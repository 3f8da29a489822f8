"""Orbax checkpoints of a training run, and loading them for inference.

A checkpoint directory holds one folder per saved step (``<dir>/<step>/``) with four items:

* ``model``:  {"params": {key: f32}, "rest": {key: array}} - all that inference needs;
* ``train``:  {"step", "opt_state", "rng"} - the rest of the train state;
* ``data``:   the grain iterator state of every process (``process_<i>-of-<n>.json``);
* ``config``: the run's :class:`~sea_jax.train.config.Config` as JSON.

Saving is asynchronous (arrays are copied to host memory, then written by a background thread
while training continues) and atomic: orbax writes into a temporary folder and renames it only
after every item is complete, and temporary folders left by a crash are deleted when the
manager is next opened. So a run killed at any moment, even mid-save, restores the last
complete step.

Restoring reads the arrays straight into the shardings of the *current* mesh, so a checkpoint
written on 8 devices restores onto 2 (or onto a TPU pod). The data iterator state is per host:
resuming with a different number of processes is refused (the data order would change).

For inference::

    model, lm_config = sea_jax.train.checkpoint.load_checkpoint("runs/tiny/checkpoints")
    export_params("runs/tiny/checkpoints", "tiny.npz")   # flat float32 arrays + tiny.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel
from sea_jax.train.config import Config, ConfigError, config_from_dict
from sea_jax.train.params import ModelParts

ITEMS = ("model", "train", "data", "config")


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's per-process iterator handler, with a clear error when the number of processes
    changed since the save."""

    def restore(self, directory: epath.Path, item=None, args=None):
        nproc = jax.process_count()
        expected = directory / f"process_{jax.process_index()}-of-{nproc}.json"
        if not expected.exists():
            saved = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise ConfigError(
                f"checkpoint: the data iterator state was saved by a different number of processes "
                f"({saved}); this run has {nproc}. Resume with the same process count."
            )
        item = item if item is not None else args.item
        state = json.loads(expected.read_text())
        # JSON turns tuples into lists, and grain's packing compares its saved "empty slice"
        # sentinel with the tuple (-1, -1): a list never matches, so a restored
        # ConcatThenSplit iterator would replay a stale remainder and silently shift the data
        # (grain 0.2.18). Tuples restore the exact position.
        item.set_state(_lists_to_tuples(state))
        start_prefetch = getattr(item, "start_prefetch", None)  # as grain's own restore does
        if start_prefetch is not None:
            start_prefetch()
        return item


def _lists_to_tuples(value):
    """JSON-decoded iterator state with every list turned back into a tuple (grain states hold
    no real lists)."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def _split_state(state: dict[str, Any]) -> tuple[dict, dict]:
    model = {"params": state["params"], "rest": state["rest"]}
    train = {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
    return model, train


def _detach_from_donation(state: dict[str, Any]) -> dict[str, Any]:
    """On CPU, a copy of ``state`` in fresh buffers; elsewhere ``state`` itself.

    An async save returns once the arrays are "on the host" and writes them from there in the
    background. On CPU that host copy is a zero-copy view of the device buffer, and the next
    train step donates (overwrites in place) exactly those buffers, so the checkpoint would
    silently hold a later step's values. A device-side copy costs one extra state of memory,
    cheap on CPU; accelerators make a real device-to-host copy before save() returns."""
    leaves = jax.tree.leaves(state)
    if leaves and all(d.platform == "cpu" for x in leaves for d in x.sharding.device_set):
        return jax.tree.map(lambda x: x.copy(), state)
    return state


class Checkpointer:
    """Saves and restores a run's train state, data iterator and config."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        directory = os.fspath(directory)
        # local paths become absolute (orbax needs it); URLs such as gs://bucket/run stay as given
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=ITEMS,
            item_handlers={
                "model": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(),
                "data": DataIteratorHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iter, config: Config) -> None:
        """Start saving ``state`` (asynchronously when enabled). ``data_iter`` must be the
        iterator whose next batch is the one step ``step`` trains on."""
        model, train = _split_state(_detach_from_donation(state))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model),
                train=ocp.args.StandardSave(train),
                data=DataSave(data_iter),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: dict[str, Any], data_iter) -> dict[str, Any]:
        """Restore ``step`` into the shardings of ``abstract_state`` and rewind ``data_iter``
        to the saved position. Returns the train state."""
        model_t, train_t = _split_state(abstract_state)
        items = self.manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(model_t),
                train=ocp.args.StandardRestore(train_t),
                data=DataRestore(data_iter),
            ),
        )
        model, train = items["model"], items["train"]
        return {
            "step": train["step"],
            "params": model["params"],
            "rest": model["rest"],
            "opt_state": train["opt_state"],
            "rng": train["rng"],
        }

    def saved_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# --------------------------------------------------------------------------------------
# inference: load the parameters of a checkpoint
# --------------------------------------------------------------------------------------


def _resolve_step_dir(path: str | os.PathLike, step: int | None) -> pathlib.Path:
    """``path`` is a checkpoint directory (then ``step`` or the latest complete step is used)
    or one step's folder."""
    path = pathlib.Path(path).absolute()
    if (path / "model").is_dir() and (path / "config").exists():
        if step is not None and path.name != str(step):
            raise ValueError(f"path {str(path)!r} is the folder of step {path.name}, but step={step} was requested")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "model").is_dir())
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {str(path)!r}")
    if step is None:
        return path / str(steps[-1])
    if step not in steps:
        raise ValueError(f"step={step} is not among the saved steps {steps} in {str(path)!r}")
    return path / str(step)


def read_config(path: str | os.PathLike, step: int | None = None) -> Config:
    """The training Config stored with a checkpoint."""
    step_dir = _resolve_step_dir(path, step)
    config_dir = step_dir / "config"
    files = [config_dir] if config_dir.is_file() else sorted(config_dir.glob("*"))
    for f in files:
        if f.is_file():
            try:
                return config_from_dict(json.loads(f.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    raise FileNotFoundError(f"no readable config in {str(config_dir)!r}")


def load_params(path: str | os.PathLike, step: int | None = None, sharding=None) -> tuple[dict, dict, LMConfig]:
    """(params, rest, lm_config): the flat parameter dicts of a checkpoint.

    sharding: a ``jax.sharding.Sharding`` for every array, or None for the first local device."""
    step_dir = _resolve_step_dir(path, step)
    lm_config = read_config(step_dir).model
    parts = ModelParts.build(lm_config)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "params": {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for k, s in parts.param_shapes.items()},
        "rest": {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for k, s in parts.rest_shapes.items()},
    }
    with ocp.StandardCheckpointer() as ckptr:
        model = ckptr.restore(step_dir / "model", target)
    return model["params"], model["rest"], lm_config


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[LanguageModel, LMConfig]:
    """Load a training checkpoint as an ``nnx`` LanguageModel for inference.

    path: a checkpoint directory (``<output_dir>/checkpoints``; the latest complete step is
    used unless ``step`` is given) or one step's folder. Returns (model, lm_config); the model's
    parameters are float32 on the first local device. Only the ``model`` item is read (no
    optimizer state)."""
    params, rest, lm_config = load_params(path, step)
    parts = ModelParts.build(lm_config)
    return parts.merge(params, rest), lm_config


def export_params(path: str | os.PathLike, out_file: str | os.PathLike, step: int | None = None) -> pathlib.Path:
    """Write a checkpoint's parameters to ``out_file`` (.npz of flat float32 arrays keyed like
    ``stages.0.blocks.attn.q_proj``; non-trained variables under ``rest/<key>``) and the
    LMConfig next to it as ``<out_file stem>.json``. Returns the .npz path."""
    params, rest, lm_config = load_params(path, step)
    out = pathlib.Path(out_file)
    if out.suffix != ".npz":
        out = out.with_suffix(".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in params.items()}
    arrays.update({f"rest/{k}": np.asarray(v) for k, v in rest.items()})
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(lm_config), indent=2, default=list))
    return out


def load_exported(npz_file: str | os.PathLike) -> tuple[LanguageModel, LMConfig]:
    """Inverse of :func:`export_params`: (model, lm_config) from the .npz and its .json."""
    npz_file = pathlib.Path(npz_file)
    values = json.loads(npz_file.with_suffix(".json").read_text())
    if values.get("layer_attention") is not None:
        values["layer_attention"] = tuple(values["layer_attention"])
    lm_config = LMConfig(**values)
    with np.load(npz_file) as data:
        params = {k: jax.numpy.asarray(data[k]) for k in data.files if not k.startswith("rest/")}
        rest = {k[len("rest/"):]: jax.numpy.asarray(data[k]) for k in data.files if k.startswith("rest/")}
    return ModelParts.build(lm_config).merge(params, rest), lm_config


__all__ = ["Checkpointer", "load_checkpoint", "load_params", "export_params", "load_exported", "read_config"]
