"""The SparseK layer with the selection's structure in the threshold kernel or in XLA passes.

``sea_jax.ops.sparsek_select_fast.STRUCTURE_IN_KERNEL`` picks, for factored selections on the
kernel path, between ``list_select`` (the threshold walk that also keeps each query's structure
and free ranges) and the XLA [Bq, Bq] passes with the plain walk. This script builds the layer's
forward and forward+backward both ways in one process, with cuDNN dense causal as the baseline,
and prints / writes per S: compile seconds, the median time of interleaved rounds, the compiled
temporaries and how far the two paths' outputs and gradients are apart (next to two calls of the
same function: the gradients' scatter-adds are not deterministic):

    python3 benchmarks/bench_sparsek_structure.py --seqs 8192,32768 --out benchmarks/results/structure_ab.json
    python3 benchmarks/bench_sparsek_structure.py --smoke --out /tmp/s.json   # tiny CPU run (interpret mode)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layers import dense_functions, sparsek_functions  # noqa: E402
from common import JsonRows, env_info, time_ms  # noqa: E402

import sea_jax.ops.sparsek_select_fast as fast  # noqa: E402
from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sparsek import SparseKOptions  # noqa: E402


def _grads(compiled, args):
    return [np.asarray(g, np.float32) for g in jax.tree.leaves(compiled(*args))]


def _rel(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--kv_heads", type=int, default=None, help="KV heads (default: the 16 query heads)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "structure_ab.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, Pallas kernels in interpret mode")
    args = ap.parse_args()
    if args.smoke:
        H, D, dtype, seqs = 2, 16, jnp.float32, [96]
        sk = SparseKOptions(k=8, window=8, block_q=16, impl="pallas_gpu", interpret=True)
        args.reps, args.rounds = 1, 1
    else:
        H, D, dtype = 16, 128, jnp.bfloat16
        seqs = [int(s) for s in args.seqs.split(",")]
        sk = SparseKOptions(k=1024, window=512)
    K = H if args.kv_heads is None else args.kv_heads
    default_structure = fast.STRUCTURE_IN_KERNEL  # restored after each S
    if K < 1 or H % K:
        raise ValueError(f"--kv_heads must divide the {H} query heads, got {K}")
    dims = AttentionDims(H, K, D, H * D)
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(B=1, H=H, K=K, D=D, k=sk.k,
                                                                               window=sk.window)))
    print("| S | cuDNN fwd / fwd+bwd ms | kernel structure fwd / fwd+bwd | XLA structure fwd / fwd+bwd | "
          "compile fwd+bwd s (kernel / XLA) | temp GiB fwd+bwd (kernel / XLA) | out diff | grad rel diff (same fn) |")
    print("|---|---|---|---|---|---|---|---|")
    for S in seqs:
        kq, kk, kv, kx = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(kq, (1, S, H, D), dtype)
        k, v = (jax.random.normal(key, (1, S, K, D), dtype) for key in (kk, kv))
        x = jax.random.normal(kx, (1, S, H * D), dtype)
        row = dict(S=S)
        paths, outs = {}, {}
        for flag, name in ((True, "kernel"), (False, "xla")):
            fast.STRUCTURE_IN_KERNEL = flag  # read when the functions are traced
            (params,), fwd, fwd_bwd = sparsek_functions(dims, sk)
            a = (params, q, k, v, x)
            t0 = time.perf_counter()
            cf = fwd.lower(*a).compile()
            t1 = time.perf_counter()
            cb = fwd_bwd.lower(*a).compile()
            t2 = time.perf_counter()
            mem = cb.memory_analysis()
            row[f"{name}_compile_s"] = [t1 - t0, t2 - t1]
            row[f"{name}_temp_gib"] = mem.temp_size_in_bytes / 2**30 if mem is not None else None
            outs[name] = (np.asarray(cf(*a), np.float32), _grads(cb, a))
            row[f"{name}_self_grad_rel_diff"] = _rel(_grads(cb, a), outs[name][1])
            paths[name] = (cf, cb, a)
        fast.STRUCTURE_IN_KERNEL = default_structure
        dense = []
        if not args.smoke:
            _, dfwd, dfb = dense_functions("cudnn")
            dense = [("cudnn", (dfwd.lower(q, k, v).compile(), dfb.lower(q, k, v).compile(), (q, k, v)))]
        times = {}
        for _ in range(args.rounds):
            for name, (cf, cb, a) in dense + list(paths.items()):
                times.setdefault(f"{name}_fwd", []).append(time_ms(cf, a, args.reps))
                times.setdefault(f"{name}_fwd_bwd", []).append(time_ms(cb, a, args.reps))
        row.update({key: float(np.median(val)) for key, val in times.items()}, rounds=times)
        row["out_max_diff"] = float(np.max(np.abs(outs["kernel"][0] - outs["xla"][0])))
        row["grad_rel_diff"] = _rel(outs["kernel"][1], outs["xla"][1])
        rec.add(row)
        c = lambda n: f"{row.get(n + '_fwd', float('nan')):.2f} / {row.get(n + '_fwd_bwd', float('nan')):.2f}"  # noqa: E731
        print(f"| {S} | {c('cudnn')} | {c('kernel')} | {c('xla')} | {row['kernel_compile_s'][1]:.1f} / "
              f"{row['xla_compile_s'][1]:.1f} | {row['kernel_temp_gib']:.3f} / {row['xla_temp_gib']:.3f} | "
              f"{row['out_max_diff']:.1e} | {row['grad_rel_diff']:.1e} ({row['xla_self_grad_rel_diff']:.1e}) |",
              flush=True)


if __name__ == "__main__":
    main()
