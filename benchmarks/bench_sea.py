"""Benchmark SEAAttention against dense cuDNN attention in the same run.

Forward and forward+backward wall time (median of timed calls after warm-up) and peak memory
(XLA's compiled memory analysis: temporaries + arguments + outputs) of one attention core at
B = 1, H = 16, D = 128, bf16, causal, SEA with k = 64, t_m = 256, for S = 2k, 8k, 32k.

fwd+bwd differentiates ``mean(out) + mean(estimate)`` with respect to q, k, v and every SEA
parameter (the estimate term stands in for the distillation loss, the only way gradient
reaches the estimator); the dense baseline differentiates ``mean(out)`` w.r.t. q, k, v.
Also reported: the largest number of key blocks a (head, query block) visits (the trip count
of the sparse loop) and the visited fraction of the causal key blocks.

SEA variants (``--variants``):
  sea_token_xla:    granularity="token", impl="xla" (exact: the selected keys only; the
                    module's blockwise XLA while-loop);
  sea_block_pallas: granularity="block", impl="auto" (-> sea_jax.kernels.block_sparse_attention
                    with the Pallas Triton kernel on GPU: every prefix key of the touched blocks).

    python benchmarks/bench_sea.py                     # GPU: writes benchmarks/results/sea_bench.json
    python benchmarks/bench_sea.py --smoke             # tiny CPU run of the same code

``--deadline`` (seconds) stops starting new measurements once passed (rows written so far are
kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention.base import AttentionDims
from sea_jax.attention.sea import SEAAttention, SEAOptions


def _time(fn, args, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _compile(jitted, args):
    """(compiled executable, peak bytes from XLA's memory analysis or None)."""
    compiled = jitted.lower(*args).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return compiled, None
    return compiled, int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)


def _measure(name, fwd, fwd_bwd, args, reps_fwd, reps_bwd, extra=None):
    row = {"name": name}
    t0 = time.perf_counter()
    compiled, row["fwd_peak_bytes"] = _compile(fwd, args)
    row["fwd_ms"] = _time(compiled, args, reps_fwd)
    compiled, row["fwd_bwd_peak_bytes"] = _compile(fwd_bwd, args)
    row["fwd_bwd_ms"] = _time(compiled, args, reps_bwd)
    row["wall_s"] = time.perf_counter() - t0
    if extra:
        row.update(extra)
    return row


VARIANTS = {
    "sea_token_xla": dict(granularity="token", impl="xla"),
    "sea_block_pallas": dict(granularity="block", impl="auto"),
    # the Triton kernel branching per tile between masked and plain steps (the default masks every
    # tile since 2026-11-24; "sea_block_pallas_am" in results before that date)
    "sea_block_pallas_branch": dict(granularity="block", impl="auto", kernel_options={"always_mask": False}),
}


