"""Gathered (token-level) attention on GPU: Pallas kernels with the Triton lowering.

For query tile [q0, q0 + tq) of query block i, head h, the forward runs one fp32 online
softmax over two phases:

1. the contiguous sliding-window span of keys [q0 - window + 1, q0 + tq) in key tiles of
   ``tk`` (masked elementwise where needed), and
2. the selected slots ``union_index[b, kh, i, :]`` in slot tiles of ``tu``: the key/value
   rows are **gathered by index inside the kernel** (``gather="kernel"``, default) or read
   from a copy gathered beforehand by XLA (``gather="xla"``: [B, K, nQ, U, D], contiguous
   loads, ~(U / block_q) x the K/V memory), with the per-(query, slot) selection mask and
   weights.

Slot tiles past the last non-empty slot of a row are not visited.

Backward (``jax.custom_vjp``; ``bwd_gather`` picks the slot loads of the backward alone):

* dQ: per (query tile, head), both phases again, from the saved log-sum-exp;
* window dK/dV: per (key tile, KV head), the query tiles whose window covers it, for every
  query head of the GQA group (single writer, no atomics);
* slot dK/dV and the selection-weight gradient: per (query block, KV head), each slot tile's
  K/V rows loaded once and its dK/dV summed over the block's query tiles and the group's
  query heads; the weight gradient tile is stored directly. The slot dK/dV reach the keys
  (``dkv_reduce``) as

  - "sorted" (default): per-slot partial sums [B, K, nQ, U, D] (bfloat16 for bfloat16 K/V,
    ``partial_dtype``), then one Pallas program per (key tile, KV head) walks the slots of
    its keys in the key-sorted slot list (an XLA sort of the union) and adds them with
    one-hot [tk, chunk] matmuls: no atomics, deterministic, no K/V copies;
  - "scatter": the same partials summed by an XLA scatter-add;
  - "atomic": float32 atomics into dK/dV inside the slot kernel.

Why these defaults (H100, jax 0.11.2, B = 1, H = K = 16, D = 128, bf16, k = 1024, w = 512,
block_q = 128, U = 1151, mask + float32 gate weights; benchmarks/bench_gathered.py, all
strategies checked against the XLA reference on the GPU, cuDNN dense causal in the same run:
benchmarks/results/gathered_bwd.json):

    ms, fwd / fwd+bwd                 S = 8k          S = 32k
    cuDNN dense causal                0.61 / 2.05     7.20 / 27.7
    kernel gather, sorted (default)   1.26 / 4.87     4.81 / 19.4
    kernel gather, scatter            1.26 / 4.75     4.81 / 19.2
    hybrid (xla gather in bwd only)   1.26 / 4.85     4.81 / 19.7
    kernel gather, atomic             1.26 / 6.23     4.81 / 25.8
    xla gather, scatter               1.66 / 5.02     6.61 / 20.5
    sorted, float32 partials          1.26 / 5.33     4.81 / 21.2
    sorted, U = 1152 (no padding)     0.86 / 4.47     3.26 / 17.8

In-kernel index loads beat the pre-gather (4.8 vs 6.6 ms forward at 32k: no 2.4 GB of K/V
copies); atomics lose 6 ms at 32k (hot keys serialise); "sorted" and "scatter" are within
noise (19.4 / 19.2 ms) and "sorted" is deterministic, so it is the default. The slot kernel
needs 8 warps (fwd+bwd at 32k 29.0 ms with 4, 22.9 with 8: two [tu, D] float32 accumulators
per program; gathered_bwd_run1.json), 3 pipeline stages save 1.2-1.6 ms (2 stages: 20.6 ms
here, run 2: 23.0 -> 21.4), bfloat16 partials 1.9 ms (float32 partials are ~2.4 GB per
tensor at 32k); 8 warps for the window / reduction kernels (19.9 ms) or reduction chunks
of 64 slots instead of 32 (19.2 ms) change nothing beyond noise. A slot count U that is a multiple of
``tu`` (e.g. k + block_q instead of k + block_q - 1) saves another ~1.6 ms: the selection
mask and weights [B, K, S, U] are then neither padded in the forward nor sliced in the
backward.

Factored selections (``selection=SlotSelection``, SparseK's default on the GPU): the mask of
a (query, slot) tile is a slot range test and its weight clip(z_slot - tau_query, 0, 1), made
on chip from a [tu] score vector and three [tq] vectors; the backward returns the slot scores'
gradient ([B, K, nQ, U] from the slot kernel, summed over the block's queries and heads) and
the thresholds' (minus the dQ kernel's row sums over free slots) instead of a [B, K, Sq, U]
weight gradient. Same setting as above with block_q = 64, U = 1088 (profile_gathered_bwd.py,
gathered_stages_*.json; one H100 process per column):

    ms at S = 32k                     dense mask/weights   factored
    forward                           2.47                 2.15
    dQ (+ threshold gradient)         4.24                 2.47
    window dK/dV                      1.22                 1.18
    slot dK/dV + sorted reduction     13.07                12.47   (key sort 3.3, reduction 2.2)
    whole fwd+bwd                     21.07                17.93   (cuDNN dense 28.39 / 27.62)

Without the [tq, tu] weight loads the slot kernel is faster with 4 warps than 8 (fwd+bwd 16.1
vs 17.8 ms, factored; 20.7 vs 21.1 dense, within noise), and 64-slot reduction chunks save
another 0.4 ms (15.7 ms): the defaults for factored selections with block_q <= 64. The XLA
scatter-add reduction was 0.6 ms faster still (15.1 ms) but is not deterministic. The key
sort of the union slots was then made one 1-D sort over all (batch, KV head) rows (XLA's GPU
radix sort; batched sorts take its comparison sort): 3.3 -> 0.83 ms, whole fwd+bwd 13.24 ms
(gathered_stages_1d_sort.json).

With a factored selection most slot tiles lie inside every query's slot range: the forward
branches per tile and skips the range test there (``range_branch``; the masked branch makes it).
In the SparseK layer at 32k on an H100 (profile_layer.py, two processes per setting; device
time of the kernel): forward 1.623-1.648 ms against 1.689-1.712 without; the same branch in dQ
made it 1.997-2.009 against 1.987-1.989, so dQ keeps the per-element test
(benchmarks/results/sweep_range_branch_1124.json has the wall-clock sweep, within its noise).

Blocks of 128 queries halve the per-slot partial sums (the union of a 128-query block is at
most k + 127 slots, against k + 63 for each of two 64-query blocks), but with 64-query
sub-tiles the slot kernel carries its [tu, D] sums through the sub-tile loop: 7.48 ms at 32k
against 4.74 at block 64. One 128-query sub-tile (``slot_tq``, the default for factored
selections with rows of <= 256 bytes) takes 3.67 ms with 8 warps (5.76 with 4), and the SparseK
layer's forward+backward 17.35 ms against 20.19 at block 64 (H = K = 16; cuDNN 27.66 in the same
process; profile_layer_32k_1123c_p_*.json). With GQA 4 the head loop pipelines the sub-tile's q /
dO loads: 3 stages do not fit in shared memory, 2 do (slot kernel 4.14 ms against 9.20 at block
64; layer 12.18 against 17.55 ms; profile_gqa4_*_1123d.json), so SparseKAttention uses 128-query
blocks on the GPU, GQA or not. Default tiles shrink for rows wider than 256 bytes (float32 at
D = 128 did not compile with the bfloat16 tiles).

Key-major dK/dV (``slot_dkv="keys"``, the default for selections with key intervals: SparseK's
``SlotSelection.key_end`` / ``key_scores``). Scores do not depend on the query, so key p is
selected by one range of queries [p + w, key_end[p]). One program per (tile of keys, KV head)
gathers the tile's K/V rows once and walks the query tiles of the range its keys span
(:func:`_key_tiles`: keys ordered by where their range ends, cut into groups, by position inside
a group; on the layer's selection at 32k the tiles visit 1.53x the selected pairs, the per-block
unions 1.125x), query heads of the GQA group included; every key is in one tile, so its dK / dV
rows and its score's gradient are written once: no per-slot partial sums
([B, K, nQ, U, D], ~1.2 GB at 32k), no key sort of the union, no reduction pass. Query tiles
inside every key's range skip the mask. H100, SparseK layer at 32k (k = 1024, w = 512, H = K = 16,
cuDNN in the same process; benchmarks/bench_key_dkv.py, profile_layer.py):

    selected keys' dK/dV alone (ms, wall)        slots + sort + reduction   key-major
    64-query steps (key_dkv_32k_1123e.json)      6.20                        4.19 (key tiles 0.61)
    + unmasked tiles branch, 64-query steps      6.02                        4.73 (same process:)
    + unmasked tiles branch, 32-query steps                                  3.82 (key_dkv_32k_tq_1123e.json)
    layer fwd+bwd, device kernels, 64-query      16.04                       14.88 (profile_layer_32k_1123e_*.json)
    layer fwd+bwd peak memory                    4.01 GiB                    1.86 GiB

64-query steps spill registers (255 per thread, 12.5 % occupancy, 57.6 M local-memory requests:
benchmarks/results/ncu_key_dkv_1123e.txt, with the unmasked-tiles branch); 32-query steps are
the default. In the same runs: 32-key tiles 4.44 (64-query) / 6.72 ms (32-query), 128-query
steps 7.53, 16-query steps 4.65, groups of 4 / 16 tiles 4.45 / 4.52 against 8's 4.19 (64-query);
with GQA 4, 8 warps 5.31 against 3.87 (key_dkv_32k_kv4_1123e.json). Whether the unmasked-tiles
branch pays at 32-query steps is not measured on its own.

The key-major kernel writes dK / dV in the dtype of k / v (the float32 window part is its input,
not an aliased output), and where the window and key tiles divide the keys no row of k / v is
padded (the spare row past the keys is the per-slot kernel's alone): at 32k the pads of k / v,
the float32 -> bfloat16 cast and the slices of dK / dV were ~0.45 ms of the layer's 14.9; with
them gone the key-major kernel took 2.67 ms in the layer (key_dkv_32k_1124a.json: 3.27 alone,
per-slot path 5.98; 16-query steps 5.31, 128-key tiles 15.4, 8 warps 6.37, 2 / 4 stages 3.32 /
3.41) and the layer's fwd+bwd 13.59 ms wall (profile_layer_32k_1124a.json).

Since then the key-major kernel runs before the window kernel: it writes float32 rows only for
the tiles of keys that some query selects (at T = 32k, k = 1024, w = 512 on random normal
scores 4,510 of 32,768 keys, CPU count of the selection's key ends) and the window kernel adds them
(masked row loads) while it writes dK / dV once in k's dtype, instead of reading full float32
window arrays back for every key (key-major 2.67 -> 2.43 ms, window 0.93 -> 1.04 in the layer,
profile_layer_32k_1124g.json). The window tiles' and the slot tiles' masks are branches on the
mask alone, with the tiles' loads and products outside the branch, where the pipeliner can
prefetch them (key-major 2.42 -> 2.08 ms, forward 1.80 -> 1.68; dQ's window step is the
exception: 2.84 instead of 1.99 that way; profile_layer_32k_1124j_*.json); slot tiles that
every query of the tile can see use the selection's mask alone (_slot_tile_needs_mask); the
window kernel runs on 2 stages (0.80 ms in the layer, profile_layer_32k_1124l.json).

With few KV heads the key-major kernel had too few programs (only tiles of selected keys have
work: ~70 of 512 per KV head at 32k); ``key_split`` = P programs per (key tile, KV head) each take
H / K / P of the group's query heads, and the window kernel adds their P float32 partial rows in
a fixed order. SparseK layer at 32k, device kernels: 1 KV head 8.26 -> 7.28 ms (P = 8), 2 KV heads
7.28 ms (P = 4), 4 KV heads 7.61 -> 7.45 (P = 2); the partial rows cost K * P float32 rows per key
(benchmarks/README.md, tenth session).

Semantics are those of :func:`sea_jax.kernels.reference.gathered_attention_reference`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sea_jax.kernels.gpu_block_sparse import (
    LOG2E,
    _dot,
    _element_mask,
    _next_pow2,
    _pad_to,
    _split,
    _run_tile,
    _tile_needs_mask,
    compiler_params,
    pltriton,
    row_scaled_tile,
)
from sea_jax.kernels.layout import num_blocks, validate_block_size

__all__ = ["gathered_attention_gpu", "GatheredGpuConfig", "default_slot_tq", "default_slot_stages",
           "default_reduce_stages"]

GATHER_MODES = ("kernel", "xla")
DKV_REDUCE_MODES = ("sorted", "scatter", "atomic")


@dataclasses.dataclass(frozen=True)
class GatheredGpuConfig:
    seq_q: int
    seq_k: int
    num_heads: int
    num_kv_heads: int
    block_q: int
    window: int | None  # None when 0: no window span (attributes shared with _element_mask)
    causal: bool
    weight_mode: str
    has_mask: bool
    has_weights: bool
    has_segments: bool
    factored: bool  # SlotSelection: mask and weights generated on chip (has_mask/has_weights False)
    scale: float
    interpret: bool
    gather: str  # forward and dQ (and the rest of the backward unless bwd_gather differs)
    bwd_gather: str  # slot dK/dV (and dQ) loads in the backward
    dkv_reduce: str
    reduce_chunk: int
    partial_dtype: str  # per-slot partial sums ("scatter", "sorted"): "float32" or "bfloat16"
    key_major: bool  # factored selection with key intervals: slot dK/dV key by key (_dkv_keys)
    key_tk: int  # the key-major kernel's key tile
    key_tq: int  # and query tile
    key_group: int  # key tiles per group of keys ordered by the end of their query range (_key_tiles)
    key_split: int  # the key-major kernel's programs per (key tile, KV head): the group's query heads split P ways
    tq: int
    tk: int
    tu: int
    slot_tq: int  # the slot dK/dV kernel's query sub-tile (divides block_q)
    always_mask: bool  # window tiles: element mask always (True) or branch per tile
    range_branch: bool  # factored: the forward's slot tiles inside every query's slot range skip the range test
    warps: tuple[int, int, int, int, int, int]  # fwd, dq, window dkv, slot dkv, sorted reduce, key dkv
    stages: tuple[int, int, int, int, int, int]

    @property
    def w(self) -> int:
        return self.window or 0


def _window_tiles(cfg, q0, tq, tk):
    """First key tile and number of key tiles of the window span of queries [q0, q0+tq)."""
    if cfg.window is None:
        return jnp.int32(0), jnp.int32(0)
    lo = jnp.maximum(q0 - (cfg.w - 1), 0)
    hi = jnp.minimum(q0 + tq, cfg.seq_k)  # exclusive
    first = lax.div(lo, jnp.int32(tk))
    n = jnp.where(hi > lo, lax.div(hi - 1, jnp.int32(tk)) - first + 1, 0)
    return first, n


def _mask_window_tile(cfg, s, q0, tq, k0, tk, positions):
    """s (a tile of queries [q0, q0 + tq) x keys [k0, k0 + tk), either orientation) with -inf
    at the pairs the causal / window / segment rule hides; ``positions()`` -> (qpos, kpos,
    segq, segk) broadcastable to s, built inside the masked branch only. A branch on the mask
    alone, the tile's loads and products outside it (with all of the step inside each branch
    the forward took 1.80 ms instead of 1.68 at T = 32k on an H100, the key-major kernel 2.42
    instead of 2.08: benchmarks/results/profile_layer_32k_1124j_*.json)."""
    def masked(s):
        return jnp.where(_element_mask(cfg, *positions()), s, -jnp.inf)

    return _run_tile(cfg, _tile_needs_mask(cfg, q0, tq, k0, tk), masked, lambda s: s, s)


def _slot_tile_needs_mask(cfg, idx, q0):
    """Traced bool: slot tile ``idx`` may hold a key that some query of the tile [q0, ...)
    must not see (an empty slot, a key past the sequence, or one too late for the causal /
    window rule), so it needs _slot_allowed's element mask; otherwise the selection mask
    alone decides (a few elementwise ops fewer per (query, slot) pair). None: every tile
    does (segments)."""
    if cfg.has_segments:
        return None
    hi = jnp.max(idx)
    need = (jnp.min(idx) < 0) | (hi >= cfg.seq_k)
    if cfg.causal:
        need = need | (hi > q0 - cfg.w)
    return need


def _mask_slot_scores(cfg, s, idx, q0, qpos, sel, segq, segk):
    """s [tq, tu] with -inf where a query may not use a slot: _slot_allowed's element mask on
    tiles that need it, the selection mask alone on the others (a branch on the mask only:
    the tile's loads stay outside it, where the pipeliner can prefetch them)."""
    def masked(s):
        return jnp.where(_slot_allowed(cfg, idx, qpos, sel, segq, segk), s, -jnp.inf)

    def plain(s):
        return s if sel is None else jnp.where(sel if sel.dtype == jnp.bool_ else sel != 0, s, -jnp.inf)

    return _run_tile(cfg, _slot_tile_needs_mask(cfg, idx, q0), masked, plain, s)


def _slot_allowed(cfg, idx, qpos, sel, segq, segk):
    """[tq, tu] visibility of slots idx (row vector) for queries qpos (column)."""
    kp = idx[None, :]
    ok = (kp >= 0) & (kp < cfg.seq_k)
    if cfg.causal:
        ok = ok & (kp <= qpos - cfg.w if cfg.w > 0 else kp <= qpos)
    if sel is not None:
        ok = ok & (sel if sel.dtype == jnp.bool_ else sel != 0)
    if cfg.has_segments:
        ok = ok & (segq == segk) & (segk != 0)
    return ok


class _Refs:
    """Named access to the kernel's positional refs."""

    def __init__(self, refs, names):
        refs = list(refs)
        assert len(refs) == len(names), (len(refs), names)
        self.__dict__.update(zip(names, refs))


def _in_names(cfg, *extra):
    names = ["union", "slot_tiles", "q", "k", "v"]
    if cfg.gather == "xla":
        names += ["kg", "vg"]
    if cfg.has_mask:
        names.append("sel")
    if cfg.has_weights:
        names.append("wsel")
    if cfg.has_segments:
        names.append("seg")
    if cfg.factored:
        names += ["zslot", "slo", "shi", "thr"]
    return names + list(extra)


def _selection_tile(cfg, r, b, kh, i, u0, rows):
    """(mask, float32 weights, free) of slot tile [u0, u0 + tu) for the queries ``rows`` (a
    pl.ds into the query-indexed refs); None where absent. ``free`` (factored selections
    only): where the weight's derivative in z and tau is nonzero, 0 < z - tau < 1."""
    if cfg.factored:
        return (_factored_range(cfg, r, u0, rows),) + _factored_weights(cfg, r, b, kh, i, u0, rows)
    sel = r.sel[rows, pl.ds(u0, cfg.tu)] if cfg.has_mask else None
    wf = r.wsel[rows, pl.ds(u0, cfg.tu)].astype(jnp.float32) if cfg.has_weights else None
    return sel, wf, None


def _factored_range(cfg, r, u0, rows):
    """[tq, tu] bool: slot u0 + j lies in query row's selected slot range [slo, shi)."""
    col = u0 + lax.broadcasted_iota(jnp.int32, (cfg.tq, cfg.tu), 1)
    return (col >= r.slo[rows][:, None]) & (col < r.shi[rows][:, None])


def _factored_weights(cfg, r, b, kh, i, u0, rows):
    """(weights clip(z - tau, 0, 1), free 0 < z - tau < 1), [tq, tu] each, of slot tile u0."""
    x = r.zslot[b, kh, i, pl.ds(u0, cfg.tu)][None, :] - r.thr[rows][:, None]  # thr = -inf: weight 1, never free
    return jnp.minimum(jnp.maximum(x, 0.0), 1.0), (x > 0.0) & (x < 1.0)


def _load_slots(cfg, r, u0, idx_safe):
    """K and V rows of slot tile [u0, u0 + tu): [tu, Dp] each."""
    if cfg.gather == "xla":
        return r.kg[pl.ds(u0, cfg.tu), :], r.vg[pl.ds(u0, cfg.tu), :]
    return r.k[idx_safe, :], r.v[idx_safe, :]


def _covered_slots(cfg, r):
    """(max lo, min hi) of the query tile's selected slot ranges [slo, shi) when slot tiles
    between them may skip the range test (``cfg.range_branch``, factored selections without
    segments), else None."""
    if not (cfg.factored and cfg.range_branch) or cfg.has_segments or cfg.always_mask:
        return None
    return jnp.max(r.slo[...]), jnp.min(r.shi[...])


def _slot_tile_scores(cfg, r, b, kh, i, t, q, q0, qpos, segq, covered=None):
    """Slot tile t of query block i for the query tile q (rows [q0, q0 + tq)): the masked, scaled
    scores s [tq, tu] and the tile's K / V rows, gate weights and free-slot mask (forward and dQ).
    ``covered`` (:func:`_covered_slots`): a tile inside every query's slot range that needs no
    causal / bounds mask either is not masked at all (a branch per tile; the range test is made
    inside the masked branch only)."""
    u0 = pl.multiple_of(t * cfg.tu, cfg.tu)
    idx = r.union[b, kh, i, pl.ds(u0, cfg.tu)]
    idx_safe = jnp.maximum(idx, 0)
    k, v = _load_slots(cfg, r, u0, idx_safe)
    s = _dot(q, k, 1, 1) * (cfg.scale * LOG2E)
    if covered is not None:
        rows = pl.ds(0, q.shape[0])
        wf, free = _factored_weights(cfg, r, b, kh, i, u0, rows)

        def masked(s):  # (the range test made here only)
            sel = _factored_range(cfg, r, u0, rows)
            return jnp.where(_slot_allowed(cfg, idx, qpos, sel, None, None), s, -jnp.inf)

        max_lo, min_hi = covered
        needs = _slot_tile_needs_mask(cfg, idx, q0) | (u0 < max_lo) | (u0 + cfg.tu > min_hi)
        return _run_tile(cfg, needs, masked, lambda s: s, s), k, v, wf, free
    sel, wf, free = _selection_tile(cfg, r, b, kh, i, u0, pl.ds(0, q.shape[0]))
    segk = r.seg[idx_safe][None, :] if cfg.has_segments else None
    return _mask_slot_scores(cfg, s, idx, q0, qpos, sel, segq, segk), k, v, wf, free


# --------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: GatheredGpuConfig):
    r = _Refs(refs, _in_names(cfg, "o", "lse"))
    tq, tk, tu = cfg.tq, cfg.tk, cfg.tu
    tile = pl.num_programs(0) - 1 - pl.program_id(0)
    h, b = pl.program_id(1), pl.program_id(2)
    kh = _split(h, cfg.num_heads // cfg.num_kv_heads)[0]
    i = _split(tile, cfg.block_q // tq)[0]
    q0 = tile * tq
    qk_scale = cfg.scale * LOG2E
    q = r.q[...]
    d = q.shape[-1]
    segq = r.seg[pl.ds(q0, tq)][:, None] if cfg.has_segments else None

    def update(carry, s, pw_factor, v):
        acc, m, l = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        if pw_factor is None:
            pw = p
            l_new = l * alpha + jnp.sum(p, axis=1)
        else:
            pw = p * pw_factor
            l_new = l * alpha + jnp.sum(pw if cfg.weight_mode == "log" else p, axis=1)
        acc = acc * alpha[:, None] + _dot(pw.astype(v.dtype), v)
        return acc, m_new, l_new

    # phase 1: the window span
    first, n_win = _window_tiles(cfg, q0, tq, tk)
    qpos_w = q0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)

    def win_step(t, carry):
        k0 = pl.multiple_of((first + t) * tk, tk)
        k = r.k[pl.ds(k0, tk), :]
        v = r.v[pl.ds(k0, tk), :]
        s = _dot(q, k, 1, 1) * qk_scale

        s = _mask_window_tile(cfg, s, q0, tq, k0, tk, lambda: (
            qpos_w, k0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 1), segq,
            r.seg[pl.ds(k0, tk)][None, :] if cfg.has_segments else None))
        return update(carry, s, None, v)

    init = (jnp.zeros((tq, d), jnp.float32), jnp.full((tq,), -jnp.inf, jnp.float32),
            jnp.zeros((tq,), jnp.float32))
    carry = lax.fori_loop(0, n_win, win_step, init)

    # phase 2: the selected slots
    qpos_s = q0 + lax.broadcasted_iota(jnp.int32, (tq, tu), 0)
    covered = _covered_slots(cfg, r)

    def slot_step(t, carry):
        s, _, v, wf, _ = _slot_tile_scores(cfg, r, b, kh, i, t, q, q0, qpos_s, segq, covered)
        return update(carry, s, wf, v)

    acc, m, l = lax.fori_loop(0, r.slot_tiles[b, kh, i], slot_step, carry)
    ok = l > 0
    safe_l = jnp.where(ok, l, 1.0)
    r.o[...] = jnp.where(ok[:, None], acc / safe_l[:, None], 0.0).astype(r.o.dtype)
    r.lse[...] = jnp.where(ok, m + jnp.log2(safe_l), jnp.inf)


def _specs(cfg, shapes):
    """BlockSpecs of the common inputs for a grid (query tile, query head h, batch)."""
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    rep = H // K
    tq = cfg.tq
    n_q_tiles = Sq_pad // tq
    sub_q = cfg.block_q // tq
    kvh = lambda h: h // rep
    qt = lambda t: n_q_tiles - 1 - t  # latest tiles (most work) first
    full = lambda x_shape: pl.BlockSpec(x_shape, lambda *_: (0,) * len(x_shape))
    specs = {
        "union": full((B, K, Sq_pad // cfg.block_q, U_pad)),
        "slot_tiles": full((B, K, Sq_pad // cfg.block_q)),
        "k": pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, h, b: (b, 0, kvh(h), 0)),
        "q": pl.BlockSpec((None, tq, None, Dp), lambda t, h, b: (b, qt(t), h, 0)),
        "row": pl.BlockSpec((None, None, tq), lambda t, h, b: (b, h, qt(t))),
        "kg": pl.BlockSpec(
            (None, None, None, U_pad, Dp), lambda t, h, b: (b, kvh(h), qt(t) // sub_q, 0, 0)
        ),
        "sel": pl.BlockSpec((None, None, tq, U_pad), lambda t, h, b: (b, kvh(h), qt(t), 0)),
        "zslot": full((B, K, Sq_pad // cfg.block_q, U_pad)),
        "slo": pl.BlockSpec((None, None, tq), lambda t, h, b: (b, kvh(h), qt(t))),
    }
    specs["v"], specs["vg"], specs["wsel"] = specs["k"], specs["kg"], specs["sel"]
    specs["shi"] = specs["thr"] = specs["slo"]
    return specs


def _common_args(cfg, names, specs, arrays):
    in_specs, args = [], []
    for n in names:
        in_specs.append(specs[n])
        args.append(arrays[n])
    return in_specs, args


def _forward(cfg, arrays, shapes):
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    specs = _specs(cfg, shapes)
    specs["seg"] = pl.BlockSpec((None, arrays["seg"].shape[1] if cfg.has_segments else 1), lambda t, h, b: (b, 0))
    names = _in_names(cfg)
    in_specs, args = _common_args(cfg, names, specs, arrays)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(Sq_pad // cfg.tq, H, B),
        in_specs=in_specs,
        out_specs=[specs["q"], specs["row"]],
        out_shape=[jax.ShapeDtypeStruct((B, Sq_pad, H, Dp), arrays["q"].dtype),
                   jax.ShapeDtypeStruct((B, H, Sq_pad), jnp.float32)],
        compiler_params=compiler_params(cfg.warps[0], cfg.stages[0]),
        interpret=cfg.interpret,
        name="gathered_fwd",
    )(*args)
    return o, lse


# ------------------------------------------------------------------------------- dQ
def _dq_kernel(*refs, cfg: GatheredGpuConfig):
    """dQ of one (query tile, head); factored selections also get ``gsum``: per query, the
    sum of the weight gradient over its free slots (tau's cotangent is -sum over heads)."""
    r = _Refs(refs, _in_names(cfg, "do", "lse", "delta", "dq", *(["gsum"] if cfg.factored else [])))
    tq, tk, tu = cfg.tq, cfg.tk, cfg.tu
    tile = pl.num_programs(0) - 1 - pl.program_id(0)
    h, b = pl.program_id(1), pl.program_id(2)
    kh = _split(h, cfg.num_heads // cfg.num_kv_heads)[0]
    i = _split(tile, cfg.block_q // tq)[0]
    q0 = tile * tq
    qk_scale = cfg.scale * LOG2E
    q = r.q[...]
    do = r.do[...]
    lse = r.lse[...][:, None]
    delta = r.delta[...][:, None]
    segq = r.seg[pl.ds(q0, tq)][:, None] if cfg.has_segments else None

    def grad_s(s, dp, wf):
        p = jnp.exp2(s - lse)
        if wf is None:
            return p * (dp - delta)
        if cfg.weight_mode == "gate":
            return p * (wf * dp - delta)
        return p * wf * (dp - delta)

    first, n_win = _window_tiles(cfg, q0, tq, tk)
    qpos_w = q0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 0)

    def win_step(t, dq):
        k0 = pl.multiple_of((first + t) * tk, tk)

        # (here the whole step sits in each branch: with the loads and products outside, as in
        # the other kernels, dQ took 2.84 ms instead of 1.99 in the layer at T = 32k on an H100,
        # benchmarks/results/profile_layer_32k_1124j_*.json)
        def compute(dq, masked):
            k = r.k[pl.ds(k0, tk), :]
            v = r.v[pl.ds(k0, tk), :]
            s = _dot(q, k, 1, 1) * qk_scale
            if masked:
                kpos = k0 + lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
                segk = r.seg[pl.ds(k0, tk)][None, :] if cfg.has_segments else None
                s = jnp.where(_element_mask(cfg, qpos_w, kpos, segq, segk), s, -jnp.inf)
            ds = grad_s(s, _dot(do, v, 1, 1), None)
            return dq + _dot(ds.astype(k.dtype), k)

        needs = _tile_needs_mask(cfg, q0, tq, k0, tk)
        return _run_tile(cfg, needs, lambda c: compute(c, True), lambda c: compute(c, False), dq)

    dq = lax.fori_loop(0, n_win, win_step, jnp.zeros(q.shape, jnp.float32))
    qpos_s = q0 + lax.broadcasted_iota(jnp.int32, (tq, tu), 0)

    def slot_step(t, carry):
        dq, gsum = carry
        # (no range branch here: on the H100 it made dQ ~0.015 ms slower at 32k, the forward
        # ~0.06 ms faster; module docstring)
        s, k, v, wf, free = _slot_tile_scores(cfg, r, b, kh, i, t, q, q0, qpos_s, segq)
        dp = _dot(do, v, 1, 1)
        ds = grad_s(s, dp, wf)
        if cfg.factored:
            p = jnp.exp2(s - lse)
            dw = p * dp if cfg.weight_mode == "gate" else p * (dp - delta)
            gsum = gsum + jnp.sum(jnp.where(free, dw, 0.0), axis=1)
        return dq + _dot(ds.astype(k.dtype), k), gsum

    dq, gsum = lax.fori_loop(0, r.slot_tiles[b, kh, i], slot_step, (dq, jnp.zeros((tq,), jnp.float32)))
    r.dq[...] = (dq * cfg.scale).astype(r.dq.dtype)
    if cfg.factored:
        r.gsum[...] = gsum


# --------------------------------------------------------------------- window dK/dV
def _dkv_window_kernel(*refs, cfg: GatheredGpuConfig):
    """dK / dV of one tile of keys from the queries of their window span. On the key-major path
    (cfg.key_major) the selected keys' part, float32 rows of the key-major kernel's output, is
    added here (``slot``: each key's row there, -1 for keys no query selects) and dK / dV are
    written in the dtype of k / v; otherwise float32 for the per-slot path to add to."""
    parts = ["slot", "pk", "pv"] if cfg.key_major else []
    names = ["q", "k", "v"] + (["seg"] if cfg.has_segments else []) + parts + ["do", "lse", "delta", "dk", "dv"]
    r = _Refs(refs, names)
    tq, tk = cfg.tq, cfg.tk
    tile = pl.program_id(0)
    rep = cfg.num_heads // cfg.num_kv_heads
    k0 = tile * tk
    qk_scale = cfg.scale * LOG2E
    k = r.k[...]
    v = r.v[...]
    d = k.shape[-1]
    kpos = k0 + lax.broadcasted_iota(jnp.int32, (tk, tq), 0)
    segk = r.seg[pl.ds(k0, tk)][:, None] if cfg.has_segments else None
    n_q_tiles = r.q.shape[0] // tq
    first = lax.div(k0, jnp.int32(tq))
    last = jnp.minimum(lax.div(k0 + tk - 1 + cfg.w - 1, jnp.int32(tq)), n_q_tiles - 1)
    n = last - first + 1

    def head(hr, carry):
        def step(t, carry):
            q0 = pl.multiple_of((first + t) * tq, tq)
            dk, dv = carry
            q = r.q[pl.ds(q0, tq), hr, :]
            do = r.do[pl.ds(q0, tq), hr, :]
            lse = r.lse[hr, pl.ds(q0, tq)][None, :]
            delta = r.delta[hr, pl.ds(q0, tq)][None, :]
            st = _dot(k, q, 1, 1) * qk_scale
            st = _mask_window_tile(cfg, st, q0, tq, k0, tk, lambda: (
                q0 + lax.broadcasted_iota(jnp.int32, (tk, tq), 1), kpos,
                r.seg[pl.ds(q0, tq)][None, :] if cfg.has_segments else None, segk))
            pt = jnp.exp2(st - lse)
            dpt = _dot(v, do, 1, 1)
            dv = dv + _dot(pt.astype(do.dtype), do)
            dk = dk + _dot((pt * (dpt - delta)).astype(q.dtype), q)
            return dk, dv

        return lax.fori_loop(0, n, step, carry)

    init = (jnp.zeros((tk, d), jnp.float32), jnp.zeros((tk, d), jnp.float32))
    dk, dv = lax.fori_loop(0, rep, head, init)
    dk = dk * cfg.scale
    if cfg.key_major:
        # the selected keys' part (~14 % of the keys at T = 32k, k = 1024): masked row loads, so the
        # keys that no query selects read nothing
        slot = r.slot[pl.ds(k0, tk)]
        shape = (tk, d)
        rows = jnp.broadcast_to(jnp.maximum(slot, 0)[:, None], shape)
        cols = lax.broadcasted_iota(jnp.int32, shape, 1)
        sel = jnp.broadcast_to((slot >= 0)[:, None], shape)
        for part in range(cfg.key_split):  # the key-major kernel's partial sums, in a fixed order
            dk = dk + pltriton.load(r.pk.at[rows, cols + part * d], mask=sel, other=0.0)
            dv = dv + pltriton.load(r.pv.at[rows, cols + part * d], mask=sel, other=0.0)
    r.dk[...] = dk.astype(r.dk.dtype)
    r.dv[...] = dv.astype(r.dv.dtype)


def _dkv_window(cfg, arrays, shapes, parts=None):
    """The window part of dK / dV: float32 [B, Skv_pad, K, Dp] each; on the key-major path
    (``parts``: (slot int32 [B, K, Skv_pad], pk, pv) from _dkv_keys) the whole dK / dV in the
    dtype of k / v."""
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    rep = H // K
    tk = cfg.tk
    kspec = pl.BlockSpec((None, tk, None, Dp), lambda t, kh, b: (b, t, kh, 0))
    qspec = pl.BlockSpec((None, Sq_pad, rep, Dp), lambda t, kh, b: (b, 0, kh, 0))
    rowspec = pl.BlockSpec((None, rep, Sq_pad), lambda t, kh, b: (b, kh, 0))
    in_specs = [qspec, kspec, kspec]
    args = [arrays["q"], arrays["k"], arrays["v"]]
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, arrays["seg"].shape[1]), lambda t, kh, b: (b, 0)))
        args.append(arrays["seg"])
    if cfg.key_major:
        if parts is None:
            raise ValueError("the key-major window kernel adds the key-major kernel's rows: pass parts=(slot, pk, pv) "
                             "from _dkv_keys")
        slot, pk, pv = parts
        full_kv = pl.BlockSpec((None, Skv_pad, None, cfg.key_split * Dp), lambda t, kh, b: (b, 0, kh, 0))
        in_specs += [pl.BlockSpec((None, None, Skv_pad), lambda t, kh, b: (b, kh, 0)), full_kv, full_kv]
        args += [slot, pk, pv]
    in_specs += [qspec, rowspec, rowspec]
    args += [arrays["do"], arrays["lse"], arrays["delta"]]
    shape = [jax.ShapeDtypeStruct((B, Skv_pad, K, Dp), arrays[n].dtype if cfg.key_major else jnp.float32)
             for n in ("k", "v")]
    return pl.pallas_call(
        functools.partial(_dkv_window_kernel, cfg=cfg),
        grid=(Skv_pad // tk, K, B),
        in_specs=in_specs,
        out_specs=[kspec, kspec],
        out_shape=shape,
        compiler_params=compiler_params(cfg.warps[2], cfg.stages[2]),
        interpret=cfg.interpret,
        name="gathered_dkv_window",
    )(*args)


# ---------------------------------------------------------- slot dK/dV and weights
def _dkv_slots_kernel(*refs, cfg: GatheredGpuConfig):
    """One program per (query block, KV head, batch): every slot tile of the block's union,
    summed over the block's query tiles and the group's query heads (the gathered K/V rows
    are loaded once per slot tile, not once per query tile)."""
    outs = (["dw"] if cfg.has_weights else []) + (["dz"] if cfg.factored else [])
    if cfg.dkv_reduce == "atomic":
        ins = _in_names(cfg, "do", "lse", "delta", "dk_in", "dv_in")
        outs += ["dk", "dv"]
    else:
        ins = _in_names(cfg, "do", "lse", "delta")
        outs += ["dks", "dvs"]
    r = _Refs(refs, ins + outs)
    tq, tu, bq = cfg.tq, cfg.tu, cfg.block_q
    rep = cfg.num_heads // cfg.num_kv_heads
    i = pl.num_programs(0) - 1 - pl.program_id(0)  # latest blocks (most slots) first
    kh, b = pl.program_id(1), pl.program_id(2)
    qk_scale = cfg.scale * LOG2E
    d = r.q.shape[-1]
    n_slot_tiles = r.slot_tiles[b, kh, i]

    def slot_step(t, carry):
        u0 = pl.multiple_of(t * tu, tu)
        idx = r.union[b, kh, i, pl.ds(u0, tu)]
        idx_safe = jnp.maximum(idx, 0)
        k, v = _load_slots(cfg, r, u0, idx_safe)
        segk = r.seg[idx_safe][None, :] if cfg.has_segments else None

        def sub_tile(j, acc):
            acc, dz = acc[:2], acc[2]
            s0 = pl.multiple_of(j * tq, tq)
            q0 = i * bq + s0
            qpos = q0 + lax.broadcasted_iota(jnp.int32, (tq, tu), 0)
            segq = r.seg[pl.ds(q0, tq)][:, None] if cfg.has_segments else None
            sel, wf, free = _selection_tile(cfg, r, b, kh, i, u0, pl.ds(s0, tq))
            allowed = _slot_allowed(cfg, idx, qpos, sel, segq, segk)

            def head(hr, carry):
                dk, dv, dw = carry
                q = r.q[pl.ds(s0, tq), hr, :]
                do = r.do[pl.ds(s0, tq), hr, :]
                lse = r.lse[hr, pl.ds(s0, tq)][:, None]
                delta = r.delta[hr, pl.ds(s0, tq)][:, None]
                s = jnp.where(allowed, _dot(q, k, 1, 1) * qk_scale, -jnp.inf)  # [tq, tu]
                p = jnp.exp2(s - lse)
                dp = _dot(do, v, 1, 1)
                if wf is None:
                    pw = p
                    ds = p * (dp - delta)
                elif cfg.weight_mode == "gate":
                    pw = p * wf
                    ds = p * (wf * dp - delta)
                    dw = dw + p * dp
                else:
                    pw = p * wf
                    ds = pw * (dp - delta)
                    dw = dw + p * (dp - delta)
                dv = dv + _dot(pw.astype(do.dtype), do, 0, 0)  # [tu, D]
                dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
                return dk, dv, dw

            dk, dv, dw = lax.fori_loop(0, rep, head, acc + (jnp.zeros((tq, tu), jnp.float32),))
            if cfg.has_weights:
                r.dw[pl.ds(s0, tq), pl.ds(u0, tu)] = dw
            if cfg.factored:  # the slot scores' gradient, summed over queries and heads
                dz = dz + jnp.sum(jnp.where(free, dw, 0.0), axis=0)
            return dk, dv, dz

        init = (jnp.zeros((tu, d), jnp.float32), jnp.zeros((tu, d), jnp.float32), jnp.zeros((tu,), jnp.float32))
        dk, dv, dz = lax.fori_loop(0, bq // tq, sub_tile, init)
        if cfg.factored:
            r.dz[pl.ds(u0, tu)] = dz
        dk = dk * cfg.scale
        if cfg.dkv_reduce == "atomic":
            # Rows of empty slots are exactly zero. They go to the spare padding row (never a
            # real key), and on the GPU the mask drops them altogether (interpret mode's
            # discharge rule takes no mask). Valid slots of a row are distinct keys.
            cols = lax.broadcasted_iota(jnp.int32, (1, d), 1)
            rows = jnp.where(idx >= 0, idx, r.k.shape[0] - 1)[:, None]  # spare padding row
            valid = None if cfg.interpret else (idx >= 0)[:, None] & (cols >= 0)
            pltriton.atomic_add(r.dk, (rows, cols), dk, mask=valid)
            pltriton.atomic_add(r.dv, (rows, cols), dv, mask=valid)
        else:
            r.dks[pl.ds(u0, tu), :] = dk.astype(r.dks.dtype)
            r.dvs[pl.ds(u0, tu), :] = dv.astype(r.dvs.dtype)
        return carry  # (a literal would not lower: scf.yield needs a value)

    lax.fori_loop(0, n_slot_tiles, slot_step, jnp.int32(0))
    if cfg.factored:
        def zero_dz(t, carry):
            r.dz[pl.ds(pl.multiple_of(t * tu, tu), tu)] = jnp.zeros((tu,), jnp.float32)
            return carry

        lax.fori_loop(n_slot_tiles, r.union.shape[-1] // tu, zero_dz, jnp.int32(0))
    if cfg.has_weights:
        # slot tiles never visited hold no selected key: zero gradient
        def zero(t, carry):
            r.dw[:, pl.ds(pl.multiple_of(t * tu, tu), tu)] = jnp.zeros((bq, tu), jnp.float32)
            return carry

        lax.fori_loop(n_slot_tiles, r.union.shape[-1] // tu, zero, jnp.int32(0))


def _dkv_slots(cfg, arrays, shapes, dk_win, dv_win):
    """Slot dK/dV (and the weight gradient): dK, dV [B, Skv_pad, K, Dp] with the window part
    dk_win / dv_win included, in float32 ("atomic", "scatter") or k's dtype ("sorted")."""
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    rep, bq = H // K, cfg.block_q
    nq = Sq_pad // bq
    qb = lambda t: nq - 1 - t
    full = lambda x_shape: pl.BlockSpec(x_shape, lambda *_: (0,) * len(x_shape))
    kvspec = pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, h, b: (b, 0, h, 0))
    qspec = pl.BlockSpec((None, bq, rep, Dp), lambda t, h, b: (b, qb(t), h, 0))
    rowspec = pl.BlockSpec((None, rep, bq), lambda t, h, b: (b, h, qb(t)))
    selspec = pl.BlockSpec((None, None, bq, U_pad), lambda t, h, b: (b, h, qb(t), 0))
    slotspec = pl.BlockSpec((None, None, None, U_pad, Dp), lambda t, h, b: (b, h, qb(t), 0, 0))
    kvrow = pl.BlockSpec((None, None, bq), lambda t, h, b: (b, h, qb(t)))
    zspec = pl.BlockSpec((None, None, None, U_pad), lambda t, h, b: (b, h, qb(t), 0))
    specs = dict(
        union=full((B, K, nq, U_pad)), slot_tiles=full((B, K, nq)), q=qspec, k=kvspec, v=kvspec,
        kg=slotspec, vg=slotspec, sel=selspec, wsel=selspec, do=qspec, lse=rowspec, delta=rowspec,
        zslot=full((B, K, nq, U_pad)), slo=kvrow, shi=kvrow, thr=kvrow,
        seg=pl.BlockSpec((None, arrays["seg"].shape[1] if cfg.has_segments else 1), lambda t, h, b: (b, 0)),
    )
    names = _in_names(cfg) + ["do", "lse", "delta"]
    in_specs, args = _common_args(cfg, names, specs, arrays)
    out_specs, out_shape = [], []
    if cfg.has_weights:
        out_specs.append(selspec)
        out_shape.append(jax.ShapeDtypeStruct((B, K, Sq_pad, U_pad), jnp.float32))
    if cfg.factored:
        out_specs.append(zspec)
        out_shape.append(jax.ShapeDtypeStruct((B, K, nq, U_pad), jnp.float32))
    aliases = {}
    if cfg.dkv_reduce == "atomic":
        aliases = {len(args): len(out_shape), len(args) + 1: len(out_shape) + 1}
        in_specs += [kvspec, kvspec]
        args += [dk_win, dv_win]
        out_specs += [kvspec, kvspec]
        out_shape += [jax.ShapeDtypeStruct(dk_win.shape, jnp.float32)] * 2
    else:
        out_specs += [slotspec, slotspec]
        out_shape += [jax.ShapeDtypeStruct((B, K, nq, U_pad, Dp), jnp.dtype(cfg.partial_dtype))] * 2
    outs = pl.pallas_call(
        functools.partial(_dkv_slots_kernel, cfg=dataclasses.replace(cfg, tq=cfg.slot_tq)),
        grid=(nq, K, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params(cfg.warps[3], cfg.stages[3]),
        interpret=cfg.interpret,
        name="gathered_dkv_slots",
    )(*args)
    dw = outs[0] if (cfg.has_weights or cfg.factored) else None  # dz for factored selections
    dk, dv = outs[-2], outs[-1]
    if cfg.dkv_reduce == "scatter":
        # XLA scatter-add of the per-slot sums of block i into the keys
        union = arrays["union"]
        safe = jnp.where(union >= 0, union, Skv_pad)  # out of range -> dropped
        bi = jnp.arange(B)[:, None, None, None]
        ki = jnp.arange(K)[None, :, None, None]
        dk = dk_win.at[bi, safe, ki].add(dk.astype(jnp.float32), mode="drop")
        dv = dv_win.at[bi, safe, ki].add(dv.astype(jnp.float32), mode="drop")
    elif cfg.dkv_reduce == "sorted":
        dk, dv = _reduce_sorted(cfg, arrays["union"], dk, dv, dk_win, dv_win, arrays["k"].dtype)
    return dw, dk, dv


# ------------------------------------------------------- key-major slot dK/dV (SparseK)
_PACKED_SORT_LIMIT = 2**31  # _key_tiles packs (row, sort key, position) into one int32 below this


@jax.named_scope("gathered_key_tiles")
def _key_tiles(cfg, kend):
    """Tiles of keys for the key-major dK/dV kernel.

    kend: int32 [B, K, Skv_pad] (key p is selected by the queries [p + w, kend[p]); kend <=
    p + w: never; kend <= seq_q). Returns perm int32 [B, K, Skv_pad] (the keys, tile t =
    perm[t * key_tk:(t + 1) * key_tk]), first and count int32 [B, K, Skv_pad // key_tk]: the
    tile's first query tile (of key_tq queries) and how many it visits (0: no key of the tile
    is ever selected).

    A tile visits the query range from its keys' first start to their last end, so its keys
    should start and end close together. Selected keys are ordered by where their range ends
    (latest first: the longest tiles start first), cut into groups of ``key_group`` tiles,
    and ordered by position inside each group. Groups by count adapt to how the ends are
    spread (on random scores at 32k, k = 1024, w = 512, with position terms from none to
    strong, 64-key tiles in groups of 8 visit 1.4-1.6x the selected (key, query) pairs, the
    per-block unions of the slot kernel 1.12x; ends bucketed by value instead: 1.5-2.9x).
    1-D sorts of packed int32 keys, or of (row and key, position) pairs, when they fit (XLA's GPU
    radix sort), else batched ones.
    """
    B, K, S = kend.shape
    tk, tq, w, G = cfg.key_tk, cfg.key_tq, cfg.w, cfg.key_group
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), kend.shape)
    start = pos + w
    alive = kend > start
    rows = B * K
    row = jnp.arange(rows, dtype=jnp.int32).reshape(B, K, 1)

    def sort_rows(key, span, payload, payload_ascending=False):
        """payload [B, K, S] in [0, S) ordered by key in [0, span), ties by payload."""
        if rows * span * S < _PACKED_SORT_LIMIT:
            packed = jnp.sort(((row * span + key) * S + payload).reshape(-1))
            return (packed % S).reshape(B, K, S)
        if payload_ascending and rows * span < _PACKED_SORT_LIMIT:
            # a stable 1-D (key, payload) sort keeps ties in payload order: also a radix sort
            # (the batched sort below is XLA's comparison sort: ~10 kernels at 32k)
            _, out = lax.sort(((row * span + key).reshape(-1), payload.reshape(-1)), num_keys=1, is_stable=True)
            return out.reshape(B, K, S)
        return lax.sort((key, payload), dimension=-1, num_keys=2)[1]

    # 1. by end, latest first (never-selected keys last)
    by_end = sort_rows(jnp.where(alive, cfg.seq_q - kend, cfg.seq_q + 1), cfg.seq_q + 2, pos, payload_ascending=True)
    # 2. groups of G tiles in that order (never-selected keys in a group of their own), by
    # position inside a group
    n_groups = -(-S // (G * tk))
    group = jnp.where(jnp.take_along_axis(alive, by_end, axis=-1), pos // (G * tk), n_groups)
    perm = sort_rows(group, n_groups + 1, by_end)
    ks = jnp.take_along_axis(kend, perm, axis=-1).reshape(B, K, S // tk, tk)
    st = (perm + w).reshape(B, K, S // tk, tk)
    live = ks > st
    lo = jnp.min(jnp.where(live, st, jnp.int32(2**30)), axis=-1)
    hi = jnp.max(jnp.where(live, ks, 0), axis=-1)
    first = jnp.where(hi > 0, lax.div(lo, jnp.int32(tq)), 0)
    count = jnp.where(hi > 0, lax.div(hi + tq - 1, jnp.int32(tq)) - first, 0)
    return perm, first.astype(jnp.int32), count.astype(jnp.int32)


def _dkv_keys_kernel(*refs, cfg: GatheredGpuConfig):
    """The selected part of dK / dV of one tile of keys, one (KV head, batch): the keys' rows
    are gathered once, then every query tile of the tile's range and every query head of the
    group is visited; the mask is the key interval [p + w, kend[p]) (and the segment), the
    weight clip(z_p - tau_t, 0, 1). The sums are written as float32 rows of the tile (row
    t * key_tk + j for the tile's j-th key; tiles of keys no query selects write nothing), for
    the window kernel to add; the key scores' gradient goes to the keys' own positions."""
    names = ["perm", "first", "count", "q", "k", "v"] + (["seg"] if cfg.has_segments else [])
    names += ["do", "lse", "delta", "zkey", "kend", "thr", "pk", "pv", "dz"]
    r = _Refs(refs, names)
    tq, tk = cfg.key_tq, cfg.key_tk
    t = pl.program_id(0)
    qk_scale = cfg.scale * LOG2E
    keys = r.perm[pl.ds(pl.multiple_of(t * tk, tk), tk)]
    first, count = r.first[t], r.count[t]
    k = r.k[keys, :]
    v = r.v[keys, :]
    d = k.shape[-1]
    z = r.zkey[keys][:, None]
    start = keys[:, None] + cfg.w
    end = r.kend[keys][:, None]
    segk = r.seg[keys][:, None] if cfg.has_segments else None
    # query tiles inside every key's range need no mask (none if the tile holds a key that is
    # never selected, or with segments)
    live = end > start
    full_lo = jnp.max(jnp.where(live, start, 0))
    full_hi = jnp.where(jnp.min(jnp.where(live, 1, 0)) > 0, jnp.min(end), 0)  # (reduce_and: no Triton lowering)

    def head(hr, carry):
        def step(j, carry):
            q0 = pl.multiple_of((first + j) * tq, tq)
            dk, dv, dz = carry
            q = r.q[pl.ds(q0, tq), hr, :]
            do = r.do[pl.ds(q0, tq), hr, :]
            lse = r.lse[hr, pl.ds(q0, tq)][None, :]
            delta = r.delta[hr, pl.ds(q0, tq)][None, :]
            x = z - r.thr[pl.ds(q0, tq)][None, :]  # [tk, tq]; thr = -inf: weight 1, never free
            st = _dot(k, q, 1, 1) * qk_scale

            def mask(st):
                qpos = q0 + lax.broadcasted_iota(jnp.int32, (tk, tq), 1)
                allowed = (qpos >= start) & (qpos < end)
                if cfg.has_segments:
                    segq = r.seg[pl.ds(q0, tq)][None, :]
                    allowed = allowed & (segq == segk) & (segk != 0)
                return jnp.where(allowed, st, -jnp.inf)

            needs = None if cfg.has_segments else (q0 < full_lo) | (q0 + tq > full_hi)
            st = _run_tile(cfg, needs, mask, lambda st: st, st)
            return _key_step(cfg, st, lse, delta, x, k, v, q, do, dk, dv, dz)

        return lax.fori_loop(0, count, step, carry)

    init = (jnp.zeros((tk, d), jnp.float32), jnp.zeros((tk, d), jnp.float32), jnp.zeros((tk,), jnp.float32))
    dk, dv, dz = lax.fori_loop(0, r.q.shape[1], head, init)  # this program's part of the group's heads
    r.dz[keys] = dz

    @pl.when(count > 0)
    def _():
        r.pk[...] = dk * cfg.scale
        r.pv[...] = dv


def _key_step(cfg, st, lse, delta, x, k, v, q, do, dk, dv, dz):
    """One (key tile, query tile) step of the key-major kernel: st [tk, tq] scaled (masked)
    scores, x = z - tau [tk, tq]; returns the updated dK, dV, dz sums."""
    pt = jnp.exp2(st - lse)
    dpt = _dot(v, do, 1, 1)
    wf = jnp.minimum(jnp.maximum(x, 0.0), 1.0)
    pw = pt * wf
    if cfg.weight_mode == "gate":
        ds = pt * (wf * dpt - delta)
        dw = pt * dpt
    else:
        ds = pw * (dpt - delta)
        dw = pt * (dpt - delta)
    dv = dv + _dot(pw.astype(do.dtype), do)
    dk = dk + _dot(ds.astype(q.dtype), q)
    dz = dz + jnp.sum(jnp.where((x > 0.0) & (x < 1.0), dw, 0.0), axis=1)
    return dk, dv, dz


def _dkv_keys(cfg, arrays, shapes):
    """Slot dK/dV key-major (factored selections with key intervals). Returns slot int32
    [B, K, Skv_pad] (each key's row of pk / pv, -1 for keys no query selects), pk, pv float32
    [B, Skv_pad, K, P * Dp] (the selected part of dK / dV, rows in tile order, P = cfg.key_split
    partial sums side by side, one per part of the group's query heads; only the rows of
    selected keys are written) and the key scores' gradient float32 [B, K, Skv_pad]."""
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    tk, P = cfg.key_tk, cfg.key_split
    hp = H // K // P  # query heads per program
    perm, first, count = _key_tiles(cfg, arrays["kend"])
    pos = jnp.arange(Skv_pad, dtype=jnp.int32)
    slot = jnp.zeros_like(perm).at[
        jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None], perm].set(jnp.broadcast_to(pos, perm.shape))
    slot = jnp.where(arrays["kend"] > pos + cfg.w, slot, -1)  # perm's inverse; -1: never selected
    n_tiles = Skv_pad // tk
    # grid axis 1: g = kh * P + part; heads [g * hp, (g + 1) * hp) of KV head kh = g // P
    krow = pl.BlockSpec((None, None, Skv_pad), lambda t, g, b: (b, g // P, 0))
    trow = pl.BlockSpec((None, None, n_tiles), lambda t, g, b: (b, g // P, 0))
    kvspec = pl.BlockSpec((None, Skv_pad, None, Dp), lambda t, g, b: (b, 0, g // P, 0))
    qspec = pl.BlockSpec((None, Sq_pad, hp, Dp), lambda t, g, b: (b, 0, g, 0))
    rowspec = pl.BlockSpec((None, hp, Sq_pad), lambda t, g, b: (b, g, 0))
    qrow = pl.BlockSpec((None, None, Sq_pad), lambda t, g, b: (b, g // P, 0))
    in_specs = [krow, trow, trow, qspec, kvspec, kvspec]
    args = [perm, first, count, arrays["q"], arrays["k"], arrays["v"]]
    if cfg.has_segments:
        in_specs.append(pl.BlockSpec((None, arrays["seg"].shape[1]), lambda t, kh, b: (b, 0)))
        args.append(arrays["seg"])
    in_specs += [qspec, rowspec, rowspec, krow, krow, qrow]
    args += [arrays["do"], arrays["lse"], arrays["delta"], arrays["zkey"], arrays["kend"], arrays["thr"]]
    part = jax.ShapeDtypeStruct((B, Skv_pad, K * P, Dp), jnp.float32)
    out_shape = [part, part, jax.ShapeDtypeStruct((B, K * P, Skv_pad), jnp.float32)]
    tile_spec = pl.BlockSpec((None, tk, None, Dp), lambda t, g, b: (b, t, g, 0))
    pk, pv, dz = pl.pallas_call(
        functools.partial(_dkv_keys_kernel, cfg=cfg),
        grid=(n_tiles, K * P, B),
        in_specs=in_specs,
        out_specs=[tile_spec, tile_spec, pl.BlockSpec((None, None, Skv_pad), lambda t, g, b: (b, g, 0))],
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.warps[5], cfg.stages[5]),
        interpret=cfg.interpret,
        name="gathered_dkv_keys",
    )(*args)
    # (the P parts side by side per KV head: a free reshape; the window kernel sums them)
    split = lambda x: x.reshape(B, Skv_pad, K, P * Dp)  # noqa: E731
    return slot, split(pk), split(pv), jnp.sum(dz.reshape(B, K, P, Skv_pad), axis=2)


# ------------------------------------------------- sorted (atomic-free) slot reduction
@jax.named_scope("gathered_slot_sort")
def _sorted_slots(union, Skv_pad: int, tk: int, chunk: int):
    """The slots of each (batch, KV head) grouped by key tile: for the key-tile reduction kernel.

    union: int32 [B, K, nQ, U_pad] (-1 = empty). Returns ``keys`` and ``pos`` int32
    [B, K, nQ * U_pad + chunk] (key of each slot, grouped by key tile in ascending tile order,
    empty slots last with key Skv_pad, then ``chunk`` sentinel entries so that a chunk read
    never leaves the array; pos = the slot's flat index i * U_pad + u) and ``starts`` int32
    [B, K, Skv_pad // tk + 1]: key tile t owns entries [starts[t], starts[t + 1]).

    One 1-D sort of (row, key tile) over all rows: XLA sorts 1-D arrays with a radix sort on
    the GPU but batched ones with a comparison sort (H100, 16 x 557,056 slots: 3.2-4.7 ms
    batched vs 0.47 ms for one 1-D sort of the same 8.9 M keys). The reduction adds one-hot
    products, so the order of keys inside a tile does not matter.
    """
    B, K, nq, U = union.shape
    n, rows = nq * U, B * K
    keys = jnp.where(union >= 0, union, Skv_pad).reshape(rows * n)
    flat_idx = jnp.arange(rows * n, dtype=jnp.int32)
    row = flat_idx // n
    group = row * (Skv_pad // tk + 1) + lax.div(keys, jnp.int32(tk))
    _, order = lax.sort((group, flat_idx), dimension=0, num_keys=1, is_stable=False)
    keys = keys[order].reshape(B, K, n)
    pos = (order - row * n).reshape(B, K, n)  # row * n: sorting by row first keeps rows in place
    bounds = jnp.arange(0, Skv_pad + 1, tk, dtype=jnp.int32)
    # keys are grouped by tile in ascending order: "key >= t * tk" is monotone along a row
    starts = jax.vmap(jax.vmap(lambda r: jnp.searchsorted(r, bounds, side="left")))(keys)
    keys = _pad_to(keys, 2, n + chunk, Skv_pad)
    pos = _pad_to(pos, 2, n + chunk, 0)
    return keys, pos, starts.astype(jnp.int32)


def _reduce_kernel(keys_ref, pos_ref, starts_ref, pk_ref, pv_ref, dkw_ref, dvw_ref, dk_ref, dv_ref,
                   *, cfg: GatheredGpuConfig, sentinel: int):
    """dK/dV of key tile [k0, k0 + tk) of one (KV head, batch): the window part plus every
    per-slot partial sum whose key lies in the tile, read in chunks of the key-sorted slot
    list. A chunk is reduced into the tile by a one-hot [tk, chunk] matmul (tensor cores, no
    atomics, deterministic); the float32 partials are split into bfloat16 high and low parts
    so that the one-hot products keep ~16 mantissa bits (error <= 2^-17 of each partial)."""
    tk, chunk = cfg.tk, cfg.reduce_chunk
    t, kh, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = starts_ref[b, kh, t]
    end = starts_ref[b, kh, t + 1]
    n = lax.div(end - start + chunk - 1, jnp.int32(chunk))
    key_of_row = t * tk + lax.broadcasted_iota(jnp.int32, (tk, chunk), 0)
    d = dk_ref.shape[-1]

    def split_dot(onehot, x):
        if x.dtype == jnp.bfloat16:  # bfloat16 partials: the one-hot products are exact
            return _dot(onehot, x)
        hi = x.astype(jnp.bfloat16)
        lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        return _dot(onehot, hi) + _dot(onehot, lo)

    def step(c, carry):
        dk, dv = carry
        p0 = start + c * chunk
        keys = keys_ref[b, kh, pl.ds(p0, chunk)]
        pos = pos_ref[b, kh, pl.ds(p0, chunk)]
        # entries past `end` belong to later tiles (or are sentinels): they match no row
        onehot = jnp.where(keys[None, :] == key_of_row, 1.0, 0.0).astype(jnp.bfloat16)
        # sentinels (empty slots) point at partial rows the slot kernel never wrote: zero
        # them, 0 * garbage could be NaN
        real = (keys < sentinel)[:, None]
        pk = jnp.where(real, pk_ref[pos, :], 0.0)
        pv = jnp.where(real, pv_ref[pos, :], 0.0)
        return dk + split_dot(onehot, pk), dv + split_dot(onehot, pv)

    init = (jnp.zeros((tk, d), jnp.float32), jnp.zeros((tk, d), jnp.float32))
    dk, dv = lax.fori_loop(0, n, step, init)
    dk_ref[...] = (dkw_ref[...] + dk).astype(dk_ref.dtype)
    dv_ref[...] = (dvw_ref[...] + dv).astype(dv_ref.dtype)


@jax.named_scope("gathered_reduce_glue")
def _reduce_sorted(cfg, union, part_k, part_v, dk_win, dv_win, out_dtype):
    """dK = dk_win + sum over slots (i, u) with union[..., i, u] = key of part_k[..., i, u, :].

    part_k, part_v: float32 or bfloat16 [B, K, nQ, U_pad, Dp]; dk_win, dv_win: float32 [B, Skv_pad, K, Dp].
    Returns dK, dV [B, Skv_pad, K, Dp] in out_dtype.
    """
    B, Skv_pad, K, Dp = dk_win.shape
    tk, chunk = cfg.tk, cfg.reduce_chunk
    keys, pos, starts = _sorted_slots(union, Skv_pad, tk, chunk)
    n_slots = part_k.shape[2] * part_k.shape[3]
    part_k = part_k.reshape(B, K, n_slots, Dp)
    part_v = part_v.reshape(B, K, n_slots, Dp)
    full = lambda x_shape: pl.BlockSpec(x_shape, lambda *_: (0,) * len(x_shape))
    pspec = pl.BlockSpec((None, None, n_slots, Dp), lambda t, h, b: (b, h, 0, 0))
    kspec = pl.BlockSpec((None, tk, None, Dp), lambda t, h, b: (b, t, h, 0))
    shape = jax.ShapeDtypeStruct(dk_win.shape, out_dtype)
    return pl.pallas_call(
        functools.partial(_reduce_kernel, cfg=cfg, sentinel=Skv_pad),  # Skv_pad: empty slots' key
        grid=(Skv_pad // tk, K, B),
        in_specs=[full(keys.shape), full(pos.shape), full(starts.shape), pspec, pspec, kspec, kspec],
        out_specs=[kspec, kspec],
        out_shape=[shape, shape],
        compiler_params=compiler_params(cfg.warps[4], cfg.stages[4]),
        interpret=cfg.interpret,
        name="gathered_dkv_reduce",
    )(keys, pos, starts, part_k, part_v, dk_win, dv_win)


def _dq(cfg, arrays, shapes):
    B, Sq_pad, H, Dp, Skv_pad, K, U_pad = shapes
    specs = _specs(cfg, shapes)
    specs["seg"] = pl.BlockSpec((None, arrays["seg"].shape[1] if cfg.has_segments else 1), lambda t, h, b: (b, 0))
    specs["do"], specs["lse"], specs["delta"] = specs["q"], specs["row"], specs["row"]
    names = _in_names(cfg) + ["do", "lse", "delta"]
    in_specs, args = _common_args(cfg, names, specs, arrays)
    out_specs = [specs["q"]]
    out_shape = [jax.ShapeDtypeStruct((B, Sq_pad, H, Dp), arrays["q"].dtype)]
    if cfg.factored:
        out_specs.append(specs["row"])
        out_shape.append(jax.ShapeDtypeStruct((B, H, Sq_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(Sq_pad // cfg.tq, H, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(cfg.warps[1], cfg.stages[1]),
        interpret=cfg.interpret,
        name="gathered_dq",
    )(*args)
    return outs[0], (outs[1] if cfg.factored else None)


# ------------------------------------------------------------------------- custom vjp
def _pregather(cfg, k, union):
    """k: [B, Skv_pad, K, Dp], union [B, K, nQ, U_pad] -> [B, K, nQ, U_pad, Dp]."""
    kt = jnp.moveaxis(k, 2, 1)  # [B, K, Skv_pad, Dp]
    B, K, nq, U = union.shape
    g = jnp.take_along_axis(kt, jnp.maximum(union, 0).reshape(B, K, nq * U)[..., None], axis=2)
    return g.reshape(B, K, nq, U, -1)


def _arrays(cfg, q, k, v, sel, wsel, seg, union, slot_tiles):
    """Factored selections come as wsel = (slot scores, thresholds[, key scores]), sel = (lo,
    hi[, key ends]) (the bracketed ones with key intervals)."""
    a = dict(q=q, k=k, v=v, sel=sel, wsel=wsel, seg=seg, union=union, slot_tiles=slot_tiles)
    if cfg.factored:
        (a["zslot"], a["thr"]), (a["slo"], a["shi"]) = wsel[:2], sel[:2]
        if cfg.key_major:
            a["zkey"], a["kend"] = wsel[2], sel[2]
    if cfg.gather == "xla":
        a["kg"], a["vg"] = _pregather(cfg, k, union), _pregather(cfg, v, union)
    return a


def _shapes(q, k, union):
    B, Sq_pad, H, Dp = q.shape
    return (B, Sq_pad, H, Dp, k.shape[1], k.shape[2], union.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, wsel, sel, seg, union, slot_tiles):
    o, _ = _forward(cfg, _arrays(cfg, q, k, v, sel, wsel, seg, union, slot_tiles), _shapes(q, k, union))
    return o


@jax.named_scope("gathered_fwd_glue")
def _attention_fwd(cfg, q, k, v, wsel, sel, seg, union, slot_tiles):
    o, lse = _forward(cfg, _arrays(cfg, q, k, v, sel, wsel, seg, union, slot_tiles), _shapes(q, k, union))
    return o, (q, k, v, wsel, sel, seg, union, slot_tiles, o, lse)


@jax.named_scope("gathered_bwd_glue")
def _attention_bwd(cfg, res, do):
    q, k, v, wsel, sel, seg, union, slot_tiles, o, lse = res
    cfg = dataclasses.replace(cfg, gather=cfg.bwd_gather)
    shapes = _shapes(q, k, union)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
    arrays = _arrays(cfg, q, k, v, sel, wsel, seg, union, slot_tiles)
    arrays.update(do=do.astype(q.dtype), lse=lse, delta=delta)
    dq, gsum = _dq(cfg, arrays, shapes)
    if cfg.key_major:
        # the key-major kernel first: its float32 rows exist only for selected keys (~14 %
        # at T = 32k), and the window kernel adds them while it writes dK / dV once in k's
        # dtype (the window part first meant full float32 arrays written, read and cast)
        slot, pk, pv, dzkey = _dkv_keys(cfg, arrays, shapes)
        if cfg.window is None:
            pk, pv = (jnp.sum(x.reshape(*x.shape[:3], cfg.key_split, -1), axis=3) for x in (pk, pv))
            take = lambda p: jnp.where(  # noqa: E731
                (slot >= 0)[..., None], jnp.take_along_axis(jnp.moveaxis(p, 2, 1), jnp.maximum(slot, 0)[..., None], 2),
                0).transpose(0, 2, 1, 3)
            dk, dv = take(pk), take(pv)
        else:
            dk, dv = _dkv_window(cfg, arrays, shapes, parts=(slot, pk, pv))
        dw = jnp.zeros(wsel[0].shape, jnp.float32)  # the scores' gradient goes to key_scores
    else:
        if cfg.window is None:
            dk_win = dv_win = jnp.zeros(k.shape, jnp.float32)
        else:
            dk_win, dv_win = _dkv_window(cfg, arrays, shapes)
        dw, dk, dv = _dkv_slots(cfg, arrays, shapes, dk_win, dv_win)
    if cfg.factored:  # weight = clip(z - tau): tau's cotangent is minus the free rows' sums
        B, Sq_pad, H = q.shape[:3]
        K = k.shape[2]
        dthr = -jnp.sum(gsum.reshape(B, K, H // K, Sq_pad), axis=2)
        dw = (dw.astype(wsel[0].dtype), dthr.astype(wsel[1].dtype))
        if cfg.key_major:
            dw += (dzkey.astype(wsel[2].dtype),)
    elif dw is not None:
        dw = dw.astype(wsel.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dw, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------- public
def default_slot_tq(block_q: int, tq: int, head_dim: int, dtype, factored: bool) -> int:
    """The slot dK/dV kernel's default query sub-tile.

    Factored selections: the whole block (up to 128 queries) as one sub-tile, so that the
    kernel's [tu, D] sums are never a loop's carry. At block_q 128 this took the slot kernel
    from 7.48 (two 64-query sub-tiles) to 3.67 ms at 32k (H = K = 16,
    profile_layer_32k_1123c_p_*.json), with GQA 4 from 10.23 to 4.14 ms
    (profile_gqa4_128*_1123d.json). With GQA the head loop pipelines [slot_tq, D] q and dO
    tiles: 3 stages of 128 x 128 bfloat16 asked for 242 KiB of shared memory (227 on an H100),
    2 stages fit (:func:`default_slot_stages`). Rows wider than 256 bytes (float32 at D = 128)
    keep ``tq`` (the float32 D = 128 compiles asked for 273-355 KiB, GQA or not), and so do
    dense masks / weights.
    """
    fits = _next_pow2(head_dim) * jnp.dtype(dtype).itemsize <= 256
    return block_q if factored and block_q <= 128 and fits else tq


def default_slot_stages(slot_tq: int, num_heads: int, num_kv_heads: int) -> int:
    """Pipeline stages of the slot dK/dV kernel: 3 (measured best, module docstring), 2 when GQA
    makes its head loop pipeline q / dO tiles of more than 64 queries (shared memory)."""
    return 2 if num_heads > num_kv_heads and slot_tq > 64 else 3


def default_reduce_stages(head_dim: int, partial_dtype) -> int:
    """Pipeline stages of the sorted reduction: 3 for bfloat16 partial sums at D <= 128 (1.27 ->
    1.18 ms at 32k against 2 stages, D = 128, block_q 128; gathered_knobs_bq128_1123d.txt), 2
    for float32 partials or wider rows (the setting the GPU tests ran with; 3 stages are not
    compiled on a GPU there yet)."""
    itemsize = jnp.dtype(partial_dtype).itemsize
    return 3 if itemsize == 2 and _next_pow2(head_dim) * itemsize <= 256 else 2


def gathered_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    union_index: jax.Array,
    *,
    block_q: int,
    window: int = 0,
    selection_mask: jax.Array | None = None,
    selection_weights: jax.Array | None = None,
    weight_mode: str = "gate",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool = False,
    selection=None,
    gather: str = "kernel",
    bwd_gather: str | None = None,
    dkv_reduce: str = "sorted",
    slot_dkv: str = "auto",
    key_tiles: tuple[int, int] | None = None,
    key_group: int = 8,
    key_split: int | None = None,
    reduce_chunk: int = 64,
    partial_dtype: str = "auto",
    tq: int | None = None,
    tk: int | None = None,
    tu: int | None = None,
    slot_tq: int | None = None,
    num_warps: tuple[int, ...] | None = None,
    num_stages: tuple[int, ...] | None = None,
    always_mask: bool = False,
    range_branch: bool = True,
) -> jax.Array:
    """Gathered attention with the Pallas Triton kernels (forward and backward).

    Arguments as :func:`sea_jax.kernels.gathered_attention` (validated there), plus the
    tuning knobs (``kernel_options``; defaults chosen by measurement, see the module
    docstring and benchmarks/bench_gathered.py):

    * ``gather``: how the slot K/V rows are read: "kernel" (index loads inside the kernel) or
      "xla" (pre-gathered [B, K, nQ, U, D] copies); ``bwd_gather``: the same for the backward
      only (default: ``gather``; "xla" with gather="kernel" is the hybrid);
    * ``dkv_reduce``: how the slot dK/dV reach the keys: "sorted" (per-slot partial sums per
      query block [B, K, nQ, U, D], reduced per key tile over the key-sorted slot list by a
      Pallas kernel: no atomics, deterministic), "scatter" (the same partials, XLA
      scatter-add) or "atomic" (float32 atomics into dK/dV inside the slot kernel);
      ``reduce_chunk``: slots per step of the "sorted" reduction (power of two >= 16);
      ``partial_dtype``: "float32", "bfloat16" (half the partials' traffic; each partial
      rounded to bfloat16 before the float32 sum) or "auto" (bfloat16 when k is bfloat16,
      whose dK is rounded to bfloat16 anyway; float32 otherwise);
    * ``slot_dkv``: the selected keys' dK / dV: "slots" (per query block and slot, reduced as
      ``dkv_reduce`` says), "keys" (key-major, for a ``selection`` with key intervals: one
      program per tile of keys, no partial sums) or "auto" ("keys" when the selection has key
      intervals); ``key_tiles``: its (key tile, query tile), default (tk, min(32, block_q));
      ``key_group``:
      key tiles per group of keys ordered by where their query ranges end (int >= 1,
      :func:`_key_tiles`); ``key_split``: programs per (key tile, KV head), each taking an
      equal part of the GQA group's query heads (divides H // K; its partial sums are added in
      a fixed order; None: the largest divisor with K * key_split <= 8, so that few KV heads
      still fill the GPU);
    * ``tq`` (query tile, divides block_q, default min(64, block_q) for rows of <= 256
      bytes), ``tk`` (window and reduction key tile), ``tu`` (slot tile), ``slot_tq`` (the
      slot dK/dV kernel's query sub-tile, divides block_q; default: block_q for a factored ``selection`` with block_q <= 128
      and rows of at most 256 bytes (D * itemsize), else tq; one sub-tile per block keeps the
      [tu, D] sums out of a loop's carry; :func:`default_slot_tq`); tiles default to 64 for
      rows of up to 256 bytes and fewer rows for wider ones (``row_scaled_tile``);
      ``num_warps``/``num_stages`` per kernel (fwd,
      dq, window dkv, slot dkv, sorted reduce, key dkv; a 4-tuple leaves the reduction at 4 / 2,
      a 5-tuple the key-major kernel at 4 / 3;
      default warps (4, 4, 4, 4, 4, 4) for a factored ``selection`` with slot_tq <= 64, else
      (4, 4, 4, 8, 4, 4); default stages (3, 3, 2, 3, 3, 3), the slot kernel 2 when GQA makes its
      head loop pipeline [slot_tq > 64, D] q / dO tiles, the reduction 2 unless its partial
      sums are bfloat16 at D <= 128: see the module docstring);
      ``always_mask``: mask every window tile elementwise instead of branching per tile;
      ``range_branch`` (factored ``selection``, no segments): the forward skips the slot range
      test on slot tiles inside every query's range [select_lo, select_hi) (a branch per tile)
      instead of testing every element.

    Shapes: q [B, Sq, H, D]; k, v [B, Skv, K, D]; union_index int32 [B, K, nQ, U];
    selection_mask bool / selection_weights float [B, K, Sq, U], or ``selection`` (a
    :class:`sea_jax.kernels.SlotSelection`: the same generated on chip from slot scores
    [B, K, nQ, U], slot ranges and thresholds [B, K, Sq]; its backward returns the gradients
    of the slot scores and thresholds, never a [B, K, Sq, U] array). Returns [B, Sq, H, D].
    """
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
    bwd_gather = gather if bwd_gather is None else bwd_gather
    if bwd_gather not in GATHER_MODES:
        raise ValueError(f"bwd_gather must be one of {GATHER_MODES} or None, got {bwd_gather!r}")
    if dkv_reduce not in DKV_REDUCE_MODES:
        raise ValueError(f"dkv_reduce must be one of {DKV_REDUCE_MODES}, got {dkv_reduce!r}")
    reduce_chunk = validate_block_size("reduce_chunk", reduce_chunk)
    if partial_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"partial_dtype must be 'auto', 'float32' or 'bfloat16', got {partial_dtype!r}")
    if partial_dtype == "auto":
        partial_dtype = "bfloat16" if k.dtype == jnp.bfloat16 else "float32"
    if slot_dkv not in ("auto", "slots", "keys"):
        raise ValueError(f"slot_dkv must be 'auto', 'slots' or 'keys', got {slot_dkv!r}")
    keyed = selection is not None and selection.has_key_intervals
    if slot_dkv == "keys" and not keyed:
        raise ValueError("slot_dkv='keys' needs a selection with key intervals (SlotSelection.key_scores / key_end)")
    if not isinstance(range_branch, bool):
        raise ValueError(f"range_branch must be a bool, got {range_branch!r}")
    if isinstance(key_group, bool) or not isinstance(key_group, int) or key_group < 1:
        raise ValueError(f"key_group must be an int >= 1, got {key_group!r}")
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    rep = H // K if K and H % K == 0 else 1  # (shapes are checked by the caller)
    if key_split is None:
        # 8 programs per key tile and batch: the key-major kernel has work for only the tiles of
        # selected keys (~70 of 512 per KV head at T = 32k), too few programs for an H100 with
        # 1 - 4 KV heads; more parts cost the window kernel one masked row load each. SparseK
        # layer at 32k, dK/dV kernels (key-major + window) ms for key_split 1 / 2 / 4 / 8 / 16:
        # K = 1: 3.79 / - / 2.89 / 2.82 / 3.31; K = 2: - / - / 2.79 / 2.87; K = 4: 2.95 / 2.81 /
        # 2.88; K = 16: 2.89 (benchmarks/results/profile_layer_32k_keysplit_*_1125.json)
        key_split = max(p for p in range(1, rep + 1) if rep % p == 0 and (K * p <= 8 or p == 1))
    if isinstance(key_split, bool) or not isinstance(key_split, int) or key_split < 1 or rep % key_split:
        raise ValueError(f"key_split must be an int >= 1 dividing the {rep} query heads per KV head, got {key_split!r}")
    # default tiles 64 (at 256-byte rows, fewer rows for wider ones: row_scaled_tile): with
    # tq = 128 and D = 128 a backward kernel needs 265 KiB of shared memory on the H100 (227 KiB
    # available; benchmarks/results/gathered_bench.json), and float32 at D = 128 with the
    # bfloat16 tiles asked for 273-355 KiB (benchmarks/results/gpu_run_1123d_2.log)
    t64 = row_scaled_tile(64, D, q.dtype)
    tq = validate_block_size("tq", tq if tq is not None else min(t64, block_q))
    tk = t64 if tk is None else tk
    tu = t64 if tu is None else tu
    if block_q % tq:
        raise ValueError(f"tq={tq} must divide block_q={block_q}")
    if slot_tq is None:
        slot_tq = default_slot_tq(block_q, tq, D, q.dtype, factored=selection is not None)
    slot_tq = validate_block_size("slot_tq", slot_tq)
    if block_q % slot_tq:
        raise ValueError(f"slot_tq={slot_tq} must divide block_q={block_q}")
    if num_stages is None:
        # the window dK/dV kernel 2 stages: 1.15 vs 1.38 ms alone at T = 32k on an H100 once its
        # loads sat outside the mask branch (benchmarks/results/sweep_layer_kernels_1124b.json)
        num_stages = (3, 3, 2, default_slot_stages(slot_tq, H, K), default_reduce_stages(D, partial_dtype), 3)
    if num_warps is None:
        # the slot kernel's 8 warps paid for its [tq, tu] mask / weight tiles and sub-tile
        # loop; with a factored selection and 64-query sub-tiles 4 are faster
        # (benchmarks/results/gathered_stages_sweep2.json); with 128-query ones 8 again
        # (3.67 vs 5.76 ms at 32k, profile_layer_32k_1123c_p_bq128_s128_w{8,4}.json)
        num_warps = (4, 4, 4, 4 if selection is not None and slot_tq <= 64 else 8, 4, 4)
    num_warps, num_stages = tuple(num_warps), tuple(num_stages)
    for name, val, default in (("num_warps", num_warps, 4), ("num_stages", num_stages, 2)):
        if len(val) not in (4, 5, 6) or not all(isinstance(x, int) and x >= 1 for x in val):
            raise ValueError(f"{name} must be 4 to 6 positive ints (fwd, dq, window dkv, slot dkv"
                             f"[, sorted reduce[, key dkv]]), got {val!r}")
    num_warps += (4, 4)[len(num_warps) - 4:]
    num_stages += (2, 3)[len(num_stages) - 4:]
    tk = validate_block_size("tk", tk)
    tu = validate_block_size("tu", tu)
    # 32-query steps: the 64-query ones spilled registers (255 per thread, 57.6 M local-memory
    # requests at 32k, benchmarks/results/ncu_key_dkv_1123e.txt) and took 4.73 ms against 3.82
    # (key_dkv_32k_tq_1123e.json)
    key_tk, key_tq = (tk, min(32, block_q)) if key_tiles is None else tuple(key_tiles)
    key_tk = validate_block_size("key_tiles[0]", key_tk)
    key_tq = validate_block_size("key_tiles[1]", key_tq)
    if block_q % key_tq:
        raise ValueError(f"key_tiles[1]={key_tq} (the key-major kernel's query tile) must divide block_q={block_q}")
    scale = D**-0.5 if scale is None else float(scale)
    cfg = GatheredGpuConfig(
        seq_q=Sq, seq_k=Skv, num_heads=H, num_kv_heads=K, block_q=block_q,
        window=window if window > 0 else None, causal=bool(causal), weight_mode=weight_mode,
        has_mask=selection_mask is not None, has_weights=selection_weights is not None,
        has_segments=segment_ids is not None, factored=selection is not None, scale=scale, interpret=bool(interpret),
        gather=gather, bwd_gather=bwd_gather, dkv_reduce=dkv_reduce, reduce_chunk=reduce_chunk,
        partial_dtype=partial_dtype, key_major=keyed and slot_dkv != "slots", key_tk=key_tk, key_tq=key_tq,
        key_group=key_group, key_split=key_split,
        tq=tq, tk=tk, tu=tu, slot_tq=slot_tq, always_mask=bool(always_mask), range_branch=range_branch,
        warps=num_warps, stages=num_stages,
    )
    nq = num_blocks(Sq, block_q)
    Dp = _next_pow2(D)
    U = union_index.shape[-1]
    U_pad = -(-U // tu) * tu
    Sq_pad = nq * block_q
    # keys padded so that every window / key tile lies inside the array; the per-slot dK/dV
    # kernel also needs one spare row past the real keys (its target for empty slots). When
    # nothing needs padding, none is made: at T = 32k the copies of k and v and the slices of
    # dK and dV were ~0.45 ms of ~15 (benchmarks/results/profile_layer_32k_1123e_keys.json)
    kt = max(tk, key_tk)  # powers of two: a multiple of both tiles
    spare = 0 if cfg.key_major else 1
    Skv_pad = -(-(max(Skv, Sq_pad) + spare) // kt) * kt
    qp = _pad_to(_pad_to(q, 1, Sq_pad), 3, Dp)
    kp = _pad_to(_pad_to(k, 1, Skv_pad), 3, Dp)
    vp = _pad_to(_pad_to(v, 1, Skv_pad), 3, Dp)
    union = _pad_to(union_index.astype(jnp.int32), 3, U_pad, -1)
    # visit slot tiles up to the last non-empty slot of each row
    last = jnp.max(jnp.where(union >= 0, jnp.arange(U_pad, dtype=jnp.int32) + 1, 0), axis=-1)
    slot_tiles = (last + tu - 1) // tu
    sel = None
    if selection_mask is not None:
        sel = _pad_to(_pad_to(selection_mask.astype(jnp.int8), 2, Sq_pad), 3, U_pad)
    wsel = None
    if selection_weights is not None:
        wsel = _pad_to(_pad_to(selection_weights, 2, Sq_pad), 3, U_pad)
    if selection is not None:
        rows = lambda x, dtype: _pad_to(x.astype(dtype), 2, Sq_pad)  # noqa: E731  (padding queries: empty range)
        slot_scores = selection.slot_scores.astype(jnp.float32)
        if cfg.key_major:
            # the scores' gradient goes to key_scores: the slot scores' cotangent is zero, and
            # would otherwise still flow back through the selection's gather of the scores
            slot_scores = lax.stop_gradient(slot_scores)
        wsel = (_pad_to(slot_scores, 3, U_pad), rows(selection.threshold, jnp.float32))
        sel = (rows(selection.select_lo, jnp.int32), rows(selection.select_hi, jnp.int32))
        if cfg.key_major:  # padding keys: never selected (end 0)
            wsel += (_pad_to(selection.key_scores.astype(jnp.float32), 2, Skv_pad),)
            # (ends past the last query mean the same as the last query: clipped, so that
            # _key_tiles' sort keys stay in range)
            sel += (_pad_to(jnp.minimum(selection.key_end.astype(jnp.int32), Sq), 2, Skv_pad),)
    seg = None
    if segment_ids is not None:
        seg = _pad_to(segment_ids.astype(jnp.int32), 1, max(Sq_pad, Skv_pad))
    o = _attention(cfg, qp, kp, vp, wsel, sel, seg, union, slot_tiles)
    return o[:, :Sq, :, :D]
