"""The TPU kernels compiled by the real Mosaic TPU compiler on this CPU machine, and the
shard_map wrappers run on 4 host CPU devices.

Both run tests/kernels/tpu_compile_check.py in a subprocess, so that this (ordinary CPU)
test process never loads the TPU runtime:

* compilation needs an interpreter with ``libtpu`` (``pip install "jax[tpu]"`` at the
  installed jax version). It is found as: the ``SEA_JAX_TPU_PYTHON`` environment variable,
  else this interpreter, if it can import jax and libtpu at this jax version. When none can, the
  compile tests are skipped (the dependency is absent; the README test command installs the
  ``tpu`` extra, so CI runs them). A ``SEA_JAX_TPU_PYTHON`` that cannot import libtpu is a
  configuration error and fails.
* the sharded interpret check uses this interpreter with 4 forced host devices.

Compiled for the ``v5e:2x2`` topology (4 chips, mesh data=2 x model=2), bfloat16, S = 8192,
inside ``jax.shard_map``; the memory analysis of every compiled program is printed (run
pytest with ``-s`` to see it).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).with_name("tpu_compile_check.py")
REPO = Path(__file__).resolve().parents[2]


def _has_libtpu(python: str) -> tuple[bool, str]:
    code = "import jax, libtpu; print(jax.__version__)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode != 0:
        return False, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "import failed"
    version = r.stdout.strip()
    if version != jax.__version__:
        return False, f"jax {version} there, {jax.__version__} here"
    return True, version


@functools.lru_cache(maxsize=1)
def tpu_python() -> str:
    """Path of an interpreter with jax + libtpu, or pytest.skip / pytest.fail."""
    forced = os.environ.get("SEA_JAX_TPU_PYTHON")
    if forced:
        ok, why = _has_libtpu(forced)
        if not ok:
            pytest.fail(f"SEA_JAX_TPU_PYTHON={forced} cannot import jax + libtpu: {why}")
        return forced
    tried = []
    for cand in (sys.executable,):
        if not os.path.exists(cand):
            tried.append(f"{cand} (missing)")
            continue
        ok, why = _has_libtpu(cand)
        if ok:
            return cand
        tried.append(f"{cand} ({why})")
    pytest.skip("no interpreter with libtpu (pip install 'jax[tpu]' matching jax "
                f"{jax.__version__}, or set SEA_JAX_TPU_PYTHON); tried: {'; '.join(tried)}")


def _run(python, *args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               # silence libtpu's probes of the (absent) TPU host metadata
               TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    r = subprocess.run([python, str(SCRIPT), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO, env=env)
    print(r.stdout)
    assert r.returncode == 0, f"{SCRIPT.name} {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _check_compiled(out: str, programs: dict[str, list[str]]):
    for name, kernels in programs.items():
        assert f"== {name}: compiled" in out, name
        line = next(l for l in out.splitlines() if l.startswith(f"== {name}:"))
        for kern in kernels:
            assert kern in line, (name, kern, line)
    assert out.count("memory_analysis: CompiledMemoryStats(") == len(programs)
    assert "temp_size_in_bytes" in out


def test_block_sparse_and_gathered_fwd_bwd_compile_for_tpu_v5e():
    """One program per kernel family: forward + backward (value_and_grad), which contains
    every Mosaic kernel (fwd, dq, dkv / fwd, fused bwd, window dkv)."""
    out = _run(tpu_python(), "--topology", "v5e:2x2", "--seq", "8192", "--programs", "fwd_bwd")
    assert "4 x TPU v5 lite" in out
    _check_compiled(out, {
        "block_sparse_fwd_bwd": ["sea_block_sparse_fwd", "sea_block_sparse_dq",
                                 "sea_block_sparse_dkv"],
        "gathered_fwd_bwd": ["sea_gathered_fwd", "sea_gathered_bwd", "sea_gathered_window_dkv"],
    })


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_all_programs_compile(topology, tmp_path):
    """Forward-only and forward + backward programs, on v5e and v5p."""
    out = _run(tpu_python(), "--topology", topology, "--seq", "8192", "--programs", "all",
               "--json", str(tmp_path / "compile.json"))
    _check_compiled(out, {"block_sparse_fwd": ["sea_block_sparse_fwd"],
                          "block_sparse_fwd_bwd": ["sea_block_sparse_dkv"],
                          "gathered_fwd": ["sea_gathered_fwd"],
                          "gathered_fwd_bwd": ["sea_gathered_bwd"]})


def test_shard_map_wrappers_match_reference_on_4_cpu_devices():
    """sharded_block_sparse_attention / sharded_gathered_attention (batch over "data", heads
    and per-KV-head layouts over "model") in interpret mode on a 2 x 2 CPU mesh: outputs
    and gradients equal the unsharded XLA reference (tolerance 2e-4 relative)."""
    out = _run(sys.executable, "--sharded-interpret", timeout=600)
    assert "sharded interpret check on 4 CPU devices: OK" in out
