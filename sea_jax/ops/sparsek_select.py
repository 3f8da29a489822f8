"""Causal SparseK selection for every query in one pass, linear in sequence length.

Query i (absolute position ``pos_i``) selects from its *selectable prefix*: the keys j with
``pos_j <= pos_i - window`` in its own segment run (the window keys are attended separately at
weight 1). Scores are query-independent (one per key and KV head), so:

* ``cand_i`` = the top-(k + c) of the selectable prefix, ordered by (score, position) with the
  later position winning ties;
* ``tau_i``  = the SparseK threshold of ``cand_i`` with budget k (exact when the (k + c + 1)-th
  key of the prefix scores <= tau_i; otherwise the query *overflows* and tau_i is the
  threshold of the candidate set, the same value in training and in decoding; with c = 0 a
  query has at most k candidates, takes them at weight 1 with tau_i = min(cand_i) - 1, and
  overflows when the (k + 1)-th key scores above that);
* the query attends its top-k keys with weights ``m_ij = clip(u_j - tau_i, 0, 1)`` (SparseK
  values restricted to the top-k, research/sparsek.md 1.3b). With at most k candidates it
  selects them all with weight 1.

Every quantity is defined per query, independently of blocking, so a decode step (block of one
query) reproduces the full pass exactly.

Implementation: queries are processed in blocks of ``block_q``. The carry holds the top-(k + c)
keys of the prefix selectable by the block's first query (as slots of a key table). A block
merges them with the ``block_q`` keys that enter the prefix during the block, sorts this list
of M = k + c + block_q entries once, and every query of the block finds its candidates by a
running count over the sorted list (entries it may not use yet are skipped). All of a block's
selected keys lie in the first U = k + block_q - 1 sorted entries (a query skips at most
block_q - 1 entries that are not yet in its prefix), which is the per-block union handed to the
attention. Cost O(T (k + c + block_q)) time and O(block_q (k + c + block_q)) live memory.

Schedules (``causal_prefix_select(schedule=...)``):

* ``"scan"``: one ``lax.scan`` step per query block, carrying the candidate state
  (T / block_q serial steps; what decoding does one token at a time).
* ``"parallel"`` (default): the carry a block starts with depends only on the keys that entered
  the prefix before it: its slots are the top-C (C = k + c) of those keys by (run, score,
  position) and its evicted key is the (C + 1)-th. "Top-C of a union plus the best of the
  rest" is an associative merge of (sorted C-list, evicted) pairs, so every block's carry is an
  exclusive prefix merge of the per-block entering sets: ``lax.associative_scan`` over blocks
  (about 2 log2(nQ) batched sorts of 2C entries). The blocks then run ``select_block`` from
  their carries independently, ``block_batch`` blocks at a time (``lax.map``), which bounds
  the live working set (see :func:`default_block_batch`). Both schedules produce bit-identical
  slots, masks and overflow flags (the merge uses the same total order and tie rules).
* ``"fast"``: :mod:`sea_jax.ops.sparsek_select_fast` (int ranks, bitonic prefix merge, no
  stored [block_q, C + block_q] arrays, closed-form VJP without recomputing the forward).
  Same outputs (bit-identical on an H100 too). Not the default: on an H100 at T = 32k
  (K = 16, k = c = 1024, block_q = 64) its carries take 1.8 ms (the 3-key merge: 11.2 ms)
  and everything but the threshold solver 3.5 ms, but the bracket solver's 10-25
  data-dependent full passes over the candidates (each batch runs as many as its slowest
  row) cost ~126 ms, so the whole is 134 / 139 ms fwd / fwd+bwd vs 113 / 127 ms here
  (benchmarks/results/sparsek_parts_fast.json, sparsek_select_stages.json).
* ``"fused"``: "fast" with the threshold solved on chip by a Pallas Triton kernel
  (:mod:`sea_jax.kernels.gpu_sparsek_threshold`: binary searches over each block's sorted list,
  an exact closed form per row, the exact per-pass iteration for rows that need it), all query
  blocks in one step; ``interpret=True`` runs the kernel in Pallas interpret mode (CPU tests).
  Same outputs (weights / tau to float rounding). On an H100 at T = 32k (K = 16, k = c = 1024,
  w = 512, block_q = 64): 13.8 / 18.8 ms fwd / fwd+bwd vs 112 / 127 ms for "parallel"
  (benchmarks/results/sparsek_parts_fused.json); the GPU default of SparseKAttention.
* ``"fast_sorted"``: "fast" with the bracket iteration run on statistics read off the sorted
  block list (two binary searches and [block_q] corrections per query and step instead of a
  pass over C + block_q entries), then one exact pass for the closed form; same outputs
  (tests). Not measured on a GPU yet; on CPU (T = 8192, K = 2, k = c = 256) it is no faster
  than "fast" (792 vs 518 ms fwd), where C + block_q = 576 is close to its per-query
  [block_q] corrections; the GPU configuration has C + block_q = 2112.

Segments: ``run`` ids are the start position of each key's contiguous segment run (-1 for
padding / empty). Sorting by (run, score, position) keeps the latest run's keys ahead of
older runs, so the carried set is always the top-(k + c) of the run a new query belongs to.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sea_jax.ops.sparsek import check_budget, sparsek_given_kth

__all__ = [
    "CandidateState",
    "KeyTable",
    "BlockSelection",
    "Selection",
    "empty_candidates",
    "select_block",
    "segment_runs",
    "causal_prefix_select",
    "union_size",
    "default_block_batch",
    "prefix_candidates",
    "SCHEDULES",
]

SCHEDULES = ("parallel", "fused", "fast", "fast_sorted", "scan")


class CandidateState(NamedTuple):
    """The carry between query blocks (per batch row and KV head).

    slots:    int32 [B, K, C] key-table slots of the top-(k + c) selectable keys, -1 = empty.
    ev_run:   int32 [B, K] run of the best key evicted so far (-1: none).
    ev_score: float32 [B, K] its score (largest evicted score of that run).
    """

    slots: jax.Array
    ev_run: jax.Array
    ev_score: jax.Array


class KeyTable(NamedTuple):
    """Every key a call can select, addressed by slot.

    score: [B, K, S] float32 (float64 in float64 runs) scores u.
    pos:   int32 [B, K, S] absolute positions.
    run:   int32 [B, K, S] segment-run id (start position of the run); -1 = not a key.
    """

    score: jax.Array
    pos: jax.Array
    run: jax.Array


class BlockSelection(NamedTuple):
    """What one query block selected (U = union slots, Bq = queries of the block).

    slots:    int32 [B, K, U] key-table slots of the block's union (-1 empty).
    pos:      int32 [B, K, U] their positions (-1 empty).
    mask:     bool [B, K, Bq, U] slot u is among query i's top-k.
    weight:   float [B, K, Bq, U] SparseK weight m_iu (0 where not selected); differentiable.
    tau:      float [B, K, Bq] thresholds (differentiable).
    overflow: bool [B, K, Bq] the candidate set was too small for the exact tau.
    """

    slots: jax.Array
    pos: jax.Array
    mask: jax.Array
    weight: jax.Array
    tau: jax.Array
    overflow: jax.Array


class Selection(NamedTuple):
    """Selection of a whole sequence (nQ = ceil(T / block_q) query blocks).

    union_index:  int32 [B, K, nQ, U] key positions per query block (-1 empty).
    mask:         bool [B, K, T, U]; weight: float [B, K, T, U]; tau: [B, K, T].
    overflow:     bool [B, K, T]; overflow_count: int32 scalar (sum of ``overflow``).
    slots:        with ``factored=True``: the mask and weights as a
                  :class:`sea_jax.kernels.SlotSelection` (mask and weight are then None;
                  :meth:`Selection.dense_mask_weight` expands them).
    """

    union_index: jax.Array
    mask: jax.Array | None
    weight: jax.Array | None
    tau: jax.Array
    overflow: jax.Array
    overflow_count: jax.Array
    slots: Any = None

    def dense_mask_weight(self, window: int, block_q: int) -> tuple[jax.Array, jax.Array]:
        """(mask, weight) [B, K, T, U] of either form (a factored selection is expanded:
        [B, K, T, U] arrays, for inspection and tests; the kernels take it as it is)."""
        if self.slots is None:
            return self.mask, self.weight
        mask, weight = self.slots.dense(block_q)
        T = mask.shape[2]
        pos = jnp.repeat(self.union_index, block_q, axis=2)[:, :, :T]  # [B, K, T, U]
        visible = (pos >= 0) & (pos <= jnp.arange(T, dtype=jnp.int32)[:, None] - window)
        mask = mask & visible
        return mask, jnp.where(mask, weight, 0).astype(self.tau.dtype)


def union_size(k: int, extra: int, block_q: int) -> int:
    """U = k + block_q - 1 slots per block union (never more than the sorted list)."""
    return min(k + block_q - 1, k + extra + block_q)


def empty_candidates(batch: int, kv_heads: int, k: int, extra: int, dtype=jnp.float32) -> CandidateState:
    c = k + extra
    return CandidateState(
        jnp.full((batch, kv_heads, c), -1, jnp.int32),
        jnp.full((batch, kv_heads), -1, jnp.int32),
        jnp.full((batch, kv_heads), -jnp.inf, dtype),
    )


def segment_runs(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """int32 [B, T]: start position of each token's contiguous segment run, -1 for padding (0).

    Without segment ids every token is in run 0.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    t = jnp.arange(length, dtype=jnp.int32)
    change = jnp.concatenate([jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(change, t[None], 0), axis=1)
    return jnp.where(seg != 0, start, -1)


def _take(a, idx):
    """a: [B, K, S], idx: int [B, K, N] (clipped) -> [B, K, N]."""
    return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[-1] - 1), axis=-1)


