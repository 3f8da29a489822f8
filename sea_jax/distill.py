"""Distillation losses of SEA (Lee et al. 2024, section 2.2 of research/sea.md).

Per layer (averaged over layers):

* **estimate**: ``w_ekl * KL(teacher attention || estimate) + w_emse * MSE`` (0.1 and 1);
* **student attention**: the same between the student's own *full* attention
  ``softmax(q_s k_s^T)`` (causal/segment masked, not top-k masked) and the teacher's (0.1, 1);
* **context**: MSE between the teacher's per-head attention output and SEA's output (1).

Global: ``0.1 * LM loss + 5 * hidden-state MSE + 0.2 * KL(teacher logits || student logits)``.
All weights live in :class:`DistillWeights`.

Normalisation follows the official code: the KLs are "batchmean" over the B * H * T rows
(sum over keys, mean over rows); the attention MSEs are means over all B * H * T * S entries
(masked entries count, as zeros).

**No T x T memory.** The paper compares the estimate, nearest-neighbour resized to T x T,
with the teacher's T x T attention. Here the teacher's attention is *pooled onto the t_m
cells* of every row (the sum of its probabilities over each cell's key span, computed one
query block at a time with a prefix sum over keys), and the estimate's pooled distribution is
``R_c = softmax_c(S_hat_c + log n_c)`` (n_c = span length; the resized estimate puts
``exp(S_hat_c) / Z`` on each of the n_c keys of cell c). Then

    KL_dense  = KL_pooled + sum_c A_c KL(A restricted to c || uniform on c)
    MSE_dense = (1 / (B H T S)) sum_rows sum_c (R_c - A_c)^2 / n_c + within-cell variance of A

where the extra terms do not depend on the estimate: both forms have the same gradient, and
the same value when the teacher is uniform within every cell. :func:`estimate_loss` is the
pooled form (any T), :func:`estimate_loss_dense` the paper's dense form (small T only).
The student-attention terms are computed blockwise over query blocks (checkpointed, so the
backward pass also stays O(T * block) per step).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from sea_jax.ops.rope import apply_rope
from sea_jax.ops.sea_select import cell_of_offset, span_starts

_F32 = jnp.float32


def _acc(*dtypes):
    """Accumulation dtype: float32, or float64 when an input is float64 (finite-difference
    tests run in float64)."""
    out = _F32
    for d in dtypes:
        out = jnp.promote_types(out, d)
    return out
# dense forms build [B, H, T, S]; refuse beyond this many keys x queries per head
DENSE_MAX_ELEMENTS = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DistillWeights:
    """Loss weights (defaults: the paper's OPT recipe)."""

    estimate_kl: float = 0.1
    estimate_mse: float = 1.0
    attention_kl: float = 0.1
    attention_mse: float = 1.0
    context_mse: float = 1.0
    lm: float = 0.1
    hidden_mse: float = 5.0
    logit_kl: float = 0.2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{f.name} must be a number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _check_rows(name, x, B, T):
    if x.shape != (B, T) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array of shape {(B, T)}, got {x.shape} {x.dtype}")


def _check_qk(q, k):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must have rank 4 [batch, seq, heads, head_dim], got {q.shape}, {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q [B, T, H, D] and k [B, S, K, D] must share B and D with H % K == 0, got {q.shape}, {k.shape}"
        )


def span_sizes(row_length, t_m: int):
    """row_length [B, T] -> int32 [B, T, t_m]: number of keys of each cell."""
    s = span_starts(row_length, t_m)
    return s[..., 1:] - s[..., :-1]


def pooled_estimate_log_probs(estimate, row_length):
    """log R_c = log_softmax_c(S_hat_c + log n_c) [B, T, H, t_m]; -inf on empty cells and on
    padding rows (row_length 0)."""
    n = span_sizes(row_length, estimate.shape[-1])[:, :, None, :]
    dt = _acc(estimate.dtype)
    logits = jnp.where(n > 0, estimate.astype(dt) + jnp.log(jnp.maximum(n, 1).astype(dt)), -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = jnp.sum(jnp.where(n > 0, jnp.exp(logits - m), 0.0), axis=-1, keepdims=True)
    return jnp.where(n > 0, logits - m - jnp.log(jnp.where(z > 0, z, 1.0)), -jnp.inf)


def _masked_log_softmax(s, allowed):
    """Row log-softmax over allowed entries; (logp with 0 on disallowed, p with 0 there)."""
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(s - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    zs = jnp.where(z > 0, z, 1.0)
    logp = jnp.where(allowed, s - m - jnp.log(zs), 0.0)
    return logp, e / zs


def _prefix_mask(row_start, row_length, key_length):
    """bool [B, T, S]: key j is in row t's prefix."""
    off = jnp.arange(key_length)[None, None, :] - row_start[:, :, None]
    return (off >= 0) & (off < row_length[:, :, None])


def _query_blocks(x, block, axis=1):
    """Split axis 1 of x into [n, ...block...] (zero padded) with the block axis leading."""
    T = x.shape[axis]
    n = -(-T // block)
    pad = n * block - T
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblock(y, T):
    """[n, B, block, ...] -> [B, T, ...]."""
    n, B, block = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape((B, n * block) + y.shape[3:])[:, :T]


def _scores(q_blk, k, scale):
    """q_blk [B, bq, H, D], k [B, S, K, D] -> float32 [B, H, bq, S]."""
    H, K = q_blk.shape[2], k.shape[2]
    kk = jnp.repeat(k, H // K, axis=2) if H != K else k
    return jnp.einsum("bqhd,bshd->bhqs", q_blk, kk, preferred_element_type=_acc(q_blk.dtype, k.dtype)) * scale


def attention_probs(q, k, row_start, row_length, *, scale=None):
    """Dense attention probabilities [B, H, T, S] over each row's prefix (small sizes only)."""
    _check_qk(q, k)
    B, T, H, D = q.shape
    S = k.shape[1]
    if T * S > DENSE_MAX_ELEMENTS:
        raise ValueError(f"attention_probs is dense: T * S must be <= {DENSE_MAX_ELEMENTS}, got {T} * {S}")
    scale = D**-0.5 if scale is None else scale
    allowed = _prefix_mask(row_start, row_length, S)[:, None]
    return _masked_log_softmax(_scores(q, k, scale), allowed)[1]


# --------------------------------------------------------------------------------------
# teacher attention pooled onto the compressed cells
# --------------------------------------------------------------------------------------

def pool_attention(q, k, row_start, row_length, t_m: int, *, scale=None, block_q: int = 64):
    """Teacher attention pooled onto each row's t_m cells, blockwise.

    q: [B, T, H, D]; k: [B, S, K, D]; row_start, row_length: [B, T] int (each row's prefix,
    e.g. SEA's aux "row_start"/"row_length"). Returns float32 [B, T, H, t_m]: A[t, h, c] =
    sum of softmax(q_t . k / sqrt(D)) over the keys of cell c (0 for empty cells and padding
    rows). Memory O(B H block_q S) per step; no T x S array.
    """
    _check_qk(q, k)
    B, T, H, D = q.shape
    S = k.shape[1]
    _check_rows("row_start", row_start, B, T)
    _check_rows("row_length", row_length, B, T)
    scale = D**-0.5 if scale is None else scale
    bq = min(block_q, T)

    def one(xs):
        q_b, st, ln = xs  # [B, bq, H, D], [B, bq], [B, bq]
        allowed = _prefix_mask(st, ln, S)[:, None]  # [B, 1, bq, S]
        _, p = _masked_log_softmax(_scores(q_b, k, scale), allowed)
        csum = jnp.concatenate([jnp.zeros(p.shape[:-1] + (1,), p.dtype), jnp.cumsum(p, axis=-1)], axis=-1)
        edges = st[..., None] + span_starts(ln, t_m)  # [B, bq, t_m + 1] absolute key positions
        edges = jnp.clip(edges, 0, S)
        at = jnp.take_along_axis(csum, jnp.broadcast_to(edges[:, None], (B, H) + edges.shape[1:]), axis=-1)
        pooled = jnp.maximum(at[..., 1:] - at[..., :-1], 0.0)  # cancellation can leave -1e-9
        return jnp.moveaxis(pooled, 1, 2)  # [B, bq, H, t_m]

    xs = (_query_blocks(q, bq), _query_blocks(row_start, bq), _query_blocks(row_length, bq))
    return _unblock(jax.lax.map(jax.checkpoint(one), xs), T)


# --------------------------------------------------------------------------------------
# per-layer losses
# --------------------------------------------------------------------------------------

def estimate_loss(estimate, teacher_pooled, row_length, *, key_length: int | None = None):
    """Pooled estimate loss (any T).

    estimate: S_hat logits [B, T, H, t_m]; teacher_pooled: [B, T, H, t_m] from
    :func:`pool_attention`; row_length: [B, T] int; key_length: S of the dense form's MSE
    normaliser (default T). Returns {"kl": scalar, "mse": scalar} (unweighted).
    """
    if estimate.ndim != 4 or teacher_pooled.shape != estimate.shape:
        raise ValueError(
            f"estimate and teacher_pooled must both have shape [batch, seq, heads, t_m], got "
            f"{estimate.shape} and {teacher_pooled.shape}"
        )
    B, T, H, M = estimate.shape
    _check_rows("row_length", row_length, B, T)
    S = T if key_length is None else key_length
    log_r = pooled_estimate_log_probs(estimate, row_length)
    n = span_sizes(row_length, M)[:, :, None, :]
    A = teacher_pooled.astype(_acc(teacher_pooled.dtype, estimate.dtype))
    finite = n > 0
    log_r_safe = jnp.where(finite, log_r, 0.0)
    kl_terms = jnp.where((A > 0) & finite, A * (jnp.log(jnp.where(A > 0, A, 1.0)) - log_r_safe), 0.0)
    R = jnp.where(finite, jnp.exp(log_r_safe), 0.0)
    mse_terms = jnp.where(finite, jnp.square(R - A) / jnp.maximum(n, 1), 0.0)
    return {"kl": jnp.sum(kl_terms) / (B * H * T), "mse": jnp.sum(mse_terms) / (B * H * T * S)}


def estimate_loss_dense(estimate, teacher_probs, row_start, row_length):
    """The paper's dense estimate loss (small T): S_hat nearest-neighbour resized to each
    row's prefix, log-softmax over keys, KL (batchmean over rows) and MSE (mean over all
    B H T S entries) against teacher_probs [B, H, T, S]."""
    B, T, H, M = estimate.shape
    S = teacher_probs.shape[-1]
    if teacher_probs.shape != (B, H, T, S):
        raise ValueError(f"teacher_probs must have shape {(B, H, T, 'S')}, got {teacher_probs.shape}")
    if T * S > DENSE_MAX_ELEMENTS:
        raise ValueError(f"the dense estimate loss needs T * S <= {DENSE_MAX_ELEMENTS}, got {T} * {S}")
    off = jnp.arange(S)[None, None, :] - row_start[:, :, None]  # [B, T, S]
    allowed = (off >= 0) & (off < row_length[:, :, None])
    cell = cell_of_offset(off, row_length[:, :, None], M)
    full = jnp.take_along_axis(
        estimate.astype(_acc(estimate.dtype)), jnp.broadcast_to(cell[:, :, None, :], (B, T, H, S)), axis=-1
    )  # [B, T, H, S]
    logp, p = _masked_log_softmax(jnp.moveaxis(full, 2, 1), allowed[:, None])
    return _kl_mse(teacher_probs.astype(_acc(teacher_probs.dtype, estimate.dtype)), logp, p, B * H * T, B * H * T * S)


def _kl_mse(target, logp, p, rows, entries):
    kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - logp), 0.0))
    mse = jnp.sum(jnp.square(p - target))
    return {"kl": kl / rows, "mse": mse / entries}


def attention_loss(q_student, k_student, q_teacher, k_teacher, row_start, row_length, *, block_q: int = 64):
    """KL(teacher attention || student full attention) and their MSE, blockwise over query
    blocks (checkpointed): no T x S array in forward or backward.

    q_*: [B, T, H, D]; k_*: [B, S, K, D] (student and teacher may differ in K and D);
    row_start, row_length: [B, T] int. Returns {"kl", "mse"} normalised as the dense form.
    """
    for q_, k_ in ((q_student, k_student), (q_teacher, k_teacher)):
        _check_qk(q_, k_)
    B, T, H, _ = q_student.shape
    S = k_student.shape[1]
    if q_teacher.shape[:3] != (B, T, H) or k_teacher.shape[1] != S:
        raise ValueError(
            f"teacher q/k must have the student's batch, lengths and heads: {q_teacher.shape} / "
            f"{k_teacher.shape} vs {q_student.shape} / {k_student.shape}"
        )
    _check_rows("row_start", row_start, B, T)
    _check_rows("row_length", row_length, B, T)
    bq = min(block_q, T)
    s_scale, t_scale = q_student.shape[-1] ** -0.5, q_teacher.shape[-1] ** -0.5

    def one(carry, xs):
        qs, qt, st, ln = xs
        allowed = _prefix_mask(st, ln, S)[:, None]
        logp_s, p_s = _masked_log_softmax(_scores(qs, k_student, s_scale), allowed)
        logp_t, p_t = _masked_log_softmax(_scores(qt, k_teacher, t_scale), allowed)
        kl = jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0))
        mse = jnp.sum(jnp.square(p_s - p_t))
        return (carry[0] + kl, carry[1] + mse), None

    xs = tuple(_query_blocks(x, bq) for x in (q_student, q_teacher, row_start, row_length))
    dt = _acc(q_student.dtype, k_student.dtype, q_teacher.dtype, k_teacher.dtype)
    (kl, mse), _ = jax.lax.scan(jax.checkpoint(one), (jnp.zeros((), dt), jnp.zeros((), dt)), xs)
    return {"kl": kl / (B * H * T), "mse": mse / (B * H * T * S)}


