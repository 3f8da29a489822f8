"""Pallas Mosaic TPU block-sparse attention (kernels/tpu_block_sparse.py) in interpret mode on CPU.

Every case runs the TPU kernels through the public entry point
(``block_sparse_attention(..., impl="pallas_tpu", interpret=...)``) and compares them with

* the XLA reference (``impl="xla"``, kernels/reference.py), forward and autodiff gradients;
* an independent dense oracle written here: the explicit T x T masked, weighted softmax in
  float64 (tokens allowed = the layout's blocks expanded to tokens & causal & window &
  segments), and its float64 autodiff gradients.

Layout families: causal, sliding window, dense (non-causal, Sq != Skv), random per-head and
per-KV-head top-k (batch-specific), top-k | window union, layouts with empty rows.
Dtypes: float32 (forward and gradients), bfloat16 (forward and gradients), float16 (forward).
Shapes are tiny (the interpreter is slow) but awkward: sequence tails, GQA and MQA, head
dims 64 and 128, block_q 32/64, block_k 128/256. One case runs under
``pltpu.InterpretParams`` (simulated VMEM/SMEM/DMA, 2 cores) with the race detector on.

Tolerances (max abs error divided by max(1, max |oracle|)): float32 forward 1e-5 vs the
XLA reference and 2e-5 vs the float64 oracle, float32 gradients 2e-4; bfloat16 forward
3e-2 and gradients 6e-2 (inputs are rounded to bf16 and P is cast to bf16 for the PV
matmul, as in every flash kernel); float16 (computed in float32 on TPU) 2e-3.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from sea_jax.kernels import BlockLayout, block_sparse_attention
from sea_jax.kernels.tpu_block_sparse import check_tpu_tiling, compact_table
from x64 import enable_x64


# ------------------------------------------------------------------------------ oracle
def dense_oracle(q, k, v, allowed, weights, weight_mode, scale):
    """Explicit T x T weighted masked softmax attention, computed in q's dtype (float64 in
    the tests).

    q: [B, Sq, H, D]; k, v: [B, Skv, K, D]; allowed: bool [B, H, Sq, Skv];
    weights: [B, H, Sq, Skv] (weight of key s for query t); "gate": o = sum e w v / sum e,
    "log": o = sum e w v / sum e w. Rows with a zero normaliser give 0.
    """
    H, K = q.shape[2], k.shape[2]
    kk = jnp.repeat(k, H // K, axis=2)
    vv = jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    m = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, s, -jnp.inf), -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - m, 0.0)), 0.0)
    den = jnp.sum(e * weights if weight_mode == "log" else e, -1, keepdims=True)
    num = jnp.einsum("bhqk,bkhd->bqhd", e * weights, vv)
    den = jnp.moveaxis(den, 1, 2)  # [B, Sq, H, 1]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def token_allowed(layout, B, Sq, Skv, H, causal, window, segment_ids):
    """bool [B, H, Sq, Skv] from a block layout plus token-level masks (NumPy)."""
    bm = np.asarray(layout.broadcast_batch(B).block_mask())  # [B, G, nq, nk]
    G = bm.shape[1]
    bm = bm[:, np.arange(H) // (H // G)]  # [B, H, nq, nk]
    tok = np.repeat(np.repeat(bm, layout.block_q, 2), layout.block_k, 3)[:, :, :Sq, :Skv]
    t = np.arange(Sq)[:, None]
    s = np.arange(Skv)[None, :]
    ok = np.ones((Sq, Skv), bool)
    if causal:
        ok &= s <= t
    if window is not None:
        ok &= s > t - window
    tok = tok & ok
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        tok = tok & same[:, None]
    return tok


def key_weight_matrix(key_weights, B, Sq, Skv, H, K):
    """[B, H, Sq, Skv] weights from per-key weights [B, Skv, K] (ones when None)."""
    if key_weights is None:
        return np.ones((B, H, Sq, Skv))
    w = np.asarray(key_weights, np.float64)[:, :, np.arange(H) // (H // K)]  # [B, Skv, H]
    return np.broadcast_to(np.moveaxis(w, 1, 2)[:, :, None, :], (B, H, Sq, Skv))


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------- cases
def random_topk_mask(rng, B, G, nq, nk, block_q, block_k, p=0.5, causal=True):
    """Random block mask [B, G, nq, nk]: each query block keeps its diagonal block and
    each causally visible key block with probability p."""
    qlast = (np.arange(nq) + 1) * block_q - 1
    visible = (np.arange(nk)[None, :] * block_k <= qlast[:, None]) if causal else np.ones((nq, nk), bool)
    m = (rng.random((B, G, nq, nk)) < p) & visible
    diag = np.minimum(qlast // block_k, nk - 1)
    m[..., np.arange(nq), diag] = True
    return m


def make_case(name, dtype=jnp.float32):
    """Returns (q, k, v, layout, kwargs) for a named case."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    key_weights = segment_ids = None
    kw = dict(causal=True, window=None, weight_mode="gate")
    if name == "causal":
        B, Sq, Skv, H, K, D, bq, bk = 1, 300, 300, 4, 2, 64, 64, 128
        layout = BlockLayout.causal(Sq, Skv, bq, bk)
    elif name == "window":  # MQA, window of 100 tokens
        B, Sq, Skv, H, K, D, bq, bk = 1, 384, 384, 2, 1, 64, 32, 128
        kw["window"] = 100
        layout = BlockLayout.sliding_window(Sq, Skv, 100, bq, bk)
    elif name == "dense_cross":  # non-causal, Sq != Skv, key tail, D = 128, block_k 256
        B, Sq, Skv, H, K, D, bq, bk = 2, 200, 330, 2, 2, 128, 64, 256
        kw["causal"] = False
        layout = BlockLayout.dense(Sq, Skv, bq, bk)
    elif name == "topk_per_head":  # batch-specific, one pattern per query head, gate weights
        B, Sq, Skv, H, K, D, bq, bk = 2, 320, 320, 4, 2, 64, 32, 128
        nq, nk = -(-Sq // bq), -(-Skv // bk)
        layout = BlockLayout.from_mask(random_topk_mask(rng, B, H, nq, nk, bq, bk), bq, bk)
        key_weights = rng.uniform(0.0, 1.5, (B, Skv, K))
    elif name == "union_segments":  # per-KV-head top-k | window, segments, log weights
        B, Sq, Skv, H, K, D, bq, bk = 1, 352, 352, 4, 2, 64, 32, 128
        nq, nk = -(-Sq // bq), -(-Skv // bk)
        topk = BlockLayout.from_mask(random_topk_mask(rng, B, K, nq, nk, bq, bk, p=0.3), bq, bk)
        win = BlockLayout.sliding_window(Sq, Skv, 64, bq, bk)
        layout = topk | BlockLayout.from_mask(
            jnp.broadcast_to(win.block_mask(), (B, K, nq, nk)), bq, bk)
        kw.update(window=None, weight_mode="log")
        key_weights = rng.uniform(0.0, 1.5, (B, Skv, K))
        key_weights[0, 5:20, 0] = 0.0  # exact zeros are allowed in "log" mode
        segment_ids = np.ones((B, Sq), np.int32)
        segment_ids[:, 150:] = 2
        segment_ids[:, 330:] = 0  # padding tail
    elif name == "empty_rows":  # some query blocks attend nothing; padding segment
        B, Sq, Skv, H, K, D, bq, bk = 1, 256, 256, 2, 1, 64, 64, 128
        m = np.zeros((4, 2), bool)
        m[1, 0] = m[3, 0] = m[3, 1] = True
        layout = BlockLayout.from_mask(m, bq, bk)
        segment_ids = np.ones((B, Sq), np.int32)
        segment_ids[:, 200:] = 0
    else:
        raise KeyError(name)
    q = rng.standard_normal((B, Sq, H, D))
    k = rng.standard_normal((B, Skv, K, D))
    v = rng.standard_normal((B, Skv, K, D))
    cast = lambda x: jnp.asarray(x, dtype)
    kw["key_weights"] = None if key_weights is None else jnp.asarray(key_weights, jnp.float32)
    kw["segment_ids"] = None if segment_ids is None else jnp.asarray(segment_ids)
    return cast(q), cast(k), cast(v), layout, kw


def oracle_fn(q, k, v, layout, kw):
    """The float64 dense oracle as a function of (q, k, v, key_weights) (x64 must be on)."""
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    allowed = token_allowed(layout, B, Sq, Skv, H, kw["causal"], kw["window"], kw["segment_ids"])

    def f(q, k, v, w):
        if w is None:
            wm = jnp.ones((B, H, Sq, Skv), jnp.float64)
        else:
            wm = jnp.moveaxis(w[:, :, jnp.arange(H) // (H // K)], 1, 2)[:, :, None, :]
            wm = jnp.broadcast_to(wm, (B, H, Sq, Skv))
        return dense_oracle(q, k, v, allowed, wm, kw["weight_mode"], D ** -0.5)

    return f


def run_impl(impl, q, k, v, layout, kw, *, grads, interpret=True):
    """Output and (optionally) gradients of sum(out * cotangent) in q, k, v, key_weights."""
    weights = kw["key_weights"]
    rest = {n: kw[n] for n in ("causal", "window", "weight_mode", "segment_ids")}

    def f(q, k, v, w):
        return block_sparse_attention(q, k, v, layout, key_weights=w, impl=impl,
                                      interpret=interpret, **rest)

    if not grads:
        return jax.jit(f)(q, k, v, weights), None
    ct = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), q.dtype)

    @jax.jit
    def fg(q, k, v, w):
        out, vjp = jax.vjp(f, q, k, v, w)
        return out, vjp(ct)

    out, g = fg(q, k, v, weights)
    return out, g, ct


def oracle_out_and_grads(q, k, v, layout, kw, ct=None):
    with enable_x64():
        f = oracle_fn(q, k, v, layout, kw)
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        w = None if kw["key_weights"] is None else jnp.asarray(np.asarray(kw["key_weights"], np.float64))
        if ct is None:
            return np.asarray(f(*args, w)), None
        out, vjp = jax.vjp(f, *args, w)
        g = vjp(jnp.asarray(np.asarray(ct, np.float64)))
        return np.asarray(out), [None if x is None else np.asarray(x) for x in g]


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["causal", "window", "empty_rows"])
def test_forward_float32_matches_reference_and_oracle(name):
    q, k, v, layout, kw = make_case(name)
    out, _ = run_impl("pallas_tpu", q, k, v, layout, kw, grads=False)
    ref, _ = run_impl("xla", q, k, v, layout, kw, grads=False)
    oracle, _ = oracle_out_and_grads(q, k, v, layout, kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, oracle) < 2e-5
    if name == "empty_rows":  # query blocks 0 and 2 see nothing; padding queries neither
        o = np.asarray(out)
        assert np.all(o[:, :64] == 0) and np.all(o[:, 128:192] == 0) and np.all(o[:, 200:] == 0)
        assert np.abs(o[:, 64:128]).max() > 0


@pytest.mark.parametrize("name", ["topk_per_head", "union_segments", "dense_cross"])
def test_gradients_float32(name):
    """Forward and dq, dk, dv, d(key_weights) against the float64 oracle's autodiff; the
    first case also against the XLA reference's autodiff (both references agree, so one
    comparison with the slower XLA reference is enough to tie the backends together)."""
    q, k, v, layout, kw = make_case(name)
    out, g, ct = run_impl("pallas_tpu", q, k, v, layout, kw, grads=True)
    oracle, g_or = oracle_out_and_grads(q, k, v, layout, kw, ct)
    assert rel_err(out, oracle) < 2e-5
    g_ref = [None] * 4
    if name == "topk_per_head":
        ref, g_ref, _ = run_impl("xla", q, k, v, layout, kw, grads=True)
        assert rel_err(out, ref) < 1e-5
    for label, a, b, c in zip(("dq", "dk", "dv", "dw"), g, g_ref, g_or):
        if c is None:
            assert a is None
            continue
        assert np.all(np.isfinite(np.asarray(a))), label
        assert rel_err(a, c) < 2e-4, (label, rel_err(a, c))
        if b is not None:
            assert rel_err(a, b) < 2e-4, (label, rel_err(a, b))
    if kw["key_weights"] is not None:  # the weight gradient is not trivially zero
        assert np.abs(np.asarray(g[3])).max() > 1e-3


def test_bfloat16_forward_and_gradients():
    q, k, v, layout, kw = make_case("topk_per_head", jnp.bfloat16)
    out, g, ct = run_impl("pallas_tpu", q, k, v, layout, kw, grads=True)
    assert out.dtype == jnp.bfloat16 and g[0].dtype == jnp.bfloat16
    oracle, g_or = oracle_out_and_grads(q, k, v, layout, kw, ct)
    assert rel_err(out, oracle) < 3e-2
    for label, a, c in zip(("dq", "dk", "dv", "dw"), g, g_or):
        assert rel_err(a, c) < 6e-2, (label, rel_err(a, c))


def test_float16_forward_computed_in_float32():
    q, k, v, layout, kw = make_case("causal", jnp.float16)
    out, _ = run_impl("pallas_tpu", q, k, v, layout, kw, grads=False)
    assert out.dtype == jnp.float16
    oracle, _ = oracle_out_and_grads(q, k, v, layout, kw)
    assert rel_err(out, oracle) < 2e-3


class _RaceLog:
    """Collects the race detector state of every kernel interpreted (the interpreter
    creates a fresh state per pallas_call and keeps only the last one)."""

    def __init__(self, monkeypatch):
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

        self.states = []
        base = ipc.RaceDetectionState
        log = self.states

        class Recording(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                log.append(self)

        monkeypatch.setattr(ipc, "RaceDetectionState", Recording)

    @property
    def races_found(self):
        return any(s.races_found for s in self.states)


def test_tpu_interpret_mode_with_race_detection(monkeypatch):
    """Simulated TPU (HBM/VMEM/SMEM, DMAs, 2 cores splitting the parallel grid axes) with the
    race detector: forward, dQ and dK/dV/dw kernels agree with the reference, no races."""
    races = _RaceLog(monkeypatch)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v, layout, kw = make_case("topk_per_head")
    # trim to one batch row, 2 query heads of 1 KV head and 160 tokens (3 x 2 blocks) to
    # keep the simulation short; the layout keeps 2 head groups and a key-block tail
    q, k, v = q[:1, :160, :2], k[:1, :160, :1], v[:1, :160, :1]
    layout = BlockLayout.from_mask(layout.block_mask()[:1, :2, :5, :2], 32, 128)
    kw["key_weights"] = kw["key_weights"][:1, :160, :1]
    out, g, ct = run_impl("pallas_tpu", q, k, v, layout, kw, grads=True, interpret=params)
    oracle, g_or = oracle_out_and_grads(q, k, v, layout, kw, ct)
    assert len(races.states) >= 3, "the race detector did not run"
    assert not races.races_found
    assert rel_err(out, oracle) < 2e-5
    for a, c in zip(g, g_or):
        assert rel_err(a, c) < 2e-4


def test_race_detector_catches_a_race(monkeypatch):
    """The harness above can fail: two cores writing one output block is reported."""
    from jax.experimental import pallas as pl

    races = _RaceLog(monkeypatch)

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    x = jnp.zeros((2, 8, 128), jnp.float32)
    pl.pallas_call(
        kernel, grid=(2,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),  # both grid points: same block
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
    )(x).block_until_ready()
    assert races.races_found


# ----------------------------------------------------------------------- bad inputs
def _qkv(S=256, H=2, K=1, D=64, dtype=jnp.float32):
    z = lambda *s: jnp.zeros(s, dtype)
    return z(1, S, H, D), z(1, S, K, D), z(1, S, K, D)


@pytest.mark.parametrize(
    "block_q, block_k, D, dtype, match",
    [
        (64, 64, 64, jnp.float32, "block_k must be a multiple of 128"),
        (64, 32, 64, jnp.float32, "block_k must be a multiple of 128"),
        (64, 128, 32, jnp.float32, "head_dim must be 64 or a multiple of 128"),
        (64, 128, 96, jnp.bfloat16, "head_dim must be 64 or a multiple of 128"),
        (2048, 2048, 128, jnp.float32, "VMEM"),
    ],
)
def test_bad_tpu_block_shapes_raise_before_lowering(block_q, block_k, D, dtype, match):
    # interpret=False: on this CPU machine lowering for TPU would fail with a different
    # error, so the ValueError proves the check runs before anything is lowered
    q, k, v = _qkv(S=256, D=D, dtype=dtype)
    layout = BlockLayout.causal(256, 256, block_q, block_k)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, layout, impl="pallas_tpu", interpret=False)


def test_tiling_check_sublanes_depend_on_dtype():
    check_tpu_tiling(block_q=16, block_k=128, head_dim=64, dtype=jnp.bfloat16, what="t")
    check_tpu_tiling(block_q=8, block_k=128, head_dim=128, dtype=jnp.float32, what="t")
    with pytest.raises(ValueError, match="block_q must be a multiple of 16 for bfloat16"):
        check_tpu_tiling(block_q=8, block_k=128, head_dim=64, dtype=jnp.bfloat16, what="t")


def test_bad_interpret_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="interpret must be a bool or a pltpu.InterpretParams"):
        block_sparse_attention(q, k, v, BlockLayout.causal(256, 256, 64, 128),
                               impl="pallas_tpu", interpret="yes")


def test_compact_table_downcasts_to_fit_smem():
    x = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    assert compact_table(x, 127).dtype == jnp.int8
    assert compact_table(x, 128).dtype == jnp.int16
    assert compact_table(x, 2**15).dtype == jnp.int32
    np.testing.assert_array_equal(compact_table(x, 11), np.arange(12))