def select_block(
    state: CandidateState,
    table: KeyTable,
    query_pos: jax.Array,
    query_run: jax.Array,
    enter_slots: jax.Array,
    *,
    k: int,
    window: int,
    union: int,
    method: str = "bracket",
) -> tuple[CandidateState, BlockSelection]:
    """Selection for one block of Bq queries; returns the carry for the next block.

    Args:
      state: carry; its slots hold the top-(k + c) keys selectable by the block's first query.
      table: the key table (scores differentiable).
      query_pos: int32 [Bq] absolute query positions (consecutive).
      query_run: int32 [B, Bq] run id of each query, -1 for padding queries (select nothing).
      enter_slots: int32 [B, Bq] slot of the key at position query_pos - window (the key that
        enters the selectable prefix at that query), -1 if none (negative position, padding
        query).
      k: budget; window: window size w; union: U, the number of union slots returned.
    """
    B, K, C = state.slots.shape
    Bq = query_pos.shape[0]
    slots = jnp.concatenate(
        [state.slots, jnp.broadcast_to(enter_slots[:, None, :], (B, K, Bq))], axis=-1
    )  # [B, K, M]
    has = slots >= 0
    run = jnp.where(has, _take(table.run, slots), -1)
    has = run >= 0
    slots = jnp.where(has, slots, -1)
    pos = jnp.where(has, _take(table.pos, slots), -1)
    score_key = lax.stop_gradient(jnp.where(has, _take(table.score, slots), -jnp.inf))
    # descending by (run, score, position): ascending sort of the negations; empties last
    _, _, _, slots = lax.sort((-run, -score_key, -pos, slots), dimension=-1, num_keys=3)
    has = slots >= 0
    run = jnp.where(has, _take(table.run, slots), -1)
    pos = jnp.where(has, _take(table.pos, slots), -1)
    score = _take(table.score, slots)  # differentiable gather
    dtype = score.dtype
    score = jnp.where(has, score, 0)

    # per query: entries of its own run already in its selectable prefix, in sorted order
    qrun = query_run[:, None, :, None]  # [B, 1, Bq, 1]
    ok = (
        has[:, :, None, :]
        & (run[:, :, None, :] == qrun)
        & (qrun >= 0)
        & (pos[:, :, None, :] <= (query_pos - window)[None, None, :, None])
    )  # [B, K, Bq, M]
    rank = jnp.cumsum(ok, axis=-1, dtype=jnp.int32) - 1
    cand = ok & (rank < C)
    sel = ok & (rank < k)
    zq = jnp.broadcast_to(score[:, :, None, :], ok.shape)
    kth = jnp.sum(jnp.where(ok & (rank == k - 1), lax.stop_gradient(zq), 0), axis=-1)
    p, tau = sparsek_given_kth(zq, cand, kth, k, method=method)
    weight = jnp.where(sel, p, 0).astype(dtype)
    # exactness: the best key outside the candidate set must not clear the threshold
    nxt = jnp.max(jnp.where(ok & (rank == C), lax.stop_gradient(zq), -jnp.inf), axis=-1)
    ev = jnp.where(state.ev_run[:, :, None] == query_run[:, None, :], state.ev_score[:, :, None], -jnp.inf)
    # also for rows with <= k candidates (c = 0): their reported tau is min(cand) - 1, and a
    # key left outside that clears it means the weight-1 selection is not the exact SparseK
    overflow = jnp.maximum(nxt, ev) > lax.stop_gradient(tau)

    # carry: the first C sorted entries; the (C+1)-th is the best evicted key of this block
    ev_run_new = run[:, :, C] if slots.shape[-1] > C else jnp.full((B, K), -1, jnp.int32)
    ev_score_new = jnp.where(ev_run_new >= 0, lax.stop_gradient(score[:, :, C]), -jnp.inf) if slots.shape[-1] > C else state.ev_score
    newer = (ev_run_new > state.ev_run) | ((ev_run_new == state.ev_run) & (ev_score_new > state.ev_score))
    new_state = CandidateState(
        slots[:, :, :C],
        jnp.where(newer, ev_run_new, state.ev_run),
        jnp.where(newer, ev_score_new, state.ev_score).astype(state.ev_score.dtype),
    )
    U = union
    out = BlockSelection(slots[:, :, :U], pos[:, :, :U], sel[..., :U], weight[..., :U], tau, overflow)
    return new_state, out


