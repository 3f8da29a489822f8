"""SEA: sparse attention on the keys an estimated (compressed) attention picks.

Lee et al., "SEA: Sparse Linear Attention with Estimated Attention Mask", ICLR 2024
(research notes: shared/research/sea.md). Per layer:

1. a Performer (fp32 kernel linear attention) and a small decoder (MLP + CNN, heads as
   channels) estimate every row's attention compressed to ``t_m`` columns:
   ``S_hat`` [B, T, H, t_m], ``P_hat = softmax(S_hat)`` (``sea_jax.ops.sea_estimate``);
2. a top-k on ``P_hat`` keeps ``round(H k t_m / L)`` cells per row shared by the heads (or
   ``round(k t_m / L)`` per head); cell c of a row covers relative positions [c, c+1) / t_m of
   the row's prefix of length L (``sea_jax.ops.sea_select``);
3. exact softmax attention runs on the selected keys only, visiting the key blocks of the
   selection's block layout (``sea_jax.ops.sea_sparse_attention`` on the XLA path; on a GPU
   ``sea_jax.kernels.block_sparse_attention`` with the selection as a ``CellMask``); with
   ``granularity="block"`` on every prefix key of the touched blocks instead (``impl`` picks
   the Pallas kernels or the XLA path, see :class:`SEAOptions`);
4. ``out = sigma(s1) * sigma(s0) * O_sparse + (1 - sigma(s1)) * O_mean`` where ``O_mean`` is
   the running mean of V over the row's prefix and s0, s1 are per (row, head) gate logits.

No gradient flows through the top-k: the estimator learns from the distillation loss on its
estimate (``sea_jax.distill``; request it with ``return_aux=True``), the gates and the
backbone from the output. Q/K/V/O projections live outside the core (``SelfAttention``), so
swapping a pretrained model's dense core for this one keeps them; this core owns only the
estimator's parameters (and a fixed random projection).

No array with two axes of length T is formed (the estimate is T x t_m, the layout
block-level); the expanded token mask is returned in ``aux`` only for T <= ``aux_mask_max_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sea_jax.attention.base import (
    AttentionDims,
    AttentionOutput,
    check_qkv,
    register_attention,
    repeat_kv,
)
from sea_jax.attention.cache import KVCache, append_kv
from sea_jax.attention.performer import RandomProjection
from sea_jax.ops import sea_estimate as est
from sea_jax.ops import sea_select as sel_ops
from sea_jax.ops.linear_attention import SCHEDULES as LINEAR_SCHEDULES
from sea_jax.ops.linear_attention import LinearAttentionState, causal_linear_attention
from sea_jax.ops.random_features import FEATURE_KINDS, default_num_features, draw_projection
from sea_jax.ops.sea_sparse_attention import selected_attention

GRANULARITIES = ("token", "block")
IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


def _check_int(name, value, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SEAOptions:
    """Options of :class:`SEAAttention`.

    k: keys per head per row on average (the budget; changeable at inference, "dynamic k").
    t_m: compressed width (columns of the estimate); a multiple of 4.
    causal: True = decoder variant (causal everything, decode cache); False = bidirectional
        (FAVOR+ estimator over the whole segment, non-causal CNN, no decode cache).
    mode: "shared" (one budget per row shared by all heads, the paper's choice for decoders)
        or "per_head".
    features: random features of the estimator, None -> "relu" (causal) / "favor".
    num_features: M, None -> d ln d / nbf; nbf: see ``default_num_features``.
    orthogonal: orthogonal random features.
    chunk: chunk of the estimator's causal linear attention (sea_jax.ops.linear_attention).
    linear_schedule: that linear attention's schedule: "parallel" (all chunks at once: an
        associative scan over chunk states; fast, memory O(T / chunk * M * 2D) per head) or
        "scan" (sequential; memory O(M * 2D)). Same result up to float rounding.
    block_q, block_k: block sizes of the layout and of the sparse attention.
    granularity: "token" (exact: the selected keys only) or "block" (every prefix key of each
        touched key block; needs power-of-two blocks >= 16).
    impl: where the sparse attention of a full pass runs. "xla": this module's blockwise XLA
        path (either granularity). "pallas_gpu": ``sea_jax.kernels.block_sparse_attention``'s
        Triton kernels over the touched blocks, with the selection's cells as a
        ``CellMask`` for granularity="token" (the kernel rebuilds each tile's token mask on
        chip). "pallas_tpu": the TPU kernels, granularity="block" only. Both need
        power-of-two blocks >= 16. "auto": "pallas_gpu" on a GPU, "pallas_tpu" on a TPU
        (granularity="block"), "xla" otherwise (and for blocks the kernels cannot take);
        every path gives the same result. Decoding always uses the XLA path. "pallas_gpu"
        also selects the top-k cells with a Pallas radix select (``select_impl``).
    kernel_interpret: run the Pallas kernels in interpret mode (CPU tests).
    kernel_options: None or a dict of backend tuning knobs passed to
        ``block_sparse_attention(kernel_options=...)`` (e.g. ``{"dkv_tiles": (64, 32)}`` for the
        Triton kernel); stored as sorted (key, value) pairs so the options stay hashable.
    select_impl: how the top-k cells are found: "xla" (a stable sort; ``lax.top_k`` for the rows
        past ``sort_rows``), "pallas" (sea_jax.kernels.gpu_top_budget, a Pallas Triton radix
        select: GPU, or interpret mode with ``kernel_interpret``) or "auto" ("pallas" when
        ``impl`` resolves to "pallas_gpu", else "xla"). The same cells either way.
    sort_rows: causal rows below this index select with a full sort; later rows (whose budget
        is bounded) with ``lax.top_k`` of that bound (same result, less work; XLA selection).
    gate_bias: initial biases of the gate logits (s0, s1) (see ``init_estimator_params``).
    aux_mask_max_len: the expanded [B, H, T, T] mask is returned in aux only up to this T.
    """

    k: int = 64
    t_m: int = 256
    causal: bool = True
    mode: str = "shared"
    features: str | None = None
    num_features: int | None = None
    nbf: float = 8.0
    orthogonal: bool = True
    chunk: int = 64
    linear_schedule: str = "parallel"
    block_q: int = 64
    block_k: int = 64
    granularity: str = "token"
    impl: str = "auto"
    kernel_interpret: bool = False
    kernel_options: Any = None
    select_impl: str = "auto"
    sort_rows: int = 1024
    gate_bias: tuple[float, float] = (3.0, 3.0)
    aux_mask_max_len: int = 1024

    def __post_init__(self):
        _check_int("k", self.k, 1)
        est.check_t_m(self.t_m)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.mode not in sel_ops.SELECT_MODES:
            raise ValueError(f"mode must be one of {sel_ops.SELECT_MODES}, got {self.mode!r}")
        if self.features is not None and self.features not in FEATURE_KINDS:
            raise ValueError(f"features must be None or one of {FEATURE_KINDS}, got {self.features!r}")
        if self.num_features is not None:
            _check_int("num_features", self.num_features, 1)
        if not self.nbf > 0:
            raise ValueError(f"nbf must be > 0, got {self.nbf!r}")
        for name in ("chunk", "block_q", "block_k", "sort_rows"):
            _check_int(name, getattr(self, name), 1)
        _check_int("aux_mask_max_len", self.aux_mask_max_len, 0)
        if self.linear_schedule not in LINEAR_SCHEDULES:
            raise ValueError(f"linear_schedule must be one of {LINEAR_SCHEDULES}, got {self.linear_schedule!r}")
        if self.select_impl not in ("auto", "xla", "pallas"):
            raise ValueError(f"select_impl must be one of ('auto', 'xla', 'pallas'), got {self.select_impl!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.impl == "pallas_tpu" and self.granularity != "block":
            raise ValueError(
                "impl='pallas_tpu' runs the TPU block-sparse kernels, which attend whole key blocks: "
                "it needs granularity='block' (granularity='token' runs on impl='xla' or 'pallas_gpu')"
            )
        if self.granularity == "block" or self.impl in ("pallas_gpu", "pallas_tpu"):
            why = "granularity='block'" if self.granularity == "block" else f"impl={self.impl!r}"
            for name in ("block_q", "block_k"):
                if not self._kernel_block(getattr(self, name)):
                    raise ValueError(f"{why} needs {name} a power of two >= 16, got {getattr(self, name)}")
        if self.kernel_options is not None:
            if not isinstance(self.kernel_options, (dict, tuple)):
                raise ValueError(f"kernel_options must be None or a dict, got {self.kernel_options!r}")
            object.__setattr__(self, "kernel_options", tuple(sorted(dict(self.kernel_options).items())))
        if len(tuple(self.gate_bias)) != 2:
            raise ValueError(f"gate_bias must be a pair (s0, s1), got {self.gate_bias!r}")
        object.__setattr__(self, "gate_bias", tuple(float(g) for g in self.gate_bias))

    @property
    def feature_kind(self) -> str:
        return self.features or ("relu" if self.causal else "favor")

    @staticmethod
    def _kernel_block(b: int) -> bool:
        return b >= 16 and not b & (b - 1)

    def resolved_impl(self, backend: str | None = None) -> str:
        """The backend of the full-pass sparse attention: "xla", "pallas_gpu" or "pallas_tpu"."""
        if self.impl != "auto":
            return self.impl
        backend = backend or jax.default_backend()
        if not (self._kernel_block(self.block_q) and self._kernel_block(self.block_k)):
            return "xla"
        if self.granularity == "token":
            return "pallas_gpu" if backend == "gpu" else "xla"
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")


@struct.dataclass
class SEACache:
    """Decode state of a causal SEA core.

    kv: every past key/value (sparse attention may pick any of them).
    estimator: running Performer sums of the estimator (over [pos, v], 2D wide).
    cnn_rows: [B, CNN_HISTORY, t_m/4, 2H] float32, the last CNN input rows (its receptive field).
    mean: running sum of V (a linear attention with constant features).
    length: int32 scalar, tokens seen.
    """

    kv: KVCache
    estimator: LinearAttentionState
    cnn_rows: jax.Array
    mean: LinearAttentionState
    length: jax.Array


_PARAM_NAMES = (
    "enc_w", "enc_b", "enc_ln_scale", "enc_ln_bias", "dec_w", "dec_b", "ln1_scale", "ln1_bias",
    "conv1_w", "conv1_b", "conv2_w", "conv2_b", "conv3_w", "conv3_b", "ln2_scale", "ln2_bias",
    "gate_w", "gate_b",
)


@register_attention("sea", SEAOptions)
class SEAAttention(nnx.Module):
    """SEA attention core (see the module docstring); GQA, segments, decode cache."""

    def __init__(self, dims: AttentionDims, options: SEAOptions = SEAOptions(), *, rngs: nnx.Rngs):
        if dims.head_dim < 2:
            raise ValueError(f"SEA needs head_dim >= 2, got {dims.head_dim}")
        self.dims = dims
        self.options = options
        m = options.num_features or default_num_features(dims.head_dim, options.nbf)
        self.projection = RandomProjection(draw_projection(rngs.params(), m, dims.head_dim, options.orthogonal))
        params = est.init_estimator_params(
            rngs.params(), head_dim=dims.head_dim, num_heads=dims.num_heads, t_m=options.t_m,
            gate_bias=options.gate_bias,
        )
        for name in _PARAM_NAMES:
            setattr(self, name, nnx.Param(params[name]))

    # ------------------------------------------------------------------ helpers
    def estimator_params(self) -> dict:
        return {name: getattr(self, name)[...] for name in _PARAM_NAMES}

    def set_k(self, k: int) -> None:
        """Change the budget k in place (dynamic k: no retraining; re-jits)."""
        self.options = dataclasses.replace(self.options, k=k)

    @property
    def num_features(self) -> int:
        return self.projection[...].shape[0]

    def _freqs(self):
        return est.position_frequencies(est.position_dims(self.dims.head_dim) // 2, self.options.t_m)

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> SEACache:
        if not self.options.causal:
            raise ValueError("a decode cache needs causal=True (the bidirectional SEA sees the whole sequence)")
        K, D, H = self.dims.num_kv_heads, self.dims.head_dim, self.dims.num_heads
        sel_ops.check_lengths(max_len, self.options.t_m)
        value_dim = est.position_dims(D) + D
        return SEACache(
            kv=KVCache.zeros(batch, max_len, K, D, dtype),
            estimator=LinearAttentionState.zeros(batch, K, self.num_features, value_dim),
            cnn_rows=jnp.zeros((batch, est.CNN_HISTORY, self.options.t_m // 4, 2 * H), jnp.float32),
            mean=LinearAttentionState.zeros(batch, K, 1, D),
            length=jnp.zeros((), jnp.int32),
        )

    def _estimate_heads(self, params, ctx, v):
        """ctx [B,T,H,*] -> (t_pred, gate logits s0, s1, CNN input rows)."""
        v_rows = repeat_kv(v.astype(jnp.float32), self.dims.group_size)
        t_pred = est.encode(params, ctx, v_rows)
        s0, s1 = est.gate_logits(params, t_pred)
        return s0, s1, est.decoder_rows(params, t_pred)

    def _running_mean(self, v, segment_ids, state):
        B, T, K, _ = v.shape
        ones_q = jnp.ones((B, T, self.dims.num_heads, 1), jnp.float32)
        ones_k = jnp.ones((B, T, K, 1), jnp.float32)
        if self.options.causal:
            return causal_linear_attention(ones_q, ones_k, v, segment_ids=segment_ids, state=state, chunk=self.options.chunk,
                                           schedule=self.options.linear_schedule)
        return est._bidirectional_linear_attention(ones_q, ones_k, v, segment_ids, self.options.chunk,
                                                   self.options.linear_schedule), None

    def _select(self, probs, row_length, *, static_rows: bool):
        """Top-k cells; ``static_rows``: row t's length is t + 1 (causal, no segments, no cache)."""
        o, H = self.options, self.dims.num_heads
        budgets = sel_ops.row_budgets(row_length, k=o.k, t_m=o.t_m, num_heads=H, mode=o.mode)
        T = probs.shape[1]
        if o.select_impl == "pallas" or (o.select_impl == "auto" and o.resolved_impl() == "pallas_gpu"):
            # the radix-select kernel: no sort (XLA's top_k of [T, H t_m] rows is one)
            if not o.kernel_interpret and jax.default_backend() != "gpu":
                raise ValueError(f"select_impl='pallas' runs a Pallas Triton kernel: it needs a GPU "
                                 f"(or kernel_interpret=True), got backend {jax.default_backend()!r}")
            method = "pallas_interpret" if o.kernel_interpret else "pallas"
            return sel_ops.select_cells(probs, budgets, mode=o.mode, method=method), budgets
        if static_rows and o.causal and T > o.sort_rows:
            R = o.sort_rows
            cap = int(sel_ops.row_budgets(np.asarray(R + 1), k=o.k, t_m=o.t_m, num_heads=H, mode=o.mode))
            head = sel_ops.select_cells(probs[:, :R], budgets[:, :R], mode=o.mode)
            tail = sel_ops.select_cells(probs[:, R:], budgets[:, R:], mode=o.mode, cap=cap)
            return jnp.concatenate([head, tail], axis=1), budgets
        if static_rows and not o.causal:
            # every row has the same length T: its budget bounds all of them
            cap = int(sel_ops.row_budgets(np.asarray(T), k=o.k, t_m=o.t_m, num_heads=H, mode=o.mode))
            return sel_ops.select_cells(probs, budgets, mode=o.mode, cap=cap), budgets
        return sel_ops.select_cells(probs, budgets, mode=o.mode), budgets

    def _sparse(self, q, k, v, selection, row_start, row_length, segment_ids, *, full_pass: bool):
        o = self.options
        layout = sel_ops.block_layout(
            selection, row_start, row_length, key_length=k.shape[1], block_q=o.block_q, block_k=o.block_k
        )
        scale = self.dims.head_dim ** -0.5
        impl = o.resolved_impl()
        if impl != "xla" and full_pass:
            from sea_jax.kernels import BlockLayout, CellMask, block_sparse_attention

            kl = BlockLayout.from_mask(
                layout.block_mask, o.block_q, o.block_k,
                max_kv_blocks=layout.block_mask.shape[-1], max_q_blocks=layout.block_mask.shape[-2],
            )
            cells = CellMask(selection, row_start, row_length) if o.granularity == "token" else None
            out = block_sparse_attention(
                q, k, v, kl, causal=o.causal, segment_ids=segment_ids, scale=scale, impl=impl,
                interpret=o.kernel_interpret, kernel_options=dict(o.kernel_options or ()),
                cell_mask=cells,
            ).astype(jnp.float32)
            return out, layout
        out = selected_attention(
            q, k, v, selection, row_start, row_length, layout.kv_index, layout.kv_count,
            block_q=o.block_q, block_k=o.block_k, scale=scale, token_mask=o.granularity == "token",
        )
        return out, layout

    def _finish(self, o_sparse, o_mean, s0, s1, row_length, dtype):
        g0, g1 = jax.nn.sigmoid(s0)[..., None], jax.nn.sigmoid(s1)[..., None]
        out = g1 * g0 * o_sparse + (1.0 - g1) * o_mean
        out = jnp.where((row_length > 0)[:, :, None, None], out, 0.0)
        return out.astype(dtype)

    # --------------------------------------------------------------------- call
    def __call__(self, q, k, v, *, x=None, segment_ids=None, cache=None, return_aux=False):
        """q: [B, T, H, D]; k, v: [B, T, K, D]; segment_ids: optional [B, T] (contiguous runs,
        0 = padding). Returns AttentionOutput(out [B, T, H, D] in q's dtype, cache, aux).

        aux (``return_aux=True``): "estimate" S_hat [B, T, H, t_m] float32 (logits),
        "selection" bool [B, T, H, t_m], "budget" [B, T], "row_start"/"row_length" [B, T]
        (each row's prefix), "gate_scale"/"gate_mix" sigma(s0)/sigma(s1) [B, T, H],
        "block_count" [B, H, nQ] (key blocks visited per query block), "q"/"k" (the inputs,
        for the student-attention distillation loss) and, for T <= aux_mask_max_len in a full
        pass, "mask" bool [B, H, T, T] (the expanded selection, for plots).
        """
        check_qkv(self.dims, q, k, v, x, segment_ids)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
            return self._decode(q, k, v, cache, return_aux)
        o = self.options
        B, T, H, D = q.shape
        sel_ops.check_lengths(T, o.t_m)
        params = self.estimator_params()
        row_start, row_length, offset = sel_ops.row_geometry(segment_ids, B, T, causal=o.causal)
        seg_rows = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        ctx, _ = est.estimator_context(
            q, k, v, self.projection[...], self._freqs(), key_offset=offset, reference=row_length,
            features=o.feature_kind, causal=o.causal, segment_ids=segment_ids, chunk=o.chunk,
            schedule=o.linear_schedule,
        )
        s0, s1, rows = self._estimate_heads(params, ctx, v)
        logits = est.cnn_logits(params, rows, seg_rows, causal=o.causal)
        selection, budgets = self._select(jax.nn.softmax(logits, axis=-1), row_length, static_rows=segment_ids is None)
        o_sparse, layout = self._sparse(q, k, v, selection, row_start, row_length, segment_ids, full_pass=True)
        o_mean, _ = self._running_mean(v, segment_ids, None)
        out = self._finish(o_sparse, o_mean, s0, s1, row_length, q.dtype)
        aux = {}
        if return_aux:
            aux = self._aux(q, k, logits, selection, budgets, row_start, row_length, s0, s1, layout)
            if T <= o.aux_mask_max_len:
                if o.granularity == "block":
                    aux["mask"] = _block_mask_to_tokens(layout.block_mask, row_start, row_length, T, o)
                else:
                    aux["mask"] = sel_ops.expand_selection(selection, row_start, row_length, T)
        return AttentionOutput(out, None, aux)

    def _aux(self, q, k, logits, selection, budgets, row_start, row_length, s0, s1, layout):
        return {
            "estimate": logits,
            "selection": selection,
            "budget": budgets,
            "row_start": row_start,
            "row_length": row_length,
            "gate_scale": jax.nn.sigmoid(s0),
            "gate_mix": jax.nn.sigmoid(s1),
            "block_count": layout.kv_count,
            "q": q,
            "k": k,
        }

    def _decode(self, q, k, v, cache: SEACache, return_aux):
        o = self.options
        if not o.causal:
            raise ValueError("decoding with a cache needs causal=True")
        B, T, H, D = q.shape
        params = self.estimator_params()
        pos = cache.length + jnp.arange(T, dtype=jnp.int32)
        offset = jnp.broadcast_to(pos, (B, T))
        row_length = offset + 1
        row_start = jnp.zeros((B, T), jnp.int32)
        kv = append_kv(cache.kv, k, v)
        ctx, est_state = est.estimator_context(
            q, k, v, self.projection[...], self._freqs(), key_offset=offset, reference=row_length,
            features=o.feature_kind, causal=True, state=cache.estimator, chunk=o.chunk, stabilise_keys=False,
            schedule=o.linear_schedule,
        )
        s0, s1, rows = self._estimate_heads(params, ctx, v)
        R = cache.cnn_rows.shape[1]
        rows_all = jnp.concatenate([cache.cnn_rows, rows], axis=1)
        # cache rows before position 0 are empty: give them segment 0 so no tap reads them
        seg_all = (cache.length - R + jnp.arange(R + T) >= 0).astype(jnp.int32)
        logits = est.cnn_logits(params, rows_all, jnp.broadcast_to(seg_all, (B, R + T)), causal=True)[:, R:]
        selection, budgets = self._select(jax.nn.softmax(logits, axis=-1), row_length, static_rows=False)
        o_sparse, layout = self._sparse(q, kv.k, kv.v, selection, row_start, row_length, None, full_pass=False)
        o_mean, mean_state = self._running_mean(v, None, cache.mean)
        out = self._finish(o_sparse, o_mean, s0, s1, row_length, q.dtype)
        new_cache = SEACache(kv, est_state, rows_all[:, -R:], mean_state, cache.length + T)
        aux = {}
        if return_aux:
            aux = self._aux(q, k, logits, selection, budgets, row_start, row_length, s0, s1, layout)
        return AttentionOutput(out, new_cache, aux)


def _block_mask_to_tokens(block_mask, row_start, row_length, key_length, o: SEAOptions):
    """Token mask [B, H, T, S] of block granularity: prefix keys of the touched blocks."""
    B, H, nq, nk = block_mask.shape
    T = row_start.shape[1]
    qb = jnp.arange(T) // o.block_q
    kb = jnp.arange(key_length) // o.block_k
    touched = block_mask[:, :, qb][:, :, :, kb]  # [B, H, T, S]
    off = jnp.arange(key_length)[None, None, :] - row_start[:, :, None]
    inside = (off >= 0) & (off < row_length[:, :, None])
    return touched & inside[:, None]