def _sea_functions(dims, opts):
    module = SEAAttention(dims, opts, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def sea_apply(p, q, kk, v, aux=False):
        m = nnx.merge(graphdef, p, rest)
        return m(q, kk, v, return_aux=aux)

    sea_fwd = jax.jit(lambda p, q, kk, v: sea_apply(p, q, kk, v).out)

    def sea_loss(p, q, kk, v):
        r = sea_apply(p, q, kk, v, aux=True)
        return jnp.mean(r.out.astype(jnp.float32)) + jnp.mean(r.aux["estimate"])

    sea_fb = jax.jit(jax.grad(sea_loss, argnums=(0, 1, 2, 3)))
    sea_stats = jax.jit(lambda p, q, kk, v: sea_apply(p, q, kk, v, aux=True).aux["block_count"])
    return params, sea_fwd, sea_fb, sea_stats


def run(lengths, *, heads, head_dim, k, t_m, block, reps_fwd, reps_bwd, dtype, with_cudnn, out_path,
        variants=tuple(VARIANTS), deadline=None):
    t_start = time.perf_counter()
    late = lambda: deadline is not None and time.perf_counter() - t_start > deadline  # noqa: E731
    dims = AttentionDims(heads, heads, head_dim, heads * head_dim)
    seas = {
        name: (SEAOptions(k=k, t_m=t_m, block_q=block, block_k=block, **VARIANTS[name]),
               _sea_functions(dims, SEAOptions(k=k, t_m=t_m, block_q=block, block_k=block, **VARIANTS[name])))
        for name in variants
    }

    def dense(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn")

    dense_fwd = jax.jit(dense)
    dense_fb = jax.jit(jax.grad(lambda q, kk, v: jnp.mean(dense(q, kk, v).astype(jnp.float32)), argnums=(0, 1, 2)))

    results = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": {"B": 1, "H": heads, "D": head_dim, "k": k, "t_m": t_m, "block": block,
                   "dtype": str(jnp.dtype(dtype)), "causal": True, "reps_fwd": reps_fwd,
                   "reps_fwd_bwd": reps_bwd, "peak": "compiled memory analysis: temp + args + outputs",
                   "variants": {n: {"granularity": o.granularity, "impl": o.impl,
                                    "resolved_impl": o.resolved_impl()} for n, (o, _) in seas.items()}},
        "rows": [],
    }

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)

    for S in lengths:
        key = jax.random.PRNGKey(S)
        kq, kk_, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (1, S, heads, head_dim), dtype)
        kk = jax.random.normal(kk_, (1, S, heads, head_dim), dtype)
        v = jax.random.normal(kv, (1, S, heads, head_dim), dtype)
        if with_cudnn:
            try:
                row = _measure("dense_cudnn", dense_fwd, dense_fb, (q, kk, v), reps_fwd, reps_bwd)
            except Exception as e:  # report, keep going
                row = {"name": "dense_cudnn", "error": f"{type(e).__name__}: {e}"[:500]}
            row["S"] = S
            results["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
        for name, (_, (params, sea_fwd, sea_fb, sea_stats)) in seas.items():
            if late():
                print(f"deadline passed: skipping {name} at S={S}", flush=True)
                continue
            try:
                counts = sea_stats(params, q, kk, v)
                nq = counts.shape[-1]
                causal_blocks = nq * (nq + 1) // 2  # key blocks a causal pass would visit (T = S)
                extra = {
                    "max_blocks_visited": int(counts.max()),
                    "visited_fraction_of_causal_blocks": float(counts.sum(-1).mean() / causal_blocks),
                }
                # estimator + top-k + block layout alone (XLA drops the unused sparse attention)
                extra["estimate_select_layout_fwd_ms"] = _time(sea_stats, (params, q, kk, v), max(1, reps_fwd // 2))
                row = _measure(name, sea_fwd, sea_fb, (params, q, kk, v), max(1, reps_fwd // 2),
                               max(1, reps_bwd // 2), extra)
            except Exception as e:
                row = {"name": name, "error": f"{type(e).__name__}: {e}"[:800]}
            row["S"] = S
            results["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)

    # ratios SEA / cuDNN per length
    by = {(r["name"], r["S"]): r for r in results["rows"] if "error" not in r}
    nan = float("nan")
    get = lambda r, key: r.get(key, nan) if r else nan  # noqa: E731
    mib = lambda r, key: (r[key] / 2**20) if r and r.get(key) else nan  # noqa: E731
    print(f"\n| S | impl | fwd ms | fwd+bwd ms | fwd / cuDNN | fwd+bwd / cuDNN | fwd peak MiB | "
          f"fwd+bwd peak MiB | max blocks | visited / causal | estimate+select+layout fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for S in lengths:
        d = by.get(("dense_cudnn", S))
        for name in ("dense_cudnn",) + tuple(seas):
            r = by.get((name, S))
            if not r:
                continue
            print(f"| {S} | {name} | {get(r, 'fwd_ms'):.2f} | {get(r, 'fwd_bwd_ms'):.2f} | "
                  f"{get(r, 'fwd_ms') / get(d, 'fwd_ms'):.1f} | {get(r, 'fwd_bwd_ms') / get(d, 'fwd_bwd_ms'):.1f} | "
                  f"{mib(r, 'fwd_peak_bytes'):.0f} | {mib(r, 'fwd_bwd_peak_bytes'):.0f} | "
                  f"{r.get('max_blocks_visited', '')} | {get(r, 'visited_fraction_of_causal_blocks'):.3f} | "
                  f"{get(r, 'estimate_select_layout_fwd_ms'):.2f} |")
    save()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--reps-fwd", type=int, default=20)
    p.add_argument("--reps-bwd", type=int, default=10)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sea_bench.json"))
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (no cuDNN)")
    a = p.parse_args()
    if a.smoke:
        run([64, 128], heads=2, head_dim=16, k=4, t_m=16, block=16, reps_fwd=2, reps_bwd=2,
            dtype=jnp.float32, with_cudnn=False, out_path=a.out, variants=a.variants, deadline=a.deadline)
        return
    run(a.lengths, heads=16, head_dim=128, k=64, t_m=256, block=a.block, reps_fwd=a.reps_fwd,
        reps_bwd=a.reps_bwd, dtype=jnp.bfloat16, with_cudnn=jax.default_backend() == "gpu", out_path=a.out,
        variants=a.variants, deadline=a.deadline)


if __name__ == "__main__":
    main()
