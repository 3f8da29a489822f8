"""Attention layers at long context: SparseKAttention and SEAAttention vs dense cuDNN.

Forward and forward+backward time and peak memory of one attention core at B = 1, H = 16
(= KV heads; ``--kv_heads 4``: GQA), D = 128, bf16, causal, for S = 8k, 32k, 64k, 128k, all
in one process:

* ``dense_cudnn``: ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")``;
  fwd+bwd = grad of mean(out) w.r.t. q, k, v.
* ``sparsek``: ``SparseKAttention`` with k = 1024, window = 512 (other options default,
  impl "auto" -> the Pallas gathered kernel on GPU), *selection included*: the scorer on x
  [B, S, E = H D], the causal prefix top-k / threshold and the union layout are inside the
  timed function; fwd+bwd = grad of mean(out) w.r.t. q, k, v, x and the scorer weights.
* ``sparsek@<schedule>``: the same with another selection schedule (``SparseKOptions.schedule``);
  ``sparsek:block_q=128;schedule=parallel``: with other ``SparseKOptions`` fields (e.g.
  ``sparsek:selection_form=dense``: the selection handed to the kernel as [B, K, T, U] mask
  and weight arrays instead of the default factored SlotSelection).
* ``sea``: ``SEAAttention`` with k = 64, t_m = 256, granularity "block", impl "auto" (-> the
  Pallas block-sparse kernel on GPU), other options default; fwd+bwd = grad of mean(out) +
  mean(estimate) w.r.t. q, k, v and every SEA parameter (the estimate term stands in for
  the distillation loss, the only path of gradient into the estimator).
* ``sea_token``: the same with granularity "token" (SEAOptions' default: exactly the selected
  keys; on a GPU the same kernel with the selection's cells as a CellMask).

Time: median of ``--reps`` calls after compile and one warm call. Memory: XLA's compiled
memory analysis of the jitted function (temporaries + arguments + outputs), so it counts
what the function needs, not what the allocator happened to keep.

    python benchmarks/bench_layers.py                       # GPU: results/layers_bench.{json,png}
    python benchmarks/bench_layers.py --smoke --out /tmp/l.json   # tiny CPU run (interpret mode)

``--deadline`` (seconds): no new measurement starts after it (rows so far stay in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SEA_LAYER, SPARSEK_LAYER, JsonRows, compile_with_memory, env_info, time_ms  # noqa: E402

from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sea import SEAAttention, SEAOptions  # noqa: E402
from sea_jax.attention.sparsek import SparseKAttention, SparseKOptions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mean_f32(x):
    return jnp.mean(x.astype(jnp.float32))


def dense_functions(implementation):
    def attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(jax.grad(lambda q, k, v: mean_f32(attn(q, k, v)), argnums=(0, 1, 2)))
    return (), fwd, fwd_bwd


def sparsek_functions(dims, options):
    module = SparseKAttention(dims, options, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(p, q, k, v, x):
        return nnx.merge(graphdef, p, rest)(q, k, v, x=x).out

    fwd = jax.jit(apply)
    fwd_bwd = jax.jit(jax.grad(lambda p, q, k, v, x: mean_f32(apply(p, q, k, v, x)), argnums=(0, 1, 2, 3, 4)))
    return (params,), fwd, fwd_bwd


def sea_functions(dims, options):
    module = SEAAttention(dims, options, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(p, q, k, v, aux=False):
        return nnx.merge(graphdef, p, rest)(q, k, v, return_aux=aux)

    fwd = jax.jit(lambda p, q, k, v: apply(p, q, k, v).out)

    def loss(p, q, k, v):
        r = apply(p, q, k, v, aux=True)
        return mean_f32(r.out) + jnp.mean(r.aux["estimate"])

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return (params,), fwd, fwd_bwd


def measure(row, fwd, fwd_bwd, args, reps):
    """Fills ``row`` step by step (memory is known before running: kept if the run fails)."""
    compiled, row["fwd_mem"] = compile_with_memory(fwd, args)
    row["fwd_ms"] = time_ms(compiled, args, reps)
    del compiled
    compiled, row["fwd_bwd_mem"] = compile_with_memory(fwd_bwd, args)
    row["fwd_bwd_ms"] = time_ms(compiled, args, reps)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "fwd_bwd_ms" in r]
    names = sorted({r["name"] for r in rows})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        rs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["S"])
        S = [r["S"] for r in rs]
        line, = ax_t.plot(S, [r["fwd_bwd_ms"] for r in rs], "o-", label=f"{name} fwd+bwd")
        ax_t.plot(S, [r["fwd_ms"] for r in rs], "s--", color=line.get_color(), alpha=0.6, label=f"{name} fwd")
        # memory comes from the compiled analysis: plotted even where the run itself failed
        mem = sorted((r["S"], r["fwd_bwd_mem"]["peak_bytes"] / 2**30) for r in data["rows"]
                     if r["name"] == name and r.get("fwd_bwd_mem"))
        if mem:
            ax_m.plot(*zip(*mem), "o-", color=line.get_color(), label=f"{name} fwd+bwd")
    for ax, ylabel in ((ax_t, "time [ms]"), (ax_m, "peak memory [GiB] (XLA memory analysis)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"attention layers, B=1 H=16 D=128 bf16 causal, {meta['env'].get('device', meta['env']['backend'])}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768,65536,131072")
    ap.add_argument("--layers", default="dense_cudnn,sparsek,sea")
    ap.add_argument("--kv_heads", type=int, default=None,
                    help="KV heads of every layer (default: = the 16 query heads; fewer: GQA)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=None, help="seconds; no new measurement after it")
    ap.add_argument("--out", default=os.path.join(RESULTS, "layers_bench.json"))
    ap.add_argument("--png", default=None, help="default: --out with .png")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, Pallas kernels in interpret mode")
    ap.add_argument("--plot_only", action="store_true", help="redraw the PNG from the JSON at --out")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="with --plot_only: JSONs of later runs whose (layer, S) points are missing from --out")
    args = ap.parse_args()
    t_start = time.perf_counter()
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    if args.plot_only:
        with open(args.out) as f:
            data = json.load(f)
        have = {(r["name"], r["S"]) for r in data["rows"] if "fwd_bwd_ms" in r}
        for path in args.merge:
            with open(path) as f:
                data["rows"] += [dict(r, merged_from=os.path.basename(path)) for r in json.load(f)["rows"]
                                 if "fwd_bwd_ms" in r and (r["name"], r["S"]) not in have]
        plot(data, png)
        print("wrote", png)
        return

    if args.smoke:
        H, D, dtype, seqs = 2, 16, jnp.float32, [96, 160]
        sk = SparseKOptions(k=8, window=8, block_q=16, impl="pallas_gpu", interpret=True)
        sea = SEAOptions(k=4, t_m=16, block_q=16, block_k=16, granularity="block", impl="pallas_gpu",
                         kernel_interpret=True)
        dense_impl = None
    else:
        H, D, dtype = 16, 128, jnp.bfloat16
        seqs = [int(s) for s in args.seqs.split(",")]
        sk = SparseKOptions(**SPARSEK_LAYER)
        sea = SEAOptions(**SEA_LAYER, granularity="block", impl="auto")
        dense_impl = "cudnn"
    K = H if args.kv_heads is None else args.kv_heads
    if K < 1 or H % K:
        raise ValueError(f"--kv_heads must divide the {H} query heads, got {K}")
    dims = AttentionDims(H, K, D, H * D)
    layers = args.layers.split(",")
    meta = dict(env=env_info(), args=vars(args),
                config=dict(B=1, H=H, K=K, D=D, E=H * D, dtype=jnp.dtype(dtype).name, causal=True),
                sparsek_options=dict(k=sk.k, window=sk.window, extra=sk.extra, block_q=sk.block_q,
                                     weight_mode=sk.weight_mode, impl=sk.impl,
                                     resolved_impl=sk.resolved_impl(), method=sk.method,
                                     schedule=sk.schedule, selection_form=sk.selection_form,
                                     resolved_selection_form=sk.resolved_selection_form(sk.resolved_impl())),
                sea_options=dict(k=sea.k, t_m=sea.t_m, block_q=sea.block_q, block_k=sea.block_k,
                                 granularity=sea.granularity, impl=sea.impl, resolved_impl=sea.resolved_impl()),
                dense=dict(implementation=dense_impl),
                timing=f"median of {args.reps} calls after compile + 1 warm call",
                memory="XLA compiled memory_analysis: temp + argument + output bytes")
    rec = JsonRows(args.out, meta)
    builders = {
        "dense_cudnn": lambda: dense_functions(dense_impl),
        "sparsek": lambda: sparsek_functions(dims, sk),
        "sea": lambda: sea_functions(dims, sea),
        "sea_token": lambda: sea_functions(dims, dataclasses.replace(sea, granularity="token")),
    }
    for name in layers:  # "sparsek@fast_sorted": another selection schedule; "sparsek:block_q=128": other options
        if name.startswith("sparsek@"):
            builders[name] = lambda name=name: sparsek_functions(
                dims, dataclasses.replace(sk, schedule=name.split("@", 1)[1]))
        elif name.startswith("sparsek:"):
            kv = dict(item.split("=") for item in name.split(":", 1)[1].split(";"))
            builders[name] = lambda kv=kv: sparsek_functions(
                dims, dataclasses.replace(sk, **{key: int(val) if val.isdigit() else val for key, val in kv.items()}))
    fns = {}
    for S in seqs:
        ks = jax.random.split(jax.random.PRNGKey(S), 4)
        q = jax.random.normal(ks[0], (1, S, H, D), jnp.float32).astype(dtype)
        k, v = (jax.random.normal(kk, (1, S, K, D), jnp.float32).astype(dtype) for kk in ks[1:3])
        x = jax.random.normal(ks[3], (1, S, H * D), jnp.float32).astype(dtype)
        for name in layers:
            if args.deadline is not None and time.perf_counter() - t_start > args.deadline:
                rec.add(dict(name=name, S=S, error="skipped: deadline passed"))
                continue

            def one(row, name=name):
                if name not in fns:
                    fns[name] = builders[name]()
                extra, fwd, fwd_bwd = fns[name]
                inputs = (*extra, q, k, v, x) if name.startswith("sparsek") else (*extra, q, k, v)
                measure(row, fwd, fwd_bwd, inputs, args.reps)

            rec.guarded(dict(name=name, S=S), one)

    # summary table
    by = {(r["name"], r["S"]): r for r in rec.data["rows"] if "fwd_bwd_ms" in r}
    gib = lambda r, key: r[key]["peak_bytes"] / 2**30 if r.get(key) else math.nan  # noqa: E731
    print("\n| S | layer | fwd ms | fwd+bwd ms | fwd+bwd / cuDNN | fwd peak GiB | fwd+bwd peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for S in seqs:
        d = by.get(("dense_cudnn", S))
        for name in layers:
            r = by.get((name, S))
            if r is None:
                print(f"| {S} | {name} | error | | | | |")
                continue
            ratio = r["fwd_bwd_ms"] / d["fwd_bwd_ms"] if d else math.nan
            print(f"| {S} | {name} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {ratio:.3f} | "
                  f"{gib(r, 'fwd_mem'):.2f} | {gib(r, 'fwd_bwd_mem'):.2f} |")
    try:
        plot(rec.data, png)
        print("wrote", png)
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot is a convenience
        print("plot failed:", type(e).__name__, e)
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