def check_selection_args(k, extra, window, block_q) -> tuple[int, int, int, int]:
    """Validate the selection hyper-parameters (ValueError naming the argument)."""
    k = check_budget("k", k)
    extra = check_budget("extra", extra, minimum=0)
    window = check_budget("window", window, minimum=0)
    block_q = check_budget("block_q", block_q)
    return k, extra, window, block_q


class _SortedKeys(NamedTuple):
    """A sorted top-C key list plus the best key left out (leading axes: [..., B, K]).

    run, score, pos: [..., B, K, C] descending by (run, score, position); empties last
      (run -1, score -inf, pos -1).
    ev_run, ev_score: [..., B, K] (run, score) of the (C + 1)-th key (-1, -inf: none).
    """

    run: jax.Array
    score: jax.Array
    pos: jax.Array
    ev_run: jax.Array
    ev_score: jax.Array


def _top_c(run, score, pos, c: int) -> _SortedKeys:
    """Sort [..., n] keys (n > c) descending by (run, score, position); keep c, report the (c+1)-th.

    The order is the one :func:`select_block` sorts by (ties in score: later position first;
    empties, run < 0, last), so the kept list and the evicted key match the serial carry.
    """
    has = run >= 0
    run = jnp.where(has, run, -1)
    pos = jnp.where(has, pos, -1)
    score = jnp.where(has, score, -jnp.inf)
    neg_run, neg_score, neg_pos = lax.sort((-run, -score, -pos), dimension=-1, num_keys=3)
    run, score, pos = -neg_run, -neg_score, -neg_pos
    ev_run = run[..., c]
    ev_score = jnp.where(ev_run >= 0, score[..., c], -jnp.inf)
    return _SortedKeys(run[..., :c], score[..., :c], pos[..., :c], ev_run, ev_score)


