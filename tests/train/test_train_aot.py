"""Ahead-of-time mode (``sea-train --compile-only --topology ...``): the full train step compiled
for a small TPU slice by the real TPU compiler (libtpu) on this CPU machine.

Runs in a subprocess with an interpreter that has libtpu (so this pytest process never loads
the TPU runtime), found as: ``SEA_JAX_TPU_PYTHON``, else this interpreter - it must import jax (same
version as here), libtpu and draccus. Skipped when there is none (``pip install "jax[tpu]"``; CI installs the ``tpu`` extra).

Checked: the CLI prints the per-device memory and exits 0; the compile report of the tiny
preset on v5p:2x2x1 (4 chips, mesh data=1 x fsdp=2 x tensor=2) for dense and (slow)
SparseK attention (the same step the loop runs; nonzero temporaries, parameters really sharded over
fsdp and tensor); an unknown topology is a ConfigError naming ``topology``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

ENV = dict(os.environ, PYTHONUNBUFFERED="1", TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="")


@functools.lru_cache(maxsize=1)
def tpu_python() -> str:
    code = "import jax, libtpu, draccus; print(jax.__version__)"
    forced = os.environ.get("SEA_JAX_TPU_PYTHON")
    candidates = [forced] if forced else [sys.executable]
    tried = []
    for python in candidates:
        if not os.path.exists(python):
            tried.append(f"{python} (missing)")
            continue
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip() == jax.__version__:
            return python
        tried.append(f"{python} ({(r.stderr.strip().splitlines() or [r.stdout.strip()])[-1]})")
    if forced:
        pytest.fail(f"SEA_JAX_TPU_PYTHON={forced} cannot import jax {jax.__version__} + libtpu + draccus: {tried}")
    pytest.skip(f"no interpreter with libtpu at jax {jax.__version__}; tried {tried}")


TINY = ["--preset", "tiny", "--mesh.data", "1", "--mesh.fsdp", "2", "--mesh.tensor", "2",
        "--metrics.progress_bar", "false"]


def test_cli_compile_only_prints_memory():
    r = subprocess.run(
        [tpu_python(), "-m", "sea_jax.train.main", *TINY, "--compile-only", "--topology", "v5p:2x2x1"],
        capture_output=True, text=True, timeout=600, env=ENV,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled the train step for v5p:2x2x1 (4 TPU" in r.stdout, r.stdout
    assert "memory per device:" in r.stdout and "temporaries" in r.stdout
    assert "embed: P('tensor', 'fsdp')" in r.stdout  # vocab over tensor, width over fsdp


REPORT_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from sea_jax.train.aot import compile_for_topology
    from sea_jax.train.config import ConfigError, parse_config
    tiny, attention = json.loads(sys.argv[1]), sys.argv[2]
    cfg = parse_config(tiny + ["--model.attention", attention, "--compile_only=true", "--topology=v5p:2x2x1"],
                       preset="tiny")
    reports = {attention: dataclasses.asdict(compile_for_topology(cfg, verbose=False))}
    try:
        compile_for_topology(parse_config(["--compile_only=true", "--topology=v5p:banana"], preset="tiny"))
        reports["bad_topology"] = None
    except ConfigError as e:
        reports["bad_topology"] = str(e)
    print("REPORT " + json.dumps(reports))
""")


@pytest.mark.parametrize("attention", ["dense", pytest.param("sparsek", marks=pytest.mark.slow)])
def test_compile_report_for_v5p_2x2x1(attention):
    tiny = [a for a in TINY if a not in ("--preset", "tiny")]
    r = subprocess.run([tpu_python(), "-c", REPORT_SCRIPT, json.dumps(tiny), attention],
                       capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("REPORT ")]
    assert line, r.stdout[-3000:]
    reports = json.loads(line[-1][len("REPORT "):])
    rep = reports[attention]
    assert rep["topology"] == "v5p:2x2x1" and rep["num_devices"] == 4, rep
    assert rep["mesh_shape"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert 0.7e6 < rep["param_count"] < 1.0e6, rep["param_count"]
    # arguments + outputs - aliased + temporaries of one chip: more than the sharded state
    # (0.8M params x 12 bytes / 4 chips) and far below a v5p chip's 95 GiB
    assert 2.4e6 < rep["bytes_per_device"] < 2**30, rep["bytes_per_device"]
    assert rep["flops_per_token"] > 6 * rep["param_count"]
    assert reports["bad_topology"] is not None and reports["bad_topology"].startswith("topology:"), reports
