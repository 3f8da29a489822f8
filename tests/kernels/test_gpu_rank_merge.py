"""sea_jax.kernels.gpu_rank_merge: the on-chip merge of sorted rank lists against numpy's sort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_rank_merge import merge_lowest
from sea_jax.ops.sparsek_select_fast import EMPTY, bitonic_merge_lowest

ON_GPU = jax.default_backend() == "gpu"


def _lists(rng, lead, n, dup):
    """Two ascending int32 lists [*lead, n], some rows cut short by EMPTY padding (all-empty
    rows included); ``dup``: values drawn with repeats (within and across the two lists)."""
    rows = int(np.prod(lead))
    if dup:
        vals = rng.integers(0, max(2, n // 2), (rows, 2 * n))
    else:
        vals = np.stack([rng.permutation(10 * n)[: 2 * n] for _ in range(rows)])
    a, b = np.sort(vals[:, :n], -1), np.sort(vals[:, n:], -1)
    cut_a, cut_b = rng.integers(0, n + 1, rows), rng.integers(0, n + 1, rows)
    cut_a[0], cut_b[0] = 0, 0  # one pair of empty lists
    a = np.where(np.arange(n) < cut_a[:, None], a, EMPTY).astype(np.int32)
    b = np.where(np.arange(n) < cut_b[:, None], b, EMPTY).astype(np.int32)
    return a.reshape(*lead, n), b.reshape(*lead, n)


@pytest.mark.parametrize("lead,n,dup", [((37,), 1, False), ((5, 3), 2, True), ((23,), 8, False),
                                        ((4, 2, 3), 64, True), ((6,), 256, False)])
def test_merge_lowest_against_sort(lead, n, dup):
    rng = np.random.default_rng(n + len(lead))
    a, b = _lists(rng, lead, n, dup)
    low, nxt = merge_lowest(jnp.asarray(a), jnp.asarray(b), interpret=True)
    want = np.sort(np.concatenate([a, b], -1), -1)
    np.testing.assert_array_equal(np.asarray(low), want[..., :n])
    np.testing.assert_array_equal(np.asarray(nxt), want[..., n])
    # the same as the XLA bitonic merge it replaces on the GPU
    low_b, nxt_b = bitonic_merge_lowest(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(low), np.asarray(low_b))
    np.testing.assert_array_equal(np.asarray(nxt), np.asarray(nxt_b))


def test_merge_lowest_empty_batch():
    a = jnp.zeros((0, 4), jnp.int32)
    low, nxt = merge_lowest(a, a, interpret=True)
    assert low.shape == (0, 4) and nxt.shape == (0,)


def test_merge_lowest_bad_inputs():
    x = jnp.zeros((3, 4), jnp.int32)
    with pytest.raises(ValueError, match="one shape"):
        merge_lowest(x, jnp.zeros((3, 8), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="int32"):
        merge_lowest(x.astype(jnp.float32), x.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        merge_lowest(jnp.zeros((3, 6), jnp.int32), jnp.zeros((3, 6), jnp.int32), interpret=True)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
def test_merge_lowest_compiled_on_gpu():
    rng = np.random.default_rng(7)
    for lead, n, dup in (((300, 16), 1024, False), ((9,), 128, True)):
        a, b = _lists(rng, lead, n, dup)
        low, nxt = jax.jit(merge_lowest)(jnp.asarray(a), jnp.asarray(b))
        want = np.sort(np.concatenate([a, b], -1), -1)
        np.testing.assert_array_equal(np.asarray(low), want[..., :n])
        np.testing.assert_array_equal(np.asarray(nxt), want[..., n])


def test_prefix_ranks_with_the_kernel_merge():
    """The carries' associative scan with the kernel's merge equals the bitonic one (odd block
    counts included: the scan combines uneven and empty slices)."""
    from sea_jax.ops.sparsek_select_fast import prefix_ranks

    rng = np.random.default_rng(3)
    for nq, c in ((7, 8), (12, 5), (1, 4)):
        bq = 4
        ranks = rng.permutation(nq * bq * 3)[: nq * bq * 2].reshape(nq, 2, bq).astype(np.int32)
        ranks = np.where(rng.random(ranks.shape) < 0.2, EMPTY, ranks).astype(np.int32)  # queries with no key
        want = prefix_ranks(jnp.asarray(ranks), c)
        got = prefix_ranks(jnp.asarray(ranks), c, merge="pallas_interpret")
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match="merge"):
        prefix_ranks(jnp.asarray(ranks), 4, merge="sorted")
