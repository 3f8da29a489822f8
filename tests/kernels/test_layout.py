"""BlockLayout: constructors against explicit loops, table invariants, bad inputs."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # kernel_reference.py lives beside this file
from kernel_reference import random_block_mask
from sea_jax.kernels import BlockLayout
from sea_jax.kernels.layout import num_blocks, stack_groups, validate_block_size


def _tables_by_loops(mask):
    """Expected (kv lists, q lists) of a [B, G, nQ, nK] mask: explicit loops."""
    B, G, nQ, nK = mask.shape
    kv = {(b, g, i): [j for j in range(nK) if mask[b, g, i, j]] for b in range(B) for g in range(G) for i in range(nQ)}
    qq = {(b, g, j): [i for i in range(nQ) if mask[b, g, i, j]] for b in range(B) for g in range(G) for j in range(nK)}
    return kv, qq


def _check_tables(lay, mask):
    kv, qq = _tables_by_loops(mask)
    kv_index, kv_count = np.asarray(lay.kv_index), np.asarray(lay.kv_count)
    q_index, q_count = np.asarray(lay.q_index), np.asarray(lay.q_count)
    for key, row in kv.items():
        assert kv_count[key] == len(row)
        assert kv_index[key][: len(row)].tolist() == row
        # padding repeats the last valid entry (0 for an empty row): no new DMA on TPU
        assert set(kv_index[key][len(row):].tolist()) <= {row[-1] if row else 0}
    for key, col in qq.items():
        assert q_count[key] == len(col)
        assert q_index[key][: len(col)].tolist() == col
    for name in ("kv_index", "kv_count", "q_index", "q_count"):
        assert getattr(lay, name).dtype == jnp.int32


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 4, 4), (1, 2, 1, 1)])
def test_from_mask_matches_loops(shape):
    rng = np.random.default_rng(sum(shape))
    mask = random_block_mask(rng, *shape)
    lay = BlockLayout.from_mask(mask, 32, 16)
    lay.validate()
    _check_tables(lay, mask)
    np.testing.assert_array_equal(np.asarray(lay.block_mask()), mask)
    assert lay.max_kv_blocks == max(1, mask.sum(-1).max())
    np.testing.assert_allclose(np.asarray(lay.density()), mask.mean((-1, -2)))


def test_from_mask_under_jit_uses_full_width():
    mask = random_block_mask(np.random.default_rng(0), 1, 2, 6, 5)
    lay = jax.jit(lambda m: BlockLayout.from_mask(m, 16, 16))(jnp.asarray(mask))
    assert lay.max_kv_blocks == 5 and lay.max_q_blocks == 6
    lay.validate()
    _check_tables(lay, mask)


def test_from_lists_merges_duplicates_and_ignores_tail():
    idx = np.array([[3, 1, 3, 0], [2, 2, 9, 9], [0, 0, 0, 0]])
    cnt = np.array([3, 2, 0])  # tails (incl. the out-of-range 9s) are not valid entries
    lay = BlockLayout.from_lists(idx, cnt, 16, 16, num_k_blocks=4)
    lay.validate()
    expected = np.zeros((1, 1, 3, 4), bool)
    expected[0, 0, 0, [1, 3]] = True
    expected[0, 0, 1, 2] = True
    _check_tables(lay, expected)


@pytest.mark.parametrize("seq_q,seq_k,window,bq,bk", [(100, 100, None, 32, 16), (77, 77, 20, 16, 32), (64, 96, 33, 16, 16)])
def test_sliding_window_and_causal_blocks(seq_q, seq_k, window, bq, bk):
    lay = BlockLayout.sliding_window(seq_q, seq_k, window, bq, bk)
    lay.validate()
    nq, nk = num_blocks(seq_q, bq), num_blocks(seq_k, bk)
    # a block is visited iff some (query, key) pair inside it is visible
    expected = np.zeros((1, 1, nq, nk), bool)
    for t in range(seq_q):
        for s in range(seq_k):
            if s <= t and (window is None or s > t - window):
                expected[0, 0, t // bq, s // bk] = True
    _check_tables(lay, expected)
    if window is None:
        causal = BlockLayout.causal(seq_q, seq_k, bq, bk)
        np.testing.assert_array_equal(np.asarray(causal.block_mask()), expected)


def test_dense_union_stack_broadcast():
    a = BlockLayout.sliding_window(64, 64, 16, 16, 16)
    d = BlockLayout.dense(64, 64, 16, 16)
    assert np.asarray(d.block_mask()).all()
    c = BlockLayout.causal(64, 64, 16, 16)
    u = a | c
    np.testing.assert_array_equal(np.asarray(u.block_mask()), np.asarray(c.block_mask()))
    s = stack_groups([a, d])
    assert s.num_groups == 2
    np.testing.assert_array_equal(np.asarray(s.block_mask())[0, 1], np.asarray(d.block_mask())[0, 0])
    bb = s.broadcast_batch(3)
    assert bb.batch == 3 and bb.kv_index.shape[0] == 3
    with pytest.raises(ValueError, match="block sizes"):
        _ = a | BlockLayout.causal(64, 64, 32, 16)


def test_validate_catches_inconsistent_tables():
    lay = BlockLayout.causal(64, 64, 16, 16)
    bad = BlockLayout(lay.kv_index, lay.kv_count, lay.q_index, lay.q_count.at[0, 0, 0].set(0), 16, 16)
    with pytest.raises(ValueError, match="transpose|q_index"):
        bad.validate()
    bad = BlockLayout(lay.kv_index.at[0, 0, 3, 0].set(2), lay.kv_count, lay.q_index, lay.q_count, 16, 16)
    with pytest.raises(ValueError, match="increasing|transpose"):
        bad.validate()


@pytest.mark.parametrize("value", [0, 8, 24, 48, 16.0, True, "32", None])
def test_bad_block_sizes(value):
    with pytest.raises(ValueError, match="block_q"):
        validate_block_size("block_q", value)
    with pytest.raises(ValueError, match="block_k"):
        BlockLayout.causal(64, 64, 16, value)


def test_bad_constructor_inputs():
    with pytest.raises(ValueError, match="boolean"):
        BlockLayout.from_mask(np.ones((2, 2), np.int32), 16, 16)
    with pytest.raises(ValueError, match="shape"):
        BlockLayout.from_mask(np.ones((2,), bool), 16, 16)
    with pytest.raises(ValueError, match="max_kv_blocks"):
        BlockLayout.from_mask(np.ones((2, 3), bool), 16, 16, max_kv_blocks=2)
    with pytest.raises(ValueError, match="num_k_blocks"):
        BlockLayout.from_lists(np.array([[0, 4]]), None, 16, 16, num_k_blocks=4)
    with pytest.raises(ValueError, match="num_k_blocks"):
        BlockLayout.from_lists(np.array([[0, -1]]), None, 16, 16, num_k_blocks=4)
    with pytest.raises(ValueError, match="kv_count"):
        BlockLayout.from_lists(np.array([[0, 1]]), np.array([3]), 16, 16, num_k_blocks=4)
    with pytest.raises(ValueError, match="kv_count must have shape"):
        BlockLayout.from_lists(np.array([[0, 1]]), np.array([1, 1]), 16, 16, num_k_blocks=4)
    with pytest.raises(ValueError, match="integer"):
        BlockLayout.from_lists(np.array([[0.0]]), None, 16, 16, num_k_blocks=4)
    with pytest.raises(ValueError, match="window"):
        BlockLayout.sliding_window(64, 64, 0, 16, 16)
    with pytest.raises(ValueError, match="seq_q"):
        BlockLayout.causal(0, 64, 16, 16)


def test_check_compatible_errors():
    lay = BlockLayout.from_mask(np.ones((2, 4, 4), bool), 16, 16)  # G = 2
    lay.check_compatible(3, 64, 64, 4)
    with pytest.raises(ValueError, match="query blocks"):
        lay.check_compatible(1, 65, 64, 4)
    with pytest.raises(ValueError, match="key blocks"):
        lay.check_compatible(1, 64, 48, 4)
    with pytest.raises(ValueError, match="head groups"):
        lay.check_compatible(1, 64, 64, 3)
    with pytest.raises(ValueError, match="broadcast"):
        BlockLayout.from_mask(np.ones((2, 1, 4, 4), bool), 16, 16).broadcast_batch(3)
