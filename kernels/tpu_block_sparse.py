"""Pallas Mosaic TPU kernels for block-sparse attention (forward, dQ, dK/dV/dw).

Design (after splash attention, written for a data-dependent :class:`BlockLayout`):

* The layout tables (``kv_index``/``kv_count`` for forward and dQ, the transposed
  ``q_index``/``q_count`` for dK/dV) are flattened to 1-D, downcast to int8/int16 when their
  values fit (SMEM is 1 MiB per core on v5e/v5p) and passed by scalar prefetch
  (``pltpu.PrefetchScalarGridSpec``). The BlockSpec ``index_map``\\ s read them to choose
  which K/V (or Q/dO) block to DMA; padded table entries repeat the row's last valid block,
  so a padded grid step maps to the block already in VMEM and issues no DMA, and
  ``pl.when(t < count)`` skips its compute.
* Forward / dQ grid ``(batch, heads, q_blocks, Mk)``: the output block of (b, h, i) is
  visited in consecutive steps (the pipeline writes a block back when its index changes).
  dK/dV grid ``(batch, kv_heads, k_blocks, heads_per_kv_head, Mq)``: the dK/dV/dw block of a
  KV head and key block is visited in consecutive steps and accumulates over the query
  heads of its GQA group and the query blocks of the transposed layout (splash's separate
  dKV mask info). GQA everywhere through the index maps (query head h reads KV head
  h // (H // K), layout group h // (H // G)).
* Online softmax in float32 with lane-replicated ``(block_q, 128)`` m / l statistics;
  ``exp(s - m)`` is cast to the value dtype for the PV matmul (as every flash kernel does).
  Token-level masks (causal, window, key tail, segments) are built in-kernel from iota and
  applied only to blocks that need them (a scalar test per step; full blocks take the
  unmasked path). Masked scores are -inf and the max is guarded, so rows with nothing
  visible give exact zeros, never NaN.
* Per-key weights (SparseK) follow :mod:`sea_jax.kernels.reference`:
  o_i = sum_j e_ij w_j v_j / sum_j c_j e_ij with c = 1 ("gate") or c = w ("log"). With
  P = exp(s - lse): dv_j = sum_i P_ij w_j dO_i, ds_ij = P_ij (w_j dp_ij - c_j D_i),
  dw_j = sum_i P_ij (dp_ij - [log] D_i), dp = dO v^T, D_i = dO_i . o_i.

Shapes inside (head-major, padded to whole blocks): q/o [B, H, Sq_pad, D], k/v
[B, K, Skv_pad, D], weights [B, K, 1, Skv_pad], lse / D [B, H, Sq_pad, 128] (lane
replicated, as splash keeps its logsumexp), query segment ids [B, Sq_pad, 128], key segment
ids [B, 1, Skv_pad].

TPU tiling: block_k a multiple of 128 (the lane width: scores are (block_q, block_k)),
block_q a multiple of 8 (16 for bf16 inputs, whose tiles pack 16 rows), head_dim 64 or a
multiple of 128. :func:`check_tpu_tiling` raises ValueError before anything is lowered.
float16 inputs are computed in float32 (TPUs have no fp16 MXU path) and cast back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sea_jax.kernels.layout import BlockLayout

__all__ = [
    "block_sparse_attention_tpu",
    "online_softmax_step",
    "softmax_grad_terms",
    "token_mask",
    "check_tpu_tiling",
    "compact_table",
    "NUM_LANES",
    "NUM_SUBLANES",
    "VMEM_BUDGET_BYTES",
]

NUM_LANES = 128
NUM_SUBLANES = 8
# Scoped VMEM a kernel may use by default (Mosaic's default limit on v5e/v5p is 16 MiB for
# v4/v5p-class parts and larger on v5e); staying under 16 MiB keeps every chip happy.
VMEM_BUDGET_BYTES = 16 * 1024 * 1024
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- checks
def sublane_multiple(dtype) -> int:
    """Rows of one native TPU tile for ``dtype``: 8 for 32-bit, 16 for 16-bit types."""
    return NUM_SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def check_tpu_tiling(*, block_q: int, block_k: int, head_dim: int, dtype, what: str) -> None:
    """Raise ValueError unless the block shapes fit TPU (sublane, lane) = (8, 128) tiling.

    block_q: rows of every q/o block (and of the score tile);
    block_k: keys per step, the lane dimension of the (block_q, block_k) score tile;
    head_dim: the lane dimension of q/k/v blocks; dtype: the compute dtype.
    """
    sub = sublane_multiple(dtype)
    if block_q % sub:
        raise ValueError(
            f"{what}: block_q must be a multiple of {sub} for {jnp.dtype(dtype).name} on TPU "
            f"(native tile ({sub}, 128)), got block_q={block_q}"
        )
    if block_k % NUM_LANES:
        raise ValueError(
            f"{what}: block_k must be a multiple of {NUM_LANES} (the TPU lane width; scores "
            f"are (block_q, block_k) tiles), got block_k={block_k}"
        )
    if head_dim != 64 and head_dim % NUM_LANES:
        raise ValueError(
            f"{what}: head_dim must be 64 or a multiple of {NUM_LANES} on TPU, got {head_dim}"
        )


def check_vmem(nbytes: int, what: str) -> None:
    """Raise ValueError if a kernel's VMEM working set (double-buffered blocks + scratch)
    exceeds :data:`VMEM_BUDGET_BYTES`."""
    if nbytes > VMEM_BUDGET_BYTES:
        raise ValueError(
            f"{what}: blocks need about {nbytes / 2**20:.1f} MiB of VMEM, more than the "
            f"{VMEM_BUDGET_BYTES / 2**20:.0f} MiB budget; use smaller blocks"
        )


def compact_table(x: jax.Array, max_value: int) -> jax.Array:
    """Flatten an index table to 1-D and downcast it to the narrowest int type holding
    ``max_value`` (int8 / int16 / int32) so that it takes little scalar memory (SMEM)."""
    if max_value < 2**7:
        dt = jnp.int8
    elif max_value < 2**15:
        dt = jnp.int16
    else:
        dt = jnp.int32
    return x.reshape(-1).astype(dt)


def _i32(x):
    return x.astype(jnp.int32)


def _div(x, n: int):
    """x // n for a traced non-negative int and a static n. jnp's floor division lowers
    through lax.sign, whose Mosaic rule queries the local TPU (absent when compiling ahead
    of time on a CPU host); truncating lax.div is the same for x >= 0."""
    return x if n == 1 else lax.div(x, jnp.int32(n))


def expand_lanes(x: jax.Array, n: int) -> jax.Array:
    """A lane-replicated (R, 128) statistic as an (R, n) array (n <= 128 or n % 128 == 0)."""
    if n == NUM_LANES:
        return x
    if n < NUM_LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // NUM_LANES))


def interpret_key(interpret) -> Any:
    """``interpret`` as a hashable static value (bool or a frozen InterpretParams)."""
    if isinstance(interpret, (bool, np.bool_)):
        return bool(interpret)
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError(
        f"interpret must be a bool or a pltpu.InterpretParams, got {type(interpret).__name__}"
    )


def compute_dtype(dtype):
    """Kernel compute dtype for inputs of ``dtype``: fp16 -> fp32 (no fp16 MXU path)."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def pad_axis(x, axis, new_len, value=0):
    pad = new_len - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


