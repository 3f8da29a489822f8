"""The SparseK list threshold alone: the on-chip kernel's variants vs the XLA solver.

Builds the block lists the causal selection hands to its threshold solver at the layer's
configuration (random scores u [S, K]; per query block of ``block_q``: the top-C keys of the
prefix before it plus the block's entering keys, sorted by score; C = 2k), then times

* ``xla``: :func:`sea_jax.kernels.gpu_sparsek_threshold.list_threshold_reference` (the XLA
  solver on materialised [rows, block_q, M] rows: what the "fast" schedule runs, but stored);
* ``kernel/<chunk>/<warps>[/rN][/aN]``: :func:`~sea_jax.kernels.gpu_sparsek_threshold.list_threshold`
  with ``algorithm="search"``, with the cheap search's steps per program (mean / max), the
  programs that needed the exact fallback and its most passes, and the max |diff| to ``xla``;
* ``kernel/<chunk>/<warps>/wN``: the same with ``algorithm="walk"`` (the default) and N start
  steps, with the walk steps and fresh starts per list instead.

    python benchmarks/bench_sparsek_threshold.py --out benchmarks/results/sparsek_threshold.json
    python benchmarks/bench_sparsek_threshold.py --smoke   # CPU, interpret mode

``--from_layer``: instead of synthetic lists, the lists the SparseKAttention layer itself
hands to the kernel (k = 1024, w = 512, H = K = 16, D = 128, bf16 inputs, scorer at its
initialisation; captured from the layer's forward with a host callback), for ``--seeds``
different random inputs x each: shows how the fallback count, and with it the kernel time,
depends on the data.
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


def layer_lists(S, seed, block_q, H=16, D=128, **options):
    """The (z, tin, s, last, active, theta) lists of SparseKAttention's forward at length S
    (``options``: SparseKOptions fields over k = 1024, window = 512)."""
    from flax import nnx

    import sea_jax.kernels.gpu_sparsek_threshold as thr
    from sea_jax.attention.base import AttentionDims
    from sea_jax.attention.sparsek import SparseKAttention, SparseKOptions

    opts = SparseKOptions(**{"k": 1024, "window": 512, "block_q": block_q, **options})
    module = SparseKAttention(AttentionDims(H, H, D, H * D), opts, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(key, (1, S, H, D), jnp.bfloat16) for key in keys[:3])
    x = jax.random.normal(keys[3], (1, S, H * D), jnp.bfloat16)
    got = []
    original = thr.list_threshold

    def capture(*a, **kw):  # one host call per query block (the selection vmaps over blocks)
        jax.debug.callback(lambda *arrays: got.append([np.asarray(t) for t in arrays]), *a)
        return original(*a, **kw)

    thr.list_threshold = capture
    try:
        jax.block_until_ready(jax.jit(lambda q, k, v, x: module(q, k, v, x=x).out)(q, k, v, x))
    finally:
        thr.list_threshold = original
    if not got:
        raise RuntimeError("the layer never called list_threshold (impl / schedule not the fused kernel?)")
    return tuple(jnp.asarray(np.concatenate([g[i] for g in got])) for i in range(6))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--variants", default="128/4,64/4,256/4,128/8,128/2,32/1",
                    help="comma list of chunk/warps[/rN][/aN][/wN] (rN: list_threshold's rows_per_program; aN: its "
                         "search_arity; wN: algorithm='walk' with N start_steps)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block_q", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--from_layer", action="store_true", help="the layer's own lists (GPU)")
    ap.add_argument("--seeds", default="0", help="--from_layer: comma list of input seeds")
    ap.add_argument("--no_xla", action="store_true", help="skip the XLA solver")
    ap.add_argument("--save_fallback", default=None,
                    help="npz path prefix: the lists whose program needed the exact fallback (for study)")
    args = ap.parse_args()
    K, k, w, bq = 16, 1024, 512, args.block_q
    interpret = args.smoke
    if args.smoke:
        K, k, w, bq = 2, 16, 8, 16
        args.seqs, args.variants, args.reps = "256", "32/4,32/4/r16,32/4/a8,32/1/w6", 1
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(K=K, k=k, window=w, block_q=bq)))
    cases = [(int(S), None) for S in args.seqs.split(",")]
    if args.from_layer:
        cases = [(S, int(seed)) for S, _ in cases for seed in args.seeds.split(",")]
    for S, seed in cases:
        lists = block_lists(S, K, k, w, bq) if seed is None else layer_lists(S, seed, bq)
        ref = None
        src = {} if seed is None else dict(lists="layer", seed=seed)

        def xla_part(row):
            nonlocal ref
            f = jax.jit(lambda *a: list_threshold_reference(*a, k=k))
            ref = np.asarray(f(*lists))
            row["ms"] = time_ms(f, lists, args.reps)

        if not args.no_xla:
            rec.guarded(dict(S=S, solver="xla", rows=int(lists[0].shape[0]), M=int(lists[0].shape[1]), **src),
                        xla_part)
        for v in args.variants.split(","):
            # "64/4"; "64/4/r32": 32 rows per program; "64/4/a16": 16-ary index searches
            chunk, warps, *more = v.split("/")
            chunk, warps = int(chunk), int(warps)
            # "64/1/w6": the walk algorithm with 6 start steps (walk steps and fresh starts instead of
            # search steps / fallbacks)
            extra = {dict(r="rows_per_program", a="search_arity", w="start_steps")[m[0]]: int(m[1:]) for m in more}
            extra["algorithm"] = "walk" if "start_steps" in extra else "search"

            def kernel_part(row, chunk=chunk, warps=warps, extra=extra):
                nonlocal ref
                f = jax.jit(lambda *a: list_threshold(*a, k=k, chunk=chunk, num_warps=warps, interpret=interpret,
                                                      return_passes=True, **extra))
                tau, steps, passes = (np.asarray(x) for x in f(*lists))
                if extra.get("algorithm") == "walk":  # walk steps per list, fresh starts per list
                    row.update(walk_steps_mean=float(steps.mean()), walk_steps_max=int(steps.max()),
                               starts_mean=float(passes.mean()), starts_max=int(passes.max()))
                    steps = passes = np.zeros(1, np.int32)
                row["search_steps_mean"] = float(steps.mean())
                row["search_steps_max"] = int(steps.max())
                row["fallback_programs"] = int((passes > 0).sum())
                row["fallback_passes_max"] = int(passes.max())
                row["fallback_passes_hist"] = np.bincount(passes).tolist()
                row["search_steps_hist"] = np.bincount(steps).tolist()
                if args.save_fallback:
                    sel = np.nonzero(passes > 0)[0]
                    np.savez(f"{args.save_fallback}_{S}_{seed}.npz", passes=passes[sel], rows=sel,
                             **{n: np.asarray(a)[sel] for n, a in zip(("z", "tin", "s", "last", "active", "theta"),
                                                                      lists)})
                if ref is not None:  # the XLA solver's, else the first variant's thresholds
                    row["max_diff_vs_xla" if not args.no_xla else "max_diff_vs_first"] = float(np.abs(tau - ref).max())
                else:
                    ref = tau
                row["ms"] = time_ms(f, lists, args.reps)

            rec.guarded(dict(S=S, solver=f"kernel/{v}", **src), kernel_part)
    ref_name = "the first variant" if args.no_xla else "xla"
    print(f"\n| S | solver | ms | search steps mean / max | fallback programs (max passes) | max diff vs {ref_name} |"
          "\n|---|---|---|---|---|---|")
    for r in rec.data["rows"]:
        if "ms" in r:
            steps = (f"walk {r['walk_steps_mean']:.0f} / {r['walk_steps_max']}, starts {r['starts_mean']:.1f} / "
                     f"{r['starts_max']}" if "walk_steps_mean" in r else
                     f"{r.get('search_steps_mean', float('nan')):.1f} / {r.get('search_steps_max', '')}")
            print(f"| {r['S']}{'' if 'seed' not in r else ' seed %d' % r['seed']} | {r['solver']} | {r['ms']:.2f} | {steps} | "
                  f"{r.get('fallback_programs', '')} ({r.get('fallback_passes_max', '')}) "
                  f"| {r.get('max_diff_vs_xla', r.get('max_diff_vs_first', ''))} |")
        else:
            print(f"| {r['S']} | {r['solver']} | error: {r.get('error', '')[:100]} | | | |")


if __name__ == "__main__":
    main()
