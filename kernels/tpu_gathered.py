"""Pallas Mosaic TPU kernels for gathered (token-level) attention: SparseK's selected keys
plus a sliding window, one online softmax.

Gather strategy on TPU: **pre-gather in XLA**. Pallas TPU moves data between HBM and VMEM
by DMA of whole tiles; a selected key is one row of D values (256 bytes in bf16), so an
in-kernel gather would issue one tiny DMA per key (the page-size-1 case of paged
attention), while XLA's TPU gather streams the rows at close to HBM bandwidth. The union of
each query block's selected keys (``union_index`` [B, K, nQ, U], U padded to a multiple of
``block_u`` = 128) is gathered once into kg / vg [B, K, nQ * U_pad, D]; the kernels then
see dense (128, D) chunks. The backward returns d(kg), d(vg) per chunk and XLA's transpose of
the gather (a scatter-add) folds them into dK / dV. The extra HBM memory is
B * K * nQ * U_pad * D per tensor (about (k + block_q) / block_q times K/V).

What is folded where:

* the per-(query, slot) state - slot empty or out of range, causal (slot key <= t - window,
  or <= t without a window), ``selection_mask``, segments and ``selection_weights`` - is
  one float32 array ``wsel`` [B, K, Sq_pad, U_pad] built in XLA: the weight where the slot
  is used, -1 where it is not (same size as ``selection_weights``). Its gradient is the
  weight gradient (XLA's ``where`` routes it back to ``selection_weights``).
* the window span of query block i (keys i*bq - window + 1 .. i*bq + bq - 1) is read
  straight from K/V in ``block_kw`` = 128-key blocks chosen by the index map (no table);
  its causal / window / tail / segment mask is built in-kernel from iota.

GQA: the ``heads // kv_heads`` query heads of a KV head share its selection, so they are
stacked as rows of one (rep * block_q, D) query tile (rows r -> head r // block_q, query
r mod block_q): every gathered chunk is loaded once per KV head and the weight gradient of
a (query, slot) sums over the stacked heads inside the kernel.

Kernels (grid dimension semantics in ``pltpu.CompilerParams``):

* forward: grid (B, K, nQ, nU + nW); steps t < nU visit gathered chunk t, the others the
  window's key blocks; m / l / acc scratch; output block visited in consecutive steps.
* fused backward (same grid): dQ accumulated over all steps; d(kg), d(vg), d(wsel) of a
  gathered chunk are complete within its single step (a chunk belongs to one query block)
  and are written directly.
* window dK/dV: grid (B, K, nKw, nV) over key blocks and the (static, at most nV) query
  blocks whose window reaches them.
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

from sea_jax.kernels.layout import num_blocks
from sea_jax.kernels.tpu_block_sparse import (
    NN_DIMS,
    NT_DIMS,
    NUM_LANES,
    TN_DIMS,
    check_tpu_tiling,
    check_vmem,
    compute_dtype,
    expand_lanes,
    finish_softmax,
    init_softmax_state,
    interpret_key,
    online_softmax_step,
    pad_axis,
    softmax_grad_terms,
    token_mask,
)

__all__ = ["gathered_attention_tpu", "BLOCK_U", "BLOCK_KW"]

BLOCK_U = 128  # gathered slots per step (lane width of the score tile)
BLOCK_KW = 128  # keys per window step


@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch: int
    kv_heads: int
    rep: int
    nq: int
    block_q: int
    head_dim: int
    nu: int  # gathered chunks per query block
    block_u: int
    window: int  # 0 = no window
    nw: int  # window steps per query block (static maximum)
    nkw: int  # key blocks of the window source
    nv: int  # query blocks reaching one window key block (static maximum)
    block_kw: int
    seq_k: int
    has_seg: bool
    weight_mode: str
    scale: float
    interpret: Any

    @property
    def rows(self):
        return self.rep * self.block_q


def _div(x, n: int):
    return x if n == 1 else lax.div(x, jnp.int32(n))


def _window_blocks(cfg: _Cfg, i):
    """First and last window key block of query block i (traced ints; first > last when
    the window is empty)."""
    first = _div(jnp.maximum(i * cfg.block_q - cfg.window + 1, 0), cfg.block_kw)
    last = jnp.minimum(_div(i * cfg.block_q + cfg.block_q - 1, cfg.block_kw), cfg.nkw - 1)
    return jnp.minimum(first, cfg.nkw - 1), last


def _query_blocks(cfg: _Cfg, jb):
    """First and last query block whose window reaches key block jb."""
    first = _div(jb * cfg.block_kw, cfg.block_q)
    last = jnp.minimum(_div(jb * cfg.block_kw + cfg.block_kw - 1 + cfg.window - 1, cfg.block_q),
                       cfg.nq - 1)
    return jnp.minimum(first, cfg.nq - 1), last


def _rows(x, rep):
    """Stack a (block_q, C) tile ``rep`` times along rows (one copy per query head)."""
    return x if rep == 1 else jnp.concatenate([x] * rep, axis=0)


def _window_mask(cfg: _Cfg, qi, jb, qseg_ref, kseg_ref):
    qseg = kseg = None
    if cfg.has_seg:
        qseg = _rows(expand_lanes(qseg_ref[...], cfg.block_kw), cfg.rep)
        kseg = kseg_ref[...]
    return token_mask(q_first=qi * cfg.block_q, k_first=jb * cfg.block_kw, rows=cfg.rows,
                      cols=cfg.block_kw, block_q=cfg.block_q, causal=True, window=cfg.window,
                      seq_k=cfg.seq_k, qseg=qseg, kseg=kseg)


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ------------------------------------------------------------------------- index maps
def _maps(cfg: _Cfg):
    last_u = cfg.nu - 1

    def q_map(b, kh, i, t):
        return b, kh, i, 0

    def kg_map(b, kh, i, t):
        return b, kh, i * cfg.nu + jnp.minimum(t, last_u), 0

    def wsel_map(b, kh, i, t):
        return b, kh, i, jnp.minimum(t, last_u)

    def window_block(i, t):
        first, last = _window_blocks(cfg, i)
        # gathered steps prefetch the first window block; padded steps repeat the last one
        return jnp.maximum(jnp.minimum(first + jnp.maximum(t - cfg.nu, 0), last), 0)

    def kw_map(b, kh, i, t):
        return b, kh, window_block(i, t), 0

    def qseg_map(b, kh, i, t):
        return b, i, 0

    def kseg_map(b, kh, i, t):
        return b, 0, window_block(i, t)

    return q_map, kg_map, wsel_map, kw_map, qseg_map, kseg_map


def _in_specs(cfg: _Cfg, maps):
    q_map, kg_map, wsel_map, kw_map, qseg_map, kseg_map = maps
    R, D, bu, bkw = cfg.rows, cfg.head_dim, cfg.block_u, cfg.block_kw
    specs = [pl.BlockSpec((None, None, R, D), q_map),
             pl.BlockSpec((None, None, bu, D), kg_map),
             pl.BlockSpec((None, None, bu, D), kg_map),
             pl.BlockSpec((None, None, cfg.block_q, bu), wsel_map)]
    if cfg.window:
        specs += [pl.BlockSpec((None, None, bkw, D), kw_map),
                  pl.BlockSpec((None, None, bkw, D), kw_map)]
        if cfg.has_seg:
            specs += [pl.BlockSpec((None, cfg.block_q, NUM_LANES), qseg_map),
                      pl.BlockSpec((None, 1, bkw), kseg_map)]
    return specs


def _unpack_inputs(cfg: _Cfg, it):
    q_ref, kg_ref, vg_ref, wsel_ref = next(it), next(it), next(it), next(it)
    kw_ref = vw_ref = qseg_ref = kseg_ref = None
    if cfg.window:
        kw_ref, vw_ref = next(it), next(it)
        if cfg.has_seg:
            qseg_ref, kseg_ref = next(it), next(it)
    return q_ref, kg_ref, vg_ref, wsel_ref, kw_ref, vw_ref, qseg_ref, kseg_ref


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(*refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, kg_ref, vg_ref, wsel_ref, kw_ref, vw_ref, qseg_ref, kseg_ref = _unpack_inputs(cfg, it)
    o_ref, lse_ref = next(it), next(it)
    m_ref, l_ref, acc_ref = next(it), next(it), next(it)
    i, t = pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        init_softmax_state(m_ref, l_ref, acc_ref)

    @pl.when(t < cfg.nu)
    def _gathered():
        s = lax.dot_general(q_ref[...], kg_ref[...], NT_DIMS,
                            preferred_element_type=jnp.float32) * cfg.scale
        w = _rows(wsel_ref[...], cfg.rep)  # weight, or -1 where the slot is not used
        w_den = w if cfg.weight_mode == "log" else None
        online_softmax_step(s, w >= 0.0, w, w_den, vg_ref[...], m_ref, l_ref, acc_ref)

    if cfg.window:
        first, last = _window_blocks(cfg, i)
        jb = first + t - cfg.nu

        @pl.when(jnp.logical_and(t >= cfg.nu, jb <= last))
        def _window():
            s = lax.dot_general(q_ref[...], kw_ref[...], NT_DIMS,
                                preferred_element_type=jnp.float32) * cfg.scale
            allowed = _window_mask(cfg, i, jb, qseg_ref, kseg_ref)
            online_softmax_step(s, allowed, None, None, vw_ref[...], m_ref, l_ref, acc_ref)

    @pl.when(t == cfg.nu + cfg.nw - 1)
    def _finish():
        finish_softmax(m_ref, l_ref, acc_ref, o_ref, lse_ref)


def _fwd_call(cfg: _Cfg, args):
    q = args[0]
    R, D = cfg.rows, cfg.head_dim
    maps = _maps(cfg)
    it = jnp.dtype(q.dtype).itemsize
    check_vmem(2 * (2 * R * D * it + 2 * cfg.block_u * D * it + 2 * cfg.block_kw * D * it
                    + cfg.block_q * cfg.block_u * 4 + R * NUM_LANES * 4)
               + R * (2 * NUM_LANES + D) * 4 + 4 * R * max(cfg.block_u, cfg.block_kw) * 4,
               "gathered forward")
    rows_total = cfg.nq * R
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(cfg.batch, cfg.kv_heads, cfg.nq, cfg.nu + cfg.nw),
        in_specs=_in_specs(cfg, maps),
        out_specs=[pl.BlockSpec((None, None, R, D), maps[0]),
                   pl.BlockSpec((None, None, R, NUM_LANES), maps[0])],
        out_shape=[jax.ShapeDtypeStruct((cfg.batch, cfg.kv_heads, rows_total, D), q.dtype),
                   jax.ShapeDtypeStruct((cfg.batch, cfg.kv_heads, rows_total, NUM_LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((R, NUM_LANES), jnp.float32),
                        pltpu.VMEM((R, NUM_LANES), jnp.float32), pltpu.VMEM((R, D), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="sea_gathered_fwd",
    )(*args)


# ----------------------------------------------------------------------- fused backward
def _bwd_kernel(*refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, kg_ref, vg_ref, wsel_ref, kw_ref, vw_ref, qseg_ref, kseg_ref = _unpack_inputs(cfg, it)
    do_ref, lse_ref, di_ref = next(it), next(it), next(it)
    dq_ref, dkg_ref, dvg_ref, dwsel_ref = next(it), next(it), next(it), next(it)
    dq_acc = next(it)
    i, t = pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(t < cfg.nu)
    def _gathered():
        q, do, kg = q_ref[...], do_ref[...], kg_ref[...]
        s = lax.dot_general(q, kg, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
        dp = lax.dot_general(do, vg_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
        w = _rows(wsel_ref[...], cfg.rep)
        p, ds, dw_terms = softmax_grad_terms(s, w >= 0.0, lse_ref[...], di_ref[...], dp, w,
                                             cfg.weight_mode)
        dq_acc[...] += lax.dot_general(ds.astype(kg.dtype), kg, NN_DIMS,
                                       preferred_element_type=jnp.float32)
        dkg_ref[...] = (lax.dot_general(ds.astype(q.dtype), q, TN_DIMS,
                                        preferred_element_type=jnp.float32) * cfg.scale
                        ).astype(dkg_ref.dtype)
        dvg_ref[...] = lax.dot_general((p * w).astype(do.dtype), do, TN_DIMS,
                                       preferred_element_type=jnp.float32).astype(dvg_ref.dtype)
        bq = cfg.block_q
        dw = dw_terms[0:bq]
        for r in range(1, cfg.rep):  # the stacked query heads share the slot's weight
            dw = dw + dw_terms[r * bq:(r + 1) * bq]
        dwsel_ref[...] = dw

    if cfg.window:
        first, last = _window_blocks(cfg, i)
        jb = first + t - cfg.nu

        @pl.when(jnp.logical_and(t >= cfg.nu, jb <= last))
        def _window():
            q, do, kw = q_ref[...], do_ref[...], kw_ref[...]
            s = lax.dot_general(q, kw, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
            dp = lax.dot_general(do, vw_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
            allowed = _window_mask(cfg, i, jb, qseg_ref, kseg_ref)
            _, ds, _ = softmax_grad_terms(s, allowed, lse_ref[...], di_ref[...], dp, None,
                                          cfg.weight_mode)
            dq_acc[...] += lax.dot_general(ds.astype(kw.dtype), kw, NN_DIMS,
                                           preferred_element_type=jnp.float32)

    @pl.when(t == cfg.nu + cfg.nw - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _bwd_call(cfg: _Cfg, args, do, lse, di):
    q, kg, _, wsel = args[:4]
    R, D, bu = cfg.rows, cfg.head_dim, cfg.block_u
    maps = _maps(cfg)
    q_map, kg_map, wsel_map = maps[:3]
    it = jnp.dtype(q.dtype).itemsize
    check_vmem(2 * (4 * R * D * it + 4 * bu * D * it + 2 * cfg.block_kw * D * it
                    + 2 * cfg.block_q * bu * 4 + 2 * R * NUM_LANES * 4)
               + R * D * 4 + 5 * R * max(bu, cfg.block_kw) * 4, "gathered backward")
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        grid=(cfg.batch, cfg.kv_heads, cfg.nq, cfg.nu + cfg.nw),
        in_specs=_in_specs(cfg, maps) + [pl.BlockSpec((None, None, R, D), q_map),
                                         pl.BlockSpec((None, None, R, NUM_LANES), q_map),
                                         pl.BlockSpec((None, None, R, NUM_LANES), q_map)],
        out_specs=[pl.BlockSpec((None, None, R, D), q_map),
                   pl.BlockSpec((None, None, bu, D), kg_map),
                   pl.BlockSpec((None, None, bu, D), kg_map),
                   pl.BlockSpec((None, None, cfg.block_q, bu), wsel_map)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(kg.shape, kg.dtype),
                   jax.ShapeDtypeStruct(kg.shape, kg.dtype),
                   jax.ShapeDtypeStruct(wsel.shape, jnp.float32)],
        scratch_shapes=[pltpu.VMEM((R, D), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="sea_gathered_bwd",
    )(*args, do, lse, di)


# ------------------------------------------------------------------- window dK / dV
def _window_dkv_kernel(*refs, cfg: _Cfg):
    it = iter(refs)
    q_ref, kw_ref, vw_ref = next(it), next(it), next(it)
    qseg_ref = kseg_ref = None
    if cfg.has_seg:
        qseg_ref, kseg_ref = next(it), next(it)
    do_ref, lse_ref, di_ref = next(it), next(it), next(it)
    dk_ref, dv_ref = next(it), next(it)
    dk_acc, dv_acc = next(it), next(it)
    jb, t = pl.program_id(2), pl.program_id(3)
    first, last = _query_blocks(cfg, jb)
    qi = first + t

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(qi <= last)
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = lax.dot_general(q, kw_ref[...], NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
        dp = lax.dot_general(do, vw_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
        allowed = _window_mask(cfg, qi, jb, qseg_ref, kseg_ref)
        p, ds, _ = softmax_grad_terms(s, allowed, lse_ref[...], di_ref[...], dp, None,
                                      cfg.weight_mode)
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, TN_DIMS,
                                       preferred_element_type=jnp.float32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, TN_DIMS,
                                       preferred_element_type=jnp.float32)

    @pl.when(t == cfg.nv - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _window_dkv_call(cfg: _Cfg, q, kw, vw, qseg, kseg, do, lse, di):
    R, D, bkw = cfg.rows, cfg.head_dim, cfg.block_kw

    def q_block(jb, t):
        first, last = _query_blocks(cfg, jb)
        return jnp.maximum(jnp.minimum(first + t, last), 0)

    def q_map(b, kh, jb, t):
        return b, kh, q_block(jb, t), 0

    def kv_map(b, kh, jb, t):
        return b, kh, jb, 0

    def qseg_map(b, kh, jb, t):
        return b, q_block(jb, t), 0

    def kseg_map(b, kh, jb, t):
        return b, 0, jb

    in_specs = [pl.BlockSpec((None, None, R, D), q_map),
                pl.BlockSpec((None, None, bkw, D), kv_map),
                pl.BlockSpec((None, None, bkw, D), kv_map)]
    seg_args = []
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, cfg.block_q, NUM_LANES), qseg_map),
                     pl.BlockSpec((None, 1, bkw), kseg_map)]
        seg_args = [qseg, kseg]
    in_specs += [pl.BlockSpec((None, None, R, D), q_map),
                 pl.BlockSpec((None, None, R, NUM_LANES), q_map),
                 pl.BlockSpec((None, None, R, NUM_LANES), q_map)]
    it = jnp.dtype(q.dtype).itemsize
    check_vmem(2 * (2 * R * D * it + 4 * bkw * D * it + 2 * R * NUM_LANES * 4)
               + 2 * bkw * D * 4 + 5 * R * bkw * 4, "gathered window dkv")
    return pl.pallas_call(
        functools.partial(_window_dkv_kernel, cfg=cfg),
        grid=(cfg.batch, cfg.kv_heads, cfg.nkw, cfg.nv),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bkw, D), kv_map),
                   pl.BlockSpec((None, None, bkw, D), kv_map)],
        out_shape=[jax.ShapeDtypeStruct(kw.shape, kw.dtype), jax.ShapeDtypeStruct(vw.shape, vw.dtype)],
        scratch_shapes=[pltpu.VMEM((bkw, D), jnp.float32), pltpu.VMEM((bkw, D), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="sea_gathered_window_dkv",
    )(q, kw, vw, *seg_args, do, lse, di)


# --------------------------------------------------------------------------- custom vjp
def _kernel_args(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg):
    args = [q, kg, vg, wsel]
    if cfg.window:
        args += [kw, vw]
        if cfg.has_seg:
            args += [qseg, kseg]
    return args


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg):
    out, _ = _fwd_call(cfg, _kernel_args(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg))
    return out


def _gathered_fwd(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg):
    out, lse = _fwd_call(cfg, _kernel_args(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg))
    # one lane of the lane-replicated logsumexp is the residual (not 128 copies)
    return out, (q, kg, vg, wsel, kw, vw, qseg, kseg, out, lse[..., :1])


def _gathered_bwd(cfg, res, do):
    q, kg, vg, wsel, kw, vw, qseg, kseg, out, lse = res
    lse = jnp.broadcast_to(lse, lse.shape[:-1] + (NUM_LANES,))
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    di = jnp.broadcast_to(di, lse.shape)
    do = do.astype(q.dtype)
    args = _kernel_args(cfg, q, kg, vg, wsel, kw, vw, qseg, kseg)
    dq, dkg, dvg, dwsel = _bwd_call(cfg, args, do, lse, di)
    dkw = dvw = None
    if cfg.window:
        dkw, dvw = _window_dkv_call(cfg, q, kw, vw, qseg, kseg, do, lse, di)
    zero = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)
    return dq, dkg, dvg, dwsel, dkw, dvw, zero(qseg), zero(kseg)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


# ------------------------------------------------------------------------------ public
def gathered_attention_tpu(
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
    interpret=False,
) -> jax.Array:
    """Gathered attention with the Pallas Mosaic TPU kernels (``impl="pallas_tpu"``).

    Same contract as :func:`sea_jax.kernels.gathered_attention` (which validates first):
      q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, kv_heads, head_dim];
      union_index: int32 [batch, kv_heads, ceil(seq_q / block_q), U], -1 = empty slot;
      selection_mask: optional bool [batch, kv_heads, seq_q, U];
      selection_weights: optional float [batch, kv_heads, seq_q, U] >= 0;
      window: keys t - window < s <= t with weight 1 (0 = none; needs causal);
      segment_ids: optional [batch, seq] int (0 = padding).
      interpret: False (Mosaic), True (HLO interpreter) or a ``pltpu.InterpretParams``.
    Returns [batch, seq_q, heads, head_dim] in q's dtype; differentiable in q, k, v and
    selection_weights.
    """
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    rep = H // K
    bq = int(block_q)
    W = int(window)
    if W > 0 and not causal:
        raise ValueError("window > 0 needs causal=True")
    if weight_mode not in ("gate", "log"):
        raise ValueError(f"weight_mode must be 'gate' or 'log', got {weight_mode!r}")
    if bq & (bq - 1):
        raise ValueError(f"block_q must be a power of two, got {bq}")
    cdt = compute_dtype(q.dtype)
    check_tpu_tiling(block_q=bq, block_k=BLOCK_U, head_dim=D, dtype=cdt, what="gathered_attention")
    nq = num_blocks(Sq, bq)
    if union_index.shape[:3] != (B, K, nq):
        raise ValueError(f"union_index must have shape [{B}, {K}, {nq}, U], got {union_index.shape}")
    U = union_index.shape[3]
    nu = num_blocks(U, BLOCK_U)
    u_pad = nu * BLOCK_U
    if scale is None:
        scale = D ** -0.5

    # window geometry (static): key blocks per query block and query blocks per key block
    nkw = num_blocks(Skv, BLOCK_KW)
    nw = nv = 0
    if W > 0:
        qb = np.arange(nq)
        first = np.minimum(np.maximum(qb * bq - W + 1, 0) // BLOCK_KW, nkw - 1)
        last = np.minimum((qb * bq + bq - 1) // BLOCK_KW, nkw - 1)
        nw = int(max(1, (last - first + 1).max()))
        kb = np.arange(nkw)
        qfirst = np.minimum(kb * BLOCK_KW // bq, nq - 1)
        qlast = np.minimum((kb * BLOCK_KW + BLOCK_KW - 1 + W - 1) // bq, nq - 1)
        nv = int(max(1, (qlast - qfirst + 1).max()))
    cfg = _Cfg(batch=B, kv_heads=K, rep=rep, nq=nq, block_q=bq, head_dim=D, nu=nu,
               block_u=BLOCK_U, window=W, nw=nw, nkw=nkw, nv=nv, block_kw=BLOCK_KW, seq_k=Skv,
               has_seg=segment_ids is not None and W > 0, weight_mode=weight_mode,
               scale=float(scale), interpret=interpret_key(interpret))
    check_tpu_tiling(block_q=cfg.rows, block_k=BLOCK_KW, head_dim=D, dtype=cdt,
                     what="gathered_attention")

    # queries: [B, Sq, H, D] -> [B, K, nq * rep * bq, D], rows (block, head-in-group, query)
    qp = pad_axis(q.astype(cdt), 1, nq * bq).reshape(B, nq, bq, K, rep, D)
    qp = qp.transpose(0, 3, 1, 4, 2, 5).reshape(B, K, nq * rep * bq, D)
    kt = jnp.swapaxes(k.astype(cdt), 1, 2)  # [B, K, Skv, D]
    vt = jnp.swapaxes(v.astype(cdt), 1, 2)

    # pre-gather the selected keys: [B, K, nq * u_pad, D]
    idx = pad_axis(union_index.astype(jnp.int32), 3, u_pad, -1)  # [B, K, nq, u_pad]
    valid = (idx >= 0) & (idx < Skv)
    safe = jnp.where(valid, idx, 0)
    flat = safe.reshape(B, K, nq * u_pad, 1)
    kg = jnp.take_along_axis(kt, flat, axis=2)
    vg = jnp.take_along_axis(vt, flat, axis=2)

    # per-(query, slot) weight, -1 where the slot is not used: [B, K, nq * bq, u_pad]
    qpos = jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq)
    ok = valid[:, :, :, None, :]  # [B, K, nq, 1, u_pad]
    if causal:
        limit = qpos - W if W > 0 else qpos
        ok = ok & (idx[:, :, :, None, :] <= limit[None, None, :, :, None])
    ok = jnp.broadcast_to(ok, (B, K, nq, bq, u_pad))
    if selection_mask is not None:
        sm = pad_axis(pad_axis(selection_mask, 2, nq * bq, False), 3, u_pad, False)
        ok = ok & sm.reshape(B, K, nq, bq, u_pad)
    seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        sq = pad_axis(seg, 1, nq * bq).reshape(B, 1, nq, bq, 1)
        sk = jnp.take_along_axis(seg[:, None, :], safe.reshape(B, K, nq * u_pad), axis=2)
        sk = sk.reshape(B, K, nq, 1, u_pad)
        ok = ok & (sq == sk) & (sk != 0)
    if selection_weights is None:
        wval = jnp.ones((), jnp.float32)
    else:
        wval = pad_axis(pad_axis(selection_weights.astype(jnp.float32), 2, nq * bq), 3, u_pad)
        wval = wval.reshape(B, K, nq, bq, u_pad)
    wsel = jnp.where(ok, wval, -1.0).reshape(B, K, nq * bq, u_pad)

    kw = vw = qseg = kseg = None
    if W > 0:
        kw = pad_axis(kt, 2, nkw * BLOCK_KW)
        vw = pad_axis(vt, 2, nkw * BLOCK_KW)
        if cfg.has_seg:
            qseg = jnp.broadcast_to(pad_axis(seg, 1, nq * bq)[:, :, None], (B, nq * bq, NUM_LANES))
            kseg = pad_axis(seg, 1, nkw * BLOCK_KW)[:, None, :]

    out = _gathered(cfg, qp, kg, vg, wsel, kw, vw, qseg, kseg)  # [B, K, nq * rep * bq, D]
    out = out.reshape(B, K, nq, rep, bq, D).transpose(0, 2, 4, 1, 3, 5).reshape(B, nq * bq, H, D)
    return out[:, :Sq].astype(q.dtype)
