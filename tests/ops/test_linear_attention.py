"""sea_jax.ops.linear_attention: both schedules against an explicit loop over queries (float64,
tests/reference_attention.py), against each other (values, denominators, final states,
gradients), with GQA, packed segments with padding, lengths that are not a multiple of the
chunk, and a state carried from an earlier call. float32 inputs: atol 2e-5 on outputs of
order 1; gradients of the two schedules: 1e-4 relative to their largest entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_attention import linear_attention_loop

from sea_jax.ops.linear_attention import LinearAttentionState, causal_linear_attention


def _inputs(seed, B, T, H, K, M, Dv):
    rng = np.random.default_rng(seed)
    # positive features (ReLU-like, as the estimator's), bounded away from 0 in sum
    fq = jnp.asarray(np.abs(rng.standard_normal((B, T, H, M))) + 0.05, jnp.float32)
    fk = jnp.asarray(np.abs(rng.standard_normal((B, T, K, M))) + 0.05, jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, Dv)), jnp.float32)
    return fq, fk, v


def _segments(B, T, seed):
    """Contiguous runs 1, 2, ... with a padded (0) tail on the first row."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    seg[0, -3:] = 0
    return jnp.asarray(seg)


CASES = [
    # B, T, H, K, M, Dv, chunk, segments, gradients
    (2, 37, 4, 2, 5, 3, 8, False, False),  # T % chunk != 0, GQA 2
    (1, 40, 2, 2, 6, 4, 5, True, True),    # segments with padding, several per chunk
    (2, 23, 3, 1, 4, 2, 64, True, False),  # one chunk longer than T
    (1, 64, 4, 4, 3, 5, 4, True, True),    # many chunks (deep scan tree)
]


@pytest.mark.parametrize("B,T,H,K,M,Dv,chunk,segments,gradients", CASES)
def test_schedules_match_the_loop_and_each_other(B, T, H, K, M, Dv, chunk, segments, gradients):
    fq, fk, v = _inputs(T * 7 + chunk, B, T, H, K, M, Dv)
    seg = _segments(B, T, T) if segments else None
    want = linear_attention_loop(fq, fk, v, seg)
    got = {}
    for schedule in ("parallel", "scan"):
        out, state, den = causal_linear_attention(fq, fk, v, segment_ids=seg, chunk=chunk, return_normaliser=True,
                                                  schedule=schedule)
        assert out.shape == (B, T, H, Dv) and den.shape == (B, T, H) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5, err_msg=schedule)
        got[schedule] = (out, state, den)
    (op, sp, dp), (os_, ss, ds) = got["parallel"], got["scan"]
    np.testing.assert_allclose(np.asarray(dp), np.asarray(ds), rtol=1e-5, atol=1e-5)
    for a, b in zip(sp, ss):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    if not gradients:
        return
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, Dv)), jnp.float32)

    def loss(fq, fk, v, schedule):
        return jnp.sum(causal_linear_attention(fq, fk, v, segment_ids=seg, chunk=chunk, schedule=schedule)[0] * ct)

    grads = {s: jax.grad(loss, argnums=(0, 1, 2))(fq, fk, v, s) for s in ("parallel", "scan")}
    for gp, gs in zip(grads["parallel"], grads["scan"]):
        scale = float(np.abs(np.asarray(gs)).max())
        assert scale > 1e-3
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gs), atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("schedule", ["parallel", "scan"])
def test_state_carries_across_calls(schedule):
    """Two calls (the second starting from the first's state) equal one call over both halves."""
    B, T, H, K, M, Dv = 2, 30, 4, 2, 5, 3
    fq, fk, v = _inputs(3, B, T, H, K, M, Dv)
    full, full_state = causal_linear_attention(fq, fk, v, chunk=4, schedule=schedule)
    cut = 13
    a, st = causal_linear_attention(fq[:, :cut], fk[:, :cut], v[:, :cut], chunk=4, schedule=schedule)
    b, st2 = causal_linear_attention(fq[:, cut:], fk[:, cut:], v[:, cut:], state=st, chunk=4, schedule=schedule)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([a, b], 1)), np.asarray(full), atol=1e-5, rtol=1e-5)
    for x, y in zip(st2, full_state):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
    # one token at a time (decoding)
    st = LinearAttentionState.zeros(B, K, M, Dv)
    outs = []
    for t in range(6):
        o, st = causal_linear_attention(fq[:, t:t + 1], fk[:, t:t + 1], v[:, t:t + 1], state=st, schedule=schedule)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full[:, :6]), atol=1e-5, rtol=1e-5)


def test_bad_schedule():
    fq, fk, v = _inputs(0, 1, 8, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        causal_linear_attention(fq, fk, v, schedule="serial")
