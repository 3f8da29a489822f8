"""Training metrics: a progress bar, a JSON-lines file and TensorBoard, all on process 0.

Each record is a dict such as ``{"step": 100, "loss": 2.31, "tokens_per_s": 5.1e4,
"mfu": 0.41, "lr": 3e-4}`` written as one line of ``<output_dir>/metrics.jsonl`` and as
TensorBoard scalars under ``<output_dir>/tensorboard``. Evaluation records carry
``eval_loss`` and ``eval_ppl``.

MFU (model FLOPs utilisation) = achieved model FLOP/s / (devices x peak FLOP/s per device),
with model FLOPs from train/step.py (``model_flops_per_token``) and the peak bf16 dense matmul
rate of the device kind (or ``metrics.peak_flops_per_device``).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax

# peak dense bf16 matmul FLOP/s per device, by substring of jax's device_kind
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first device), None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


class MetricsWriter:
    """Writes records on process 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, *, total_steps: int, start_step: int = 0, progress_bar: bool = True,
                 jsonl: bool = True, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.jsonl_file = None
        self.tb = None
        self.bar = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        if jsonl:
            self.jsonl_file = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        if self.jsonl_file is not None:
            self.jsonl_file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        """Move the bar to ``step`` (steps done) and show ``postfix``."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=True)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl_file is not None:
            self.jsonl_file.close()


class Throughput:
    """Tokens/s and MFU over the interval since the last call to :meth:`measure`."""

    def __init__(self, flops_per_token: float, num_devices: int, peak_per_device: float | None):
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak_per_device
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.steps = 0

    def add(self, tokens: int, steps: int = 1) -> None:
        self.tokens += tokens
        self.steps += steps

    def measure(self) -> dict[str, float]:
        """Rates since the last call (the caller blocks on the device first)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        out = {"tokens_per_s": rate, "step_time_s": elapsed / max(self.steps, 1)}
        if self.peak:
            out["mfu"] = rate * self.flops_per_token / (self.num_devices * self.peak)
        self.reset()
        return out


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str, bool)) else value
    except (TypeError, ValueError):
        return str(value)


def _short(value):
    if isinstance(value, float):
        if value and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return value
