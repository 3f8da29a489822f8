"""The SparseK list threshold alone: the on-chip kernel's variants vs the XLA solver.

Builds the block lists the causal selection hands to its threshold solver at the layer's
configuration (random scores u [S, K]; per query block of ``block_q``: the top-C keys of the
prefix before it plus the block's entering keys, sorted by score; C = 2k), then times

* ``xla``: :func:`sea_jax.kernels.gpu_sparsek_threshold.list_threshold_reference` (the XLA
  solver on materialised [rows, block_q, M] rows: what the "fast" schedule runs, but stored);
* ``kernel/<chunk>/<warps>``: :func:`~sea_jax.kernels.gpu_sparsek_threshold.list_threshold`,
  with the cheap search's steps per program (mean / max), the programs that needed the exact
  fallback and its most passes, and the max |diff| to ``xla``.

    python benchmarks/bench_sparsek_threshold.py --out benchmarks/results/sparsek_threshold.json
    python benchmarks/bench_sparsek_threshold.py --smoke   # CPU, interpret mode
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

from sea_jax.kernels.gpu_sparsek_threshold import list_threshold, list_threshold_reference  # noqa: E402


def block_lists(S, K, k, window, bq, seed=0):
    """(z, tin, s, last, active, theta) of every (KV head, query block) list, rows = K * S / bq."""
    C = 2 * k
    u = jax.random.normal(jax.random.PRNGKey(seed), (K, S), jnp.float32)
    nq = S // bq
    pos = jnp.arange(S)

    def one(uh, q):
        q0 = q * bq
        carried = jnp.where(pos < q0 - window, uh, -jnp.inf)
        top = jax.lax.top_k(carried, C)[0]                       # [C] (-inf: empty)
        ent_pos = q0 - window + jnp.arange(bq)
        ent = jnp.where(ent_pos >= 0, uh[jnp.clip(ent_pos, 0, S - 1)], -jnp.inf)
        z = jnp.concatenate([top, ent])
        tin = jnp.concatenate([jnp.full((C,), -1, jnp.int32), jnp.arange(bq, dtype=jnp.int32)])
        tin = jnp.where(jnp.isfinite(z), tin, bq)                 # empties: never visible
        order = jnp.argsort(-z)
        z, tin = z[order], tin[order]
        vis = tin[None, :] <= jnp.arange(bq)[:, None]             # [bq, M]
        rank = jnp.cumsum(vis, axis=1) - 1
        nvis = jnp.sum(vis, axis=1)
        m = jnp.arange(z.shape[0])
        last = jnp.max(jnp.where(vis & (rank < C), m, -1), axis=1)
        kpos = jnp.max(jnp.where(vis & (rank < k), m, -1), axis=1)
        active = nvis > k
        theta = jnp.where(active, z[jnp.clip(kpos, 0)], 0.0)
        return jnp.where(jnp.isfinite(z), z, 0.0), tin, jnp.zeros((bq,), jnp.int32), last, active, theta

    qs = jnp.arange(nq)
    out = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))(u, qs)
    return tuple(a.reshape((K * nq,) + a.shape[2:]) for a in out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--variants", default="128/4,64/4,256/4,128/8,128/2,32/1",
                    help="comma list of chunk/warps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block_q", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    K, k, w, bq = 16, 1024, 512, args.block_q
    interpret = args.smoke
    if args.smoke:
        K, k, w, bq = 2, 16, 8, 16
        args.seqs, args.variants, args.reps = "256", "32/4", 1
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(K=K, k=k, window=w, block_q=bq)))
    for S in [int(s) for s in args.seqs.split(",")]:
        lists = block_lists(S, K, k, w, bq)
        ref = None

        def xla_part(row):
            nonlocal ref
            f = jax.jit(lambda *a: list_threshold_reference(*a, k=k))
            ref = np.asarray(f(*lists))
            row["ms"] = time_ms(f, lists, args.reps)

        rec.guarded(dict(S=S, solver="xla", rows=int(lists[0].shape[0]), M=int(lists[0].shape[1])), xla_part)
        for v in args.variants.split(","):
            chunk, warps = (int(x) for x in v.split("/"))

            def kernel_part(row, chunk=chunk, warps=warps):
                f = jax.jit(lambda *a: list_threshold(*a, k=k, chunk=chunk, num_warps=warps,
                                                      interpret=interpret, return_passes=True))
                tau, steps, passes = (np.asarray(x) for x in f(*lists))
                row["search_steps_mean"] = float(steps.mean())
                row["search_steps_max"] = int(steps.max())
                row["fallback_programs"] = int((passes > 0).sum())
                row["fallback_passes_max"] = int(passes.max())
                if ref is not None:
                    row["max_diff_vs_xla"] = float(np.abs(tau - ref).max())
                row["ms"] = time_ms(f, lists, args.reps)

            rec.guarded(dict(S=S, solver=f"kernel/{chunk}/{warps}"), kernel_part)
    print("\n| S | solver | ms | search steps mean / max | fallback programs (max passes) | max diff vs xla |"
          "\n|---|---|---|---|---|---|")
    for r in rec.data["rows"]:
        if "ms" in r:
            print(f"| {r['S']} | {r['solver']} | {r['ms']:.2f} | {r.get('search_steps_mean', float('nan')):.1f} / "
                  f"{r.get('search_steps_max', '')} | {r.get('fallback_programs', '')} ({r.get('fallback_passes_max', '')}) "
                  f"| {r.get('max_diff_vs_xla', '')} |")
        else:
            print(f"| {r['S']} | {r['solver']} | error: {r.get('error', '')[:100]} | | | |")


if __name__ == "__main__":
    main()
