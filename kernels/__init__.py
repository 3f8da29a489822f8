"""sea_jax.kernels: block-sparse and gathered attention, XLA reference and Pallas kernels.

Public entry points:

* :func:`block_sparse_attention` - attention restricted to the key blocks a
  :class:`BlockLayout` lists for each query block (SEA's expanded top-k, sliding windows,
  causal), with in-block causal / window / segment masking and optional per-key weights.
* :func:`gathered_attention` - token-level selection (SparseK): per query block the union of
  the selected key positions (gathered by index) plus a contiguous sliding-window span, with
  per-query selection masks and weights, in one online softmax.

Both take ``impl``:

* ``"xla"``: :mod:`sea_jax.kernels.reference` (blockwise, never T x T; autodiff backward);
* ``"pallas_gpu"``: Pallas kernels with the Triton lowering (:mod:`.gpu_block_sparse`,
  :mod:`.gpu_gathered`), forward and backward via ``jax.custom_vjp``; on Hopper GPUs the
  block-sparse forward is the Mosaic GPU (wgmma/TMA) kernel of :mod:`.gpu_block_sparse_mosaic`
  where it applies (``kernel_options={"forward": ...}``);
* ``"pallas_tpu"``: Pallas Mosaic TPU kernels, imported lazily from
  ``sea_jax.kernels.tpu_block_sparse.block_sparse_attention_tpu`` and
  ``sea_jax.kernels.tpu_gathered.gathered_attention_tpu``. Those functions receive the same
  arguments as the public ones, already validated, minus ``impl`` and ``kernel_options``
  (``interpret`` may be True, False or a ``pltpu.InterpretParams``), with ``scale`` resolved
  to a Python float and the layout's batch axis broadcast to B;
* ``"auto"``: Pallas on GPU / TPU, XLA on CPU (and XLA on TPU while the TPU kernels are
  missing).

``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests).

Internal to the SparseK selection (not an attention entry point):
:mod:`.gpu_sparsek_threshold`, the SparseK threshold of every query of a block list, solved on
chip (used by ``causal_prefix_select(schedule="fused")``, the GPU default of SparseKAttention).
"""

from __future__ import annotations

import importlib
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.kernels.cell_mask import CellMask
from sea_jax.kernels.layout import BlockLayout, num_blocks, validate_block_size
from sea_jax.kernels.slot_selection import SlotSelection
from sea_jax.kernels.reference import (
    block_sparse_attention_reference,
    gathered_attention_reference,
)

__all__ = [
    "BlockLayout",
    "CellMask",
    "block_sparse_attention",
    "gathered_attention",
    "SlotSelection",
    "block_sparse_attention_reference",
    "gathered_attention_reference",
    "IMPLS",
    "WEIGHT_MODES",
]

IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
WEIGHT_MODES = ("gate", "log")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------- dispatch
def _resolve_impl(impl: str, interpret) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas_gpu"
    if backend == "tpu":
        try:
            importlib.import_module("sea_jax.kernels.tpu_block_sparse")
            return "pallas_tpu"
        except ImportError:
            return "xla"
    return "xla"


def _tpu_function(module: str, name: str):
    try:
        mod = importlib.import_module(f"sea_jax.kernels.{module}")
    except ImportError as e:  # the TPU kernels are written separately
        raise NotImplementedError(
            f"impl='pallas_tpu' needs sea_jax.kernels.{module}.{name}, which is not available: {e}"
        ) from e
    return getattr(mod, name)


# --------------------------------------------------------------------------- validation
def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], got {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k/v must have shape [{B}, Skv, K, {D}] to match q {q.shape}, got {k.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    K = k.shape[2]
    if H % K:
        raise ValueError(f"num query heads ({H}) must be a multiple of num kv heads ({K})")
    return B, Sq, H, D, k.shape[1], K


def _check_common(weight_mode, causal, scale, segment_ids, B, Sq, Skv):
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is not None:
        if not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be None or a positive finite float, got {scale!r}")
    if segment_ids is not None:
        if Sq != Skv:
            raise ValueError(f"segment_ids need seq_q == seq_kv, got {Sq} and {Skv}")
        if segment_ids.shape != (B, Sq) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"segment_ids must be an integer array of shape {(B, Sq)}, got "
                f"{segment_ids.shape} {segment_ids.dtype}"
            )


def _check_window(window, *, allow_none: bool):
    if window is None and allow_none:
        return None
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)):
        raise ValueError(f"window must be {'None or ' if allow_none else ''}an int, got {window!r}")
    low = 1 if allow_none else 0
    if window < low:
        raise ValueError(f"window must be >= {low}, got {window}")
    return int(window)