def _merge(a: _SortedKeys, b: _SortedKeys) -> _SortedKeys:
    """Associative merge: top-C of the union of two key sets and the (C + 1)-th of the union.

    The (C + 1)-th key of a union is either one of the two sets' own (C + 1)-th keys or the
    (C + 1)-th entry of the merged top-C lists, so the best of the three by (run, score) is it.
    """
    c = a.run.shape[-1]
    m = _top_c(jnp.concatenate([a.run, b.run], -1), jnp.concatenate([a.score, b.score], -1),
               jnp.concatenate([a.pos, b.pos], -1), c)
    ev_run, ev_score = m.ev_run, m.ev_score
    for other in (a, b):
        better = (other.ev_run > ev_run) | ((other.ev_run == ev_run) & (other.ev_score > ev_score))
        ev_run = jnp.where(better, other.ev_run, ev_run)
        ev_score = jnp.where(better, other.ev_score, ev_score)
    return m._replace(ev_run=ev_run, ev_score=ev_score)


def prefix_candidates(table: KeyTable, enter_blocks: jax.Array, c: int) -> CandidateState:
    """The candidate state every query block starts with, for all blocks at once.

    Args:
      table: the key table whose slot s holds position s (as in :func:`causal_prefix_select`);
        only run and the stop-gradient scores are read.
      enter_blocks: int32 [nQ, B, Bq] slot of the key entering the prefix at each query (-1 none).
      c: C = k + extra, the carried list length.
    Returns:
      CandidateState with a leading block axis: slots [nQ, B, K, C], ev_* [nQ, B, K]; entry q
      equals the carry the serial scan hands to block q (exclusive prefix over blocks < q).
    """
    nq, B, Bq = enter_blocks.shape
    K = table.run.shape[1]
    slots = jnp.broadcast_to(enter_blocks[:, :, None, :], (nq, B, K, Bq))
    take = lambda a: jax.vmap(_take, in_axes=(None, 0))(a, slots)  # noqa: E731  [nQ, B, K, Bq]
    run = jnp.where(slots >= 0, take(table.run), -1)
    score = lax.stop_gradient(take(table.score))
    # each block's entering keys as a sorted C-list (padded with C empties so the list is
    # longer than C and the (C + 1)-th entry exists)
    pad = lambda a, v: jnp.concatenate([a, jnp.full(a.shape[:-1] + (c,), v, a.dtype)], -1)  # noqa: E731
    leaves = _top_c(pad(run, -1), pad(score, -jnp.inf), pad(slots, -1), c)
    incl = lax.associative_scan(_merge, leaves, axis=0)
    empty = _SortedKeys(
        jnp.full((1, B, K, c), -1, jnp.int32), jnp.full((1, B, K, c), -jnp.inf, score.dtype),
        jnp.full((1, B, K, c), -1, jnp.int32), jnp.full((1, B, K), -1, jnp.int32),
        jnp.full((1, B, K), -jnp.inf, score.dtype))
    excl = jax.tree.map(lambda e, a: jnp.concatenate([e, a[:-1]], 0), empty, incl)
    return CandidateState(jnp.where(excl.run >= 0, excl.pos, -1), excl.ev_run, excl.ev_score)


