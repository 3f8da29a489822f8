"""Block-sparse attention forward on Hopper GPUs: a Pallas Mosaic GPU (wgmma + TMA) kernel.

The FlashAttention-3 structure of jax's ``pallas/ops/gpu/attention_mgpu.py`` (read, not copied)
driven by a :class:`~sea_jax.kernels.layout.BlockLayout`:

* one CTA per (head, 128-query tile, batch) with three warpgroups: two compute warpgroups of 64
  query rows each (ping-ponging the tensor cores through a schedule barrier) and one producer
  warpgroup that reads the tile's row of the layout (``kv_index[b, g, i, :kv_count]``) from
  global memory as scalars and TMA-loads those K/V blocks into a ring of shared-memory slots;
* ``wgmma`` for S = Q K^T and O += P V, fp32 online softmax in base 2;
* every key tile is masked elementwise (causal, sliding window, keys past the sequence end):
  which tiles need it is data dependent here, and a branch per tile costs more than the mask;
* ``octets=`` (optional): K/V stored in 8-row octets at places given by a table, each pipeline
  step gathered as block_kv / 8 TMA copies of 8 rows - the finest gather a Hopper TMA can put
  into a wgmma operand tile through Pallas (a token-level gathered kernel would read its keys so).
  Measured (benchmarks/results/octet_tma_1125.json, same layouts and run, S = 32k, 12.5 %,
  block_kv 128): 1.374 ms with randomly scattered octets against 1.257 ms for one copy per step.

It computes exactly what the Triton forward of :mod:`.gpu_block_sparse` computes - the output
and the base-2 log-sum-exp of the scaled scores (``+inf`` for rows that see nothing, whose
output is 0) - so the Triton dQ and dK/dV kernels consume its residuals unchanged.

Scope (:func:`mosaic_forward_supported` says whether a call qualifies; otherwise the Triton
forward runs): Hopper (sm_90) GPUs, bf16/fp16, head_dim 64 or 128, no per-key weights, no
segment ids, layout blocks ``block_q`` a multiple of 128 and ``block_k`` a multiple of 64.
There is no interpret mode for it on CPU (the wgmma pipeline effects do not interpret): the CPU
tests lower it for an abstract H100; the GPU tests and ``benchmarks/bench_block_sparse.py``
check it against the XLA reference.

Measured (benchmarks/results/block_sparse_mosaic.json; H100, B = 1, H = 16, D = 128, bf16, S = 32k,
12.5 % of the causal 128 x 128 blocks, same layouts, same run): forward 1.214 ms = 441 TFLOP/s on
kept blocks against 1.560 ms = 343 for the Triton forward (516 vs 406 at 100 %; cuDNN dense causal
608), hence the default on Hopper.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU is part of jax; guard anyway so that CPU-only installs import this module
    import jax.experimental.pallas.mosaic_gpu as plgpu
except Exception:  # noqa: BLE001
    plgpu = None

__all__ = ["mosaic_forward_supported", "block_sparse_forward_mosaic"]

LOG2E = math.log2(math.e)
ROWS_PER_WG = 64  # query rows per compute warpgroup (one wgmma M tile)
COMPUTE_WGS = 2
CTA_ROWS = ROWS_PER_WG * COMPUTE_WGS


def _is_hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except Exception:  # noqa: BLE001
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")) == "9.0"


def mosaic_forward_supported(*, dtype, head_dim: int, block_q: int, block_k: int,
                             has_weights: bool, has_segments: bool, interpret: bool,
                             check_device: bool = True) -> tuple[bool, str]:
    """(ok, why not): whether the Mosaic GPU forward can run this call."""
    if plgpu is None:
        return False, "jax.experimental.pallas.mosaic_gpu is not importable"
    if interpret:
        return False, "interpret mode (the Mosaic GPU kernel has none on CPU)"
    if check_device and not _is_hopper():
        return False, "needs a Hopper (sm_90) GPU"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False, f"dtype {jnp.dtype(dtype)} (bf16/fp16 only)"
    if head_dim not in (64, 128):
        return False, f"head_dim {head_dim} (64 or 128 only)"
    if block_q % CTA_ROWS:
        return False, f"layout block_q {block_q} (a multiple of {CTA_ROWS})"
    if block_k % 64:
        return False, f"layout block_k {block_k} (a multiple of 64)"
    if has_weights:
        return False, "per-key weights"
    if has_segments:
        return False, "segment ids"
    return True, ""


def _transposed(ref):
    """ref^T for wgmma: ``ref.transpose`` on jax >= 0.11, ``plgpu.transpose_ref`` before."""
    if jax.__version_info__ >= (0, 11, 0):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def block_sparse_forward_mosaic(q, k, v, kv_index, kv_count, *, seq_k: int, block_q: int,
                                block_k: int, causal: bool, window: int | None, scale: float,
                                block_kv: int = 128, stages: int = 2, octets=None):
    """Forward pass.

    q: [B, Sq_pad, H, D] (Sq_pad a multiple of block_q); k, v: [B, Skv_pad, K, D] (Skv_pad a
    multiple of block_k); kv_index: int32 [B, G, nQ, Mk]; kv_count: int32 [B, G, nQ] (the
    layout's tables; head h uses group h // (H // G)). seq_k: the true key length (keys at or
    past it are masked); block_q, block_k: the layout's blocks; causal, window: token masks;
    scale: softmax scale; block_kv: keys per pipeline step (a multiple of 64 dividing block_k);
    stages: shared-memory K/V slots in flight (>= 2). octets: optional int32 [B, K, Skv_pad // 8]:
    k / v store key octet o (keys [8 o, 8 o + 8)) at rows [8 octets[o], 8 octets[o] + 8), and
    every pipeline step TMA-copies its keys as block_kv / 8 copies of 8 rows (the gather
    granularity a Hopper TMA can place into a wgmma operand tile; without it: one copy).
    Returns (o [B, Sq_pad, H, D] in q.dtype, lse2 [B, H, Sq_pad] float32).
    """
    B, Sq_pad, H, D = q.shape
    K = k.shape[2]
    rep = H // K
    per_group = H // kv_index.shape[1]
    bkv = block_kv
    sub_k = block_k // bkv
    tiles_per_block = block_q // CTA_ROWS
    n_tiles = Sq_pad // CTA_ROWS
    dtype = q.dtype
    qk_scale = scale * LOG2E

    n_copies = 1
    if octets is not None:
        want = (B, K, k.shape[1] // 8)
        if octets.shape != want or octets.dtype != jnp.int32 or k.shape[1] % 8:
            raise ValueError(f"octets must be int32 {list(want)} (one storage octet per 8 keys of k, whose "
                             f"length must be a multiple of 8), got {octets.dtype} {list(octets.shape)}")
        n_copies = bkv // 8

    def kernel(kv_index_ref, kv_count_ref, oct_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
        smem, (k_bar, v_bar, q_bar), (k_free, v_free), sched_bar = scoped
        qo_smem2, k_smem, v_smem, lse_smem2 = smem
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = n_tiles - 1 - lax.axis_index("q_seq")  # heavy (late, causal) tiles first
        wg = lax.axis_index("wg")
        g = lax.div(h, jnp.int32(per_group))
        row = lax.div(tile, jnp.int32(tiles_per_block))
        n_steps = kv_count_ref[b, g, row] * sub_k

        def key_start(t):
            blk, sub = lax.div(t, jnp.int32(sub_k)), lax.rem(t, jnp.int32(sub_k))
            return kv_index_ref[b, g, row, blk] * block_k + sub * bkv

        def schedule_barrier():
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            lse_smem = lse_smem2.at[wg]
            q0 = tile * CTA_ROWS + wg * ROWS_PER_WG
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, ROWS_PER_WG), h], qo_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            m_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), 0, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS_PER_WG, D), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(n_steps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            pl.when(wg == 1)(schedule_barrier)

            def step(t, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(t, jnp.int32(stages))

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, _transposed(k_smem.at[slot]))
                    schedule_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS_PER_WG, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                k0 = key_start(t)
                qpos = q0 + plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, bkv), 0,
                                                   layout=plgpu.Layout.WGMMA)
                kpos = k0 + plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, bkv), 1,
                                                   layout=plgpu.Layout.WGMMA)
                ok = kpos < seq_k
                if causal:
                    ok = ok & (kpos <= qpos)
                if window is not None:
                    ok = ok & (kpos > qpos - window)
                s = jnp.where(ok, s * qk_scale, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                # rows that have seen nothing yet keep m = -inf; shift them by 0 (p = 0, no NaN)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched_bar)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched_bar)  # tensor cores free

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = t + 1

                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, n_steps, step, (acc, m_i, l_i))
            pl.when(wg == 0)(schedule_barrier)

            seen = l_i > 0
            safe_l = jnp.where(seen, l_i, 1.0)
            o = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
            o = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), o, 0.0)
            qo_smem[...] = o.astype(dtype)
            lse_smem[...] = jnp.where(seen, m_i + jnp.log(safe_l) * LOG2E, jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(q0, ROWS_PER_WG), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, ROWS_PER_WG)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(h, jnp.int32(rep))

            def issue(t, slot):
                if oct_ref is None:
                    at = (b, pl.ds(key_start(t), bkv), kv_head)
                    plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_bar.at[slot])
                    return
                starts = octet_starts(t)
                issue_octets(k_ref, k_smem, k_bar, slot, starts)
                issue_octets(v_ref, v_smem, v_bar, slot, starts)

            def octet_starts(t):
                # all index loads first: with each load right before its copy the forward took
                # 1.62 ms at 32k instead of 1.33 (benchmarks/results/octet_tma_perload_1125.json,
                # octet_tma_variants_1125.json)
                o0 = lax.div(key_start(t), jnp.int32(8))
                return [oct_ref[b, kv_head, o0 + j] * 8 for j in range(n_copies)]

            def issue_octets(ref, smem_ref, bar, slot, starts):
                for j, r0 in enumerate(starts):
                    plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(r0, 8), kv_head],
                                            smem_ref.at[slot].at[pl.ds(j * 8, 8)], bar.at[slot])

            for i in range(stages):
                pl.when(i < n_steps)(functools.partial(issue, jnp.int32(i), i))

            @pl.loop(0, jnp.maximum(n_steps - stages, 0))
            def _(t):
                slot = lax.rem(t, jnp.int32(stages))
                if oct_ref is None:
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    issue(t + stages, slot)
                    return
                starts = octet_starts(t + stages)  # index loads before the waits; K before V
                plgpu.barrier_wait(k_free.at[slot])
                issue_octets(k_ref, k_smem, k_bar, slot, starts)
                plgpu.barrier_wait(v_free.at[slot])
                issue_octets(v_ref, v_smem, v_bar, slot, starts)

    def entry(kv_index_ref, kv_count_ref, *refs):
        oct_ref, (q_ref, k_ref, v_ref, out_ref, lse_ref) = (None, refs) if octets is None else (refs[0], refs[1:])
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=transforms),
            plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        )
        pl.run_scoped(
            lambda *scoped: kernel(kv_index_ref, kv_count_ref, oct_ref, q_ref, k_ref, v_ref,
                                   out_ref, lse_ref, scoped),
            smem,
            (plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
             plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, Sq_pad), jnp.float32))
    o, lse = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(H, n_tiles, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(kv_index, kv_count, *(() if octets is None else (octets,)), q, k, v)
    return o, lse
