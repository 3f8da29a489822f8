"""Sharded training on fake CPU devices, each scenario in its own process (train_driver.py).

XLA_FLAGS=--xla_force_host_platform_device_count=N only takes effect before jax starts, and the
other test files share this pytest process, so every scenario runs in a subprocess.

Tolerances: runs on different meshes do the same math with different reduction orders
(all-reduces of partial sums), so their float32 losses agree to rtol 2e-4 and parameters after
6 AdamW steps to atol 2e-4 (Adam normalises tiny gradient differences into updates of up to
lr-size, so parameters are the looser check). Kill-and-resume on the same mesh is bitwise: the
restored state, data position and compiled program are identical.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

DRIVER = pathlib.Path(__file__).with_name("train_driver.py")
MESH_RTOL = 2e-4
PARAM_ATOL = 2e-4


def run_driver(scenario: str, out: pathlib.Path, args: dict | None = None, *, devices: int = 8,
               env: dict | None = None, expect_kill: bool = False, timeout: int = 600) -> dict | None:
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(DRIVER), scenario, str(out), json.dumps(args or {})],
        env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if expect_kill:
        assert proc.returncode == -9, f"expected SIGKILL, got {proc.returncode}\n{proc.stderr[-3000:]}"
        return None
    assert proc.returncode == 0, proc.stderr[-5000:]
    path = out / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    return out, run_driver("meshes", out)


def test_same_loss_curve_on_every_mesh(meshes):
    out, result = meshes
    ref = result["1dev"]
    assert len(ref["losses"]) == 6 and len(ref["evals"]) == 2
    assert ref["losses"][-1] < ref["losses"][0] - 0.5, "the tiny run must learn"
    ref_params = np.load(out / "1dev.npz")
    for name in ("8_1_1", "2_4_1", "1_4_2", "2_2_2"):
        np.testing.assert_allclose(result[name]["losses"], ref["losses"], rtol=MESH_RTOL, err_msg=name)
        np.testing.assert_allclose(result[name]["evals"], ref["evals"], rtol=MESH_RTOL, err_msg=name)
        params = np.load(out / f"{name}.npz")
        for key in ref_params.files:
            np.testing.assert_allclose(params[key], ref_params[key], atol=PARAM_ATOL, err_msg=f"{name} {key}")


def test_meshes_really_shard(meshes):
    _, result = meshes
    assert result["1_4_2"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    specs = result["1_4_2"]["specs"]
    # embed [vocab, embed]: vocab over tensor, embed over fsdp; MLP hidden over tensor
    assert specs["embed"] == ["tensor", "fsdp"]
    assert specs["stages.0.blocks.mlp.gate"] == [None, "fsdp", "tensor"]  # [layers, embed, mlp]
    assert specs["stages.0.blocks.attn.k_proj"] == [None, "fsdp", "tensor", None]  # 2 KV heads over tensor=2
    # pure data parallelism replicates every parameter
    assert all(e is None for spec in result["8_1_1"]["specs"].values() for e in spec)


def test_gradient_accumulation_matches_one_big_batch(meshes):
    out, result = meshes
    np.testing.assert_allclose(result["2_2_2_accum2"]["losses"], result["2_2_2_b16"]["losses"], rtol=MESH_RTOL)
    a, b = np.load(out / "2_2_2_accum2.npz"), np.load(out / "2_2_2_b16.npz")
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], atol=PARAM_ATOL, err_msg=key)


def test_restore_8_device_checkpoint_on_2_devices(meshes, tmp_path):
    out, _ = meshes
    # a copy, so that resuming here does not disturb the other tests' files
    source = tmp_path / "run"
    shutil.copytree(out / "2_4_1", source)
    result = run_driver("restore", tmp_path / "restore",
                        {"source": str(source), "saved_npz": str(out / "2_4_1.npz")}, devices=2)
    assert result["devices"] == 2 and result["step"] == 6
    assert result["exact"], "restored parameters differ from the saved ones"
    assert result["loader_exact"], "load_checkpoint returned other parameters"
    assert set(result["num_devices"].values()) == {2}
    assert result["specs"]["embed"] == [None, "fsdp"]
    assert len(result["resumed_losses"]) == 2 and all(np.isfinite(result["resumed_losses"]))


def _run(tmp_path: pathlib.Path, name: str, run_dir: pathlib.Path, **args) -> dict | None:
    return run_driver("run", tmp_path / name, {"dir": str(run_dir), **args}, devices=2,
                      expect_kill=any(k.startswith("kill") for k in args))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = _run(tmp, "ref", tmp / "run")
    return result, np.load(tmp / "ref" / "params.npz")


def _check_resumed(result, params, reference, resumed_from: int):
    ref_result, ref_params = reference
    for key in ref_params.files:
        assert np.array_equal(params[key], ref_params[key]), f"{key} differs after resume (bitwise expected)"
    ref_losses = {h["step"]: h["loss"] for h in ref_result["history"] if "loss" in h}
    got = {h["step"]: h["loss"] for h in result["history"] if "loss" in h}
    assert min(got) == resumed_from + 1 and max(got) == 6
    assert all(got[s] == ref_losses[s] for s in got), (got, ref_losses)


def test_sigkill_at_random_step_then_resume_is_bitwise(tmp_path, uninterrupted):
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(2, 6)  # batches fetched before the kill: 1..5 steps done
    run_dir = tmp_path / "run"
    _run(tmp_path, "killed", run_dir, kill_at_batch=kill_at)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    expected_last = ((kill_at - 1) // 2) * 2  # checkpoints every 2 steps
    assert (saved[-1] if saved else 0) in (expected_last, expected_last - 2), (seed, kill_at, saved)
    result = _run(tmp_path, "resumed", run_dir, overrides={"checkpoint.resume": True})
    _check_resumed(result, np.load(tmp_path / "resumed" / "params.npz"), uninterrupted, saved[-1] if saved else 0)


def test_sigkill_during_save_then_resume_is_bitwise(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    _run(tmp_path, "killed", run_dir, kill_during_save=4)
    ckpt_dir = run_dir / "checkpoints"
    complete = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert complete == [2], f"only step 2 may be complete, found {sorted(p.name for p in ckpt_dir.iterdir())}"
    result = _run(tmp_path, "resumed", run_dir, overrides={"checkpoint.resume": True})
    _check_resumed(result, np.load(tmp_path / "resumed" / "params.npz"), uninterrupted, 2)
    leftovers = [p.name for p in ckpt_dir.iterdir() if "tmp" in p.name]
    assert not leftovers, f"temporary folders survived the resume: {leftovers}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_jax_distributed_agree(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, str(DRIVER), "distributed", str(tmp_path / "out"), json.dumps({"dir": str(tmp_path / "run")})],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-5000:]
    results = [json.loads((tmp_path / "out" / f"result_{i}.json").read_text()) for i in range(2)]
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 4
    assert results[0]["evals"] == results[1]["evals"]
    assert results[0]["losses"][-1] < results[0]["losses"][0]
    p0, p1 = np.load(tmp_path / "out" / "params_0.npz"), np.load(tmp_path / "out" / "params_1.npz")
    for key in p0.files:
        assert np.array_equal(p0[key], p1[key]), key
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4"]
    data_states = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "4" / "data").glob("process_*"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