# --------------------------------------------------------------------- shared kernel math
def online_softmax_step(s, allowed, w_num, w_den, v, m_ref, l_ref, acc_ref):
    """One online-softmax update with a (R, C) score tile.

    s: float32 (R, C) scaled scores; allowed: bool (R, C) or None (all visible);
    w_num: float32 broadcastable to (R, C) or None: weight multiplying each value;
    w_den: same for the normaliser (None = 1); v: (C, D) values;
    m_ref / l_ref: (R, 128) running max / normaliser; acc_ref: (R, D) float32.
    """
    if allowed is not None:
        s = jnp.where(allowed, s, _NEG_INF)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (R, 128)
    if allowed is not None:
        # rows with nothing visible so far keep m = -inf; subtract 0 instead (no inf - inf)
        m_use = jnp.where(m_next == _NEG_INF, 0.0, m_next)
    else:
        m_use = m_next
    e = jnp.exp(s - expand_lanes(m_use, s.shape[1]))  # masked entries: exp(-inf) = 0
    alpha = jnp.exp(m_prev - m_use)  # m_prev = -inf -> 0
    den = e if w_den is None else e * w_den
    l_ref[...] = alpha * l_ref[...] + jnp.sum(den, axis=1, keepdims=True)
    num = e if w_num is None else e * w_num
    pv = lax.dot_general(num.astype(v.dtype), v, NN_DIMS, preferred_element_type=jnp.float32)
    acc_ref[...] = expand_lanes(alpha, acc_ref.shape[1]) * acc_ref[...] + pv
    m_ref[...] = m_next


