"""The jitted train step, the optimizer and the parameter export, on one CPU device.

References are written here, independently of train/step.py and train/optim.py:

* the loss: the model's logits turned into a masked mean cross-entropy in float64 numpy;
* the gradient: ``jax.grad`` of a plain float32 loss function (no accumulation, no
  stop_gradient, no sharding constraints);
* the update: AdamW's first step written out, ``p - lr0 (g / (|g| + eps) + wd p [ndim >= 2])``
  with ``lr0 = peak lr / warmup_steps`` per group; frozen parameters unchanged;
* clipping: Adam's first moment after one step is ``(1 - b1) g min(1, clip / |g|_trainable)``;
* the schedule: linear warmup then the cosine formula.

Gradient accumulation across meshes is checked in test_train_sharded.py.

Tolerances (float32): loss rtol 1e-5; gradient norm rtol 1e-4; first-step parameters
atol 2e-3 x lr0 (g / (|g| + eps) is sensitive to float32 noise only where |g| ~ eps); bf16
compute vs fp32: loss rtol 2e-2. Tiny shapes (2 layers, width 32, 4 rows of 12 tokens): the
file runs in well under a minute.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("draccus")
pytest.importorskip("grain")

from sea_jax.train.config import parse_config  # noqa: E402
from sea_jax.train.optim import make_schedule  # noqa: E402
from sea_jax.train.setup import build_setup  # noqa: E402
from sea_jax.train.state import init_state  # noqa: E402
from sea_jax.train.step import make_train_step  # noqa: E402

VOCAB, SEQ, ROWS = 40, 12, 4
SMALL = {
    "model.vocab_size": VOCAB, "model.width": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64, "train.global_batch_size": ROWS,
    "train.steps": 10, "optim.warmup_steps": 2, "optim.weight_decay": 0.1, "optim.clip_norm": 0,
    "optim.lr": 1e-2,
}


def _config(**extra):
    values = dict(SMALL)
    values.update(extra)
    return parse_config([f"--{k}={v}" for k, v in values.items()], preset="tiny")


def _batch(accum: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """[accum, ROWS // accum, SEQ] rows of two documents each (the second starts at a random
    offset), some targets masked; the layout the data pipeline produces."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(ROWS, SEQ + 1)).astype(np.int32)
    cut = rng.integers(3, SEQ - 2, size=ROWS)
    seg = np.where(np.arange(SEQ + 1)[None] < cut[:, None], 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(SEQ + 1)[None], np.arange(SEQ + 1)[None] - cut[:, None]).astype(np.int32)
    mask = (seg[:, 1:] == seg[:, :-1]).astype(np.int32)
    mask[0, -3:] = 0  # a few more uncounted targets
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos[:, :-1],
             "segment_ids": seg[:, :-1], "loss_mask": mask}
    return {k: v.reshape(accum, ROWS // accum, SEQ) for k, v in batch.items()}


def _setup_and_state(cfg):
    setup = build_setup(cfg, jax.devices()[:1])
    state = init_state(setup.parts, setup.opt, setup.shardings, cfg.train.seed)
    return setup, state


def _step(setup, state, batch, **kw):
    with jax.set_mesh(setup.mesh):
        step = make_train_step(setup.parts, setup.opt, setup.mesh, setup.shardings, setup.batch_sharding, **kw)
        return step(state, {k: jnp.asarray(v) for k, v in batch.items()}, kw.get("extra"))


def _reference_loss(parts, params, rest, batch):
    """Masked mean next-token cross-entropy over all rows (float32, plain jax)."""
    flat = {k: jnp.asarray(v.reshape(-1, SEQ)) for k, v in batch.items()}
    model = parts.merge(params, rest)
    logits = model(flat["inputs"], positions=flat["positions"], segment_ids=flat["segment_ids"]).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, flat["targets"][..., None], axis=-1)[..., 0]
    mask = flat["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.sum(mask)


def _numpy_loss(logits: np.ndarray, batch) -> float:
    """The same loss in float64 numpy from the model's logits."""
    logits = logits.astype(np.float64)
    targets = batch["targets"].reshape(-1, SEQ)
    mask = batch["loss_mask"].reshape(-1, SEQ).astype(np.float64)
    total = 0.0
    for r in range(logits.shape[0]):
        for t in range(SEQ):
            row = logits[r, t]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            total += mask[r, t] * (lse - row[targets[r, t]])
    return total / mask.sum()


def test_step_matches_hand_written_loss_gradient_and_adamw():
    groups = "[{name: attn, pattern: 'attn\\.', lr: 1e-3}, {name: mlp, pattern: 'mlp\\.', frozen: true}]"
    cfg = _config(**{"optim.groups": groups})
    setup, state = _setup_and_state(cfg)
    parts = setup.parts
    params0 = jax.device_get(state["params"])
    rest0 = jax.device_get(state["rest"])
    batch = _batch()

    flat = {k: jnp.asarray(v.reshape(-1, SEQ)) for k, v in batch.items()}
    logits = parts.merge(params0, rest0)(flat["inputs"], positions=flat["positions"], segment_ids=flat["segment_ids"]).logits
    want_loss = _numpy_loss(np.asarray(logits), batch)
    grads = jax.grad(lambda p: _reference_loss(parts, p, rest0, batch))(params0)

    new_state, metrics = _step(setup, state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
    assert float(metrics["tokens"]) == batch["loss_mask"].sum()
    trainable = [k for k in grads if ".mlp." not in k]
    assert len(trainable) < len(grads)
    want_norm = math.sqrt(sum(float(np.sum(np.asarray(grads[k], np.float64) ** 2)) for k in trainable))
    np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-4)

    eps, wd = cfg.optim.eps, cfg.optim.weight_decay
    new = jax.device_get(new_state["params"])
    for key, p in params0.items():
        if ".mlp." in key:
            assert np.array_equal(new[key], p), f"{key} is frozen"
            continue
        lr0 = (1e-3 if ".attn." in key else 1e-2) / cfg.optim.warmup_steps
        g = np.asarray(grads[key], np.float64)
        p64 = np.asarray(p, np.float64)
        want = p64 - lr0 * (g / (np.abs(g) + eps) + (wd * p64 if p.ndim >= 2 else 0.0))
        np.testing.assert_allclose(new[key], want, atol=2e-3 * lr0, rtol=0, err_msg=key)
        assert not np.array_equal(new[key], p), f"{key} did not move"
    assert int(new_state["step"]) == 1


def _first_moments(opt_state) -> dict[str, np.ndarray]:
    """Adam's ``mu`` per parameter key, found by path in the optimizer state."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [getattr(e, "name", None) for e in path]
        keys = [getattr(e, "key", None) for e in path]
        if "mu" in names and isinstance(keys[-1], str):
            out[keys[-1]] = np.asarray(leaf)
    return out


def test_clipping_scales_the_gradient_by_the_trainable_norm():
    clip = 1e-3
    cfg = _config(**{"optim.clip_norm": clip, "optim.groups": "[{name: emb, pattern: '^embed$', frozen: true}]"})
    setup, state = _setup_and_state(cfg)
    params0, rest0 = jax.device_get(state["params"]), jax.device_get(state["rest"])
    batch = _batch(seed=1)
    grads = jax.grad(lambda p: _reference_loss(setup.parts, p, rest0, batch))(params0)
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for k, g in grads.items() if k != "embed"))
    assert norm > 10 * clip
    new_state, metrics = _step(setup, state, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    mu = _first_moments(new_state["opt_state"])
    assert "embed" not in mu and set(mu) == set(grads) - {"embed"}
    for key, m in mu.items():
        want = (1 - cfg.optim.b1) * np.asarray(grads[key], np.float64) * clip / norm
        np.testing.assert_allclose(m, want, rtol=2e-4, atol=1e-12, err_msg=key)


def test_mixed_precision_keeps_fp32_master_weights():
    cfg32, cfg16 = _config(), _config(**{"model.dtype": "bfloat16"})
    (s32, st32), (s16, st16) = _setup_and_state(cfg32), _setup_and_state(cfg16)
    new32, m32 = _step(s32, st32, _batch())
    new16, m16 = _step(s16, st16, _batch())
    assert all(v.dtype == jnp.float32 for v in new16["params"].values())
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"]), "bf16 compute must actually be used"


def test_custom_loss_fn_contract_metrics_and_extra():
    """loss_fn(params, rest, micro, extra) -> (loss_sum, count, metrics): the step divides the
    loss and every metric by the total count, over all micro-batches; ``extra`` arrives as an
    argument with its own sharding."""
    from sea_jax.train.step import lm_loss

    cfg = _config(**{"train.grad_accum_steps": 2})
    setup, state = _setup_and_state(cfg)
    base = lm_loss(setup.parts, setup.mesh)

    def loss_fn(params, rest, micro, extra):
        loss_sum, count = base(params, rest, micro, None)[:2]
        return extra["scale"] * loss_sum, count, {"plain": loss_sum, "ones": count}

    extra = {"scale": jax.device_put(jnp.float32(3.0), jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))}
    ref_state = init_state(setup.parts, setup.opt, setup.shardings, cfg.train.seed)
    _, ref = _step(setup, ref_state, _batch(accum=2))
    _, got = _step(setup, state, _batch(accum=2), loss_fn=loss_fn, extra=extra)
    np.testing.assert_allclose(float(got["loss"]), 3 * float(ref["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["plain"]), float(ref["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["ones"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(got["grad_norm"]), 3 * float(ref["grad_norm"]), rtol=1e-4)
    with pytest.raises(ValueError, match="extra: every leaf must be a jax.Array"):
        make_train_step(setup.parts, setup.opt, setup.mesh, setup.shardings, setup.batch_sharding,
                        loss_fn=loss_fn, extra={"scale": 3.0})


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_formula(schedule):
    cfg = _config(**{"optim.schedule": schedule, "optim.warmup_steps": 4, "optim.min_lr_ratio": 0.1})
    total, peak, warm = 20, 2e-3, 4
    sched = make_schedule(peak, cfg.optim, total)
    for step in range(total + 3):
        if step < warm:
            want = peak * (step + 1) / warm
        elif schedule == "constant":
            want = peak
        else:
            t = min(step - warm, total - warm) / (total - warm)
            want = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, err_msg=f"step {step}")


def test_unmatched_or_invalid_group_names_the_group():
    from sea_jax.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.groups: group\(s\) \['nothing'\] match no parameter"):
        build_setup(_config(**{"optim.groups": "[{name: nothing, pattern: 'no_such_param'}]"}), jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"optim.groups\[bad\].pattern: invalid regular expression"):
        build_setup(_config(**{"optim.groups": "[{name: bad, pattern: '(['}]"}), jax.devices()[:1])


def test_checkpoint_export_and_load_round_trip(tmp_path):
    import sea_jax
    from sea_jax.train.checkpoint import Checkpointer, export_params, load_exported
    from sea_jax.train.data import build_pipeline
    from sea_jax.train.params import split_model

    cfg = _config(**{"data.source": "synthetic", "data.seq_len": SEQ, "output_dir": str(tmp_path)})
    setup, state = _setup_and_state(cfg)
    data = build_pipeline(cfg.data, global_batch_size=ROWS, grad_accum_steps=1, eval_batches=0,
                          model_vocab_size=VOCAB)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    ckpt.save(3, state, data.train_iter, cfg)
    ckpt.wait()
    ckpt.close()
    want = jax.device_get(state["params"])
    model, lm_config = sea_jax.load_checkpoint(tmp_path / "ckpt")
    assert lm_config == cfg.model
    got, _ = split_model(model)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    npz = export_params(tmp_path / "ckpt", tmp_path / "export" / "tiny.npz")
    model2, lm_config2 = load_exported(npz)
    assert lm_config2 == cfg.model
    got2, _ = split_model(model2)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got2[k]), want[k], err_msg=k)
    tokens = jnp.asarray(_batch()["inputs"][0])
    np.testing.assert_allclose(np.asarray(model2(tokens).logits), np.asarray(model(tokens).logits), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        sea_jax.load_checkpoint(tmp_path / "export")
