"""The training configuration: typed dataclasses, YAML presets and dotted command-line overrides.

One :class:`Config` holds every setting of a run, grouped in sections::

    model       sea_jax.model.config.LMConfig (the network)
    data        corpus, tokenizer, sequence length, shuffling seed
    optim       AdamW, learning-rate schedule, clipping, parameter groups
    train       steps, batch size, gradient accumulation, evaluation and logging cadence
    mesh        device mesh axes (data, fsdp, tensor) and multi-host start
    checkpoint  orbax checkpoints: cadence, retention, async, resume
    metrics     progress bar, JSON lines, TensorBoard, MFU peak
    distill     teacher and loss weights when ``objective: distill``

Parsing is done by `draccus <https://github.com/dlwh/draccus>`_: a YAML preset
(``configs/*.yaml``, installed as the package data ``sea_jax.configs``) is read first, then dotted flags override it, e.g.
``--optim.lr 1e-3 --model.attention sparsek --mesh.fsdp 4``. Unknown keys and values that do not
parse are errors naming the key (``model.widht``, ``train.steps``); each section validates its
values in ``__post_init__`` and names the offending key as ``section.field``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
import pathlib
import tempfile
from typing import Any, Iterator, Sequence

import draccus

from sea_jax.distill import DistillWeights
from sea_jax.model.config import LMConfig

# presets are package data (pyproject maps configs/ to sea_jax.configs), so they are found the
# same way in a source checkout, an editable install and a wheel; a preset can also be given as
# a path to any YAML file
PRESET_PACKAGE = "sea_jax.configs"

DATA_SOURCES = ("wiki", "text", "jsonl", "synthetic")
SCHEDULES = ("cosine", "constant")
DISTRIBUTED_MODES = ("auto", "on", "off")
OBJECTIVES = ("lm", "distill")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


def _positive(section: str, obj, *names: str, allow_zero: bool = False):
    for name in names:
        value = getattr(obj, name)
        ok = value >= 0 if allow_zero else value > 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            _fail(f"{section}.{name}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length token rows.

    source: "wiki" (the offline Wikipedia corpus with its fixed train/validation split),
        "text" (plain-text files, each file one document), "jsonl" (one JSON object per line,
        text under ``jsonl_key``; without validation_files every 20th line is validation), or "synthetic" (random tokens from ``seed``; for
        throughput runs that need no files).
    train_files / validation_files: paths for "text" and "jsonl" sources.
    tokenizer: a name accepted by ``sea_jax.data.tokenizers.load_tokenizer`` ("byte", "gpt2",
        "smollm2").
    seq_len: tokens per training row (packed; documents are separated by segment ids).
    seed: shuffling seed of the document order (reshuffled every epoch from it).
    document_mask: attention stays inside each packed document (segment ids go to the model).
        False lets a row attend across document boundaries (GPT-2-style packing); on GPU this
        lets dense attention use cuDNN, which takes no segment ids.
    """

    source: str = "wiki"
    train_files: list[str] = dataclasses.field(default_factory=list)
    validation_files: list[str] = dataclasses.field(default_factory=list)
    jsonl_key: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 256
    seed: int = 0
    document_mask: bool = True

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            _fail("data.source", f"must be one of {DATA_SOURCES}, got {self.source!r}")
        _positive("data", self, "seq_len")
        if self.source in ("text", "jsonl") and not self.train_files:
            _fail("data.train_files", f"source={self.source!r} needs at least one training file")


