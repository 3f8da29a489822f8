"""Performer random-feature maps (shared by the performer baseline and SEA's estimator).

A feature map phi: [..., D] -> [..., M] such that phi(q) . phi(k) approximates a positive
attention kernel, so softmax-like attention becomes linear in sequence length:
``out_i = phi(q_i) S_i / (phi(q_i) . z_i)``, ``S_i = sum_j phi(k_j) v_j^T``, ``z_i = sum_j phi(k_j)``.

* ``relu``: phi(x) = relu(W x) / sqrt(M) (Performer's generalised ReLU kernel; what SEA's
  causal estimator uses).
* ``favor``: FAVOR+ positive features, phi(x) = exp(W x - |x|^2 / 2 - c) / sqrt(M), an unbiased
  estimate of exp(q . k); ``c`` is a stabiliser (per-row max for queries, a global max for
  keys, so the key normaliser cancels consistently).

All maps compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FEATURE_KINDS = ("relu", "favor")


def default_num_features(head_dim: int, nbf: float = 8.0) -> int:
    """SEA's choice: m = d ln d / nbf (33 for d = 64, nbf = 8)."""
    if head_dim <= 1:
        raise ValueError(f"head_dim must be > 1, got {head_dim}")
    if nbf <= 0:
        raise ValueError(f"nbf must be > 0, got {nbf}")
    return max(1, int(head_dim * math.log(head_dim) / nbf))


def draw_projection(key: jax.Array, num_features: int, head_dim: int, orthogonal: bool = True):
    """Random projection W: [num_features, head_dim] with rows of norm ~ sqrt(head_dim).

    ``orthogonal=True`` stacks blocks of orthogonal rows (Performer's ORF), rescaled by the
    norms of Gaussian rows, which lowers the estimator's variance.
    """
    if num_features <= 0 or head_dim <= 0:
        raise ValueError(f"num_features and head_dim must be > 0, got {num_features}, {head_dim}")
    if not orthogonal:
        return jax.random.normal(key, (num_features, head_dim), jnp.float32)
    n_blocks = -(-num_features // head_dim)
    keys = jax.random.split(key, n_blocks + 1)
    blocks = []
    for i in range(n_blocks):
        g = jax.random.normal(keys[i], (head_dim, head_dim), jnp.float32)
        qmat, _ = jnp.linalg.qr(g)
        blocks.append(qmat.T)
    w = jnp.concatenate(blocks, axis=0)[:num_features]
    norms = jnp.linalg.norm(
        jax.random.normal(keys[-1], (num_features, head_dim), jnp.float32), axis=-1
    )
    return w * norms[:, None]


def relu_features(x: jax.Array, projection: jax.Array, eps: float = 1e-3) -> jax.Array:
    """x: [..., D], projection: [M, D] -> [..., M] float32, strictly positive (eps keeps the
    linear-attention normaliser away from zero)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    m = projection.shape[0]
    return jax.nn.relu(x @ projection.T) / math.sqrt(m) + eps


def favor_features(
    x: jax.Array,
    projection: jax.Array,
    *,
    is_query: bool,
    scale: float = 1.0,
    stabilise_keys: bool = True,
):
    """FAVOR+ positive features of ``x * scale**0.5`` (so phi(q).phi(k) ~ exp(scale q.k)).

    x: [..., D]; projection: [M, D] -> [..., S, M] float32. ``stabilise_keys=False`` (decoding, where keys
    arrive one at a time) skips the shared key stabiliser; the ratio S / z is unchanged.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32)) * math.sqrt(scale)
    m = projection.shape[0]
    wx = x @ projection.T
    sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if is_query:
        stab = jnp.max(wx, axis=-1, keepdims=True)
    elif not stabilise_keys:
        stab = 0.0
    else:
        # one constant for all keys keeps the ratio S / z exact (it cancels)
        stab = jax.lax.stop_gradient(jnp.max(wx))
    feats = jnp.exp(wx - sq - stab)
    if is_query:
        # keeps a query's normaliser positive; keys get no floor, so that the cancelling
        # key stabiliser stays exact whichever value it takes
        feats = feats + 1e-6
    return feats / math.sqrt(m)


def feature_map(
    kind: str,
    x: jax.Array,
    projection: jax.Array,
    *,
    is_query: bool,
    scale: float,
    stabilise_keys: bool = True,
):
    """Dispatch on ``kind`` in FEATURE_KINDS."""
    if kind == "relu":
        return relu_features(x, projection)
    if kind == "favor":
        return favor_features(
            x, projection, is_query=is_query, scale=scale, stabilise_keys=stabilise_keys
        )
    raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
