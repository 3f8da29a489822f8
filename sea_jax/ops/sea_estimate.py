"""SEA's estimator: a Performer estimate of each row's attention, decoded by an MLP and a
small CNN into compressed logits S_hat [B, T, H, t_m] (``P_hat = softmax(S_hat)`` over t_m).

Pipeline (per layer; parameters in a plain dict, see :func:`init_estimator_params`):

1. **Kernel linear attention** (fp32) of q, k over an augmented value
   ``[pos(j), v_j]`` (2D wide): ReLU random features and causal prefix sums in the causal
   variant, FAVOR+ over the whole segment in the bidirectional one (feature maps and the
   chunked causal scan are shared with the ``performer`` core).
2. **Position signal that works at any length.** ``pos(j)`` are D/2 rotary pairs of the
   key's log in-segment position, ``(cos, sin)(w_i log(o_j + 1))``. After the linear
   attention, the position half of the context is rotated back by the query's reference
   ``w_i log(R_t)`` (``R_t = o_t + 1`` causal, the segment length bidirectional). Rotation is
   linear, so the result is exactly the attention-weighted average of
   ``(cos, sin)(w_i log((o_j + 1) / R_t))``: a function of the *relative* position j / R_t only,
   the coordinate the compressed columns use (column c = relative position c / t_m), with no
   table tied to a maximum length (the official code's learned 2048-row table).
3. **Encoder** (shared by heads): ``[context (2D), v_t (D)] -> Linear(3D, 2D) -> LayerNorm ->
   GELU = t_pred``; the gate head ``Linear(2D, 2)`` gives the logits of sigma(s0), sigma(s1).
4. **Row decoder**: ``Linear(2D, 2 t_m/4)`` split into 2 channels per head, LayerNorm over
   the t_m/4 columns: an image [B, T, t_m/4, 2H] with heads as channels.
5. **CNN** over (query, column): two 3x3 convolutions (2H -> 2H, ReLU) whose query taps are
   t-4, t-2, t (dilation 2; causal) or t-2, t, t+2 (bidirectional), width taps c-1, c, c+1;
   then a 1x1 convolution 2H -> 4H read as 4 sub-columns per column ("pixel shuffle") to reach
   t_m columns per head, and a LayerNorm over t_m. Query taps never cross a segment boundary
   or read padding. (The official code upsamples by nearest neighbour and then applies a
   1x1 conv, which makes every 4 adjacent columns equal before the final LayerNorm, so the
   top-k would see exact ties; the sub-pixel projection has the same cost without that.)

Receptive field along queries: 8 rows back (causal), which is what a decode cache keeps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sea_jax.ops.linear_attention import LinearAttentionState, causal_linear_attention
from sea_jax.ops.random_features import feature_map

_F32 = jnp.float32
CNN_DILATION = 2
CNN_TAPS = 3
# rows of CNN input a causal decode step needs: two layers of taps t-4, t-2, t
CNN_HISTORY = 2 * (CNN_TAPS - 1) * CNN_DILATION


def check_t_m(t_m) -> int:
    """t_m must be an int >= 4 divisible by 4 (the CNN works at t_m / 4 columns)."""
    if isinstance(t_m, bool) or not isinstance(t_m, int) or t_m < 4 or t_m % 4:
        raise ValueError(f"t_m must be an int >= 4 divisible by 4, got {t_m!r}")
    return t_m


# --------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------

def init_estimator_params(key, *, head_dim: int, num_heads: int, t_m: int, gate_bias=(3.0, 3.0)):
    """Estimator parameters (float32 dict).

    Linear and conv weights: normal with std 1/sqrt(fan_in); LayerNorms: scale 1, bias 0.
    The gate head starts with zero weights and biases ``gate_bias`` so that at the start of
    distillation sigma(s0) = sigma(s1) = sigmoid(3) ~ 0.953 for every row: the layer's output
    is then 0.91 x the exact attention over the selected keys + 0.05 x the running mean of V
    (close to the teacher whose Q/K/V/O it keeps) instead of the official code's
    PyTorch-default ~0.25 sparse + 0.5 mean mixture, and the gates still get gradient from
    the first step (sigmoid'(3) = 0.045).
    """
    check_t_m(t_m)
    D, H, W = head_dim, num_heads, t_m // 4
    C = 2 * H
    enc_in = position_dims(D) + 2 * D
    ks = jax.random.split(key, 6)

    def dense(k, fan_in, shape):
        return jax.random.normal(k, shape, _F32) / math.sqrt(fan_in)

    return {
        "enc_w": dense(ks[0], enc_in, (enc_in, 2 * D)),
        "enc_b": jnp.zeros((2 * D,), _F32),
        "enc_ln_scale": jnp.ones((2 * D,), _F32),
        "enc_ln_bias": jnp.zeros((2 * D,), _F32),
        "dec_w": dense(ks[1], 2 * D, (2 * D, 2 * W)),
        "dec_b": jnp.zeros((2 * W,), _F32),
        "ln1_scale": jnp.ones((W,), _F32),
        "ln1_bias": jnp.zeros((W,), _F32),
        "conv1_w": dense(ks[2], CNN_TAPS * 3 * C, (CNN_TAPS, 3, C, C)),
        "conv1_b": jnp.zeros((C,), _F32),
        "conv2_w": dense(ks[3], CNN_TAPS * 3 * C, (CNN_TAPS, 3, C, C)),
        "conv2_b": jnp.zeros((C,), _F32),
        "conv3_w": dense(ks[4], C, (C, 4 * H)),
        "conv3_b": jnp.zeros((4 * H,), _F32),
        "ln2_scale": jnp.ones((t_m,), _F32),
        "ln2_bias": jnp.zeros((t_m,), _F32),
        "gate_w": jnp.zeros((2 * D, 2), _F32),
        "gate_b": jnp.asarray(gate_bias, _F32).reshape(2),
    }


# --------------------------------------------------------------------------------------
# 1-2: linear-attention context with a relative position signal
# --------------------------------------------------------------------------------------

def position_dims(head_dim: int) -> int:
    """Width of the position signal: D rounded down to even (D/2 rotary pairs)."""
    if head_dim < 2:
        raise ValueError(f"head_dim must be >= 2, got {head_dim}")
    return 2 * (head_dim // 2)


def position_frequencies(num_pairs: int, t_m: int) -> jax.Array:
    """Angular frequencies of the log-position signal, geometric in [0.5, t_m] (float32).

    The top frequency resolves relative steps of ~1/t_m near the query (log r ~ r - 1 there),
    the bottom one distinguishes log-positions across ~6 orders of magnitude."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if num_pairs == 1:
        return jnp.array([1.0], _F32)
    return jnp.geomspace(0.5, float(t_m), num_pairs).astype(_F32)


def log_position_features(offset: jax.Array, freqs: jax.Array) -> jax.Array:
    """offset [...] int (in-segment position) -> [..., 2P] = (cos, sin)(w log(offset + 1))."""
    ang = jnp.log1p(offset.astype(_F32))[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def rotate_to_relative(pos_context: jax.Array, reference: jax.Array, freqs: jax.Array) -> jax.Array:
    """Rotate averaged (cos, sin) pairs by -w log(reference).

    pos_context: [B, T, H, 2P]; reference: [B, T] (> 0). Returns the same shape."""
    P = freqs.shape[0]
    c, s = pos_context[..., :P], pos_context[..., P:]
    ang = jnp.log(jnp.maximum(reference.astype(_F32), 1.0))[:, :, None, None] * freqs
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    return jnp.concatenate([c * cos + s * sin, s * cos - c * sin], axis=-1)


def _bidirectional_linear_attention(fq, fk, values, segment_ids, chunk, schedule="parallel"):
    """Non-causal linear attention within segments, in linear memory: the causal pass forward
    plus the causal pass over the reversed sequence, minus the diagonal counted twice.

    fq: [B, T, H, M]; fk: [B, T, K, M]; values: [B, T, K, Dv]. Returns [B, T, H, Dv] float32."""
    B, T, H, M = fq.shape
    K = fk.shape[2]
    G = H // K
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    out_f, _, den_f = causal_linear_attention(fq, fk, values, segment_ids=seg, chunk=chunk, return_normaliser=True,
                                              schedule=schedule)
    rev = lambda x: jnp.flip(x, axis=1)
    out_b, _, den_b = causal_linear_attention(
        rev(fq), rev(fk), rev(values), segment_ids=rev(seg), chunk=chunk, return_normaliser=True, schedule=schedule
    )
    out_b, den_b = rev(out_b), rev(den_b)
    fk_h = jnp.repeat(fk.astype(_F32), G, axis=2)
    v_h = jnp.repeat(values.astype(_F32), G, axis=2)
    diag = jnp.sum(fq.astype(_F32) * fk_h, axis=-1) * (seg != 0)[:, :, None]  # [B, T, H]
    num = out_f * den_f[..., None] + out_b * den_b[..., None] - diag[..., None] * v_h
    den = den_f + den_b - diag
    # the same floor as causal_linear_attention: a tiny positive den would overflow 1/den^2
    # in the backward (the reconstruction above is exact wherever den >= floor)
    floor = float(jnp.finfo(num.dtype).eps) ** 2
    ok = (seg != 0)[:, :, None]
    return jnp.where(ok[..., None], num / jnp.where(ok, jnp.maximum(den, floor), 1.0)[..., None], 0.0)


def estimator_context(
    q,
    k,
    v,
    projection,
    freqs,
    *,
    key_offset,
    reference,
    features: str,
    causal: bool,
    segment_ids=None,
    state: LinearAttentionState | None = None,
    chunk: int = 64,
    stabilise_keys: bool = True,
    schedule: str = "parallel",
):
    """Kernel-attention context [B, T, H, 2D] (float32): [relative-position half, value half].

    q: [B, T, H, D]; k, v: [B, T, K, D]; projection: [M, D] random features; freqs: [D/2];
    key_offset: [B, T] in-segment positions of the keys (= of the tokens); reference: [B, T]
    the rows' reference lengths (R_t); state: causal decode state (running sums), or None;
    chunk, schedule: of the linear attention (sea_jax.ops.linear_attention).
    Returns (context, new_state); new_state is None in the bidirectional variant.
    """
    D = q.shape[-1]
    scale = D**-0.5
    fq = feature_map(features, q, projection, is_query=True, scale=scale)
    fk = feature_map(features, k, projection, is_query=False, scale=scale, stabilise_keys=stabilise_keys)
    pos = log_position_features(key_offset, freqs)  # [B, T, 2P]
    pos = jnp.broadcast_to(pos[:, :, None, :], k.shape[:3] + (pos.shape[-1],))
    values = jnp.concatenate([pos, v.astype(_F32)], axis=-1)
    if causal:
        ctx, state = causal_linear_attention(fq, fk, values, segment_ids=segment_ids, state=state, chunk=chunk,
                                             schedule=schedule)
    else:
        ctx, state = _bidirectional_linear_attention(fq, fk, values, segment_ids, chunk, schedule), None
    P2 = pos.shape[-1]
    rel = rotate_to_relative(ctx[..., :P2], reference, freqs)
    return jnp.concatenate([rel, ctx[..., P2:]], axis=-1), state


# --------------------------------------------------------------------------------------
# 3-5: encoder, gates, row decoder, CNN
# --------------------------------------------------------------------------------------

def _layer_norm(x, scale, bias, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def encode(params, context, v_rows):
    """context [B, T, H, 2D], v_rows [B, T, H, D] (the query token's own value, per query
    head) -> t_pred [B, T, H, 2D] float32."""
    x = jnp.concatenate([context.astype(_F32), v_rows.astype(_F32)], axis=-1)
    h = x @ params["enc_w"] + params["enc_b"]
    return jax.nn.gelu(_layer_norm(h, params["enc_ln_scale"], params["enc_ln_bias"]))


def gate_logits(params, t_pred):
    """t_pred [B, T, H, 2D] -> (s0, s1) each [B, T, H]: sigma(s0) scales the sparse
    attention, sigma(s1) mixes it with the running mean of V."""
    g = t_pred @ params["gate_w"] + params["gate_b"]
    return g[..., 0], g[..., 1]


def decoder_rows(params, t_pred):
    """t_pred [B, T, H, 2D] -> CNN input [B, T, t_m/4, 2H] (channel 2h + i is split i of
    head h), LayerNorm'd over the columns."""
    B, T, H, _ = t_pred.shape
    W = params["ln1_scale"].shape[0]
    rows = (t_pred @ params["dec_w"] + params["dec_b"]).reshape(B, T, H, 2, W)
    rows = _layer_norm(rows, params["ln1_scale"], params["ln1_bias"])
    return rows.transpose(0, 1, 4, 2, 3).reshape(B, T, W, 2 * H)


def _query_taps(causal: bool):
    """Row offsets d of the query taps (tap reads row t - d)."""
    if causal:
        return tuple((CNN_TAPS - 1 - i) * CNN_DILATION for i in range(CNN_TAPS))  # 4, 2, 0
    half = (CNN_TAPS - 1) // 2
    return tuple((half - i) * CNN_DILATION for i in range(CNN_TAPS))  # 2, 0, -2


def _shift_rows(x, d):
    """y[:, t] = x[:, t - d] (zero outside)."""
    T = x.shape[1]
    if d == 0:
        return x
    if abs(d) >= T:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * x.ndim
    if d > 0:
        pad[1] = (d, 0)
        return jnp.pad(x[:, : T - d], pad)
    pad[1] = (0, -d)
    return jnp.pad(x[:, -d:], pad)


def _conv(x, w, b, row_segments, causal):
    """x [B, T, W, C]; w [taps, 3, C, Cout]: a 3x3 conv whose query taps only read rows of the
    same (non-padding) segment."""
    y = b
    for i, d in enumerate(_query_taps(causal)):
        same = (_shift_rows(row_segments, d) == row_segments) & (row_segments != 0)  # [B, T]
        xs = _shift_rows(x, d) * same[:, :, None, None]
        y = y + jax.lax.conv_general_dilated(
            xs, w[i][None], window_strides=(1, 1), padding=((0, 0), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return y


def cnn_logits(params, rows, row_segments, *, causal: bool):
    """rows [B, T, t_m/4, 2H] (from :func:`decoder_rows`), row_segments [B, T] int (0 =
    padding; query taps stay inside a segment) -> S_hat [B, T, H, t_m] float32."""
    B, T, W, C = rows.shape
    H = C // 2
    h = jax.nn.relu(_conv(rows, params["conv1_w"], params["conv1_b"], row_segments, causal))
    h = jax.nn.relu(_conv(h, params["conv2_w"], params["conv2_b"], row_segments, causal))
    out = (h @ params["conv3_w"] + params["conv3_b"]).reshape(B, T, W, H, 4)
    out = out.transpose(0, 1, 3, 2, 4).reshape(B, T, H, 4 * W)
    return _layer_norm(out, params["ln2_scale"], params["ln2_bias"])