@dataclasses.dataclass
class ParamGroupConfig:
    """Parameters whose path matches ``pattern`` (a regular expression searched in the
    parameter's dotted path, e.g. ``stages.0.blocks.attn.core.scorer``) form a group with its own
    learning rate (``lr``; None = optim.lr) and weight decay, or are ``frozen``. The first
    matching group wins; unmatched parameters use optim.lr. A group that matches no parameter is
    an error (it is almost always a typo)."""

    name: str = "group"
    pattern: str = ""
    lr: float | None = None
    weight_decay: float | None = None
    frozen: bool = False

    def __post_init__(self):
        if not self.pattern:
            _fail(f"optim.groups[{self.name}].pattern", "must be a non-empty regular expression")
        if self.lr is not None and not self.lr > 0:
            _fail(f"optim.groups[{self.name}].lr", f"must be > 0, got {self.lr!r}")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (to ``min_lr_ratio * lr``) or a constant LR.

    clip_norm: global gradient-norm clipping threshold (0 = off). Weight decay applies to
    parameters with at least two axes (not to norm scales)."""

    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    groups: list[ParamGroupConfig] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        _positive("optim", self, "lr", "eps")
        _positive("optim", self, "warmup_steps", "weight_decay", "clip_norm", allow_zero=True)
        if self.schedule not in SCHEDULES:
            _fail("optim.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)!r}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names) or "default" in names:
            _fail("optim.groups", f"group names must be unique and not 'default', got {names}")


@dataclasses.dataclass
class TrainConfig:
    """steps: optimizer steps. global_batch_size: sequences per optimizer step over all devices
    and hosts, split into ``grad_accum_steps`` micro-batches. eval_every / checkpoint cadence in
    optimizer steps (0 = never; evaluation also runs at the end when eval_every > 0)."""

    steps: int = 300
    global_batch_size: int = 16
    grad_accum_steps: int = 1
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10

    def __post_init__(self):
        _positive("train", self, "steps", "global_batch_size", "grad_accum_steps", "eval_batches", "log_every")
        _positive("train", self, "eval_every", allow_zero=True)
        if self.global_batch_size % self.grad_accum_steps:
            _fail(
                "train.global_batch_size",
                f"({self.global_batch_size}) must be a multiple of train.grad_accum_steps ({self.grad_accum_steps})",
            )


@dataclasses.dataclass
class MeshConfig:
    """Device mesh (data, fsdp, tensor). Exactly one axis may be -1: it takes whatever devices the
    others leave. ``rules`` overrides the logical-axis -> mesh-axes table of train/mesh.py, e.g.
    ``{embed: [], mlp: [tensor, fsdp]}``. distributed: "auto" calls jax.distributed.initialize
    when the environment names a coordinator or a multi-host TPU/SLURM job; "on" always; "off"
    never."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    distributed: str = "auto"

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                _fail(f"mesh.{name}", f"must be a positive int or -1 (fill), got {size!r}")
        if sum(size == -1 for size in sizes.values()) > 1:
            _fail("mesh", f"at most one axis may be -1, got {sizes}")
        if self.distributed not in DISTRIBUTED_MODES:
            _fail("mesh.distributed", f"must be one of {DISTRIBUTED_MODES}, got {self.distributed!r}")

    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass
class CheckpointConfig:
    """every_steps: save cadence (0 = only at the end); keep: how many recent checkpoints stay;
    directory: default ``<output_dir>/checkpoints``; resume: continue from the latest checkpoint
    in ``directory`` (a fresh start when there is none)."""

    directory: str | None = None
    every_steps: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = False

    def __post_init__(self):
        _positive("checkpoint", self, "keep")
        _positive("checkpoint", self, "every_steps", allow_zero=True)


@dataclasses.dataclass
class MetricsConfig:
    """progress_bar: tqdm bar on process 0. jsonl / tensorboard: write ``metrics.jsonl`` and
    ``tensorboard/`` under output_dir. peak_flops_per_device: FLOP/s for the MFU estimate
    (0 = look it up from the device kind; MFU is omitted when unknown, e.g. on CPU)."""

    progress_bar: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    peak_flops_per_device: float = 0.0

    def __post_init__(self):
        _positive("metrics", self, "peak_flops_per_device", allow_zero=True)


@dataclasses.dataclass
class DistillConfig:
    """Distillation from a pretrained teacher (used when ``objective: distill``; the loss is
    built by sea_jax.train.distill.make_distill_loss).

    teacher: a source for ``sea_jax.pretrained.load_pretrained`` ("smollm2", a .gguf path or a
        safetensors directory); the teacher runs with dense attention.
    weights: the loss weights (sea_jax.distill.DistillWeights; the paper's recipe by default).
    """

    teacher: str = "smollm2"
    weights: DistillWeights = dataclasses.field(default_factory=DistillWeights)

    def __post_init__(self):
        if not self.teacher:
            _fail("distill.teacher", "must name a pretrained source such as 'smollm2'")


def _tiny_model() -> LMConfig:
    # 259 byte-level tokens padded to 264 so the vocabulary splits over up to 8 devices
    return LMConfig(vocab_size=264, width=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)


