"""The training loop in-process on one CPU device: what a user sees and finds on disk after
``sea-train`` (progress bar, metrics.jsonl, TensorBoard events, validation perplexity,
checkpoints kept, refusing to overwrite a run without --resume). Synthetic data, a 2-layer
width-32 model, 4 steps: a few seconds after compilation."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("draccus")
pytest.importorskip("grain")

from sea_jax.train.config import ConfigError, parse_config  # noqa: E402
from sea_jax.train.loop import train  # noqa: E402


def _config(out, **extra):
    values = {
        "model.vocab_size": 48, "model.width": 32, "model.num_layers": 2, "model.num_heads": 2,
        "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64, "data.source": "synthetic",
        "data.seq_len": 16, "train.global_batch_size": 4, "train.steps": 4, "train.log_every": 1,
        "train.eval_every": 2, "train.eval_batches": 2, "checkpoint.every_steps": 1, "checkpoint.keep": 2,
        "optim.warmup_steps": 1, "output_dir": str(out),
    }
    values.update(extra)
    return parse_config([f"--{k}={v}" for k, v in values.items()], preset="tiny")


def test_run_writes_metrics_tensorboard_and_checkpoints(tmp_path, capsys):
    result = train(_config(tmp_path / "run"))
    err = capsys.readouterr()
    assert "train: 100%" in err.err + err.out, "tqdm progress bar on process 0"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for r in train_records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr/default"] > 0
        assert "mfu" not in r  # unknown peak FLOP/s on CPU: no made-up MFU
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-6) and r["eval_tokens"] > 0
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [3, 4], "checkpoint.keep=2 keeps the last two"
    assert result.history == records

    with pytest.raises(ConfigError, match=r"checkpoint.directory: .* already holds steps \[3, 4\]; pass --resume"):
        train(_config(tmp_path / "run"))


def test_mfu_needs_a_known_peak(tmp_path):
    """CPUs have no peak FLOP/s entry, so the loop reports no MFU there (above); with
    metrics.peak_flops_per_device it is tokens/s x model FLOPs per token / peak."""
    from sea_jax.train.metrics import Throughput, peak_flops_per_device

    assert peak_flops_per_device() is None
    meter = Throughput(flops_per_token=1e6, num_devices=2, peak_per_device=1e9)
    meter.add(4000)
    out = meter.measure()
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e6 / 2e9, rel=1e-9)
    assert "mfu" not in Throughput(1e6, 1, None).measure()


@pytest.mark.parametrize("attention", ["sparsek", pytest.param("sea", marks=pytest.mark.slow)])
def test_sparse_cores_train_through_the_loop(tmp_path, attention):
    """The tiny preset's attention options (SEA scaled to short rows) through the same loop:
    finite losses, a validation perplexity, and the core's own parameters move, so gradients
    reach them through the train step: all of SparseK's (the scorer learns through the SparseK
    operator's VJP); for SEA some of them: parameters that only feed its top-k selection
    get no LM gradient (seen here: conv1_b stays at its init) and are trained by
    ``objective: distill``. (Synthetic tokens are uniform: the loss cannot fall below
    ln(vocab), so it is not asked to.)"""
    import jax
    import numpy as np

    from sea_jax.train.setup import build_setup
    from sea_jax.train.state import init_state

    cfg = _config(tmp_path / "run", **{"model.attention": attention, "data.seq_len": 64, "train.steps": 3,
                                       "train.eval_every": 3, "train.eval_batches": 1, "checkpoint.every_steps": 0,
                                       "metrics.tensorboard": False, "optim.lr": 1e-2})
    assert cfg.model.layer_names() == (attention, attention)
    setup = build_setup(cfg)
    initial = jax.device_get(init_state(setup.parts, setup.opt, setup.shardings, cfg.train.seed)["params"])
    result = train(cfg)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite([h for h in result.history if "eval_loss" in h][-1]["eval_ppl"])
    final = jax.device_get(result.state["params"])
    core = [k for k in initial if ".core." in k]
    assert core, sorted(initial)
    moved = {k for k in core if not np.array_equal(initial[k], final[k])}
    if attention == "sparsek":
        assert moved == set(core), f"no update: {sorted(set(core) - moved)}"
    else:
        assert any(k.endswith((".enc_b", ".gate_b")) for k in moved), sorted(moved)  # 1-D: no weight decay
