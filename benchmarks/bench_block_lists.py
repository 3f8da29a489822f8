"""The SparseK selection's per-block candidate lists: one Pallas pass vs the merge scan + sort.

Every query block of the causal SparseK selection works on one sorted list of key ranks (the C
best ranks entered before the block and the ranks entering during it) and the (C + 1)-th best
rank entered before it. Two ways to build them, timed in one process on the same inputs (random
normal scores, B = 1, K = 16 KV heads, k = 1024, C = 2k, w = 512, 128-query blocks: the layer's):

* ``merge_scan_sort``: :func:`sea_jax.ops.sparsek_select_fast.prefix_ranks` (an associative scan
  of on-chip rank merges, ``merge="pallas"``) + :func:`~sea_jax.ops.sparsek_select_fast.sorted_block_lists`
  (one radix sort of all lists): the GPU path until 2026-11-24;
* ``kernel[chunk/warps]``: :func:`sea_jax.ops.sparsek_select_fast.kernel_block_lists` (the
  entry-time scatter + :func:`sea_jax.kernels.gpu_block_lists.block_lists`).

Each kernel row records whether its outputs equal the merge path's (``equal``). Baseline in
the same run: cuDNN dense causal attention forward at the same S (H = 16, D = 128, bf16).

    python benchmarks/bench_block_lists.py --out benchmarks/results/block_lists_1124.json   # GPU
    python benchmarks/bench_block_lists.py --smoke                                          # CPU
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRows, env_info, time_ms  # noqa: E402

from sea_jax.ops import sparsek_select_fast as fast  # noqa: E402


def entering_ranks(S, K, k_sel, window, bq, seed=0):
    """enter_ranks int32 [nQ, 1, K, Bq] of the layer's selection on random normal scores."""
    score = jax.random.normal(jax.random.key(seed), (1, K, S), jnp.float32)
    run = jnp.zeros(score.shape, jnp.int32)
    _, rank = fast.global_ranks(score, run)
    nq = -(-S // bq)
    qpos = jnp.arange(nq * bq, dtype=jnp.int32)
    enter = jnp.where((qpos - window >= 0) & (qpos < S), qpos - window, -1)
    er = jnp.where(enter >= 0, jnp.take_along_axis(rank, jnp.clip(enter, 0, None)[None, None].repeat(K, 1), -1),
                   fast.EMPTY)
    return jnp.moveaxis(er.reshape(1, K, nq, bq), 2, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--kv_heads", type=int, default=16)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block_q", type=int, default=128)
    ap.add_argument("--variants", default="512/4,1024/4,256/4,512/8,1024/8", help="kernel chunk/warps, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, kernels in interpret mode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    interpret = args.smoke
    seqs = [512] if args.smoke else [int(s) for s in args.seqs.split(",")]
    K, k_sel, w, bq = (2, 32, 16, 32) if args.smoke else (args.kv_heads, args.k, args.window, args.block_q)
    c = 2 * k_sel
    variants = ["64/4"] if args.smoke else args.variants.split(",")
    rows = JsonRows(args.out, dict(env=env_info(), args=vars(args)))
    table = []
    for S in seqs:
        er = entering_ranks(S, K, k_sel, w, bq)
        if not interpret and jax.default_backend() == "gpu":
            q = jax.random.normal(jax.random.key(1), (1, S, 16, 128), jnp.bfloat16)
            dense = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"))
            ms = time_ms(dense, (q,), args.reps)
            rows.add(dict(S=S, impl="cudnn_dense_causal_fwd", ms=ms))
            table.append((S, "cudnn_dense_causal_fwd (baseline)", ms, ""))

        merge = "pallas_interpret" if interpret else "pallas"
        ref_fn = jax.jit(lambda er: (lambda cr: (fast.sorted_block_lists(cr[0], er, S), cr[1]))(
            fast.prefix_ranks(er, c, merge=merge)))
        want = jax.block_until_ready(ref_fn(er))
        ms = time_ms(ref_fn, (er,), args.reps)
        rows.add(dict(S=S, impl="merge_scan_sort", ms=ms))
        table.append((S, "merge_scan_sort", ms, ""))
        for var in variants:
            chunk, warps = (int(x) for x in var.split("/"))
            fn = jax.jit(lambda er, chunk=chunk, warps=warps: fast.kernel_block_lists(
                er, c, S, interpret=interpret, chunk=chunk, num_warps=warps))
            got = jax.block_until_ready(fn(er))
            equal = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, want))
            ms = time_ms(fn, (er,), args.reps)
            rows.add(dict(S=S, impl="kernel", chunk=chunk, num_warps=warps, ms=ms, equal=equal))
            table.append((S, f"kernel[{chunk}/{warps}]", ms, equal))
    print(f"\n{'S':>7}  {'impl':<34} {'ms':>8}  equal")
    for S, name, ms, eq in table:
        print(f"{S:>7}  {name:<34} {ms:8.3f}  {eq}")


if __name__ == "__main__":
    main()
