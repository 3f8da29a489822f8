"""sea_jax.kernels.gpu_block_lists: every block's sorted rank list in one pass, against the XLA
path it replaces on the GPU (the carries' merge scan + the lists' sort) and numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sea_jax.kernels.gpu_block_lists import NEVER, block_lists
from sea_jax.ops import sparsek_select_fast as fast
from sea_jax.ops.sparsek_select import causal_prefix_select
from sea_jax.ops.sparsek_select_fast import EMPTY, kernel_block_lists, prefix_ranks, sorted_block_lists

ON_GPU = jax.default_backend() == "gpu"


def _entries(rng, rows, num_keys, nq, bq, frac):
    """entry [rows, num_keys] and enter_ranks [nQ, rows, Bq]: a random share ``frac`` of the
    ranks enters, each at its own random query (the others never)."""
    T = nq * bq
    entry = np.full((rows, num_keys), NEVER, np.int64)
    ent = np.full((rows, T), EMPTY, np.int64)
    for r in range(rows):
        n = int(frac * min(num_keys, T))
        ranks, when = rng.choice(num_keys, n, replace=False), rng.choice(T, n, replace=False)
        entry[r, ranks], ent[r, when] = when, ranks
    ent = np.moveaxis(ent.reshape(rows, nq, bq), 1, 0)
    return jnp.asarray(entry, jnp.int32), jnp.asarray(ent, jnp.int32)


def _numpy_lists(entry, ent, c):
    """The definition, written out: per block, the c best ranks entered before it plus the ranks
    entering in it, ascending, EMPTY-padded; the (c + 1)-th best entered before it; and per
    query the list index of the rank entering at it (c + bq where none does)."""
    entry, ent = np.asarray(entry, np.int64), np.asarray(ent)
    nq, rows, bq = ent.shape
    lists = np.full((nq, rows, c + bq), EMPTY, np.int64)
    ev = np.full((nq, rows), EMPTY, np.int64)
    spos = np.full((nq, rows, bq), c + bq, np.int64)
    for q in range(nq):
        for r in range(rows):
            old = np.flatnonzero(entry[r] < q * bq)  # ranks ascending
            new = np.flatnonzero((entry[r] >= q * bq) & (entry[r] < (q + 1) * bq))
            keep = np.sort(np.concatenate([old[:c], new]))
            lists[q, r, :len(keep)] = keep
            if len(old) > c:
                ev[q, r] = old[c]
            index = {int(x): i for i, x in enumerate(keep)}
            for t in range(bq):
                if ent[q, r, t] != EMPTY:
                    spos[q, r, t] = index[int(ent[q, r, t])]
    return lists, ev, spos


CASES = [
    # rows, num_keys, nQ, Bq, C, share of ranks entering, chunk
    (2, 300, 5, 64, 32, 0.9, 64),
    (2, 800, 6, 100, 200, 0.5, 64),      # a block that is not a power of two; fewer than C early on
    (1, 64, 4, 16, 1, 1.0, 16),          # C = 1
    (2, 700, 6, 32, 500, 1.0, 128),      # C longer than most prefixes (EMPTY tails, no ev)
    (2, 2000, 4, 128, 64, 0.3, 256),     # most ranks never enter
]


@pytest.mark.parametrize("rows,num_keys,nq,bq,c,frac,chunk", CASES)
def test_block_lists_against_merge_path_and_numpy(rows, num_keys, nq, bq, c, frac, chunk):
    rng = np.random.default_rng(num_keys + c)
    entry, ent = _entries(rng, rows, num_keys, nq, bq, frac)
    lists, ev, spos = block_lists(entry, ent, c, chunk=chunk, interpret=True)
    want_lists, want_ev, want_spos = _numpy_lists(entry, ent, c)
    np.testing.assert_array_equal(np.asarray(lists), want_lists)
    np.testing.assert_array_equal(np.asarray(ev), want_ev)
    np.testing.assert_array_equal(np.asarray(spos), want_spos)
    # the XLA path it replaces: carries by the merge scan, then the lists' sort
    carry, ev_x = prefix_ranks(ent, c)
    np.testing.assert_array_equal(np.asarray(lists), np.asarray(sorted_block_lists(carry, ent, num_keys)))
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(ev_x))


def test_kernel_block_lists_from_enter_ranks_keeps_lead_axes():
    """kernel_block_lists builds the entry times itself and keeps the [nQ, B, K, ...] axes."""
    rng = np.random.default_rng(7)
    nq, B, K, bq, N, c = 5, 2, 3, 16, 90, 24
    ent = np.full((B, K, nq * bq), EMPTY, np.int64)
    for b in range(B):
        for h in range(K):
            n = 70
            ent[b, h, rng.choice(nq * bq, n, replace=False)] = rng.choice(N, n, replace=False)
    ent = jnp.asarray(np.moveaxis(ent.reshape(B, K, nq, bq), 2, 0), jnp.int32)
    lists, ev, spos = kernel_block_lists(ent, c, N, interpret=True, chunk=32)
    carry, ev_x = prefix_ranks(ent, c)
    assert lists.shape == (nq, B, K, c + bq) and ev.shape == (nq, B, K) and spos.shape == (nq, B, K, bq)
    flat = lambda a: np.moveaxis(np.asarray(a), 0, 2).reshape(B * K, nq, -1).swapaxes(0, 1)  # noqa: E731
    entry = np.full((B * K, N), NEVER, np.int64)
    when = np.arange(nq * bq).reshape(nq, bq)
    for q in range(nq):
        for r in range(B * K):
            e = flat(ent)[q, r]
            entry[r, e[e != EMPTY]] = when[q, e != EMPTY]
    np.testing.assert_array_equal(flat(spos), _numpy_lists(entry, flat(ent), c)[2])
    np.testing.assert_array_equal(np.asarray(lists), np.asarray(sorted_block_lists(carry, ent, N)))
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(ev_x))


@pytest.mark.parametrize("segments", [False, True])
def test_fused_selection_same_with_either_block_lists(monkeypatch, segments):
    """The fused schedule (kernel path, interpret mode) selects the same with the one-pass lists
    (and their entering ranks' list indices) as with the merge scan + sort (and binary searches),
    with or without segments (without, each query's run range is not searched either)."""
    u = jax.random.normal(jax.random.key(3), (1, 150, 2), jnp.float32)
    seg = jnp.asarray(np.repeat([1, 2, 0], [70, 60, 20])[None], jnp.int32) if segments else None
    sel = functools.partial(causal_prefix_select, k=12, window=5, block_q=16, schedule="fused", interpret=True,
                            factored=True, segment_ids=seg)
    a = jax.jit(lambda u: sel(u))(u)
    monkeypatch.setattr(fast, "KERNEL_BLOCK_LISTS", False)
    b = jax.jit(lambda u: sel(u))(u)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_block_lists_empty_and_bad_inputs():
    lists, ev, spos = block_lists(jnp.zeros((0, 8), jnp.int32), jnp.zeros((3, 0, 16), jnp.int32), 4, interpret=True)
    assert lists.shape == (3, 0, 20) and ev.shape == (3, 0) and spos.shape == (3, 0, 16)
    entry, ent = jnp.zeros((2, 8), jnp.int32), jnp.zeros((3, 2, 16), jnp.int32)
    with pytest.raises(ValueError, match="same R"):
        block_lists(entry, jnp.zeros((3, 4, 16), jnp.int32), 4, interpret=True)
    with pytest.raises(ValueError, match="int32"):
        block_lists(entry.astype(jnp.float32), ent, 4, interpret=True)
    with pytest.raises(ValueError, match="c must be"):
        block_lists(entry, ent, 0, interpret=True)
    with pytest.raises(ValueError, match="chunk must be"):
        block_lists(entry, ent, 4, chunk=48, interpret=True)


def test_block_lists_lowers_for_an_h100():
    """The Triton lowering on the CPU machine, for an abstract H100 (the layer's sizes)."""
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    sds = jax.ShapeDtypeStruct
    f = jax.jit(functools.partial(block_lists, c=2048))
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        text = f.trace(sds((16, 32768), jnp.int32), sds((256, 16, 128), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "sparsek_block_lists" in text


@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernel needs a GPU (interpret mode covers it on CPU)")
@pytest.mark.parametrize("chunk,num_warps", [(512, 4), (256, 8)])
def test_compiled_block_lists_on_gpu(chunk, num_warps):
    rng = np.random.default_rng(chunk)
    entry, ent = _entries(rng, 4, 6000, 40, 128, 0.8)
    lists, ev, spos = jax.jit(functools.partial(block_lists, c=1024, chunk=chunk, num_warps=num_warps))(entry, ent)
    carry, ev_x = prefix_ranks(ent, 1024, merge="pallas")
    np.testing.assert_array_equal(np.asarray(spos), _numpy_lists(entry, ent, 1024)[2])
    np.testing.assert_array_equal(np.asarray(lists), np.asarray(sorted_block_lists(carry, ent, 6000)))
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(ev_x))
