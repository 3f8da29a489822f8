"""Paper estimate of TPU time: SEA block-sparse attention (12.5 % of blocks) vs splash attention
(dense causal), both compiled by Mosaic for v5e and v5p on this CPU machine.

No TPU is available, so nothing is timed. Instead, for each chip:

1. both kernels are compiled ahead of time for a TPU topology (``get_topology_desc``, a
   ("data", "model") mesh, ``shard_map``, bfloat16, S = 32k; forward and forward + backward)
   - this proves the block sizes below are accepted by Mosaic (VMEM, tiling) - and the
   compiled memory analysis is recorded;
2. the kernels' grids are counted from their own tables: for ours, the BlockLayout
   (kv_count / q_count, table widths Mk / Mq); for splash, its MaskInfo (``block_mask``
   non-zeros = blocks computed, table shape = grid steps);
3. each Pallas kernel's time is estimated per chip as

       t = max(MXU FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth)
           + grid steps / TensorCores per chip * step overhead

   with MXU FLOPs = c * (blocks computed) * block_q * block_k * head_dim, c = 4 (forward:
   QK^T and PV), 6 (dQ: QK^T, dO V^T, dS K), 8 (dK/dV: QK^T, dO V^T, P^T dO, dS^T Q);
   HBM bytes = the blocks the BlockSpecs DMA (a K/V (or Q/dO) block per computed block, the
   row's Q/O/dO/lse/D once per row, the column's K/V/dK/dV once per column; padded steps
   repeat the resident block and move nothing), plus for ours the XLA glue around the
   kernels (head-major transposes of q/k/v/o, lane-replicated lse and D).
   Published per-chip numbers: v5e 197 TFLOP/s bf16, 819 GB/s HBM, 1 TensorCore; v5p
   459 TFLOP/s, 2765 GB/s, 2 TensorCores (megacore: "parallel" grid axes are split).
   Step overhead: 0.35 us per grid step (the figure the Pallas TPU guide gives for a
   pipelined grid iteration; ``--step-us``).

What this leaves out (the same for both kernels, so the ratio is less affected than the
absolute times): softmax VPU/EUP work (exp, max, masking) which on TPU can rival the MXU at
head_dim 128, MXU efficiency below peak, DMA latency not hidden by double buffering, and
the host/XLA launch costs. Absolute numbers are therefore optimistic lower bounds.

Run with an interpreter that has libtpu (``pip install "jax[tpu]"`` matching jax):

    python benchmarks/tpu_estimate.py [--seq 32768] [--block 512]
        [--density 0.125] [--json benchmarks/results/tpu_estimate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CHIPS = {
    # name: (topology compiled for, accelerator type, peak bf16 FLOP/s, HBM B/s, TensorCores)
    "v5e": ("v5e:2x2", "v5litepod-4", 197e12, 819e9, 1),
    "v5p": ("v5p:2x2x1", "v5p-8", 459e12, 2765e9, 2),
}
LANES = 128


def sea_layout_mask(nq, nk, block_q, block_k, per_row, groups, seed=0):
    """SEA-like causal top-k block mask [groups, nq, nk]: each query block keeps its
    diagonal key block and per_row - 1 key blocks drawn uniformly from its causal past
    (all of them when fewer exist)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m = np.zeros((groups, nq, nk), bool)
    for g in range(groups):
        for i in range(nq):
            diag = min((i * block_q + block_q - 1) // block_k, nk - 1)
            m[g, i, diag] = True
            past = np.arange(diag)
            take = min(per_row - 1, past.size)
            if take:
                m[g, i, rng.choice(past, take, replace=False)] = True
    return m


def kernel_time(flops, nbytes, steps, chip, step_us):
    _, _, peak, bw, cores = CHIPS[chip]
    t_mxu, t_hbm = flops / peak, nbytes / bw
    t_steps = steps / cores * step_us * 1e-6
    return dict(gflop=flops / 1e9, mbytes=nbytes / 1e6, steps=int(steps),
                t_mxu_us=t_mxu * 1e6, t_hbm_us=t_hbm * 1e6, t_steps_us=t_steps * 1e6,
                t_us=(max(t_mxu, t_hbm) + t_steps) * 1e6)


def estimate_ours(mask, *, B, H, K, S, D, bq, bk, chip, step_us):
    """Per-chip cost of the block-sparse fwd / dq / dkv kernels for a block mask
    [K (one pattern per KV head), nq, nk]."""
    import numpy as np

    rep = H // K
    nq, nk = mask.shape[1:]
    row_cnt = mask.sum(-1)  # [K, nq]
    col_cnt = mask.sum(-2)  # [K, nk]
    mk, mq = int(row_cnt.max()), int(col_cnt.max())
    active = B * rep * int(mask.sum())  # (query head, q block, k block) triples computed
    rows = B * H * nq
    cols = B * K * nk
    e = 2  # bf16 bytes
    blk_q, blk_k = bq * D * e, bk * D * e
    stat = bq * LANES * 4  # a lane-replicated f32 (block_q, 128) statistic block
    tok = B * S * D * e  # one [B, S, D] bf16 tensor per head
    fwd = kernel_time(4 * active * bq * bk * D,
                      active * 2 * blk_k + rows * (2 * blk_q + stat),
                      B * H * nq * mk, chip, step_us)
    dq = kernel_time(6 * active * bq * bk * D,
                     active * 2 * blk_k + rows * (3 * blk_q + 2 * stat),
                     B * H * nq * mk, chip, step_us)
    dkv = kernel_time(8 * active * bq * bk * D,
                      active * (2 * blk_q + 2 * stat) + cols * 4 * blk_k,
                      B * K * nk * rep * mq, chip, step_us)
    # XLA glue: [B,S,N,D] <-> [B,N,S,D] transposes (read + write) of q, k, v, o in the
    # forward; of q, k, v, o, dO, dq, dk, dv in the backward; D = rowsum(dO * o) and the
    # lane-replicated lse / D ([B, H, S, 128] f32) written once and read by dq and dkv
    glue_fwd = 2 * (H + 2 * K + H) * tok
    stat_full = B * H * S * LANES * 4
    glue_bwd = 2 * (3 * H + 2 * K + 2 * K) * tok + 2 * H * tok + 2 * stat_full * 3
    _, _, _, bw, _ = CHIPS[chip]
    glue = dict(glue_fwd_us=glue_fwd / bw * 1e6, glue_bwd_us=glue_bwd / bw * 1e6)
    return dict(fwd=fwd, dq=dq, dkv=dkv, **glue,
                layout=dict(nq=nq, nk=nk, max_kv_blocks=mk, max_q_blocks=mq,
                            blocks_per_head=int(mask.sum() // K),
                            density=float(mask.sum() / (K * nq * nk))))


def estimate_splash(kernel, *, B, H, S, D, bq, bk, chip, step_us):
    """Per-chip cost of splash's fwd / dq / dkv kernels from its MaskInfo tables (one
    unique causal mask: tables [head_shards, nq, width], the same for every head)."""
    import numpy as np

    fwd_bm = np.asarray(kernel.fwd_mask_info.block_mask)[0]
    dq_bm = np.asarray(kernel.dq_mask_info.block_mask)[0]
    dkv_bm = np.asarray(kernel.dkv_mask_info.block_mask)[0]
    nq = S // bq
    nk = S // bk
    e = 2
    blk_q, blk_k = bq * D * e, bk * D * e
    a_fwd = B * H * int(np.count_nonzero(fwd_bm))
    a_dq = B * H * int(np.count_nonzero(dq_bm))
    a_dkv = B * H * int(np.count_nonzero(dkv_bm))
    lse_row = bq * LANES * 4  # forward residual block (bq, 128) f32
    fwd = kernel_time(4 * a_fwd * bq * bk * D, a_fwd * 2 * blk_k + B * H * nq * (2 * blk_q + lse_row),
                      B * H * fwd_bm.size, chip, step_us)
    dq = kernel_time(6 * a_dq * bq * bk * D, a_dq * 2 * blk_k + B * H * nq * (3 * blk_q + 2 * bq * 4),
                     B * H * dq_bm.size, chip, step_us)
    dkv = kernel_time(8 * a_dkv * bq * bk * D,
                      a_dkv * (2 * blk_q + 2 * 8 * bq * 4) + B * H * nk * 4 * blk_k,
                      B * H * dkv_bm.size, chip, step_us)
    return dict(fwd=fwd, dq=dq, dkv=dkv, glue_fwd_us=0.0, glue_bwd_us=0.0,
                layout=dict(nq=nq, nk=nk, fwd_grid=list(fwd_bm.shape),
                            dkv_grid=list(dkv_bm.shape),
                            blocks_per_head=int(np.count_nonzero(fwd_bm)),
                            density=float(np.count_nonzero(fwd_bm) / (nq * nk))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--block", type=int, default=512, help="block_q = block_k for both kernels")
    ap.add_argument("--density", type=float, default=0.125, help="fraction of the nq x nk blocks per query block row")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--step-us", type=float, default=0.35)
    ap.add_argument("--chips", nargs="+", default=list(CHIPS))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "tpu_estimate.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", CHIPS[args.chips[0]][1])
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as smask
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sea_jax.kernels import BlockLayout
    from sea_jax.kernels.tpu_shard_map import sharded_block_sparse_attention

    S, bq = args.seq, args.block
    bk = bq
    Bg, Hg, Kg, D = args.batch, args.heads, args.kv_heads, args.head_dim
    nq, nk = S // bq, S // bk
    per_row = max(1, round(args.density * nk))
    results = dict(config=dict(seq=S, block_q=bq, block_k=bk, density_nominal=args.density,
                               key_blocks_per_row=per_row, batch=Bg, heads=Hg, kv_heads=Kg,
                               head_dim=D, dtype="bfloat16", step_us=args.step_us,
                               jax=jax.__version__), chips={})

    for chip in args.chips:
        topo_name, _, peak, bw, cores = CHIPS[chip]
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name)
        n = len(topo.devices)
        mesh = topologies.make_mesh(topo, (2, n // 2), ("data", "model"))
        B, H, K = Bg // mesh.shape["data"], Hg // mesh.shape["model"], Kg // mesh.shape["model"]
        print(f"\n=== {chip}: {topo_name}, {n} x {topo.devices[0].device_kind}, mesh "
              f"{dict(mesh.shape)}; per chip B={B} H={H} K={K} S={S} D={D}", flush=True)
        spec = P("data", None, "model", None)
        sds = lambda shape, dt, sp: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, sp))
        compiled = {}

        # ---- ours: SEA-like per-KV-head causal top-k layout
        mask = sea_layout_mask(nq, nk, bq, bk, per_row, Kg)
        lay = BlockLayout.from_mask(np.broadcast_to(mask[None], (Bg,) + mask.shape), bq, bk)
        q = sds((Bg, S, Hg, D), jnp.bfloat16, spec)
        k = sds((Bg, S, Kg, D), jnp.bfloat16, spec)

        def ours_fwd(q, k, v, lay):
            return sharded_block_sparse_attention(q, k, v, lay, mesh=mesh, causal=True)

        def ours_loss(q, k, v, lay):
            return jnp.sum(ours_fwd(q, k, v, lay).astype(jnp.float32))

        # ---- splash: dense causal, same block sizes, heads sharded like ours
        blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                                   block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                                   block_q_dq=bq, block_kv_dq=bk)
        cmask = smask.MultiHeadMask([smask.CausalMask((S, S)) for _ in range(Hg)])
        kern = splash.make_splash_mha(cmask, block_sizes=blocks, head_shards=mesh.shape["model"],
                                      q_seq_shards=1)
        kspec = kern.manual_sharding_spec(NamedSharding(mesh, P("model", None)))
        hspec = P("data", "model", None, None)

        def splash_fwd(kern, q, k, v):  # q: [B, H, S, D] (splash's layout)
            body = lambda kern, q, k, v: jax.vmap(kern)(q, k, v)
            return jax.shard_map(body, mesh=mesh, in_specs=(kspec, hspec, hspec, hspec),
                                 out_specs=hspec, check_vma=False)(kern, q, k, v)

        def splash_loss(kern, q, k, v):
            return jnp.sum(splash_fwd(kern, q, k, v).astype(jnp.float32))

        qh = sds((Bg, Hg, S, D), jnp.bfloat16, hspec)
        kh = sds((Bg, Hg, S, D), jnp.bfloat16, hspec)
        programs = {
            "sea_fwd": (ours_fwd, (q, k, k, lay)),
            "sea_fwd_bwd": (jax.grad(ours_loss, argnums=(0, 1, 2)), (q, k, k, lay)),
            "splash_fwd": (splash_fwd, (kern, qh, kh, kh)),
            "splash_fwd_bwd": (jax.grad(splash_loss, argnums=(1, 2, 3)), (kern, qh, kh, kh)),
        }
        for name, (fn, fargs) in programs.items():
            t = time.time()
            c = jax.jit(fn).lower(*fargs).compile()
            ma = c.memory_analysis()
            compiled[name] = dict(compile_s=round(time.time() - t, 1),
                                  argument_mib=ma.argument_size_in_bytes / 2**20,
                                  output_mib=ma.output_size_in_bytes / 2**20,
                                  temp_mib=ma.temp_size_in_bytes / 2**20)
            print(f"compiled {name:15s} in {compiled[name]['compile_s']:5.1f} s; memory per chip: "
                  f"args {compiled[name]['argument_mib']:.1f} MiB, out "
                  f"{compiled[name]['output_mib']:.1f} MiB, temp {compiled[name]['temp_mib']:.1f} MiB",
                  flush=True)

        # per chip: the patterns of its K local KV heads (the mask's other groups live on
        # the other "model" shard; all groups have the same number of blocks per row)
        ours = estimate_ours(mask[:K], B=B, H=H, K=K, S=S, D=D, bq=bq, bk=bk, chip=chip,
                             step_us=args.step_us)
        ref = estimate_splash(kern, B=B, H=H, S=S, D=D, bq=bq, bk=bk, chip=chip,
                              step_us=args.step_us)
        print(f"chip: peak {peak / 1e12:.0f} TFLOP/s bf16, HBM {bw / 1e9:.0f} GB/s, "
              f"{cores} TensorCore(s); step overhead {args.step_us} us")
        print(f"ours:   {ours['layout']}")
        print(f"splash: {ref['layout']}")
        hdr = (f"{'kernel':8s} {'pass':5s} {'grid steps':>12s} {'GFLOP':>8s} {'MB':>8s} "
               f"{'t_mxu us':>9s} {'t_hbm us':>9s} {'t_step us':>9s} {'t us':>9s}")
        print(hdr)
        summary = {}
        for label, est in (("sea", ours), ("splash", ref)):
            for p in ("fwd", "dq", "dkv"):
                r = est[p]
                print(f"{label:8s} {p:5s} {r['steps']:12d} {r['gflop']:8.1f} {r['mbytes']:8.1f} "
                      f"{r['t_mxu_us']:9.1f} {r['t_hbm_us']:9.1f} {r['t_steps_us']:9.1f} "
                      f"{r['t_us']:9.1f}")
            fwd = est["fwd"]["t_us"] + est["glue_fwd_us"]
            bwd = est["dq"]["t_us"] + est["dkv"]["t_us"] + est["glue_bwd_us"]
            summary[label] = dict(fwd_us=fwd, fwd_bwd_us=fwd + bwd,
                                  glue_fwd_us=est["glue_fwd_us"], glue_bwd_us=est["glue_bwd_us"])
            print(f"{label:8s} XLA glue: fwd {est['glue_fwd_us']:.1f} us, bwd "
                  f"{est['glue_bwd_us']:.1f} us;  total fwd {fwd:.1f} us, fwd+bwd {fwd + bwd:.1f} us")
        speed = dict(fwd=summary["splash"]["fwd_us"] / summary["sea"]["fwd_us"],
                     fwd_bwd=summary["splash"]["fwd_bwd_us"] / summary["sea"]["fwd_bwd_us"])
        # the same without the per-step overhead (pure MXU / HBM roofline, glue included)
        roof = {}
        for label, est in (("sea", ours), ("splash", ref)):
            r = lambda p: max(est[p]["t_mxu_us"], est[p]["t_hbm_us"])
            roof[label] = dict(fwd_us=r("fwd") + est["glue_fwd_us"],
                               fwd_bwd_us=r("fwd") + r("dq") + r("dkv") + est["glue_fwd_us"]
                               + est["glue_bwd_us"])
        speed["fwd_roofline_only"] = roof["splash"]["fwd_us"] / roof["sea"]["fwd_us"]
        speed["fwd_bwd_roofline_only"] = roof["splash"]["fwd_bwd_us"] / roof["sea"]["fwd_bwd_us"]
        print(f"estimated speed-up of SEA block-sparse ({ours['layout']['density']:.1%} of blocks) "
              f"over splash dense causal ({ref['layout']['density']:.1%}): fwd {speed['fwd']:.2f}x, "
              f"fwd+bwd {speed['fwd_bwd']:.2f}x (without step overheads: fwd "
              f"{speed['fwd_roofline_only']:.2f}x, fwd+bwd {speed['fwd_bwd_roofline_only']:.2f}x)")
        results["chips"][chip] = dict(topology=topo_name, peak_flops=peak, hbm_bytes_per_s=bw,
                                      tensorcores=cores, per_chip=dict(batch=B, heads=H, kv_heads=K),
                                      compiled=compiled, sea=ours, splash=ref, totals=summary,
                                      speedup=speed)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
