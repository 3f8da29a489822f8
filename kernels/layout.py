"""Block layouts: which key blocks each query block attends to.

A :class:`BlockLayout` describes a block-sparse attention pattern as small int32 tables,
the form every backend consumes:

* the forward / dQ tables ``kv_index`` [B, G, nQ, Mk] and ``kv_count`` [B, G, nQ]: for batch
  ``b``, head group ``g`` and query block ``i``, the key blocks ``kv_index[b, g, i, :kv_count]``
  in **strictly increasing** order;
* the transposed (dK/dV) tables ``q_index`` [B, G, nK, Mq] and ``q_count`` [B, G, nK]: for key
  block ``j``, the query blocks that visit it, increasing (splash attention's ``dkv`` mask
  info).

Padding entries (positions ``>= count``) repeat the row's last valid index (0 for an empty
row). A TPU kernel can therefore put the tables in SMEM with scalar prefetch and use them
directly in BlockSpec ``index_map``\\ s: a padded grid step maps to the block already
resident, so no DMA is issued, and ``pl.when(t < count)`` skips its compute. A GPU kernel
(Triton or Mosaic GPU) reads the row from global memory and loops ``count`` times.

Head groups: ``G`` is 1 (one pattern shared by all heads), the number of KV heads (one
pattern per GQA group, e.g. a selection made per KV head) or the number of query heads.
Query head ``h`` of ``H`` uses group ``h // (H // G)``. ``B`` is the batch size or 1
(broadcast over the batch).

Block ``i`` of the queries covers positions ``[i * block_q, (i + 1) * block_q)`` and block
``j`` of the keys ``[j * block_k, (j + 1) * block_k)``; sequences whose length is not a
multiple of the block are padded by the kernels and the tail is masked. The layout says
only which blocks are *visited*; token-level masking inside a block (causal, sliding window,
padding, segments) is the kernel's job and is given to it separately.

Layouts are pytrees (the tables are leaves; ``block_q``/``block_k`` are static), so they can
be built under ``jax.jit`` from a data-dependent selection (SEA's top-k) and passed to jitted
functions. Everything here costs O(nQ * nK) memory per (batch, group) at most, i.e. block
level, never token level.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BlockLayout", "validate_block_size", "num_blocks"]

# Triton needs power-of-two tile shapes and tl.dot needs >= 16 rows/cols; a Mosaic TPU kernel
# may demand more (multiples of 128) and checks that itself.
MIN_BLOCK = 16


def validate_block_size(name: str, value) -> int:
    """Check a block size: a power-of-two int >= 16. Raises ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a power-of-two int >= {MIN_BLOCK}, got {value!r}")
    value = int(value)
    if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power-of-two int >= {MIN_BLOCK}, got {value}")
    return value


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``length`` tokens (ceil division)."""
    return -(-int(length) // int(block))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _compact_rows(mask: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the True entries of each row of ``mask`` [..., n], increasing.

    Returns (index [..., width] int32, count [...] int32); padding repeats the last valid
    index (0 for an empty row). Rows with more than ``width`` entries are truncated (the
    caller checks that this cannot happen).
    """
    n = mask.shape[-1]
    count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    # stable argsort of "not selected" puts the selected columns first, in increasing order
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
    if width > n:
        order = jnp.concatenate(
            [order, jnp.zeros(order.shape[:-1] + (width - n,), jnp.int32)], axis=-1
        )
    order = order[..., :width]
    last = jnp.take_along_axis(order, jnp.maximum(jnp.minimum(count, width) - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    pos = jnp.arange(width, dtype=jnp.int32)
    index = jnp.where(pos < count[..., None], order, last)
    return index, jnp.minimum(count, width)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Block-sparse attention pattern (see the module docstring).

    kv_index: int32 [B, G, nQ, Mk]  key blocks of each query block, increasing, padded.
    kv_count: int32 [B, G, nQ]      number of valid entries of each kv_index row (0..nK).
    q_index:  int32 [B, G, nK, Mq]  transposed: query blocks visiting each key block.
    q_count:  int32 [B, G, nK]
    block_q, block_k: static block sizes (tokens).

    Build it with the constructors (:meth:`from_mask`, :meth:`from_lists`, :meth:`causal`,
    :meth:`sliding_window`, :meth:`dense`) rather than by hand: they keep the two table
    pairs consistent.
    """

    kv_index: jax.Array
    kv_count: jax.Array
    q_index: jax.Array
    q_count: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True), default=128)
    block_k: int = dataclasses.field(metadata=dict(static=True), default=128)

    # ------------------------------------------------------------------ shapes
    @property
    def batch(self) -> int:
        return self.kv_index.shape[0]

    @property
    def num_groups(self) -> int:
        return self.kv_index.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.q_index.shape[2]

    @property
    def max_kv_blocks(self) -> int:
        return self.kv_index.shape[3]

    @property
    def max_q_blocks(self) -> int:
        return self.q_index.shape[3]

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_mask(
        cls,
        block_mask,
        block_q: int,
        block_k: int,
        *,
        max_kv_blocks: int | None = None,
        max_q_blocks: int | None = None,
    ) -> "BlockLayout":
        """Layout from a boolean block mask.

        block_mask: bool [nQ, nK], [G, nQ, nK] or [B, G, nQ, nK]; True = visit the block.
        max_kv_blocks / max_q_blocks: widths Mk / Mq of the tables. Default: the largest row
          count when the mask is concrete (tightest tables), nK / nQ under ``jit``. A row with
          more entries than the width given raises ValueError (concrete masks only).
        """
        block_q = validate_block_size("block_q", block_q)
        block_k = validate_block_size("block_k", block_k)
        block_mask = jnp.asarray(block_mask)
        if block_mask.dtype != jnp.bool_:
            raise ValueError(f"block_mask must be boolean, got dtype {block_mask.dtype}")
        if block_mask.ndim == 2:
            block_mask = block_mask[None, None]
        elif block_mask.ndim == 3:
            block_mask = block_mask[None]
        elif block_mask.ndim != 4:
            raise ValueError(
                "block_mask must have shape [nQ, nK], [G, nQ, nK] or [B, G, nQ, nK], got "
                f"{block_mask.shape}"
            )
        nq, nk = block_mask.shape[2:]
        if nq < 1 or nk < 1:
            raise ValueError(f"block_mask needs at least one query and key block, got {block_mask.shape}")
        concrete = _is_concrete(block_mask)
        kv_rows = np.asarray(block_mask.sum(-1)).max() if concrete else None
        q_rows = np.asarray(block_mask.sum(-2)).max() if concrete else None
        mk = _table_width("max_kv_blocks", max_kv_blocks, kv_rows, nk)
        mq = _table_width("max_q_blocks", max_q_blocks, q_rows, nq)
        kv_index, kv_count = _compact_rows(block_mask, mk)
        q_index, q_count = _compact_rows(jnp.swapaxes(block_mask, -1, -2), mq)
        return cls(kv_index, kv_count, q_index, q_count, block_q, block_k)

    @classmethod
    def from_lists(
        cls,
        kv_index,
        kv_count,
        block_q: int,
        block_k: int,
        num_k_blocks: int,
        *,
        max_kv_blocks: int | None = None,
        max_q_blocks: int | None = None,
    ) -> "BlockLayout":
        """Layout from user-given key-block lists (e.g. SEA's per-query-block top-k).

        kv_index: int [nQ, M], [G, nQ, M] or [B, G, nQ, M]: key block indices in
          [0, num_k_blocks), any order; duplicates are merged.
        kv_count: int, same shape without the last axis (or None: every entry valid): how
          many leading entries of each row are valid; the rest are ignored.
        num_k_blocks: nK, the number of key blocks of the sequence.

        Concrete inputs are checked (ValueError for an index out of range or a count outside
        [0, M]). Under ``jit`` they cannot be: an out-of-range entry is then dropped, so call
        :meth:`validate` on a concrete layout in tests.
        """
        kv_index = jnp.asarray(kv_index)
        if not jnp.issubdtype(kv_index.dtype, jnp.integer):
            raise ValueError(f"kv_index must be an integer array, got dtype {kv_index.dtype}")
        if kv_index.ndim not in (2, 3, 4):
            raise ValueError(f"kv_index must have 2, 3 or 4 dims, got shape {kv_index.shape}")
        num_k_blocks = int(num_k_blocks)
        if num_k_blocks < 1:
            raise ValueError(f"num_k_blocks must be >= 1, got {num_k_blocks}")
        m = kv_index.shape[-1]
        if kv_count is None:
            kv_count = jnp.full(kv_index.shape[:-1], m, jnp.int32)
        kv_count = jnp.asarray(kv_count)
        if kv_count.shape != kv_index.shape[:-1]:
            raise ValueError(
                f"kv_count must have shape {kv_index.shape[:-1]} (kv_index without its last "
                f"axis), got {kv_count.shape}"
            )
        valid = jnp.arange(m) < kv_count[..., None]
        if _is_concrete(kv_index) and _is_concrete(kv_count):
            cnt = np.asarray(kv_count)
            if cnt.size and (cnt.min() < 0 or cnt.max() > m):
                raise ValueError(f"kv_count must lie in [0, {m}], got range [{cnt.min()}, {cnt.max()}]")
            idx = np.asarray(kv_index)[np.asarray(valid)]
            if idx.size and (idx.min() < 0 or idx.max() >= num_k_blocks):
                raise ValueError(
                    f"kv_index entries must lie in [0, num_k_blocks={num_k_blocks}), got range "
                    f"[{idx.min()}, {idx.max()}]"
                )
        # scatter into a block-level mask (merges duplicates); out-of-range one-hots vanish
        onehot = (kv_index[..., None] == jnp.arange(num_k_blocks)) & valid[..., None]
        block_mask = jnp.any(onehot, axis=-2)
        return cls.from_mask(
            block_mask, block_q, block_k, max_kv_blocks=max_kv_blocks, max_q_blocks=max_q_blocks
        )

    @classmethod
    def causal(cls, seq_q: int, seq_k: int, block_q: int, block_k: int) -> "BlockLayout":
        """Causal pattern: query block i visits key blocks holding a key <= its last query.

        Query position t attends key positions <= t (positions start at 0 for both). B=G=1.
        """
        return cls.sliding_window(seq_q, seq_k, None, block_q, block_k)

    @classmethod
    def sliding_window(
        cls, seq_q: int, seq_k: int, window: int | None, block_q: int, block_k: int
    ) -> "BlockLayout":
        """Causal sliding window: query t attends keys t - window < s <= t (``window`` keys,
        itself included; ``None`` = unbounded, i.e. plain causal). B=G=1."""
        block_q = validate_block_size("block_q", block_q)
        block_k = validate_block_size("block_k", block_k)
        seq_q, seq_k = _check_len("seq_q", seq_q), _check_len("seq_k", seq_k)
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
        q_first = np.arange(nq)[:, None] * block_q
        q_last = np.minimum(q_first + block_q, seq_q) - 1
        k_first = np.arange(nk)[None, :] * block_k
        k_last = np.minimum(k_first + block_k, seq_k) - 1
        mask = k_first <= q_last
        if window is not None:
            mask &= k_last > q_first - window
        return cls.from_mask(mask, block_q, block_k)

    @classmethod
    def dense(cls, seq_q: int, seq_k: int, block_q: int, block_k: int) -> "BlockLayout":
        """Every query block visits every key block (B=G=1)."""
        block_q = validate_block_size("block_q", block_q)
        block_k = validate_block_size("block_k", block_k)
        nq = num_blocks(_check_len("seq_q", seq_q), block_q)
        nk = num_blocks(_check_len("seq_k", seq_k), block_k)
        return cls.from_mask(np.ones((nq, nk), bool), block_q, block_k)

    # ---------------------------------------------------------------- helpers
    def block_mask(self) -> jax.Array:
        """Dense boolean block mask [B, G, nQ, nK] (block level; for tests and unions)."""
        valid = jnp.arange(self.max_kv_blocks) < self.kv_count[..., None]
        onehot = (self.kv_index[..., None] == jnp.arange(self.num_k_blocks)) & valid[..., None]
        return jnp.any(onehot, axis=-2)

    def __or__(self, other: "BlockLayout") -> "BlockLayout":
        """Union of two layouts of the same block sizes (e.g. causal top-k | window)."""
        if not isinstance(other, BlockLayout):
            return NotImplemented
        if (self.block_q, self.block_k) != (other.block_q, other.block_k):
            raise ValueError(
                f"cannot combine layouts of block sizes {(self.block_q, self.block_k)} and "
                f"{(other.block_q, other.block_k)}"
            )
        a, b = self.block_mask(), other.block_mask()
        if a.shape[2:] != b.shape[2:]:
            raise ValueError(f"cannot combine layouts of {a.shape[2:]} and {b.shape[2:]} blocks")
        return BlockLayout.from_mask(a | b, self.block_q, self.block_k)

    def density(self) -> jax.Array:
        """Fraction of the nQ x nK blocks visited, per batch and group: float32 [B, G]."""
        return jnp.sum(self.kv_count, axis=-1) / (self.num_q_blocks * self.num_k_blocks)

    def broadcast_batch(self, batch: int) -> "BlockLayout":
        """The same layout with its batch axis broadcast from 1 to ``batch``."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"layout batch {self.batch} cannot broadcast to batch {batch}")
        f = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])
        return BlockLayout(
            f(self.kv_index), f(self.kv_count), f(self.q_index), f(self.q_count),
            self.block_q, self.block_k,
        )

    def check_compatible(self, batch: int, seq_q: int, seq_k: int, num_heads: int) -> None:
        """Raise ValueError unless this layout fits q [batch, seq_q, num_heads, D] and keys
        of length ``seq_k``."""
        nq, nk = num_blocks(seq_q, self.block_q), num_blocks(seq_k, self.block_k)
        if self.num_q_blocks != nq:
            raise ValueError(
                f"layout has {self.num_q_blocks} query blocks but seq_q={seq_q} with "
                f"block_q={self.block_q} needs {nq}"
            )
        if self.num_k_blocks != nk:
            raise ValueError(
                f"layout has {self.num_k_blocks} key blocks but seq_k={seq_k} with "
                f"block_k={self.block_k} needs {nk}"
            )
        if self.batch not in (1, batch):
            raise ValueError(f"layout batch must be 1 or {batch}, got {self.batch}")
        if num_heads % self.num_groups:
            raise ValueError(
                f"layout has {self.num_groups} head groups, which must divide num_heads={num_heads}"
            )
        for name in ("kv_index", "kv_count", "q_index", "q_count"):
            if getattr(self, name).dtype != jnp.int32:
                raise ValueError(f"layout.{name} must be int32, got {getattr(self, name).dtype}")

    def validate(self) -> None:
        """Eager consistency check of a concrete layout (ranges, order, transposition)."""
        kv_index, kv_count = np.asarray(self.kv_index), np.asarray(self.kv_count)
        q_index, q_count = np.asarray(self.q_index), np.asarray(self.q_count)
        nq, nk = self.num_q_blocks, self.num_k_blocks
        if kv_count.min(initial=0) < 0 or kv_count.max(initial=0) > self.max_kv_blocks:
            raise ValueError("kv_count out of [0, max_kv_blocks]")
        if q_count.min(initial=0) < 0 or q_count.max(initial=0) > self.max_q_blocks:
            raise ValueError("q_count out of [0, max_q_blocks]")
        if kv_index.min(initial=0) < 0 or kv_index.max(initial=0) >= nk:
            raise ValueError(f"kv_index out of [0, {nk})")
        if q_index.min(initial=0) < 0 or q_index.max(initial=0) >= nq:
            raise ValueError(f"q_index out of [0, {nq})")
        fwd = np.zeros(kv_index.shape[:2] + (nq, nk), bool)
        bwd = np.zeros(kv_index.shape[:2] + (nq, nk), bool)
        for b, g, i in np.ndindex(*kv_count.shape):
            row = kv_index[b, g, i, : kv_count[b, g, i]]
            if np.any(np.diff(row) <= 0):
                raise ValueError(f"kv_index row {(b, g, i)} is not strictly increasing: {row}")
            fwd[b, g, i, row] = True
        for b, g, j in np.ndindex(*q_count.shape):
            col = q_index[b, g, j, : q_count[b, g, j]]
            if np.any(np.diff(col) <= 0):
                raise ValueError(f"q_index row {(b, g, j)} is not strictly increasing: {col}")
            bwd[b, g, col, j] = True
        if not np.array_equal(fwd, bwd):
            raise ValueError("q_index/q_count is not the transpose of kv_index/kv_count")


def _check_len(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _table_width(name: str, given: int | None, needed, limit: int) -> int:
    if given is None:
        return max(int(needed), 1) if needed is not None else limit
    if isinstance(given, (bool, np.bool_)) or not isinstance(given, (int, np.integer)) or given < 1:
        raise ValueError(f"{name} must be an int >= 1, got {given!r}")
    if needed is not None and needed > given:
        raise ValueError(f"{name}={given} is smaller than the largest row of the mask ({needed})")
    return int(given)


def stack_groups(layouts: Sequence[BlockLayout]) -> BlockLayout:
    """Stack single-group layouts (G=1 each) into one layout with G = len(layouts)."""
    if not layouts:
        raise ValueError("stack_groups needs at least one layout")
    masks = [lay.block_mask() for lay in layouts]
    if any(m.shape != masks[0].shape or m.shape[1] != 1 for m in masks):
        raise ValueError("stack_groups needs single-group layouts of identical shape")
    bq, bk = layouts[0].block_q, layouts[0].block_k
    if any((lay.block_q, lay.block_k) != (bq, bk) for lay in layouts):
        raise ValueError("stack_groups needs layouts of identical block sizes")
    return BlockLayout.from_mask(jnp.concatenate(masks, axis=1), bq, bk)