# ------------------------------------------------------------------------ block sparse
def block_sparse_attention(
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
    impl: str = "auto",
    interpret=False,
    kernel_options: dict | None = None,
    cell_mask: CellMask | None = None,
) -> jax.Array:
    """Block-sparse softmax attention.

    Args:
      q: [batch, seq_q, heads, head_dim] (float32, bfloat16 or float16).
      k, v: [batch, seq_kv, kv_heads, head_dim], same dtype; heads % kv_heads == 0 (GQA:
        query head h reads kv head h // (heads // kv_heads)).
      layout: :class:`BlockLayout` with ceil(seq_q / block_q) query blocks and
        ceil(seq_kv / block_k) key blocks, batch 1 or ``batch``, and a number of head groups
        G dividing ``heads`` (query head h uses group h // (heads // G)).
      key_weights: optional [batch, seq_kv, kv_heads] float weights >= 0 (SparseK's soft
        mask): ``"gate"`` multiplies each value by its weight after the softmax (the
        normaliser ignores weights); ``"log"`` is softmax(s + log w). Differentiable.
      causal: mask keys after the query (positions start at 0 for both q and k).
      window: None or an int >= 1: also mask keys s <= t - window (``window`` keys visible,
        the query's own included).
      segment_ids: optional [batch, seq] int (needs seq_q == seq_kv): attend only within a
        segment; id 0 is padding (never attended; padding queries give zeros).
      scale: softmax scale, default head_dim ** -0.5.
      impl: "auto" | "xla" | "pallas_gpu" | "pallas_tpu".
      interpret: run the Pallas kernel in interpret mode (CPU testing).
      kernel_options: backend tuning knobs (see the backend module), None for defaults.
      cell_mask: optional :class:`CellMask` (SEA's token-level selection: selected cells of
        each query row's prefix, per query head): inside the listed blocks, only the keys of
        selected cells are visible. "xla" and "pallas_gpu" take it; "pallas_tpu" does not
        (ValueError; "auto" on a TPU then runs "xla").

    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype. Queries with no visible key give 0.
    """
    B, Sq, H, D, Skv, K = _check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    layout.check_compatible(B, Sq, Skv, H)
    _check_common(weight_mode, causal, scale, segment_ids, B, Sq, Skv)
    window = _check_window(window, allow_none=True)
    if key_weights is not None:
        if key_weights.shape != (B, Skv, K):
            raise ValueError(f"key_weights must have shape {(B, Skv, K)}, got {key_weights.shape}")
        if not jnp.issubdtype(key_weights.dtype, jnp.floating):
            raise ValueError(f"key_weights must be floating point, got {key_weights.dtype}")
    scale = float(D**-0.5 if scale is None else scale)
    layout = layout.broadcast_batch(B)
    kw = dict(key_weights=key_weights, weight_mode=weight_mode, causal=bool(causal), window=window,
              segment_ids=segment_ids, scale=scale)
    asked = impl
    impl = _resolve_impl(impl, interpret)
    if cell_mask is not None:
        if not isinstance(cell_mask, CellMask):
            raise ValueError(f"cell_mask must be a CellMask, got {type(cell_mask).__name__}")
        cell_mask.check(B, Sq, H, Skv)
        if impl == "pallas_tpu":
            if asked != "auto":
                raise ValueError("impl='pallas_tpu' does not take a cell_mask (use impl='xla' or 'pallas_gpu')")
            impl = "xla"
        kw["cell_mask"] = cell_mask
    if impl == "xla":
        return block_sparse_attention_reference(q, k, v, layout, **kw)
    if impl == "pallas_gpu":
        from sea_jax.kernels.gpu_block_sparse import block_sparse_attention_gpu

        return block_sparse_attention_gpu(q, k, v, layout, interpret=bool(interpret),
                                          **(kernel_options or {}), **kw)
    fn = _tpu_function("tpu_block_sparse", "block_sparse_attention_tpu")
    return fn(q, k, v, layout, interpret=interpret, **kw)


