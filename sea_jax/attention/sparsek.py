"""SparseK attention (Lou et al. 2024): learned query-independent key scores, a differentiable
top-k per query, plus a sliding window; linear time, constant decode memory.

For query i (research/sparsek.md; SPEC section 4):

* scores ``u_j = w_score . x_j + slope * j``, one per KV head (the query heads of a GQA group
  share the selection); ``slope`` is a fixed position term (a small recency bias);
* the window: keys ``i - w < j <= i`` at weight 1;
* the selection: the top-k keys of ``{j <= i - w}`` with SparseK weights
  ``m_ij = clip(u_j - tau_i, 0, 1)`` (:mod:`sea_jax.ops.sparsek_select`: tau from the top-(k+c)
  candidates, exact unless the overflow counter says otherwise);
* one softmax over the union: ``o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) * m_ij * v_j``
  (``weight_mode="gate"``, default) or ``softmax_j(q_i . k_j / sqrt(D) + log m_ij) v_j``
  (``"log"``).

Execution: query blocks are scanned once; each block selects (sorting the carried candidates
with the keys entering its prefix) and, on the XLA path, attends to the gathered selected keys
plus the contiguous window span. No array is ever [T, T]. With ``impl`` other than "xla" the
attention runs in :func:`sea_jax.kernels.gathered_attention` (Pallas on GPU / TPU) on the
selection produced by the same scan. Decoding keeps k + c candidate keys and the last w keys
per KV head (:class:`SparseKCache`, independent of the context length) and runs the same block
code, so a decode step reproduces the full pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax import lax

from sea_jax.attention.base import (
    AttentionDims,
    AttentionOutput,
    check_qkv,
    register_attention,
)
from sea_jax.model.partitioning import logical_param
from sea_jax.ops.sparsek import METHODS, check_budget
from sea_jax.ops.sparsek_select import (
    SCHEDULES,
    CandidateState,
    KeyTable,
    causal_prefix_select,
    segment_runs,
    select_block,
    union_size,
)

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
WEIGHT_MODES = ("gate", "log")
SELECTION_FORMS = ("auto", "dense", "factored")
FACTORED_SCHEDULES = ("fused", "fast", "fast_sorted")


@dataclasses.dataclass(frozen=True)
class SparseKOptions:
    """k: keys selected per query (>= 1). window: sliding-window keys at weight 1, the query
    itself included (>= 0; 0 = none). extra: c, extra candidates carried for the threshold
    (>= 0; None = k). block_q: query block of the scan (>= 1; a power of two >= 16 for the
    Pallas kernels; None: 128 for impl "pallas_gpu", whose kernels then write half the
    per-slot partial sums (SparseK layer forward+backward at 32k on an H100: H = K = 16 17.4
    vs 20.2 ms at 64; H = 16, K = 4 12.2 vs 17.6 ms), else 64). The selection is the same for
    every block_q unless the candidate set overflows (reported in the aux outputs). weight_mode: "gate"
    (value gating, default) or "log" (softmax(s + log m)).
    position_slope: the fixed position term (score += slope * position). impl: "auto" (Pallas
    on GPU/TPU, XLA on CPU) | "xla" | "pallas_gpu" | "pallas_tpu". interpret: run the Pallas
    kernel in interpret mode (CPU tests). method: SparseK threshold solver ("bracket"|"sort").
    schedule: how the kernel path runs the causal selection: "auto" (default: "fused" on a GPU,
    i.e. impl pallas_gpu without interpret, where its threshold kernel compiles; "parallel"
    otherwise) or one of sea_jax.ops.sparsek_select.SCHEDULES ("parallel", "fused", "fast",
    "fast_sorted", "scan"; the same selection, different speed). selection_form: how the
    selection reaches the attention kernel: "auto" (default: "factored" for impl pallas_gpu
    with a fast schedule, "dense" otherwise), "dense" ([B, K, T, U] mask and weight arrays) or
    "factored" (sea_jax.kernels.SlotSelection: slot scores, slot ranges and thresholds, the
    mask and weights generated inside the kernel, and each key's range of selecting queries, with
    which the GPU backward computes the selected keys' dK / dV key by key; schedules "fused",
    "fast", "fast_sorted").
    """

    k: int = 64
    window: int = 64
    extra: int | None = None
    block_q: int | None = None
    weight_mode: str = "gate"
    position_slope: float = 1e-3
    impl: str = "auto"
    interpret: bool = False
    method: str = "bracket"
    schedule: str = "auto"
    selection_form: str = "auto"

    def __post_init__(self):
        check_budget("k", self.k)
        check_budget("window", self.window, minimum=0)
        if self.extra is not None:
            check_budget("extra", self.extra, minimum=0)
        if self.block_q is not None:
            check_budget("block_q", self.block_q)
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {self.weight_mode!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.schedule != "auto" and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'auto' or one of {SCHEDULES}, got {self.schedule!r}")
        if self.selection_form not in SELECTION_FORMS:
            raise ValueError(f"selection_form must be one of {SELECTION_FORMS}, got {self.selection_form!r}")
        if self.selection_form == "factored" and self.schedule not in ("auto",) + FACTORED_SCHEDULES:
            raise ValueError(f"selection_form='factored' needs schedule 'auto' or one of {FACTORED_SCHEDULES}, "
                             f"got {self.schedule!r}")
        slope = self.position_slope
        if isinstance(slope, bool) or not isinstance(slope, numbers.Real) or not math.isfinite(slope):
            raise ValueError(f"position_slope must be a finite float, got {slope!r}")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"interpret must be a bool, got {self.interpret!r}")

    def resolved_block_q(self, impl: str) -> int:
        """block_q, or its default for ``impl`` (resolved) when None: 128 on the GPU kernels
        (first for half the per-slot partial sums of 64, see sea_jax.kernels.gpu_gathered;
        with the key-major dK/dV, which has none, 128 still measured faster at T = 32k on an
        H100: fwd+bwd 13.70 vs 14.24 ms wall with 16 KV heads, 10.71 vs 11.30 with 4,
        benchmarks/results/profile_layer_32k_1124_kv*_bq*.json), 64 elsewhere."""
        if self.block_q is not None:
            return self.block_q
        return 128 if impl == "pallas_gpu" else 64

    def resolved_schedule(self, impl: str) -> str:
        """The selection schedule of the kernel path with attention backend ``impl``."""
        if self.schedule != "auto":
            return self.schedule
        # the fused schedule's threshold kernel is Pallas Triton: 6.8 ms vs 136 ms for the XLA
        # solver at T = 32k, k = 1024 on an H100 (benchmarks/results/sparsek_threshold.json)
        return "fused" if impl == "pallas_gpu" and not self.interpret else "parallel"

    def resolved_selection_form(self, impl: str) -> str:
        """"dense" or "factored" for the kernel path with attention backend ``impl``."""
        schedule = self.resolved_schedule(impl)
        if self.selection_form == "factored":
            if schedule not in FACTORED_SCHEDULES:
                raise ValueError(f"selection_form='factored' needs one of the schedules {FACTORED_SCHEDULES}; "
                                 f"schedule 'auto' resolves to {schedule!r} for impl {impl!r}")
            return "factored"
        if self.selection_form == "dense":
            return "dense"
        # factored: no [B, K, T, U] mask / weights in memory (the GPU kernel generates them);
        # the XLA and TPU paths would only expand it again
        return "factored" if impl == "pallas_gpu" and schedule in FACTORED_SCHEDULES else "dense"

    def resolved_impl(self, backend: str | None = None) -> str:
        """The full pass's attention backend: "xla", "pallas_gpu" or "pallas_tpu" ("auto":
        Pallas on GPU / TPU, XLA elsewhere; ``backend`` defaults to jax.default_backend())."""
        if self.impl != "auto":
            return self.impl
        backend = backend or jax.default_backend()
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")

    @property
    def num_candidates(self) -> int:
        return self.k + (self.k if self.extra is None else self.extra)


@struct.dataclass
class SparseKCache:
    """Decode state, constant in context length (C = k + c candidates, w window keys).

    cand_k, cand_v: [B, K, C, D] keys/values of the carried candidates.
    cand_score: [B, K, C] their scores; cand_pos: int32 [B, K, C] positions (-1 = empty).
    win_k, win_v: [B, K, w, D] the last w keys/values (oldest first); win_score: [B, K, w].
    ev_run: int32 [B, K], ev_score: [B, K]: best evicted candidate (for the overflow flag).
    length: int32 scalar, tokens seen so far.
    """

    cand_k: jax.Array
    cand_v: jax.Array
    cand_score: jax.Array
    cand_pos: jax.Array
    win_k: jax.Array
    win_v: jax.Array
    win_score: jax.Array
    ev_run: jax.Array
    ev_score: jax.Array
    length: jax.Array


def _empty_cache(batch, kv_heads, head_dim, num_candidates, window, dtype, score_dtype) -> SparseKCache:
    C, w = num_candidates, window
    return SparseKCache(
        jnp.zeros((batch, kv_heads, C, head_dim), dtype),
        jnp.zeros((batch, kv_heads, C, head_dim), dtype),
        jnp.zeros((batch, kv_heads, C), score_dtype),
        jnp.full((batch, kv_heads, C), -1, jnp.int32),
        jnp.zeros((batch, kv_heads, w, head_dim), dtype),
        jnp.zeros((batch, kv_heads, w, head_dim), dtype),
        jnp.zeros((batch, kv_heads, w), score_dtype),
        jnp.full((batch, kv_heads), -1, jnp.int32),
        jnp.full((batch, kv_heads), -jnp.inf, score_dtype),
        jnp.zeros((), jnp.int32),
    )


def _attend_block(qb, kg, vg, sel_mask, sel_weight, ks, vs, span_mask, weight_mode, scale, acc):
    """One softmax over gathered slots and the window span.

    qb: [B, K, G, Bq, D]; kg, vg: [B, K, U, D]; sel_mask/sel_weight: [B, K, Bq, U];
    ks, vs: [B, K, L, D] window span (L may be 0); span_mask: [B, K or 1, Bq, L].
    Returns [B, K, G, Bq, D] in ``acc``.
    """
    qf = qb.astype(acc)
    s_sel = jnp.einsum("bkgqd,bkud->bkgqu", qf, kg.astype(acc)) * scale
    w_sel = sel_weight.astype(acc)[:, :, None]
    m_sel = sel_mask[:, :, None]
    if weight_mode == "log":
        ok = m_sel & (w_sel > 0)
        s_sel = s_sel + jnp.log(jnp.where(ok, w_sel, 1))
        m_sel, w_sel = ok, jnp.ones_like(w_sel)
    s_sel = jnp.where(m_sel, s_sel, -jnp.inf)
    parts_s, parts_w, parts_v = [s_sel], [w_sel], [vg]
    if ks.shape[2] > 0:
        s_win = jnp.einsum("bkgqd,bkld->bkgql", qf, ks.astype(acc)) * scale
        parts_s.append(jnp.where(span_mask[:, :, None], s_win, -jnp.inf))
        parts_w.append(jnp.ones((1, 1, 1, 1, 1), acc))
        parts_v.append(vs)
    mx = parts_s[0].max(-1, keepdims=True)
    for s in parts_s[1:]:
        mx = jnp.maximum(mx, s.max(-1, keepdims=True))
    mx = lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0))
    ps = [jnp.exp(s - mx) for s in parts_s]
    den = sum(p.sum(-1, keepdims=True) for p in ps)
    inv = 1 / jnp.where(den > 0, den, 1)
    out = 0
    for p, w, v in zip(ps, parts_w, parts_v):
        out = out + jnp.einsum("bkgql,bkld->bkgqd", p * w, v.astype(acc))
    return out * inv


@register_attention("sparsek", SparseKOptions)
class SparseKAttention(nnx.Module):
    """SparseK attention core with GQA; owns the scorer ``w_score`` [E, K]."""

    def __init__(self, dims: AttentionDims, options: SparseKOptions = SparseKOptions(), *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dims = dims
        self.options = options
        E, K = dims.embed_dim, dims.num_kv_heads
        init = nnx.initializers.normal(stddev=E ** -0.5)
        self.w_score = logical_param(init(rngs.params(), (E, K), param_dtype), ("embed", "kv_heads"))

    # ------------------------------------------------------------------ scores
    @jax.named_scope("sparsek_scores")
    def scores(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """u: [B, T, K] = x [B, T, E] . w_score + slope * positions [T] (fp32, fp64 for fp64 x)."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        u = jnp.einsum("bte,ek->btk", x.astype(acc), self.w_score[...].astype(acc))
        return u + jnp.asarray(self.options.position_slope, acc) * positions.astype(acc)[None, :, None]

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> SparseKCache:
        """A cache of k + c + w entries per KV head (``max_len`` does not change its size).

        Keys/values are stored in ``dtype``; scores in float32 (float64 for a float64 cache).
        """
        o = self.options
        return _empty_cache(batch, self.dims.num_kv_heads, self.dims.head_dim, o.num_candidates,
                            o.window, dtype, jnp.promote_types(dtype, jnp.float32))

    # ------------------------------------------------------------------ call
    def __call__(self, q, k, v, *, x=None, segment_ids=None, cache=None, return_aux=False):
        """q: [B, T, H, D]; k, v: [B, T, K, D]; x: [B, T, E] (required: the scorer reads it);
        segment_ids: optional [B, T] contiguous runs with distinct ids (0 = padding; a run is a
        sequence: an id that reappears after a gap starts a new one), full pass only;
        cache: a :class:`SparseKCache` for decoding (always the XLA path; positions continue
        from ``cache.length``). Returns AttentionOutput with out [B, T, H, D] in q's dtype,
        the new cache (or None) and, with ``return_aux``, the selection (nQ = ceil(T / Bq),
        Bq = min(block_q, T) on the XLA path, block_q on the kernel path; U = k + Bq - 1):

        * ``sparsek_index``: int32 [B, K, nQ, U] key positions of each query block's union
          (-1 = empty slot);
        * ``sparsek_mask``: bool [B, K, T, U] slot selected by the query (its top-k);
        * ``sparsek_weight``: [B, K, T, U] the SparseK weight m (0 where not selected);
        * ``sparsek_tau``: [B, K, T] thresholds (min(u) - 1 for prefixes of <= k keys, 0 when
          there is nothing to select);
        * ``sparsek_overflow``: bool [B, K, T] the k + c candidates were too few for the
          exact tau; ``sparsek_overflow_count``: int32 scalar, its sum;
        * ``sparsek_scores``: [B, T, K] the scores u (float32, float64 for float64 x).
        """
        check_qkv(self.dims, q, k, v, x, segment_ids)
        if x is None:
            raise ValueError("x [batch, seq, embed_dim] is required: SparseK scores keys from the layer input")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be floating point, got dtype {x.dtype}")
        o = self.options
        B, T = q.shape[:2]
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
            if not isinstance(cache, SparseKCache):
                raise ValueError(f"cache must be a SparseKCache (from init_cache), got {type(cache).__name__}")
            want = (B, self.dims.num_kv_heads, o.num_candidates, self.dims.head_dim)
            if cache.cand_k.shape != want or cache.win_k.shape != want[:2] + (o.window, want[3]):
                raise ValueError(
                    f"cache does not fit this call: candidate keys {cache.cand_k.shape} and window "
                    f"keys {cache.win_k.shape}, expected {want} and {want[:2] + (o.window, want[3])} "
                    "(init_cache(batch, ...) with this layer's options)")
            u = self.scores(x, cache.length + jnp.arange(T, dtype=jnp.int32))
            runs = jnp.zeros((B, T), jnp.int32)
            return self._scan(q, k, v, u.astype(cache.cand_score.dtype), runs, cache, return_aux, True)

        u = self.scores(x, jnp.arange(T, dtype=jnp.int32))
        impl = o.resolved_impl()
        if impl != "xla":
            return self._kernel_path(q, k, v, u, segment_ids, impl, return_aux)
        runs = segment_runs(segment_ids, B, T)
        empty = _empty_cache(B, self.dims.num_kv_heads, self.dims.head_dim, o.num_candidates,
                             o.window, k.dtype, u.dtype)
        return self._scan(q, k, v, u, runs, empty, return_aux, False)

    def _kernel_path(self, q, k, v, u, segment_ids, impl, return_aux):
        from sea_jax.kernels import gathered_attention

        o = self.options
        bq = o.resolved_block_q(impl)
        factored = o.resolved_selection_form(impl) == "factored"
        sel = causal_prefix_select(u, o.k, window=o.window, extra=o.num_candidates - o.k,
                                   block_q=bq, segment_ids=segment_ids, method=o.method,
                                   schedule=o.resolved_schedule(impl), interpret=o.interpret,
                                   # the GPU kernel's slot tile (64): no padding copies of the
                                   # per-slot arrays
                                   union_multiple=64 if impl == "pallas_gpu" else 1, factored=factored)
        # the kernel masks by segment-id equality; hand it the run ids (start + 1, 0 = padding)
        # so that a repeated id after a gap is a new sequence on both paths
        runs = None if segment_ids is None else segment_runs(segment_ids, *q.shape[:2]) + 1
        dense = {} if factored else dict(selection_mask=sel.mask, selection_weights=sel.weight.astype(jnp.float32))
        out = gathered_attention(
            q, k, v, sel.union_index, block_q=bq, window=o.window, selection=sel.slots, **dense,
            weight_mode=o.weight_mode, causal=True, segment_ids=runs,
            scale=self.dims.head_dim ** -0.5, impl=impl, interpret=o.interpret,
        )
        aux = {}
        if return_aux:
            mask, weight = sel.dense_mask_weight(o.window, bq)
            aux = dict(sparsek_index=sel.union_index, sparsek_mask=mask, sparsek_weight=weight,
                       sparsek_tau=sel.tau, sparsek_overflow=sel.overflow,
                       sparsek_overflow_count=sel.overflow_count, sparsek_scores=u)
        return AttentionOutput(out, None, aux)

    def _scan(self, q, k, v, u, runs, cache: SparseKCache, return_aux, return_cache):
        """The XLA path (full pass with an empty cache, or decoding): see the module docstring."""
        o = self.options
        B, T, H, D = q.shape
        K, G = self.dims.num_kv_heads, self.dims.group_size
        C, w = o.num_candidates, o.window
        Bq = min(o.resolved_block_q("xla"), T)
        nq = -(-T // Bq)
        Tp = nq * Bq
        L = cache.length
        acc = jnp.promote_types(q.dtype, jnp.float32)
        sdt = u.dtype

        # key table / store: [C carried candidates | w window keys | Tp new keys]
        new_pos = L + jnp.arange(Tp, dtype=jnp.int32)
        win_pos = L - w + jnp.arange(w, dtype=jnp.int32)
        new_run = jnp.pad(runs, ((0, 0), (0, Tp - T)), constant_values=-1)  # [B, Tp]
        table = KeyTable(
            jnp.concatenate([cache.cand_score.astype(sdt), cache.win_score.astype(sdt),
                             jnp.pad(jnp.moveaxis(u, 1, 2), ((0, 0), (0, 0), (0, Tp - T)))], axis=-1),
            jnp.concatenate([cache.cand_pos, jnp.broadcast_to(win_pos, (B, K, w)),
                             jnp.broadcast_to(new_pos, (B, K, Tp))], axis=-1),
            jnp.concatenate([jnp.where(cache.cand_pos >= 0, 0, -1).astype(jnp.int32),
                             jnp.broadcast_to(jnp.where(win_pos >= 0, 0, -1).astype(jnp.int32), (B, K, w)),
                             jnp.broadcast_to(new_run[:, None], (B, K, Tp))], axis=-1),
        )

        def store(c_part, w_part, new):
            new = jnp.pad(jnp.moveaxis(new, 1, 2).astype(c_part.dtype), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
            return jnp.concatenate([c_part, w_part, new], axis=2)  # [B, K, S, D]

        k_store = store(cache.cand_k, cache.win_k, k)
        v_store = store(cache.cand_v, cache.win_v, v)
        state = CandidateState(
            jnp.where(cache.cand_pos >= 0, jnp.arange(C, dtype=jnp.int32), -1),
            cache.ev_run, cache.ev_score.astype(sdt),
        )
        t = jnp.arange(Tp, dtype=jnp.int32)
        enter = jnp.where((L + t - w >= 0) & (t < T), C + t, -1)
        enter = jnp.broadcast_to(enter, (B, Tp))
        qb = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, nq, Bq, K, G, D)
        qb = jnp.moveaxis(qb, (1, 2), (0, 4))  # [nq, B, K, G, Bq, D]
        U = union_size(o.k, C - o.k, Bq)
        span = w + Bq - 1 if w > 0 else 0
        scale = D ** -0.5

        def body(state, xs):
            b, qblk, qpos, qrun, en = xs
            state, sel = select_block(state, table, qpos, qrun, en, k=o.k, window=w, union=U, method=o.method)
            slots = jnp.clip(sel.slots, 0)[..., None]
            kg = jnp.take_along_axis(k_store, slots, axis=2)
            vg = jnp.take_along_axis(v_store, slots, axis=2)
            if span:
                start = C + b * Bq + 1  # slot of position L + b*Bq - w + 1
                ks = lax.dynamic_slice_in_dim(k_store, start, span, axis=2)
                vs = lax.dynamic_slice_in_dim(v_store, start, span, axis=2)
                kpos = lax.dynamic_slice_in_dim(table.pos[:, :1], start, span, axis=2)[:, 0]  # [B, span]
                krun = lax.dynamic_slice_in_dim(table.run[:, :1], start, span, axis=2)[:, 0]
                d = qpos[None, :, None] - kpos[:, None, :]  # [B, Bq, span]
                smask = (d >= 0) & (d < w) & (krun[:, None, :] == qrun[:, :, None]) & (qrun[:, :, None] >= 0)
                smask = smask[:, None]
            else:
                ks = vs = jnp.zeros((B, K, 0, D), k_store.dtype)
                smask = jnp.zeros((B, 1, Bq, 0), bool)
            out = _attend_block(qblk, kg, vg, sel.mask, sel.weight, ks, vs, smask, o.weight_mode, scale, acc)
            aux = (sel.pos, sel.mask, sel.weight, sel.tau, sel.overflow) if return_aux else None
            return state, (out.astype(q.dtype), aux)

        xs = (jnp.arange(nq, dtype=jnp.int32), qb, (L + t).reshape(nq, Bq),
              jnp.moveaxis(new_run.reshape(B, nq, Bq), 1, 0), jnp.moveaxis(enter.reshape(B, nq, Bq), 1, 0))
        state, (out, aux_b) = lax.scan(jax.checkpoint(body), state, xs)
        out = jnp.moveaxis(out, (0, 4), (1, 2)).reshape(B, Tp, H, D)[:, :T]

        new_cache = None
        if return_cache:
            slots = jnp.clip(state.slots, 0)
            has = state.slots >= 0
            gather = lambda a: jnp.take_along_axis(a, slots[..., None], axis=2)
            tail = slice(C + T, C + T + w)  # the last w positions: L + T - w .. L + T - 1
            new_cache = SparseKCache(
                gather(k_store), gather(v_store),
                jnp.where(has, jnp.take_along_axis(table.score, slots, -1), 0).astype(cache.cand_score.dtype),
                jnp.where(has, jnp.take_along_axis(table.pos, slots, -1), -1),
                k_store[:, :, tail], v_store[:, :, tail],
                table.score[:, :, tail].astype(cache.win_score.dtype),
                state.ev_run, state.ev_score.astype(cache.ev_score.dtype), L + T,
            )
        aux = {}
        if return_aux:
            pos, mask, weight, tau, overflow = aux_b

            def per_query(a):  # [nq, B, K, Bq, ...] -> [B, K, T, ...]
                a = jnp.moveaxis(a, 0, 2)
                return a.reshape(a.shape[:2] + (Tp,) + a.shape[4:])[:, :, :T]

            overflow = per_query(overflow)
            aux = dict(sparsek_index=jnp.moveaxis(pos, 0, 2), sparsek_mask=per_query(mask),
                       sparsek_weight=per_query(weight), sparsek_tau=per_query(tau),
                       sparsek_overflow=overflow,
                       sparsek_overflow_count=jnp.sum(overflow, dtype=jnp.int32), sparsek_scores=u)
        return AttentionOutput(out, new_cache, aux)