@dataclasses.dataclass
class Config:
    """A whole training run. The defaults are the tiny CPU preset (configs/tiny.yaml).

    objective: "lm" (next-token cross-entropy) or "distill" (match ``distill.teacher``; the loss
        comes from sea_jax.train.distill).
    init_from: start from pretrained weights instead of a random init: a source for
        ``sea_jax.pretrained.load_pretrained`` ("smollm2", a .gguf file, a safetensors
        directory). The architecture then comes from the checkpoint; of ``model`` only the
        attention choices (attention, layer_attention, attention_options) and the execution
        settings (dtype, param_dtype, scan_layers, remat) apply. None = random init from ``model``.
    output_dir: where checkpoints, metrics.jsonl and tensorboard/ go.
    compile_only / topology: compile the train step ahead of time for a TPU topology
    (e.g. "v5p:4x4x4") through libtpu on this machine, print per-device memory, and exit.
    """

    model: LMConfig = dataclasses.field(default_factory=_tiny_model)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    objective: str = "lm"
    init_from: str | None = None
    output_dir: str = "runs/tiny"
    compile_only: bool = False
    topology: str | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            _fail("objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.init_from == "":
            _fail("init_from", "must be null or a pretrained source such as 'smollm2'")
        if self.compile_only and not self.topology:
            _fail("topology", "compile_only needs a TPU topology such as 'v5p:4x4x4'")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.directory or os.path.join(self.output_dir, "checkpoints")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch over all devices."""
        return self.train.global_batch_size // self.train.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the form stored next to checkpoints)."""
        return draccus.encode(self)


def preset_names() -> list[str]:
    """Names of the presets shipped in sea_jax.configs (``tiny``, ``gpu_135m_4k``, ...)."""
    root = importlib.resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


@contextlib.contextmanager
def resolve_preset(name_or_path: str) -> Iterator[pathlib.Path]:
    """Context manager giving a real file path for a preset name (``tiny`` -> the packaged
    sea_jax/configs/tiny.yaml) or a path to a YAML file."""
    path = pathlib.Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path or path.exists():
        if not path.is_file():
            raise ConfigError(f"config: file {str(path)!r} does not exist")
        yield path
        return
    resource = importlib.resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(
            f"config: no preset named {name_or_path!r}; available: {preset_names()} (or give a .yaml path)"
        )
    with importlib.resources.as_file(resource) as real_path:  # a temporary copy if zipped
        yield real_path


_SECTION_OF_CLASS = {
    "LMConfig": "model", "DataConfig": "data", "OptimConfig": "optim", "TrainConfig": "train",
    "MeshConfig": "mesh", "CheckpointConfig": "checkpoint", "MetricsConfig": "metrics",
    "ParamGroupConfig": "optim.groups", "DistillConfig": "distill", "DistillWeights": "distill.weights",
    "Config": "config",
}


def _explain(error: BaseException) -> str:
    """Turn a draccus error (whose cause may be our ConfigError or LMConfig's ValueError) into
    one line naming the key."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        if isinstance(nxt, ConfigError):
            return str(nxt)
        cause = nxt
    message = str(error)
    if isinstance(cause, ValueError) and cause is not error:
        for cls_name, section in _SECTION_OF_CLASS.items():
            if f"class {cls_name} " in message:
                return f"{section}: {cause}"
        return f"{message}: {cause}"
    return message


def parse_config(args: Sequence[str] = (), preset: str | None = None) -> Config:
    """Build a :class:`Config` from an optional preset (name or YAML path) and dotted overrides
    (``["--optim.lr", "1e-3"]`` or ``["--optim.lr=1e-3"]``). Raises :class:`ConfigError` naming
    the key on unknown keys or bad values."""
    if preset:
        with resolve_preset(preset) as path:
            return _parse(path, args)
    # draccus builds an overridden section from its class defaults, not from Config's
    # default_factory (``--model.width 64`` would reset model.vocab_size to LMConfig's 256); so
    # the defaults go in as a preset file too
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "defaults.yaml"
        path.write_text(draccus.dump(Config()))
        return _parse(path, args)


def _parse(config_path: pathlib.Path, args: Sequence[str]) -> Config:
    try:
        return draccus.parse(Config, config_path=config_path, args=list(args), exit_on_error=False)
    except ConfigError:
        raise
    except Exception as e:  # draccus wraps errors raised while building the dataclasses
        message = str(e)
        if message.startswith("unrecognized arguments:"):
            keys = [a[2:].split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            raise ConfigError(
                f"unknown config key(s) {keys or message}: not a field of any section (sea-train --help lists them)"
            ) from e
        if message.startswith("Failed to load config from"):
            cause = e.__cause__ or e.__context__
            raise ConfigError(f"config: cannot read {str(config_path)!r} as YAML: {cause or message}") from e
        raise ConfigError(_explain(e)) from e


def config_from_dict(values: dict[str, Any]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used when reading a checkpoint's config)."""
    try:
        return draccus.decode(Config, values)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_explain(e)) from e


def total_tokens_per_step(cfg: Config) -> int:
    return cfg.train.global_batch_size * cfg.data.seq_len


def describe(cfg: Config) -> str:
    """The config as YAML (printed at the start of a run and saved next to checkpoints)."""
    return draccus.dump(cfg)


__all__ = [
    "Config", "ConfigError", "DataConfig", "DistillConfig", "preset_names", "OptimConfig", "ParamGroupConfig", "TrainConfig",
    "MeshConfig", "CheckpointConfig", "MetricsConfig", "parse_config", "config_from_dict",
    "resolve_preset", "describe", "total_tokens_per_step",
]
