"""Slow, obvious attention references for tests: explicit loops and explicit T x T softmax.

Written independently of the library code; use only at small sizes.
"""

import numpy as np


def masked_softmax_attention(q, k, v, allowed, scale=None):
    """q: [B, T, H, D], k/v: [B, S, K, D] (GQA), allowed: bool [B, H or 1, T, S] or [T, S].

    Computed in float64 with NumPy; rows with no allowed key give zeros.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    scale = D ** -0.5 if scale is None else scale
    allowed = np.broadcast_to(np.asarray(allowed, bool), (B, H, T, k.shape[1]))
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            kh = h // G
            s = q[b, :, h] @ k[b, :, kh].T * scale
            s = np.where(allowed[b, h], s, -np.inf)
            for t in range(T):
                if not allowed[b, h, t].any():
                    continue
                p = np.exp(s[t] - s[t].max())
                p /= p.sum()
                out[b, t, h] = p @ v[b, :, kh]
    return out


def causal_mask(T, window=None, segment_ids=None):
    """allowed[b, 1, i, j]: j <= i, i - j < window, same non-zero segment."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    m = j <= i
    if window is not None:
        m &= (i - j) < window
    m = m[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        m = m & same[:, None]
    return m


def linear_attention_loop(fq, fk, v, segment_ids=None):
    """Causal kernel attention by an explicit loop over queries. fq: [B,T,H,M], fk: [B,T,K,M]."""
    fq, fk, v = (np.asarray(a, np.float64) for a in (fq, fk, v))
    B, T, H, _ = fq.shape
    G = H // fk.shape[2]
    seg = np.ones((B, T), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                if seg[b, i] == 0:
                    continue
                num, den = 0.0, 0.0
                for j in range(i + 1):
                    if seg[b, j] != seg[b, i]:
                        continue
                    w = fq[b, i, h] @ fk[b, j, h // G]
                    num = num + w * v[b, j, h // G]
                    den += w
                out[b, i, h] = num / den
    return out


def segment_rows(seg, causal):
    """(start, length) int32 [B, T] of every query row's prefix, by walking the segment ids:
    its segment up to itself (causal) or the whole segment; padding rows (id 0) get length 0."""
    seg = np.asarray(seg)
    B, T = seg.shape
    start = np.zeros((B, T), np.int32)
    length = np.zeros((B, T), np.int32)
    for b, t in np.ndindex(B, T):
        if seg[b, t] == 0:
            continue
        s = t
        while s > 0 and seg[b, s - 1] == seg[b, t]:
            s -= 1
        e = t
        while e + 1 < T and seg[b, e + 1] == seg[b, t]:
            e += 1
        start[b, t], length[b, t] = s, (t - s + 1) if causal else (e - s + 1)
    return start, length
