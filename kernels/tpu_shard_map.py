"""shard_map wrappers that run the TPU attention kernels on a device mesh.

Attention is independent across batch rows and across KV-head groups, so both kernels
shard without communication: each device gets a contiguous slice of the batch
(``batch_axis``) and of the heads (``head_axis``: H / n query heads together with their
K / n KV heads, so GQA groups never straddle devices). Layout tables follow: their batch
axis with the batch, their head-group axis with the heads when there is more than one
group (a single shared pattern is replicated). Sequences are not sharded (as in splash
attention, whose kernels reject KV-sequence sharding).

Pallas calls inside ``shard_map`` need ``check_vma=False`` (the kernels do not declare how
their outputs vary over mesh axes).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from sea_jax.kernels.layout import BlockLayout

__all__ = ["sharded_block_sparse_attention", "sharded_gathered_attention"]


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    return mesh.shape[axis]


def _check_divides(name: str, value: int, axis, n: int) -> None:
    if value % n:
        raise ValueError(f"{name}={value} must be divisible by the size of mesh axis {axis!r} ({n})")


def _check_mesh(mesh, q, k, head_axis, batch_axis):
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if head_axis is not None and head_axis == batch_axis:
        raise ValueError(f"head_axis and batch_axis must differ, both are {head_axis!r}")
    nh, nb = _axis_size(mesh, head_axis), _axis_size(mesh, batch_axis)
    _check_divides("batch", q.shape[0], batch_axis, nb)
    _check_divides("heads", q.shape[2], head_axis, nh)
    _check_divides("kv_heads", k.shape[2], head_axis, nh)
    return nh, nb


def sharded_block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    mesh: Mesh,
    head_axis: str | None = "model",
    batch_axis: str | None = "data",
    key_weights: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret=False,
    **kwargs,
) -> jax.Array:
    """:func:`sea_jax.kernels.block_sparse_attention` with ``impl="pallas_tpu"`` inside a
    ``shard_map`` over ``mesh``.

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, kv_heads, head_dim];
    layout: BlockLayout whose batch is 1 or ``batch`` and whose group count is 1 or
    divisible by the size of ``head_axis``; key_weights: [batch, seq_kv, kv_heads];
    segment_ids: [batch, seq]. ``batch_axis`` / ``head_axis`` name mesh axes (None: not
    sharded). Other keyword arguments (weight_mode, causal, window, scale) pass through.
    Returns [batch, seq_q, heads, head_dim], sharded like q.
    """
    from sea_jax.kernels import block_sparse_attention

    nh, _ = _check_mesh(mesh, q, k, head_axis, batch_axis)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    layout = layout.broadcast_batch(q.shape[0])
    G = layout.num_groups
    if G > 1 and G % nh:
        raise ValueError(
            f"layout has {G} head groups; with head_axis {head_axis!r} of size {nh} it needs 1 "
            f"group or a multiple of {nh}"
        )
    group_axis = head_axis if G > 1 else None
    table_spec = P(batch_axis, group_axis, None, None)
    count_spec = P(batch_axis, group_axis, None)
    qkv_spec = P(batch_axis, None, head_axis, None)
    tables = (layout.kv_index, layout.kv_count, layout.q_index, layout.q_count)
    bq, bk = layout.block_q, layout.block_k

    def local(q, k, v, tables, key_weights, segment_ids):
        lay = BlockLayout(*tables, block_q=bq, block_k=bk)
        return block_sparse_attention(q, k, v, lay, key_weights=key_weights,
                                      segment_ids=segment_ids, impl="pallas_tpu",
                                      interpret=interpret, **kwargs)

    in_specs = (qkv_spec, qkv_spec, qkv_spec, (table_spec, count_spec, table_spec, count_spec),
                None if key_weights is None else P(batch_axis, None, head_axis),
                None if segment_ids is None else P(batch_axis, None))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, tables, key_weights, segment_ids)


def sharded_gathered_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    union_index: jax.Array,
    *,
    mesh: Mesh,
    block_q: int,
    head_axis: str | None = "model",
    batch_axis: str | None = "data",
    selection_mask: jax.Array | None = None,
    selection_weights: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret=False,
    **kwargs,
) -> jax.Array:
    """:func:`sea_jax.kernels.gathered_attention` with ``impl="pallas_tpu"`` inside a
    ``shard_map`` over ``mesh`` (batch over ``batch_axis``, KV heads and their query heads
    over ``head_axis``).

    union_index: [batch, kv_heads, n_q_blocks, U]; selection_mask / selection_weights:
    [batch, kv_heads, seq_q, U]; segment_ids: [batch, seq]. Other keyword arguments
    (window, weight_mode, causal, scale) pass through. Returns [batch, seq_q, heads,
    head_dim], sharded like q.
    """
    from sea_jax.kernels import gathered_attention

    _check_mesh(mesh, q, k, head_axis, batch_axis)
    qkv_spec = P(batch_axis, None, head_axis, None)
    sel_spec = P(batch_axis, head_axis, None, None)

    def local(q, k, v, union_index, selection_mask, selection_weights, segment_ids):
        return gathered_attention(q, k, v, union_index, block_q=block_q,
                                  selection_mask=selection_mask,
                                  selection_weights=selection_weights, segment_ids=segment_ids,
                                  impl="pallas_tpu", interpret=interpret, **kwargs)

    in_specs = (qkv_spec, qkv_spec, qkv_spec, sel_spec,
                None if selection_mask is None else sel_spec,
                None if selection_weights is None else sel_spec,
                None if segment_ids is None else P(batch_axis, None))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, union_index, selection_mask, selection_weights, segment_ids)
