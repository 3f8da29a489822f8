"""sea_jax.kernels.gpu_top_budget (interpret mode on CPU, compiled on a GPU) against a NumPy
selection written here (a stable descending sort per row: ties towards the lower index, -0.0
equal to +0.0) and against the XLA sort it replaces (sea_jax.ops.sea_select.select_cells).
Exact: masks are compared bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_top_budget import top_budget_mask
from sea_jax.ops.sea_select import select_cells


def _numpy_top(x, budget):
    out = np.zeros(x.shape, bool)
    for r in range(x.shape[0]):
        key = np.where(x[r] == 0, 0.0, x[r])  # -0.0 ties with +0.0
        order = sorted(range(x.shape[1]), key=lambda j: (-key[j], j))
        out[r, order[:budget[r]]] = True
    return out


def _case(seed, R, N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((R, N)).astype(np.float32)
    x[0, ::3] = 0.5                    # many ties across the budget's edge
    x[1, : N // 2] = -0.0
    x[1, N // 2:] = 0.0                # signed zeros tie
    x[2, ::2] = -np.inf                # infinities
    x[3] = np.round(x[3] * 2) / 2      # coarse values: ties everywhere
    budget = rng.integers(0, N + 1, R)
    budget[:4] = [N // 3, N // 2 + 1, N, 0]
    return x, budget.astype(np.int32)


@pytest.mark.parametrize("R,N,rows_per_program", [(6, 64, 1), (5, 100, 2), (9, 17, 4), (4, 4096, 1)])
def test_matches_numpy_and_the_xla_sort(R, N, rows_per_program):
    x, budget = _case(R * N, R, N)
    want = _numpy_top(x, budget)
    got = np.asarray(top_budget_mask(jnp.asarray(x), jnp.asarray(budget), rows_per_program=rows_per_program,
                                     interpret=True))
    assert got.dtype == bool and got.shape == (R, N)
    np.testing.assert_array_equal(got.sum(1), budget)
    np.testing.assert_array_equal(got, want)
    # the XLA sort: rows as [1, R, 1, N] (one head, shared budgets)
    xla = select_cells(jnp.asarray(x)[None, :, None, :], jnp.asarray(budget)[None], method="sort")
    np.testing.assert_array_equal(np.asarray(xla)[0, :, 0], want)


def test_bad_arguments_and_lowering():
    import re

    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    x = jnp.zeros((4, 32), jnp.float32)
    b = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="scores must be float32"):
        top_budget_mask(x.astype(jnp.bfloat16), b, interpret=True)
    with pytest.raises(ValueError, match="budget must be an int array of shape"):
        top_budget_mask(x, b[:3], interpret=True)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
        top_budget_mask(x, b, rows_per_program=3, interpret=True)
    sds = jax.ShapeDtypeStruct
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = jax.jit(top_budget_mask).trace(sds((64, 4096), jnp.float32), sds((64,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @(\w+)", text) == ["__gpu"] and "sea_top_budget_mask" in text


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("R,N", [(64, 4096), (33, 256), (7, 100)])
def test_compiled_matches_numpy(R, N):
    x, budget = _case(R + N, R, N)
    got = np.asarray(jax.jit(top_budget_mask)(jnp.asarray(x), jnp.asarray(budget)))
    np.testing.assert_array_equal(got, _numpy_top(x, budget))