def init_softmax_state(m_ref, l_ref, acc_ref):
    m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def finish_softmax(m_ref, l_ref, acc_ref, o_ref, lse_ref):
    """o = acc / l (0 where l = 0); lse = m + log l (+inf where l = 0, so that
    exp(s - lse) = 0 in the backward)."""
    l = l_ref[...]
    ok = l > 0.0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, l, 1.0), 0.0)
    o_ref[...] = (acc_ref[...] * expand_lanes(inv, acc_ref.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m_ref[...] + jnp.log(jnp.where(ok, l, 1.0)), jnp.inf)


def token_mask(*, q_first, k_first, rows, cols, block_q, causal, window, seq_k,
               qseg=None, kseg=None):
    """Visible (query, key) pairs of an (rows, cols) score tile.

    Query of row r is q_first + (r mod block_q) (rows may stack several query heads of one
    block), key of column c is k_first + c. causal: key <= query; window: key > query -
    window; seq_k: key < seq_k (None: no tail); qseg: int (rows, cols) or None; kseg: int
    (1, cols).
    """
    r = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    if rows > block_q:
        r = jnp.bitwise_and(r, block_q - 1)  # block_q is a power of two
    qpos = q_first + r
    kpos = k_first + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    ok = None

    def conj(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if causal:
        ok = conj(ok, kpos <= qpos)
    if window is not None:
        ok = conj(ok, kpos > qpos - window)
    if seq_k is not None:
        ok = conj(ok, kpos < seq_k)
    if qseg is not None:
        ok = conj(ok, jnp.logical_and(qseg == kseg, kseg != 0))
    if ok is None:
        ok = jnp.ones((rows, cols), jnp.bool_)
    return ok


# ------------------------------------------------------------------------- static config
@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch: int
    heads: int
    kv_heads: int
    groups: int
    nq: int
    nk: int
    mk: int
    mq: int
    block_q: int
    block_k: int
    head_dim: int
    seq_k: int  # true key length (tail masked when it is not a multiple of block_k)
    causal: bool
    window: int | None
    weight_mode: str
    has_w: bool
    has_seg: bool
    scale: float
    interpret: Any

    @property
    def rep(self):  # query heads per KV head
        return self.heads // self.kv_heads

    @property
    def heads_per_group(self):
        return self.heads // self.groups

    @property
    def kv_tail(self):
        return self.seq_k % self.block_k != 0

    @property
    def maskable(self):
        return self.causal or self.window is not None or self.kv_tail or self.has_seg


def _needs_mask(cfg: _Cfg, i, kb):
    """Traced bool: does block (query block i, key block kb) need token-level masking?"""
    if cfg.has_seg:
        return jnp.bool_(True)
    q_first, q_last = i * cfg.block_q, i * cfg.block_q + cfg.block_q - 1
    k_first, k_last = kb * cfg.block_k, kb * cfg.block_k + cfg.block_k - 1
    need = jnp.bool_(False)
    if cfg.causal:
        need = need | (k_last > q_first)
    if cfg.window is not None:
        need = need | (k_first <= q_last - cfg.window)
    if cfg.kv_tail:
        need = need | (k_last >= cfg.seq_k)
    return need


def _mask_for(cfg: _Cfg, i, kb, qseg_ref, kseg_ref):
    qseg = kseg = None
    if cfg.has_seg:
        qseg = expand_lanes(qseg_ref[...], cfg.block_k)
        kseg = kseg_ref[...]
    return token_mask(q_first=i * cfg.block_q, k_first=kb * cfg.block_k, rows=cfg.block_q,
                      cols=cfg.block_k, block_q=cfg.block_q, causal=cfg.causal,
                      window=cfg.window, seq_k=cfg.seq_k if cfg.kv_tail else None,
                      qseg=qseg, kseg=kseg)


def _run_masked_or_not(cfg: _Cfg, run, i, kb, step):
    """Call step(masked) under pl.when, taking the unmasked path for full blocks."""
    if not cfg.maskable:
        pl.when(run)(lambda: step(False))
        return
    if cfg.has_seg:
        pl.when(run)(lambda: step(True))
        return
    need = _needs_mask(cfg, i, kb)
    pl.when(jnp.logical_and(run, need))(lambda: step(True))
    pl.when(jnp.logical_and(run, jnp.logical_not(need)))(lambda: step(False))


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _itemsize(dt):
    return jnp.dtype(dt).itemsize


# ------------------------------------------------------------------------------ forward
def _fwd_kernel(kv_idx_ref, kv_cnt_ref, *refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    w_ref = next(it) if cfg.has_w else None
    qseg_ref = next(it) if cfg.has_seg else None
    kseg_ref = next(it) if cfg.has_seg else None
    o_ref, lse_ref = next(it), next(it)
    m_ref, l_ref, acc_ref = next(it), next(it), next(it)

    b, h, i, j = (pl.program_id(a) for a in range(4))
    row = (b * cfg.groups + _div(h, cfg.heads_per_group)) * cfg.nq + i
    cnt = _i32(kv_cnt_ref[row])
    kb = _i32(kv_idx_ref[row * cfg.mk + j])

    @pl.when(j == 0)
    def _init():
        init_softmax_state(m_ref, l_ref, acc_ref)

    def step(masked):
        s = lax.dot_general(q_ref[...], k_ref[...], NT_DIMS,
                            preferred_element_type=jnp.float32) * cfg.scale
        allowed = _mask_for(cfg, i, kb, qseg_ref, kseg_ref) if masked else None
        w = w_ref[...] if cfg.has_w else None  # (1, block_k) float32
        w_den = w if cfg.weight_mode == "log" else None
        online_softmax_step(s, allowed, w, w_den, v_ref[...], m_ref, l_ref, acc_ref)

    _run_masked_or_not(cfg, j < cnt, i, kb, step)

    @pl.when(j == cfg.mk - 1)
    def _finish():
        finish_softmax(m_ref, l_ref, acc_ref, o_ref, lse_ref)


def _kv_block_maps(cfg: _Cfg):
    """index maps of the forward/dQ grid (b, h, i, j, kv_idx, kv_cnt)."""

    def kv_block(b, h, i, j, kv_idx_ref):
        row = (b * cfg.groups + _div(h, cfg.heads_per_group)) * cfg.nq + i
        return _i32(kv_idx_ref[row * cfg.mk + j])

    def q_map(b, h, i, j, kv_idx_ref, kv_cnt_ref):
        return b, h, i, 0

    def kv_map(b, h, i, j, kv_idx_ref, kv_cnt_ref):
        return b, _div(h, cfg.rep), kv_block(b, h, i, j, kv_idx_ref), 0

    def w_map(b, h, i, j, kv_idx_ref, kv_cnt_ref):
        return b, _div(h, cfg.rep), 0, kv_block(b, h, i, j, kv_idx_ref)

    def qseg_map(b, h, i, j, kv_idx_ref, kv_cnt_ref):
        return b, i, 0

    def kseg_map(b, h, i, j, kv_idx_ref, kv_cnt_ref):
        return b, 0, kv_block(b, h, i, j, kv_idx_ref)

    return q_map, kv_map, w_map, qseg_map, kseg_map


def _side_inputs(cfg, w, qseg, kseg, w_map, qseg_map, kseg_map):
    specs, args = [], []
    if cfg.has_w:
        specs.append(pl.BlockSpec((None, None, 1, cfg.block_k), w_map))
        args.append(w)
    if cfg.has_seg:
        specs += [pl.BlockSpec((None, cfg.block_q, NUM_LANES), qseg_map),
                  pl.BlockSpec((None, 1, cfg.block_k), kseg_map)]
        args += [qseg, kseg]
    return specs, args


def _fwd_call(cfg: _Cfg, q, k, v, w, kv_idx, kv_cnt, qseg, kseg):
    bq, bk, D = cfg.block_q, cfg.block_k, cfg.head_dim
    q_map, kv_map, w_map, qseg_map, kseg_map = _kv_block_maps(cfg)
    side_specs, side_args = _side_inputs(cfg, w, qseg, kseg, w_map, qseg_map, kseg_map)
    in_specs = [pl.BlockSpec((None, None, bq, D), q_map),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map)] + side_specs
    out_specs = [pl.BlockSpec((None, None, bq, D), q_map),
                 pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
    sq_pad = cfg.nq * bq
    out_shape = [jax.ShapeDtypeStruct((cfg.batch, cfg.heads, sq_pad, D), q.dtype),
                 jax.ShapeDtypeStruct((cfg.batch, cfg.heads, sq_pad, NUM_LANES), jnp.float32)]
    scratch = [pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
               pltpu.VMEM((bq, D), jnp.float32)]
    it = _itemsize(q.dtype)
    check_vmem(2 * (2 * bq * D * it + 2 * bk * D * it + bq * NUM_LANES * 4)
               + bq * (2 * NUM_LANES + D) * 4 + 3 * bq * bk * 4, "block_sparse forward")
    steps = cfg.batch * cfg.heads * cfg.nq * cfg.mk
    cost = pl.CostEstimate(flops=4 * steps * bq * bk * D, transcendentals=steps * bq * bk,
                           bytes_accessed=steps * 2 * bk * D * it + 2 * cfg.batch * cfg.heads * sq_pad * D * it)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cfg.batch, cfg.heads, cfg.nq, cfg.mk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="sea_block_sparse_fwd",
    )(kv_idx, kv_cnt, q, k, v, *side_args)


# ---------------------------------------------------------------------------------- dQ
def softmax_grad_terms(s, allowed, lse, di, dp, w, weight_mode):
    """Backward terms of one (R, C) tile of the weighted softmax.

    s: float32 scaled scores; allowed: bool or None; lse, di: (R, 128) lane-replicated
    log-normaliser and D = rowsum(dO * o); dp = dO v^T (R, C); w: float32 broadcastable to
    (R, C) or None. Returns (p, ds, dw_terms): p = exp(s - lse) (0 where masked),
    ds = P (w dp - c D) (the score gradient, before the softmax scale), dw_terms =
    P (dp - [log] D) (sum it over queries for the weight gradient; None without weights).
    """
    if allowed is not None:
        s = jnp.where(allowed, s, _NEG_INF)
    p = jnp.exp(s - expand_lanes(lse, s.shape[1]))
    d = expand_lanes(di, s.shape[1])
    if w is None:
        return p, p * (dp - d), None
    if weight_mode == "log":
        dw_terms = p * (dp - d)
        return p, w * dw_terms, dw_terms
    return p, p * (w * dp - d), p * dp


def _grad_tile(cfg: _Cfg, q, k, v, do, lse, di, w, allowed):
    """(p, ds, dw_terms) of one (block_q, block_k) tile (see :func:`softmax_grad_terms`)."""
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
    dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
    return softmax_grad_terms(s, allowed, lse, di, dp, w, cfg.weight_mode)


def _dq_kernel(kv_idx_ref, kv_cnt_ref, *refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    w_ref = next(it) if cfg.has_w else None
    qseg_ref = next(it) if cfg.has_seg else None
    kseg_ref = next(it) if cfg.has_seg else None
    do_ref, lse_ref, di_ref = next(it), next(it), next(it)
    dq_ref = next(it)
    dq_acc = next(it)

    b, h, i, j = (pl.program_id(a) for a in range(4))
    row = (b * cfg.groups + _div(h, cfg.heads_per_group)) * cfg.nq + i
    cnt = _i32(kv_cnt_ref[row])
    kb = _i32(kv_idx_ref[row * cfg.mk + j])

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def step(masked):
        allowed = _mask_for(cfg, i, kb, qseg_ref, kseg_ref) if masked else None
        w = w_ref[...] if cfg.has_w else None
        k = k_ref[...]
        _, ds, _ = _grad_tile(cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                              di_ref[...], w, allowed)
        dq_acc[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS,
                                       preferred_element_type=jnp.float32)

    _run_masked_or_not(cfg, j < cnt, i, kb, step)

    @pl.when(j == cfg.mk - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dq_call(cfg: _Cfg, q, k, v, w, kv_idx, kv_cnt, qseg, kseg, do, lse, di):
    bq, bk, D = cfg.block_q, cfg.block_k, cfg.head_dim
    q_map, kv_map, w_map, qseg_map, kseg_map = _kv_block_maps(cfg)
    side_specs, side_args = _side_inputs(cfg, w, qseg, kseg, w_map, qseg_map, kseg_map)
    in_specs = [pl.BlockSpec((None, None, bq, D), q_map),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map)] + side_specs + [
        pl.BlockSpec((None, None, bq, D), q_map),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
    it = _itemsize(q.dtype)
    check_vmem(2 * (3 * bq * D * it + 2 * bk * D * it + 2 * bq * NUM_LANES * 4)
               + bq * D * 4 + 4 * bq * bk * 4, "block_sparse dq")
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cfg.batch, cfg.heads, cfg.nq, cfg.mk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, D), q_map),
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="sea_block_sparse_dq",
    )(kv_idx, kv_cnt, q, k, v, *side_args, do, lse, di)


# ---------------------------------------------------------------------------- dK, dV, dw
def _dkv_kernel(q_idx_ref, q_cnt_ref, *refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    w_ref = next(it) if cfg.has_w else None
    qseg_ref = next(it) if cfg.has_seg else None
    kseg_ref = next(it) if cfg.has_seg else None
    do_ref, lse_ref, di_ref = next(it), next(it), next(it)
    dk_ref, dv_ref = next(it), next(it)
    dw_ref = next(it) if cfg.has_w else None
    dk_acc, dv_acc = next(it), next(it)
    dw_acc = next(it) if cfg.has_w else None

    b, kh, jk, r, t = (pl.program_id(a) for a in range(5))
    h = kh * cfg.rep + r
    row = (b * cfg.groups + _div(h, cfg.heads_per_group)) * cfg.nk + jk
    cnt = _i32(q_cnt_ref[row])
    qi = _i32(q_idx_ref[row * cfg.mq + t])

    @pl.when(jnp.logical_and(r == 0, t == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
        if cfg.has_w:
            dw_acc[...] = jnp.zeros(dw_acc.shape, jnp.float32)

    def step(masked):
        allowed = _mask_for(cfg, qi, jk, qseg_ref, kseg_ref) if masked else None
        w = w_ref[...] if cfg.has_w else None
        q, do = q_ref[...], do_ref[...]
        p, ds, dw_terms = _grad_tile(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...],
                                     di_ref[...], w, allowed)
        pw = p if w is None else p * w
        dv_acc[...] += lax.dot_general(pw.astype(do.dtype), do, TN_DIMS,
                                       preferred_element_type=jnp.float32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, TN_DIMS,
                                       preferred_element_type=jnp.float32)
        if cfg.has_w:
            dw_acc[...] += jnp.sum(dw_terms, axis=0, keepdims=True)

    _run_masked_or_not(cfg, t < cnt, qi, jk, step)

    @pl.when(jnp.logical_and(r == cfg.rep - 1, t == cfg.mq - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
        if cfg.has_w:
            dw_ref[...] = dw_acc[...]


def _dkv_call(cfg: _Cfg, q, k, v, w, q_idx, q_cnt, qseg, kseg, do, lse, di):
    bq, bk, D = cfg.block_q, cfg.block_k, cfg.head_dim

    def q_block(b, kh, jk, r, t, q_idx_ref):
        h = kh * cfg.rep + r
        row = (b * cfg.groups + _div(h, cfg.heads_per_group)) * cfg.nk + jk
        return _i32(q_idx_ref[row * cfg.mq + t])

    def q_map(b, kh, jk, r, t, q_idx_ref, q_cnt_ref):
        return b, kh * cfg.rep + r, q_block(b, kh, jk, r, t, q_idx_ref), 0

    def kv_map(b, kh, jk, r, t, q_idx_ref, q_cnt_ref):
        return b, kh, jk, 0

    def w_map(b, kh, jk, r, t, q_idx_ref, q_cnt_ref):
        return b, kh, 0, jk

    def qseg_map(b, kh, jk, r, t, q_idx_ref, q_cnt_ref):
        return b, q_block(b, kh, jk, r, t, q_idx_ref), 0

    def kseg_map(b, kh, jk, r, t, q_idx_ref, q_cnt_ref):
        return b, 0, jk

    side_specs, side_args = _side_inputs(cfg, w, qseg, kseg, w_map, qseg_map, kseg_map)
    in_specs = [pl.BlockSpec((None, None, bq, D), q_map),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, D), kv_map)] + side_specs + [
        pl.BlockSpec((None, None, bq, D), q_map),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_map)]
    out_specs = [pl.BlockSpec((None, None, bk, D), kv_map), pl.BlockSpec((None, None, bk, D), kv_map)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    scratch = [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]
    if cfg.has_w:
        out_specs.append(pl.BlockSpec((None, None, 1, bk), w_map))
        out_shape.append(jax.ShapeDtypeStruct(w.shape, jnp.float32))
        scratch.append(pltpu.VMEM((1, bk), jnp.float32))
    it = _itemsize(q.dtype)
    check_vmem(2 * (2 * bq * D * it + 4 * bk * D * it + 2 * bq * NUM_LANES * 4)
               + 2 * bk * D * 4 + 5 * bq * bk * 4, "block_sparse dkv")
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(cfg.batch, cfg.kv_heads, cfg.nk, cfg.rep, cfg.mq),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="sea_block_sparse_dkv",
    )(q_idx, q_cnt, q, k, v, *side_args, do, lse, di)
    if cfg.has_w:
        return outs[0], outs[1], outs[2]
    return outs[0], outs[1], None


# --------------------------------------------------------------------------- custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, w, tables, qseg, kseg):
    out, _ = _fwd_call(cfg, q, k, v, w, tables[0], tables[1], qseg, kseg)
    return out


def _attention_fwd(cfg, q, k, v, w, tables, qseg, kseg):
    out, lse = _fwd_call(cfg, q, k, v, w, tables[0], tables[1], qseg, kseg)
    # keep one lane of the lane-replicated logsumexp as the residual: [B, H, Sq_pad, 1]
    # instead of 128 copies (residuals live from the forward to the backward of a layer)
    return out, (q, k, v, w, tables, qseg, kseg, out, lse[..., :1])


def _attention_bwd(cfg, res, do):
    q, k, v, w, tables, qseg, kseg, out, lse = res
    lse = jnp.broadcast_to(lse, lse.shape[:-1] + (NUM_LANES,))
    # D_i = dO_i . o_i (the softmax-backward row term), lane-replicated like lse
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    di = jnp.broadcast_to(di, lse.shape)
    do = do.astype(q.dtype)
    dq = _dq_call(cfg, q, k, v, w, tables[0], tables[1], qseg, kseg, do, lse, di)
    dk, dv, dw = _dkv_call(cfg, q, k, v, w, tables[2], tables[3], qseg, kseg, do, lse, di)
    dtables = tuple(np.zeros(t.shape, jax.dtypes.float0) for t in tables)
    dseg = None if qseg is None else (np.zeros(qseg.shape, jax.dtypes.float0),
                                      np.zeros(kseg.shape, jax.dtypes.float0))
    return (dq, dk, dv, dw, dtables) + (dseg if dseg is not None else (None, None))


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------ public
def block_sparse_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    key_weights: jax.Array | None = None,
    weight_mode: str = "gate",
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    interpret=False,
) -> jax.Array:
    """Block-sparse attention with the Pallas Mosaic TPU kernels (``impl="pallas_tpu"``).

    Same contract as :func:`sea_jax.kernels.block_sparse_attention` (which validates the
    arguments and broadcasts the layout's batch axis before calling this):
      q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, kv_heads, head_dim];
      layout: BlockLayout (batch 1 or ``batch``, G head groups dividing ``heads``);
      key_weights: optional [batch, seq_kv, kv_heads] float >= 0 ("gate" or "log");
      segment_ids: optional [batch, seq] int (0 = padding).
      interpret: False (compile with Mosaic), True (HLO interpreter) or a
        ``pltpu.InterpretParams`` (TPU interpret mode: simulated VMEM/SMEM/DMA, races).
    Returns [batch, seq_q, heads, head_dim] in q's dtype; differentiable in q, k, v and
    key_weights (jax.custom_vjp with Pallas dQ and dK/dV/dw kernels).

    Raises ValueError when the block shapes do not fit TPU tiling (block_k % 128,
    block_q % 8 or 16, head_dim 64 or % 128) or the blocks exceed the VMEM budget.
    """
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    layout = layout.broadcast_batch(B)
    layout.check_compatible(B, Sq, Skv, H)
    bq, bk = layout.block_q, layout.block_k
    cdt = compute_dtype(q.dtype)
    check_tpu_tiling(block_q=bq, block_k=bk, head_dim=D, dtype=cdt, what="block_sparse_attention")
    if weight_mode not in ("gate", "log"):
        raise ValueError(f"weight_mode must be 'gate' or 'log', got {weight_mode!r}")
    if scale is None:
        scale = D ** -0.5
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    cfg = _Cfg(batch=B, heads=H, kv_heads=K, groups=layout.num_groups, nq=nq, nk=nk,
               mk=layout.max_kv_blocks, mq=layout.max_q_blocks, block_q=bq, block_k=bk,
               head_dim=D, seq_k=Skv, causal=bool(causal),
               window=None if window is None else int(window), weight_mode=weight_mode,
               has_w=key_weights is not None, has_seg=segment_ids is not None,
               scale=float(scale), interpret=interpret_key(interpret))

    def heads_major(x, length):  # [B, S, N, D] -> [B, N, S_pad, D]
        return jnp.swapaxes(pad_axis(x.astype(cdt), 1, length), 1, 2)

    qh = heads_major(q, nq * bq)
    kh = heads_major(k, nk * bk)
    vh = heads_major(v, nk * bk)
    w = None
    if key_weights is not None:  # [B, Skv, K] -> [B, K, 1, Skv_pad] (padded keys are masked)
        w = jnp.swapaxes(pad_axis(key_weights.astype(jnp.float32), 1, nk * bk), 1, 2)[:, :, None, :]
    qseg = kseg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        qseg = jnp.broadcast_to(pad_axis(seg, 1, nq * bq)[:, :, None], (B, nq * bq, NUM_LANES))
        kseg = pad_axis(seg, 1, nk * bk)[:, None, :]
    tables = (compact_table(layout.kv_index, nk - 1), compact_table(layout.kv_count, cfg.mk),
              compact_table(layout.q_index, nq - 1), compact_table(layout.q_count, cfg.mq))
    out = _attention(cfg, qh, kh, vh, w, tables, qseg, kseg)
    return jnp.swapaxes(out, 1, 2)[:, :Sq].astype(q.dtype)