def default_block_batch(batch: int, kv_heads: int, block_q: int, candidates: int,
                        budget_bytes: int = 1 << 30) -> int:
    """Query blocks the parallel schedule runs at once: the largest that fits ``budget_bytes``.

    One block's working set is about ten [B, K, block_q, C + block_q] arrays of 4 bytes (masks,
    ranks, scores, SparseK weights and their temporaries; float64 doubles some), so with the
    default 1 GiB budget B = 1, K = 16, block_q = 64, C = 2048 runs 12 blocks per step (the
    same at any T: the batch bounds this working set; T / (block_q * batch) steps remain
    serial). Not counted here: the outputs ([B, K, T, U] weights and masks) and the prefix
    merge's [nQ, B, K, C] carries and sort temporaries, which grow with T (XLA's CPU memory
    analysis of the forward at T = 128k, K = 16, k = c = 1024: 11.0 GiB temporaries vs 8.7 GiB
    for the serial scan, next to 10.75 GiB of outputs).
    """
    per_block = 40 * batch * kv_heads * block_q * (candidates + block_q)
    return max(1, budget_bytes // per_block)


def _fast_schedule(table: KeyTable, xs, *, k, c, window, union, method, block_batch, factored=False,
                   segments=True):
    """schedule="fast": BlockSelection with a leading block axis (slots hold positions); factored:
    (BlockSelection, key_end [B, K, T]) (:func:`sea_jax.ops.sparsek_select_fast.key_ends`);
    segments=False: no segment ids (one run), see fast_select_blocks."""
    from sea_jax.ops import sparsek_select_fast as fast

    qpos, qrun, enter = xs  # [nQ, Bq], [nQ, B, Bq], [nQ, B, Bq]
    nq, B, Bq = enter.shape
    K = table.run.shape[1]
    order, rank = fast.global_ranks(table.score, table.run)
    # rank of the key entering at each query (EMPTY: none, or not a key)
    ent = jnp.broadcast_to(jnp.moveaxis(enter, 0, 1).reshape(B, 1, nq * Bq), (B, K, nq * Bq))
    ok = (ent >= 0) & (_take(table.run, ent) >= 0)
    ent_rank = jnp.where(ok, _take(rank, ent), fast.EMPTY)
    ent_rank = jnp.moveaxis(ent_rank.reshape(B, K, nq, Bq), 2, 0)  # [nQ, B, K, Bq]
    on_chip = method in ("pallas", "pallas_interpret")
    if on_chip and fast.KERNEL_BLOCK_LISTS:
        # the GPU kernel path: every block's sorted list in one Pallas pass over the keys in
        # rank order (no merge scan, no sort)
        # (and where each entering rank lands in its list)
        lists, ev, spos = fast.kernel_block_lists(ent_rank, c, table.score.shape[-1],
                                                  interpret=method == "pallas_interpret")
    else:
        carry, ev = fast.prefix_ranks(ent_rank, c, merge=method if on_chip else "bitonic")
        lists = fast.sorted_block_lists(carry, ent_rank, table.score.shape[-1])  # [nQ, B, K, C + Bq]
        spos = None

    def one_block(args):
        list_q, ev_q, ent_q, qpos_q, qrun_q, spos_q = args
        pos, mask, weight, tau, overflow = fast.fast_select_blocks(
            list_q, ev_q, ent_q, qpos_q, qrun_q, order=order, score=table.score, run=table.run,
            k=k, c=c, window=window, union=union, method=method, factored=factored, spos=spos_q,
            segments=segments)
        return BlockSelection(pos, pos, mask, weight, tau, overflow)

    if block_batch is None:
        # the fused schedule's per-block working set is the block list and its outputs (no
        # solver passes over generated rows): all blocks in one step (on an H100 at T = 32k,
        # with the kernel's first version: 61 ms forward vs 140 ms in steps of 49 blocks, peak
        # 3.1 vs 5.3 GB; sparsek_parts_fused.json has the current kernel in one step)
        block_batch = nq if method.startswith("pallas") else default_block_batch(B, K, Bq, c, budget_bytes=1 << 32)
    # no checkpoint: the residuals are the block lists' scores and per-query scalars (the
    # SparseK VJP regenerates its rows), so recomputing the forward would only cost time
    args = (lists, ev, ent_rank, qpos, qrun, spos)
    if block_batch >= nq:  # one step: a plain vmap, no loop around the block outputs
        sel = jax.vmap(one_block)(args)
    else:
        sel = lax.map(one_block, args, batch_size=block_batch)
    if not factored:
        return sel
    lo, hi, kth = sel.mask
    T = rank.shape[-1]
    kth = jnp.moveaxis(kth, 0, 2).reshape(B, K, nq * Bq)[..., :T]
    return sel._replace(mask=(lo, hi)), fast.key_ends(kth, rank, table.run, window)


def causal_prefix_select(
    scores: jax.Array,
    k: int,
    *,
    window: int = 0,
    extra: int | None = None,
    block_q: int = 64,
    segment_ids: jax.Array | None = None,
    method: str = "bracket",
    schedule: str = "parallel",
    block_batch: int | None = None,
    interpret: bool = False,
    union_multiple: int = 1,
    factored: bool = False,
) -> Selection:
    """Causal SparseK selection of a whole sequence.

    Args:
      scores: [B, T, K] float key scores u (one per KV head); differentiable.
      k: keys selected per query (int >= 1).
      window: w >= 0: query i selects from keys at positions <= i - w.
      extra: c >= 0 extra candidates carried for the threshold (default k).
      block_q: queries per block (int >= 1).
      segment_ids: optional int [B, T], contiguous runs (0 = padding).
      method: SparseK threshold method ("bracket" or "sort").
      schedule: "parallel" (default: prefix merge over blocks, then blocks in batches),
        "fast" (global ranks, bitonic prefix merge, per-query rows generated on the fly;
        :mod:`sea_jax.ops.sparsek_select_fast`), "fused" ("fast" with the Pallas threshold
        kernel; GPU, or CPU with ``interpret=True``), "fast_sorted" (the same with the bracket
        iteration run on statistics read off the sorted block list; not yet measured on a
        GPU) or "scan" (one serial step per block); identical results (module docstring).
      block_batch: fast and parallel schedules: query blocks per batched step (int >= 1);
        default :func:`default_block_batch` (about 1 GiB of working set; the fast schedule
        stores no [block_q, C + block_q] arrays, so its default batch is larger; "fused":
        all blocks at once).
      interpret: "fused" only: run the threshold kernel in Pallas interpret mode.
      union_multiple: round the union width U up to a multiple of this (int >= 1; the extra
        slots are empty: index -1, mask False, weight 0). A kernel whose slot tile divides U
        then takes the [B, K, T, U] mask and weights without padding copies.
      factored: schedules "fused", "fast", "fast_sorted": return the mask and weights as a
        :class:`sea_jax.kernels.SlotSelection` in ``Selection.slots`` (slot scores, a slot
        range and a threshold per query) instead of [B, K, T, U] arrays; the GPU gathered
        kernel generates them on chip. Same selection, same gradients.
    Returns:
      :class:`Selection` (union_index holds key positions, -1 empty).
    """
    if not hasattr(scores, "ndim") or scores.ndim != 3:
        raise ValueError(f"scores must have shape [batch, seq, kv_heads], got {getattr(scores, 'shape', None)}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    k, extra, window, block_q = check_selection_args(k, k if extra is None else extra, window, block_q)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if block_batch is not None:
        block_batch = check_budget("block_batch", block_batch)
    union_multiple = check_budget("union_multiple", union_multiple)
    if factored and schedule not in ("fused", "fast", "fast_sorted"):
        raise ValueError(f"factored=True needs schedule 'fused', 'fast' or 'fast_sorted', got {schedule!r}")
    B, T, K = scores.shape
    if segment_ids is not None:
        if segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array of shape {(B, T)}, got {segment_ids.shape} {segment_ids.dtype}")
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    runs = segment_runs(segment_ids, B, T)  # [B, T]
    table = KeyTable(
        jnp.moveaxis(scores.astype(dtype), 1, 2),
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, K, T)),
        jnp.broadcast_to(runs[:, None, :], (B, K, T)),
    )
    nq = -(-T // block_q)
    Tp = nq * block_q
    qpos = jnp.arange(Tp, dtype=jnp.int32)
    qrun = jnp.pad(runs, ((0, 0), (0, Tp - T)), constant_values=-1)
    enter = jnp.where((qpos - window >= 0) & (qpos < T), qpos - window, -1)
    enter = jnp.broadcast_to(enter[None], (B, Tp))
    U0 = union_size(k, extra, block_q)
    U = -(-U0 // union_multiple) * union_multiple

    def body(state, xs):
        qp, qr, en = xs
        state, out = select_block(state, table, qp, qr, en, k=k, window=window, union=U0, method=method)
        if U != U0:  # empty slots up to the rounded union width
            pad = lambda a, v: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, U - U0)], constant_values=v)  # noqa: E731
            out = out._replace(slots=pad(out.slots, -1), pos=pad(out.pos, -1), mask=pad(out.mask, False),
                               weight=pad(out.weight, 0))
        return state, out

    xs = (qpos.reshape(nq, block_q), jnp.moveaxis(qrun.reshape(B, nq, block_q), 1, 0),
          jnp.moveaxis(enter.reshape(B, nq, block_q), 1, 0))
    if schedule == "scan":
        _, sel = lax.scan(jax.checkpoint(body), empty_candidates(B, K, k, extra, dtype), xs)
    elif schedule in ("fused", "fast", "fast_sorted"):
        solver = "sorted" if schedule == "fast_sorted" and method == "bracket" else method
        if schedule == "fused" and method == "bracket":
            solver = "pallas_interpret" if interpret else "pallas"
        sel = _fast_schedule(table, xs, k=k, c=k + extra, window=window, union=U, method=solver,
                             block_batch=block_batch, factored=factored, segments=segment_ids is not None)
        if factored:
            sel, key_end = sel
    else:
        states = prefix_candidates(table, xs[2], k + extra)

        def one_block(args):
            state, xs_q = args
            return body(CandidateState(*state), xs_q)[1]

        if block_batch is None:
            block_batch = default_block_batch(B, K, block_q, k + extra)
        # checkpointed: the backward recomputes a batch's working set instead of storing
        # [nQ, B, K, block_q, C + block_q] residuals
        sel = lax.map(jax.checkpoint(one_block), (tuple(states), xs), batch_size=min(block_batch, nq))

    @jax.named_scope("sparsek_outputs")
    def per_query(a):  # [nq, B, K, Bq, ...] -> [B, K, T, ...]
        a = jnp.moveaxis(a, 0, 2)
        return a.reshape(a.shape[:2] + (Tp,) + a.shape[4:])[:, :, :T]

    overflow = per_query(sel.overflow)
    if factored:
        from sea_jax.kernels.slot_selection import SlotSelection

        (lo, hi), (zs, thr) = sel.mask, sel.weight
        # key_scores: the same scores, per key (the GPU backward's key-major dK/dV returns the
        # scores' gradient there; the other paths through the slot scores)
        slots = SlotSelection(jnp.moveaxis(zs, 0, 2), per_query(lo), per_query(hi), per_query(thr),
                              key_scores=table.score, key_end=key_end)
        return Selection(jnp.moveaxis(sel.pos, 0, 2), None, None, per_query(sel.tau), overflow,
                         jnp.sum(overflow, dtype=jnp.int32), slots)
    return Selection(
        jnp.moveaxis(sel.pos, 0, 2),
        per_query(sel.mask),
        per_query(sel.weight),
        per_query(sel.tau),
        overflow,
        jnp.sum(overflow, dtype=jnp.int32),
    )
