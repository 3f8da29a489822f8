"""SEA selection: geometry, budgets, top-k, expansion, block layout and the exact blockwise
sparse attention, each against a slow reference written here with explicit loops.

Tolerances: fp32 outputs/gradients 2e-5 absolute (inputs ~N(0,1), D <= 16); bf16 inputs
3e-2 (bf16 has 8 mantissa bits; probabilities are accumulated in fp32); float64 finite
differences via jax.test_util.check_grads at 1e-5 relative.
"""

from fractions import Fraction

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_attention import segment_rows
from x64 import enable_x64
from jax.test_util import check_grads

from sea_jax.ops import sea_select as ss
from sea_jax.ops.sea_sparse_attention import selected_attention


def random_segments(rng, B, T, *, padding=True):
    """Contiguous runs of ids 1, 2, ... with an optional padded (0) tail per row."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        n_valid = T - (rng.integers(0, T // 3 + 1) if padding else 0)
        cuts = sorted(rng.choice(np.arange(1, max(n_valid, 2)), size=min(2, max(n_valid - 1, 0)), replace=False))
        sid, prev = 1, 0
        for c in list(cuts) + [n_valid]:
            seg[b, prev:c] = sid
            sid, prev = sid + 1, c
    return seg


def ref_cell(j, L, t_m):
    """The official nearest-neighbour rule floor((j + 0.5) / L * t_m), exactly."""
    return int(Fraction(2 * j + 1, 2 * L) * t_m)


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------

def test_spans_partition_prefix_and_match_cell_rule():
    lengths = np.array(list(range(1, 41)) + [255, 256, 257, 1000])
    offsets = np.arange(1000)
    for t_m in (4, 12, 256):
        starts = np.asarray(ss.span_starts(jnp.asarray(lengths), t_m))  # [n, t_m + 1]
        cells = np.asarray(ss.cell_of_offset(jnp.asarray(offsets)[None], jnp.asarray(lengths)[:, None], t_m))
        for i, L in enumerate(lengths):
            s = starts[i]
            assert s[0] == 0 and s[-1] == L and np.all(np.diff(s) >= 0)
            for j in range(0, L, max(1, L // 50)):
                c = ref_cell(j, L, t_m)
                assert cells[i, j] == c, (L, j)
                assert s[c] <= j < s[c + 1], (L, j, c)


@pytest.mark.parametrize("causal", [True, False])
def test_row_geometry_matches_loop(causal):
    rng = np.random.default_rng(0)
    seg = random_segments(rng, 3, 23)
    start, length, offset = ss.row_geometry(jnp.asarray(seg), 3, 23, causal=causal)
    rs, rl = segment_rows(seg, causal)
    valid = seg != 0
    np.testing.assert_array_equal(np.asarray(length), rl)
    np.testing.assert_array_equal(np.asarray(start)[valid], rs[valid])
    np.testing.assert_array_equal(np.asarray(offset)[valid], (np.arange(23)[None] - rs)[valid])
    # no segments: one segment of length T
    start, length, _ = ss.row_geometry(None, 2, 7, causal=causal)
    np.testing.assert_array_equal(np.asarray(length[0]), np.arange(1, 8) if causal else np.full(7, 7))


# --------------------------------------------------------------------------------------
# budgets and top-k
# --------------------------------------------------------------------------------------

def ref_budget(L, k, t_m, H, mode):
    if L == 0:
        return 0
    heads = H if mode == "shared" else 1
    x = Fraction(heads * k * t_m, L)
    r = int(x + Fraction(1, 2))  # halves round up
    return min(max(r, 1), heads * t_m)


@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_row_budgets_match_formula(mode):
    lengths = np.array([0, 1, 2, 3, 5, 7, 8, 9, 10, 31, 64, 100, 511, 2048, 32768])
    for k, t_m, H in [(1, 4, 1), (3, 8, 2), (64, 256, 16), (5, 12, 3)]:
        got = np.asarray(ss.row_budgets(jnp.asarray(lengths), k=k, t_m=t_m, num_heads=H, mode=mode))
        want = [ref_budget(int(L), k, t_m, H, mode) for L in lengths]
        np.testing.assert_array_equal(got, want)
        # rows no longer than k are dense
        heads = H if mode == "shared" else 1
        for L, b in zip(lengths, got):
            if 0 < L <= k:
                assert b == heads * t_m


def ref_select(probs, budgets, mode):
    B, T, H, M = probs.shape
    out = np.zeros(probs.shape, bool)
    for b in range(B):
        for t in range(T):
            if mode == "shared":
                flat = probs[b, t].reshape(-1)
                order = sorted(range(H * M), key=lambda i: (-flat[i], i))
                for i in order[: budgets[b, t]]:
                    out[b, t, i // M, i % M] = True
            else:
                for h in range(H):
                    order = sorted(range(M), key=lambda i: (-probs[b, t, h, i], i))
                    out[b, t, h, order[: budgets[b, t]]] = True
    return out


@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_select_cells_matches_loop_with_ties(mode):
    rng = np.random.default_rng(1)
    B, T, H, M, k = 2, 19, 3, 8, 2
    probs = rng.integers(0, 4, size=(B, T, H, M)).astype(np.float32)  # many ties
    L = np.tile(np.arange(1, T + 1), (B, 1))
    budgets = ss.row_budgets(jnp.asarray(L), k=k, t_m=M, num_heads=H, mode=mode)
    got = np.asarray(ss.select_cells(jnp.asarray(probs), budgets, mode=mode))
    np.testing.assert_array_equal(got, ref_select(probs, np.asarray(budgets), mode))
    # the lax.top_k path (rows whose budgets are bounded) selects the same set
    tail = slice(10, T)
    cap = int(np.asarray(budgets)[:, tail].max())
    got_cap = ss.select_cells(jnp.asarray(probs[:, tail]), budgets[:, tail], mode=mode, cap=cap)
    np.testing.assert_array_equal(np.asarray(got_cap), got[:, tail])
    # the GPU radix-select kernel (interpret mode) selects the same set
    got_kernel = ss.select_cells(jnp.asarray(probs), budgets, mode=mode, method="pallas_interpret")
    np.testing.assert_array_equal(np.asarray(got_kernel), got)
    with pytest.raises(ValueError, match="method must be one of"):
        ss.select_cells(jnp.asarray(probs), budgets, mode=mode, method="radix")
    counts = got.reshape(B, T, -1).sum(-1) if mode == "shared" else got.sum(-1)
    want = np.asarray(budgets) if mode == "shared" else np.repeat(np.asarray(budgets)[..., None], H, -1)
    np.testing.assert_array_equal(counts, want)


# --------------------------------------------------------------------------------------
# expansion and block layout
# --------------------------------------------------------------------------------------

def ref_expand(sel, start, length, S):
    B, T, H, M = sel.shape
    mask = np.zeros((B, H, T, S), bool)
    for b in range(B):
        for t in range(T):
            L = length[b, t]
            for j in range(S):
                o = j - start[b, t]
                if 0 <= o < L:
                    mask[b, :, t, j] = sel[b, t, :, ref_cell(o, L, M)]
    return mask


def ref_touched(sel, start, length, S, bq, bk):
    """Per (query block, head, cell): hull over the block's rows of the cell's key span."""
    B, T, H, M = sel.shape
    nq, nk = -(-T // bq), -(-S // bk)
    touched = np.zeros((B, H, nq, nk), bool)
    for b in range(B):
        for h in range(H):
            for n in range(nq):
                for c in range(M):
                    lo, hi = None, None
                    for t in range(n * bq, min((n + 1) * bq, T)):
                        L = length[b, t]
                        keys = [start[b, t] + o for o in range(L) if ref_cell(o, L, M) == c]
                        if sel[b, t, h, c] and keys:
                            lo = keys[0] if lo is None else min(lo, keys[0])
                            hi = keys[-1] if hi is None else max(hi, keys[-1])
                    if lo is not None:
                        touched[b, h, n, lo // bk : hi // bk + 1] = True
    return touched


@functools.partial(jax.jit, static_argnames=("k", "causal", "mode"))
def _selection(seg, probs, *, k, causal, mode):
    B, T, H, M = probs.shape
    start, length, _ = ss.row_geometry(seg, B, T, causal=causal)
    budgets = ss.row_budgets(length, k=k, t_m=M, num_heads=H, mode=mode)
    return start, length, ss.select_cells(probs, budgets, mode=mode)


@functools.partial(jax.jit, static_argnames=("bq", "bk"))
def _layout_and_mask(sel, start, length, *, bq, bk):
    T = sel.shape[1]
    lay = ss.block_layout(sel, start, length, key_length=T, block_q=bq, block_k=bk)
    return lay, ss.expand_selection(sel, start, length, T)


def make_selection(seed, B, T, H, M, k, causal=True, padding=True, mode="shared"):
    rng = np.random.default_rng(seed)
    seg = random_segments(rng, B, T, padding=padding)
    probs = jnp.asarray(rng.random((B, T, H, M)), jnp.float32)
    start, length, sel = _selection(jnp.asarray(seg), probs, k=k, causal=causal, mode=mode)
    return seg, start, length, sel


@pytest.mark.parametrize("causal", [True, False])
def test_expansion_and_block_layout_match_loops(causal):
    B, T, H, M, bq, bk = 2, 21, 2, 8, 4, 8
    seg, start, length, sel = make_selection(2, B, T, H, M, k=2, causal=causal)
    lay, mask = _layout_and_mask(sel, start, length, bq=bq, bk=bk)
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask, ref_expand(np.asarray(sel), np.asarray(start), np.asarray(length), T))
    want = ref_touched(np.asarray(sel), np.asarray(start), np.asarray(length), T, bq, bk)
    np.testing.assert_array_equal(np.asarray(lay.block_mask), want)
    # every allowed key lies in a listed block; lists are increasing then padded
    idx, cnt = np.asarray(lay.kv_index), np.asarray(lay.kv_count)
    for b, h, n in np.ndindex(*cnt.shape):
        row = idx[b, h, n, : cnt[b, h, n]]
        assert np.all(np.diff(row) > 0)
        np.testing.assert_array_equal(row, np.nonzero(want[b, h, n])[0])
        rows = slice(n * bq, (n + 1) * bq)
        keys = np.nonzero(mask[b, h, rows].any(0))[0]
        assert set(keys // bk) <= set(row.tolist())
        if cnt[b, h, n]:
            assert np.all(idx[b, h, n, cnt[b, h, n] :] == row[-1])


# --------------------------------------------------------------------------------------
# exact sparse attention over the selection
# --------------------------------------------------------------------------------------

def dense_masked_attention(q, k, v, mask, scale):
    """jnp reference (for gradients): [B, H, T, S] masked softmax, GQA by repetition."""
    G = q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kr) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0)
    p = jnp.where(mask, jnp.exp(s - m), 0)
    den = p.sum(-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", p / jnp.where(den > 0, den, 1), vr)


def loop_attention(q, k, v, mask, scale):
    """Explicit softmax per (b, h, t) row over its allowed keys (float64); zeros for empty rows."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b, h, t in np.ndindex(B, H, T):
        keys = np.nonzero(mask[b, h, t])[0]
        if len(keys) == 0:
            continue
        s = np.array([q[b, t, h] @ k[b, j, h // G] for j in keys]) * scale
        p = np.exp(s - s.max())
        p /= p.sum()
        out[b, t, h] = sum(pi * v[b, j, h // G] for pi, j in zip(p, keys))
    return out


CASES = [
    # B, T, H, K, D, M, k, bq, bk, causal
    (2, 21, 2, 2, 8, 8, 2, 4, 8, True),
    (1, 33, 4, 2, 16, 8, 3, 8, 4, True),
    (2, 17, 3, 1, 8, 4, 2, 16, 16, False),
]


@pytest.mark.parametrize("case", CASES)
def test_selected_attention_matches_dense_and_loop(case):
    B, T, H, K, D, M, k, bq, bk, causal = case
    seg, start, length, sel = make_selection(3, B, T, H, M, k=k, causal=causal)
    ks = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    kk = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, D))
    w = jax.random.normal(ks[3], (B, T, H, D))
    lay, mask = _layout_and_mask(sel, start, length, bq=bq, bk=bk)
    scale = D**-0.5

    def f(q, kk, v):
        return selected_attention(q, kk, v, sel, start, length, lay.kv_index, lay.kv_count,
                                  block_q=bq, block_k=bk, scale=scale)

    @jax.jit
    def everything(q, kk, v):
        # one compile: output and gradients of the op and of the dense reference, and bf16
        loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
        ref = lambda *a: dense_masked_attention(*a, mask, scale)  # noqa: E731
        g = jax.grad(loss(f), argnums=(0, 1, 2))(q, kk, v)
        g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, kk, v)
        bf = [x.astype(jnp.bfloat16) for x in (q, kk, v)]
        return f(q, kk, v), g, g_ref, f(*bf)

    out, g, g_ref, out16 = everything(q, kk, v)
    np.testing.assert_allclose(out, loop_attention(q, kk, v, np.asarray(mask), scale), atol=2e-5)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)  # padding rows
    for a, b_ in zip(g, g_ref):
        np.testing.assert_allclose(a, b_, atol=2e-5)
    np.testing.assert_allclose(out16, out, atol=3e-2)


def test_block_granularity_attends_whole_touched_blocks():
    B, T, H, K, D, M, bq, bk = 1, 29, 2, 1, 8, 8, 8, 8
    seg, start, length, sel = make_selection(4, B, T, H, M, k=2, padding=False)
    lay, _ = _layout_and_mask(sel, start, length, bq=bq, bk=bk)
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, kk, v = (jax.random.normal(kx, (B, T, n, D)) for kx, n in zip(ks, (H, K, K)))
    out = jax.jit(lambda q, kk, v: selected_attention(
        q, kk, v, sel, start, length, lay.kv_index, lay.kv_count, block_q=bq, block_k=bk, scale=0.3,
        token_mask=False))(q, kk, v)
    bm = np.asarray(lay.block_mask)
    mask = np.zeros((B, H, T, T), bool)
    for b, h, t, j in np.ndindex(B, H, T, T):
        mask[b, h, t, j] = bm[b, h, t // bq, j // bk] and start[b, t] <= j < start[b, t] + length[b, t]
    np.testing.assert_allclose(out, loop_attention(q, kk, v, mask, 0.3), atol=2e-5)


def test_selected_attention_float64_finite_differences():
    B, T, H, K, D, M, bq, bk = 1, 11, 2, 1, 4, 4, 4, 4
    seg, start, length, sel = make_selection(5, B, T, H, M, k=1)
    lay, _ = _layout_and_mask(sel, start, length, bq=bq, bk=bk)
    with enable_x64():
        ks = jax.random.split(jax.random.PRNGKey(1), 3)
        q, kk, v = (jax.random.normal(kx, (B, T, n, D), jnp.float64) for kx, n in zip(ks, (H, K, K)))
        f = jax.jit(lambda q, kk, v: selected_attention(
            q, kk, v, sel, start, length, lay.kv_index, lay.kv_count, block_q=bq, block_k=bk, scale=0.5))
        assert f(q, kk, v).dtype == jnp.float64
        check_grads(f, (q, kk, v), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_rows_with_nothing_selected_give_zero_not_nan():
    B, T, H, K, D, M = 1, 9, 2, 2, 4, 4
    sel = jnp.zeros((B, T, H, M), bool).at[:, :, 0, :].set(True)  # head 1 selects nothing
    start, length, _ = ss.row_geometry(None, B, T, causal=True)
    lay, _ = _layout_and_mask(sel, start, length, bq=4, bk=4)
    q = jnp.ones((B, T, H, D))
    f = lambda q: selected_attention(q, q[:, :, :K], q[:, :, :K], sel, start, length,  # noqa: E731
                                     lay.kv_index, lay.kv_count, block_q=4, block_k=4, scale=1.0)
    out, g = jax.jit(lambda q: (f(q), jax.grad(lambda q: jnp.sum(f(q)))(q)))(q)
    assert np.all(np.asarray(out[:, :, 1]) == 0)
    assert np.all(np.isfinite(np.asarray(g)))


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------

def test_bad_inputs():
    L = jnp.arange(1, 5)
    with pytest.raises(ValueError, match="k must be"):
        ss.row_budgets(L, k=0, t_m=8, num_heads=2)
    with pytest.raises(ValueError, match="k must be"):
        ss.row_budgets(L, k=2.5, t_m=8, num_heads=2)
    with pytest.raises(ValueError, match="mode must be"):
        ss.row_budgets(L, k=2, t_m=8, num_heads=2, mode="query")
    with pytest.raises(ValueError, match="probs must have shape"):
        ss.select_cells(jnp.zeros((2, 3, 4)), jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="budgets must have shape"):
        ss.select_cells(jnp.zeros((2, 3, 4, 8)), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="block_q must be"):
        ss.block_layout(jnp.zeros((1, 4, 1, 4), bool), jnp.zeros((1, 4), jnp.int32),
                        jnp.ones((1, 4), jnp.int32), key_length=4, block_q=0, block_k=4)
    with pytest.raises(ValueError, match="t_m \\* sequence length"):
        ss.check_lengths(2**23, 256)