def attention_loss_dense(student_probs, teacher_probs):
    """Dense form of :func:`attention_loss`: probs [B, H, T, S] each (small T)."""
    if student_probs.shape != teacher_probs.shape or student_probs.ndim != 4:
        raise ValueError(f"probs must both be [B, H, T, S], got {student_probs.shape}, {teacher_probs.shape}")
    B, H, T, S = student_probs.shape
    dt = _acc(student_probs.dtype, teacher_probs.dtype)
    p = student_probs.astype(dt)
    logp = jnp.log(jnp.where(p > 0, p, 1.0))
    return _kl_mse(teacher_probs.astype(dt), logp, p, B * H * T, B * H * T * S)


def context_loss(student_out, teacher_out):
    """MSE between SEA's per-head output and the teacher's (both [B, T, H, D])."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student_out and teacher_out shapes differ: {student_out.shape}, {teacher_out.shape}")
    dt = _acc(student_out.dtype, teacher_out.dtype)
    return jnp.mean(jnp.square(student_out.astype(dt) - teacher_out.astype(dt)))


def layer_loss(aux, student_out, teacher_q, teacher_k, teacher_out, weights: DistillWeights = DistillWeights(), *, block_q: int = 64):
    """Per-layer SEA distillation loss from the core's aux (``return_aux=True``).

    aux: SEAAttention aux ("estimate", "row_start", "row_length", "q", "k");
    student_out: the core's output [B, T, H, D]; teacher_q/k: the teacher layer's rotated q
    [B, T, H, D] and k [B, T, K, D] (see :func:`projected_qk`); teacher_out: the teacher
    core's output [B, T, H, D]. Returns (weighted total, dict of unweighted terms).
    """
    missing = [n for n in ("estimate", "row_start", "row_length", "q", "k") if n not in aux]
    if missing:
        raise ValueError(f"aux lacks {missing}: call the SEA core with return_aux=True")
    teacher_q = jax.lax.stop_gradient(teacher_q)
    teacher_k = jax.lax.stop_gradient(teacher_k)
    pooled = pool_attention(
        teacher_q, teacher_k, aux["row_start"], aux["row_length"], aux["estimate"].shape[-1], block_q=block_q
    )
    e = estimate_loss(aux["estimate"], pooled, aux["row_length"], key_length=teacher_k.shape[1])
    a = attention_loss(aux["q"], aux["k"], teacher_q, teacher_k, aux["row_start"], aux["row_length"], block_q=block_q)
    c = context_loss(student_out, jax.lax.stop_gradient(teacher_out))
    terms = {"estimate_kl": e["kl"], "estimate_mse": e["mse"], "attention_kl": a["kl"],
             "attention_mse": a["mse"], "context_mse": c}
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


# --------------------------------------------------------------------------------------
# global losses
# --------------------------------------------------------------------------------------

def _token_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    m = mask.astype(values.dtype)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def lm_loss(logits, targets, mask=None):
    """Mean next-token cross entropy. logits [B, T, V]; targets [B, T] int; mask [B, T]."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T], got {logits.shape}, {targets.shape}")
    logp = jax.nn.log_softmax(logits.astype(_acc(logits.dtype)), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _token_mean(nll, mask)


def logit_kl(student_logits, teacher_logits, mask=None):
    """KL(teacher || student) over the vocabulary in float32, mean over tokens."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {student_logits.shape}, {teacher_logits.shape}")
    dt = _acc(student_logits.dtype, teacher_logits.dtype)
    ls = jax.nn.log_softmax(student_logits.astype(dt), axis=-1)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(dt), axis=-1)
    return _token_mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1), mask)


def hidden_mse(student_hidden: Sequence | jax.Array, teacher_hidden: Sequence | jax.Array):
    """Mean over layers (embeddings and every layer output) of the hidden-state MSE."""
    s = [jnp.asarray(h) for h in student_hidden]
    t = [jnp.asarray(h) for h in teacher_hidden]
    if len(s) != len(t) or not s:
        raise ValueError(f"need the same non-zero number of hidden states, got {len(s)} and {len(t)}")
    return sum(context_loss(a, jax.lax.stop_gradient(b)) for a, b in zip(s, t)) / len(s)


def distillation_loss(layer_losses: Sequence, lm: jax.Array, hidden: jax.Array, logits_kl: jax.Array,
                      weights: DistillWeights = DistillWeights()):
    """Total: ``w_lm lm + w_hidden hidden + w_logit logits_kl + mean over layers of the
    weighted layer losses`` (each from :func:`layer_loss`). Returns (total, terms)."""
    if not layer_losses:
        raise ValueError("layer_losses must not be empty")
    layers = sum(layer_losses) / len(layer_losses)
    terms = {"lm": lm, "hidden_mse": hidden, "logit_kl": logits_kl, "layers": layers}
    total = weights.lm * lm + weights.hidden_mse * hidden + weights.logit_kl * logits_kl + layers
    return total, terms


def projected_qk(layer, x, positions):
    """The rotated q [B, T, H, D] and k [B, T, K, D] of a :class:`SelfAttention` layer (e.g.
    the teacher's) for hidden states x [B, T, E] and RoPE positions [B, T]."""
    dt = layer.dtype
    x = x.astype(dt)
    q = jnp.einsum("bte,ehd->bthd", x, layer.q_proj[...].astype(dt))
    k = jnp.einsum("bte,ekd->btkd", x, layer.k_proj[...].astype(dt))
    return apply_rope(q, positions, layer.rope_base), apply_rope(k, positions, layer.rope_base)
