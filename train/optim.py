"""The optimizer: AdamW per parameter group, warmup + cosine/constant schedules, clipping, frozen groups.

Parameters are a flat dict (train/params.py). Each key gets a group label: the first
``optim.groups`` entry whose regex ``pattern`` is found in the key, else ``"default"``. Every
group has its own learning-rate schedule (same shape, its own peak LR) and weight decay; frozen
groups get no update and no Adam moments (``optax.set_to_zero`` under ``multi_transform``).

The update is ``clip_by_global_norm`` (over the trainable gradients) followed by the per-group
AdamW. Gradient accumulation happens in the train step (train/step.py), not here, so that the
accumulated gradient is exactly the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from sea_jax.train.config import ConfigError, OptimConfig

DEFAULT_GROUP = "default"
FROZEN = "frozen"


def make_schedule(peak_lr: float, cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * peak_lr`` at ``total_steps`` (or constant)."""
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak_lr)
    else:
        decay = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return decay
    # step 0 already trains with lr = peak / warmup (a zero first step would waste a batch)
    ramp = lambda step: peak_lr * (step + 1) / warmup  # noqa: E731
    return optax.join_schedules([ramp, decay], [warmup])


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transformation plus what the loop reports: per-key labels, per-group LR
    schedules and the set of trainable keys."""

    tx: optax.GradientTransformation
    labels: dict[str, str]
    schedules: dict[str, optax.Schedule]

    @property
    def trainable(self) -> frozenset[str]:
        return frozenset(k for k, g in self.labels.items() if g != FROZEN)

    def learning_rates(self, step: int) -> dict[str, float]:
        return {name: float(s(step)) for name, s in self.schedules.items()}


def group_labels(keys: list[str], cfg: OptimConfig) -> dict[str, str]:
    """Group name per parameter key ("frozen" for frozen groups). Raises ConfigError naming a
    group whose pattern is invalid or matches nothing."""
    compiled = []
    for group in cfg.groups:
        try:
            compiled.append((group, re.compile(group.pattern)))
        except re.error as e:
            raise ConfigError(f"optim.groups[{group.name}].pattern: invalid regular expression ({e})") from e
    labels, used = {}, set()
    for key in keys:
        label = DEFAULT_GROUP
        for group, regex in compiled:
            if regex.search(key):
                label = FROZEN if group.frozen else group.name
                used.add(group.name)
                break
        labels[key] = label
    unused = [g.name for g in cfg.groups if g.name not in used]
    if unused:
        raise ConfigError(
            f"optim.groups: group(s) {unused} match no parameter; parameter keys look like {sorted(keys)[:4]}"
        )
    return labels


def make_optimizer(cfg: OptimConfig, param_shapes: Mapping[str, jax.ShapeDtypeStruct], total_steps: int) -> Optimizer:
    """Build the optimizer for flat parameters with shapes ``param_shapes``."""
    labels = group_labels(list(param_shapes), cfg)
    decay_mask = {k: len(s.shape) >= 2 for k, s in param_shapes.items()}
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    schedules: dict[str, optax.Schedule] = {}
    groups = {g.name: g for g in cfg.groups if not g.frozen}
    for name in sorted(set(labels.values()) - {FROZEN}):
        group = groups.get(name)
        lr = group.lr if group is not None and group.lr is not None else cfg.lr
        wd = group.weight_decay if group is not None and group.weight_decay is not None else cfg.weight_decay
        schedules[name] = make_schedule(lr, cfg, total_steps)
        transforms[name] = optax.adamw(
            schedules[name], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask
        )
    frozen_mask = {k: labels[k] == FROZEN for k in labels}
    chain = [optax.masked(optax.set_to_zero(), frozen_mask)]  # frozen grads never count in the norm
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return Optimizer(optax.chain(*chain), labels, schedules)


def opt_state_shardings(opt_state_shapes, param_shardings: Mapping[str, jax.sharding.Sharding], default) -> object:
    """Sharding for every leaf of an optimizer state whose parameter-shaped subtrees are flat
    dicts keyed like the parameters: a leaf under key ``k`` with the shape of parameter ``k``
    gets that parameter's sharding; everything else (counts, scalars) gets ``default``."""

    def pick(path, leaf):
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in param_shardings:
                return param_shardings[key]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


__all__ = ["Optimizer", "make_optimizer", "make_schedule", "group_labels", "opt_state_shardings", "global_norm"]