# ---------------------------------------------------------------------------- gathered
def gathered_attention(
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
    impl: str = "auto",
    interpret=False,
    kernel_options: dict | None = None,
    selection: SlotSelection | None = None,
) -> jax.Array:
    """Token-level sparse attention: selected keys gathered by index + a sliding window.

    For query block i (queries [i * block_q, (i + 1) * block_q)) and KV head h, the keys are
    ``union_index[b, h, i, :]`` (the union of what the block's queries selected, at most
    k + block_q - 1 for SparseK's prefix top-k) plus the contiguous span of the window; one
    online softmax runs over both.

    Args:
      q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, kv_heads, head_dim] (GQA: the
        selection is shared by the query heads of a KV head).
      union_index: int32 [batch, kv_heads, ceil(seq_q / block_q), U]: key positions in
        [0, seq_kv), -1 = empty slot. Entries of a row must be distinct (checked when the
        array is concrete; under jit a duplicate would be counted twice). Any order; sorted
        rows give better memory locality.
      block_q: query block size (power of two >= 16).
      window: int >= 0; query t also attends keys t - window < s <= t with weight 1
        (0: no window). Slots whose key falls inside the query's window are ignored (the
        window already covers them). Needs causal=True when > 0.
      selection_mask: optional bool [batch, kv_heads, seq_q, U]: slot u is used by query t
        (default: all non-empty slots).
      selection_weights: optional float [batch, kv_heads, seq_q, U] >= 0: the weight of slot
        u for query t (default 1); "gate" / "log" as in :func:`block_sparse_attention`.
        Differentiable.
      causal: slots with key s > t (or s > t - window with a window) are ignored.
      segment_ids: optional [batch, seq] int (seq_q == seq_kv), as in block_sparse_attention.
      scale: default head_dim ** -0.5.
      impl, interpret, kernel_options: as in :func:`block_sparse_attention`.
      selection: optional :class:`SlotSelection`, the mask and weights in factored form
        (SparseK: a slot range and a threshold per query, a score per slot; differentiable in
        the scores and thresholds); instead of selection_mask / selection_weights. The GPU
        kernel generates them on chip (no [batch, kv_heads, seq_q, U] arrays in memory, forward
        or backward); the XLA and TPU paths expand them with :meth:`SlotSelection.dense`.
        With key intervals (``key_scores`` / ``key_end``, SparseK's selections) the GPU
        backward computes the selected keys' dK / dV key-major and returns the scores'
        gradient through ``key_scores``.

    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype; queries with nothing visible give 0.
    """
    B, Sq, H, D, Skv, K = _check_qkv(q, k, v)
    block_q = validate_block_size("block_q", block_q)
    _check_common(weight_mode, causal, scale, segment_ids, B, Sq, Skv)
    window = _check_window(window, allow_none=False)
    if window > 0 and not causal:
        raise ValueError("window > 0 needs causal=True")
    nq = num_blocks(Sq, block_q)
    if union_index.ndim != 4 or union_index.shape[:3] != (B, K, nq):
        raise ValueError(
            f"union_index must have shape [{B}, {K}, {nq}, U] (batch, kv_heads, "
            f"ceil(seq_q / block_q), slots), got {union_index.shape}"
        )
    if not jnp.issubdtype(union_index.dtype, jnp.integer):
        raise ValueError(f"union_index must be an integer array, got {union_index.dtype}")
    U = union_index.shape[3]
    if U < 1:
        raise ValueError("union_index needs at least one slot")
    for name, x in (("selection_mask", selection_mask), ("selection_weights", selection_weights)):
        if x is not None and x.shape != (B, K, Sq, U):
            raise ValueError(f"{name} must have shape {(B, K, Sq, U)}, got {x.shape}")
    if selection_mask is not None and selection_mask.dtype != jnp.bool_:
        raise ValueError(f"selection_mask must be boolean, got {selection_mask.dtype}")
    if selection_weights is not None and not jnp.issubdtype(selection_weights.dtype, jnp.floating):
        raise ValueError(f"selection_weights must be floating point, got {selection_weights.dtype}")
    if selection is not None:
        if selection_mask is not None or selection_weights is not None:
            raise ValueError("give either selection or selection_mask / selection_weights, not both")
        if not isinstance(selection, SlotSelection):
            raise ValueError(f"selection must be a SlotSelection, got {type(selection).__name__}")
        selection.check(B, K, Sq, nq, U, Skv)
    if not isinstance(union_index, jax.core.Tracer):
        _check_union_index(np.asarray(union_index), Skv)
    union_index = union_index.astype(jnp.int32)
    scale = float(D**-0.5 if scale is None else scale)
    impl = _resolve_impl(impl, interpret)
    if selection is not None:
        if impl == "pallas_gpu":
            from sea_jax.kernels.gpu_gathered import gathered_attention_gpu

            return gathered_attention_gpu(
                q, k, v, union_index, block_q=block_q, window=window, selection=selection,
                weight_mode=weight_mode, causal=bool(causal), segment_ids=segment_ids, scale=scale,
                interpret=bool(interpret), **(kernel_options or {}))
        selection_mask, selection_weights = selection.dense(block_q)
    kw = dict(block_q=block_q, window=window, selection_mask=selection_mask,
              selection_weights=selection_weights, weight_mode=weight_mode, causal=bool(causal),
              segment_ids=segment_ids, scale=scale)
    if impl == "xla":
        return gathered_attention_reference(q, k, v, union_index, **kw)
    if impl == "pallas_gpu":
        from sea_jax.kernels.gpu_gathered import gathered_attention_gpu

        return gathered_attention_gpu(q, k, v, union_index, interpret=bool(interpret),
                                      **(kernel_options or {}), **kw)
    fn = _tpu_function("tpu_gathered", "gathered_attention_tpu")
    return fn(q, k, v, union_index, interpret=interpret, **kw)


def _check_union_index(idx: np.ndarray, seq_kv: int) -> None:
    bad = (idx < -1) | (idx >= seq_kv)
    if bad.any():
        raise ValueError(
            f"union_index entries must be -1 (empty) or in [0, seq_kv={seq_kv}), got values "
            f"{np.unique(idx[bad])[:5].tolist()}"
        )
    s = np.sort(idx, axis=-1)
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if dup.any():
        where = tuple(int(a[0]) for a in np.nonzero(dup.any(-1)))
        raise ValueError(f"union_index has duplicate entries in row (batch, kv_head, block)={where}")
