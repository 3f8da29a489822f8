"""Shared helpers of the layer-level benchmarks (bench_layers.py): timing of compiled
functions, XLA's compiled memory analysis, JSON rows written as they come.

Timing: compile once (excluded), one warm call (excluded), then the median over ``reps``
calls, each waited for with ``block_until_ready``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import traceback

import jax

# the layer settings, shared by the layer benchmarks (bench_layers, profile_layer,
# triton_regs): SparseKAttention with k = 1024, w = 512; SEAAttention with k = 64, T_M = 256
SPARSEK_LAYER = dict(k=1024, window=512)
SEA_LAYER = dict(k=64, t_m=256)


def compile_with_memory(jitted, args):
    """(compiled executable, dict of XLA memory-analysis bytes or None).

    ``peak_bytes`` = temporaries + arguments + outputs (aliases not subtracted): an upper
    bound of what one call holds on the device.
    """
    compiled = jitted.lower(*args).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return compiled, None
    mem = dict(temp_bytes=int(ma.temp_size_in_bytes), argument_bytes=int(ma.argument_size_in_bytes),
               output_bytes=int(ma.output_size_in_bytes))
    mem["peak_bytes"] = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
    return compiled, mem


def time_ms(fn, args, reps):
    """Median milliseconds per call of ``fn(*args)`` after one warm call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_options_json(text):
    """kernel_options from a JSON object: lists (per-kernel warps / stages) become tuples."""
    return {name: tuple(val) if isinstance(val, list) else val for name, val in json.loads(text).items()}


def env_info():
    info = dict(jax=jax.__version__, backend=jax.default_backend(), python=platform.python_version())
    try:
        info["device"] = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


class JsonRows:
    """Rows appended to ``data["rows"]``; the file is rewritten after every row so that a
    run cut short keeps what it measured."""

    def __init__(self, path, meta):
        self.path = path
        self.data = dict(meta=meta, rows=[])

    def add(self, row):
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)

    def guarded(self, base, fn):
        """Run ``fn(partial)``, which fills the dict ``partial`` as it measures, and add
        ``{**base, **partial}``; on an exception add what was measured so far plus the error
        and the tail of the traceback (one failure must not end the run)."""
        t0 = time.perf_counter()
        partial = {}
        try:
            fn(partial)
            row = {**base, **partial}
        except Exception as e:  # noqa: BLE001 - recorded in the JSON
            row = {**base, **partial, "error": f"{type(e).__name__}: {str(e)[:1500]}",
                   "trace": traceback.format_exc()[-2000:]}
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        self.add(row)
        return row
