"""Pallas Mosaic TPU gathered attention (kernels/tpu_gathered.py) in interpret mode on CPU.

The kernels run through the public entry point (``gathered_attention(..., impl="pallas_tpu",
interpret=...)``) and are compared with the XLA reference (``impl="xla"``) and with an
independent dense oracle written here: the explicit T x T weighted masked softmax in
float64, whose (query, key) weights come from scattering the slots each query uses (plus the
sliding window with weight 1), with float64 autodiff gradients.

Selections are built like SparseK's: every query picks a few keys among those it may see,
``union_index`` is the union over the query block (sorted, -1 padded), ``selection_mask``
marks which slots each query picked, ``selection_weights`` are random (with exact zeros).
Cases: GQA without window ("gate"), MQA with a window, segments and "log" weights,
non-causal cross attention with empty slots and more than one 128-slot chunk (D = 128),
bfloat16 forward and gradients, TPU interpret mode with the race detector.

Tolerances (max abs error / max(1, max |oracle|)): float32 forward 2e-5, gradients 2e-4;
bfloat16 forward 3e-2, gradients 6e-2.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from sea_jax.kernels import gathered_attention
from x64 import enable_x64


def dense_oracle(q, k, v, allowed, weights, weight_mode, scale):
    """Explicit T x T weighted masked softmax (see test_tpu_block_sparse.py): q [B,Sq,H,D],
    k/v [B,Skv,K,D], allowed / weights [B,H,Sq,Skv]; rows with a zero normaliser give 0."""
    H, K = q.shape[2], k.shape[2]
    kk = jnp.repeat(k, H // K, axis=2)
    vv = jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    m = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, s, -jnp.inf), -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - m, 0.0)), 0.0)
    den = jnp.sum(e * weights if weight_mode == "log" else e, -1, keepdims=True)
    num = jnp.einsum("bhqk,bkhd->bqhd", e * weights, vv)
    den = jnp.moveaxis(den, 1, 2)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------- cases
def make_selection(rng, B, K, Sq, Skv, block_q, n_select, window, causal, n_empty=0):
    """SparseK-like selection. Returns union_index int32 [B, K, nq, U] (-1 padded, n_empty
    extra empty slots) and selection_mask bool [B, K, Sq, U]."""
    nq = -(-Sq // block_q)
    picks = np.zeros((B, K, Sq, Skv), bool)
    for b, h, t in np.ndindex(B, K, Sq):
        hi = (t - window if window > 0 else t) if causal else Skv - 1
        if hi < 0:
            continue
        cand = np.arange(min(hi, Skv - 1) + 1)
        picks[b, h, t, rng.choice(cand, min(n_select, cand.size), replace=False)] = True
    unions = [[np.nonzero(picks[b, h, i * block_q:(i + 1) * block_q].any(0))[0]
               for i in range(nq)] for b in range(B) for h in range(K)]
    U = max(len(u) for row in unions for u in row) + n_empty
    idx = -np.ones((B, K, nq, U), np.int32)
    for n, row in enumerate(unions):
        b, h = divmod(n, K)
        for i, u in enumerate(row):
            idx[b, h, i, :len(u)] = rng.permutation(u)  # any order is allowed
    safe = np.maximum(idx, 0)
    qblock = np.arange(Sq) // block_q
    sel = np.take_along_axis(picks, np.repeat(safe, block_q, axis=2)[:, :, :Sq], axis=3)
    sel &= np.repeat(idx >= 0, block_q, axis=2)[:, :, :Sq]
    assert sel.shape == (B, K, Sq, U) and qblock.size == Sq
    return idx, sel


def make_case(name, dtype=jnp.float32):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    kw = dict(window=0, weight_mode="gate", causal=True, segment_ids=None,
              selection_weights=None, selection_mask=None)
    if name == "gate_gqa":
        B, Sq, Skv, H, K, D, bq, nsel = 1, 200, 200, 4, 2, 64, 32, 3
    elif name == "window_log_segments":
        B, Sq, Skv, H, K, D, bq, nsel = 1, 256, 256, 2, 1, 64, 32, 3
        kw.update(window=40, weight_mode="log")
        seg = np.ones((B, Sq), np.int32)
        seg[:, 100:] = 2
        seg[:, 240:] = 0
        kw["segment_ids"] = jnp.asarray(seg)
    elif name == "noncausal_cross":
        B, Sq, Skv, H, K, D, bq, nsel = 2, 96, 300, 2, 2, 128, 32, 5
        kw["causal"] = False
    else:
        raise KeyError(name)
    idx, sel = make_selection(rng, B, K, Sq, Skv, bq, nsel, kw["window"], kw["causal"],
                              n_empty=3 if name == "noncausal_cross" else 0)
    if name == "noncausal_cross":
        # more than one 128-slot chunk, default mask (all non-empty slots), no weights
        pad = -np.ones(idx.shape[:3] + (140 - idx.shape[3],), np.int32)
        idx = np.concatenate([idx, pad], axis=3)
    else:
        w = rng.uniform(0.0, 1.5, sel.shape).astype(np.float32)
        w[..., ::7] = 0.0
        kw["selection_mask"] = jnp.asarray(sel)
        kw["selection_weights"] = jnp.asarray(w)
    kw["block_q"] = bq
    q = rng.standard_normal((B, Sq, H, D))
    k = rng.standard_normal((B, Skv, K, D))
    v = rng.standard_normal((B, Skv, K, D))
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(idx), kw


def token_tables(q, k, idx, kw):
    """allowed bool [B, H, Sq, Skv] and the slot weights as a 0/1 selector: returns
    (allowed_slots [B,K,Sq,U] bool, allowed_window [B,K,Sq,Skv] bool, key of slot [B,K,nq,U])."""
    B, Sq, H, _ = q.shape
    Skv, K = k.shape[1], k.shape[2]
    bq, W = kw["block_q"], kw["window"]
    idx = np.asarray(idx)
    U = idx.shape[3]
    t = np.arange(Sq)
    key = np.repeat(idx, bq, axis=2)[:, :, :Sq]  # [B, K, Sq, U]
    use = key >= 0
    if kw["causal"]:
        use &= key <= (t - W if W > 0 else t)[None, None, :, None]
    if kw["selection_mask"] is not None:
        use &= np.asarray(kw["selection_mask"])
    s = np.arange(Skv)
    win = np.zeros((Sq, Skv), bool)
    if W > 0:
        win = (s[None] <= t[:, None]) & (s[None] > t[:, None] - W)
    win = np.broadcast_to(win, (B, K, Sq, Skv)).copy()
    if kw["segment_ids"] is not None:
        seg = np.asarray(kw["segment_ids"])
        segk = np.take_along_axis(np.broadcast_to(seg[:, None, None, :], (B, K, Sq, Skv)),
                                  np.maximum(key, 0), axis=3)
        use &= (segk == seg[:, None, :, None]) & (segk != 0)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        win &= same[:, None]
    assert use.shape == (B, K, Sq, U)
    return use, win, key


def oracle_fn(q, k, idx, kw):
    """float64 dense oracle as a function of (q, k, v, selection_weights); x64 must be on."""
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    use, win, key = token_tables(q, k, idx, kw)
    U = key.shape[3]
    # scatter matrix: onehot[b, h, t, u, s] = slot u of query t is used and holds key s
    onehot = (np.maximum(key, 0)[..., None] == np.arange(Skv)) & use[..., None]
    assert onehot.sum(3).max(initial=0) <= 1, "union rows must hold distinct keys"
    heads = np.arange(H) // (H // K)
    allowed = (onehot.any(3) | win)[:, heads]

    def f(q, k, v, w):
        wslot = jnp.ones((B, K, Sq, U), jnp.float64) if w is None else w
        wtok = jnp.einsum("bktu,bktus->bkts", wslot, onehot.astype(np.float64)) + win
        return dense_oracle(q, k, v, allowed, wtok[:, heads], kw["weight_mode"], D ** -0.5)

    return f


def run_impl(impl, q, k, v, idx, kw, *, grads, interpret=True):
    rest = {n: x for n, x in kw.items() if n != "selection_weights"}

    def f(q, k, v, w):
        return gathered_attention(q, k, v, idx, selection_weights=w, impl=impl,
                                  interpret=interpret, **rest)

    w = kw["selection_weights"]
    if not grads:
        return jax.jit(f)(q, k, v, w), None, None
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), q.dtype)

    @jax.jit
    def fg(q, k, v, w):
        out, vjp = jax.vjp(f, q, k, v, w)
        return out, vjp(ct)

    out, g = fg(q, k, v, w)
    return out, g, ct


def oracle_out_and_grads(q, k, v, idx, kw, ct=None):
    with enable_x64():
        f = oracle_fn(q, k, idx, kw)
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        w = kw["selection_weights"]
        w = None if w is None else jnp.asarray(np.asarray(w, np.float64))
        if ct is None:
            return np.asarray(f(*args, w)), None
        out, vjp = jax.vjp(f, *args, w)
        g = vjp(jnp.asarray(np.asarray(ct, np.float64)))
        return np.asarray(out), [None if x is None else np.asarray(x) for x in g]


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["gate_gqa", "window_log_segments", "noncausal_cross"])
def test_forward_and_gradients_float32(name):
    q, k, v, idx, kw = make_case(name)
    out, g, ct = run_impl("pallas_tpu", q, k, v, idx, kw, grads=True)
    oracle, g_or = oracle_out_and_grads(q, k, v, idx, kw, ct)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, oracle) < 2e-5
    g_ref = [None] * 4
    if name == "window_log_segments":  # also tie to the XLA reference (fwd + autodiff)
        ref, g_ref, _ = run_impl("xla", q, k, v, idx, kw, grads=True)
        assert rel_err(out, ref) < 1e-5
    else:
        ref, _, _ = run_impl("xla", q, k, v, idx, kw, grads=False)
        assert rel_err(out, ref) < 1e-5
    for label, a, b, c in zip(("dq", "dk", "dv", "dw"), g, g_ref, g_or):
        if c is None:
            assert a is None
            continue
        assert np.all(np.isfinite(np.asarray(a))), label
        assert rel_err(a, c) < 2e-4, (label, rel_err(a, c))
        if b is not None:
            assert rel_err(a, b) < 2e-4, (label, rel_err(a, b))
    if kw["selection_weights"] is not None:
        assert np.abs(np.asarray(g[3])).max() > 1e-3
    if kw["segment_ids"] is not None:  # padding queries give exact zeros
        assert np.all(np.asarray(out)[:, 240:] == 0)


def test_bfloat16_forward_and_gradients():
    q, k, v, idx, kw = make_case("gate_gqa", jnp.bfloat16)
    out, g, ct = run_impl("pallas_tpu", q, k, v, idx, kw, grads=True)
    assert out.dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    oracle, g_or = oracle_out_and_grads(q, k, v, idx, kw, ct)
    assert rel_err(out, oracle) < 3e-2
    for label, a, c in zip(("dq", "dk", "dv", "dw"), g, g_or):
        assert rel_err(a, c) < 6e-2, (label, rel_err(a, c))


def test_tpu_interpret_mode_with_race_detection(monkeypatch):
    """Simulated TPU with 2 cores and the race detector: forward, fused backward and window
    dK/dV kernels agree with the oracle and no race is reported."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    states = []
    base = ipc.RaceDetectionState

    class Recording(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            states.append(self)

    monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
    q, k, v, idx, kw = make_case("window_log_segments")
    S = 128  # trim: 4 query blocks, 1 window key block
    q, k, v = q[:, :S], k[:, :S], v[:, :S]
    idx = jnp.where(idx[:, :, :4] < S, idx[:, :, :4], -1)
    kw.update(selection_mask=kw["selection_mask"][:, :, :S], segment_ids=kw["segment_ids"][:, :S],
              selection_weights=kw["selection_weights"][:, :, :S])
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    out, g, ct = run_impl("pallas_tpu", q, k, v, idx, kw, grads=True, interpret=params)
    oracle, g_or = oracle_out_and_grads(q, k, v, idx, kw, ct)
    assert len(states) >= 3, "the race detector did not run"
    assert not any(s.races_found for s in states)
    assert rel_err(out, oracle) < 2e-5
    for a, c in zip(g, g_or):
        assert rel_err(a, c) < 2e-4


# ----------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "H, K, D, block_q, match",
    [
        (2, 1, 32, 32, "head_dim must be 64 or a multiple of 128"),
        (2, 2, 80, 32, "head_dim must be 64 or a multiple of 128"),
        (16, 1, 128, 1024, "VMEM"),
    ],
)
def test_bad_tpu_shapes_raise_before_lowering(H, K, D, block_q, match):
    S = 64
    q = jnp.zeros((1, S, H, D), jnp.float32)
    k = jnp.zeros((1, S, K, D), jnp.float32)
    idx = jnp.zeros((1, K, -(-S // block_q), 4), jnp.int32).at[..., 1:].set(-1)
    with pytest.raises(ValueError, match=match):
        gathered_attention(q, k, k, idx, block_q=block_q, impl="pallas_tpu", interpret=False)


def test_nothing_selected_gives_zeros_bfloat16_block_q16():
    # 16-bit inputs pack 16 rows per (sublane, lane) tile: 16 x 1 stacked heads is fine ...
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    idx = jnp.full((1, 1, 4, 2), -1, jnp.int32)
    out = gathered_attention(q, q, q, idx, block_q=16, impl="pallas_tpu", interpret=True)
    assert np.all(np.asarray(out) == 0)  # nothing selected, no window: zeros, not NaN
