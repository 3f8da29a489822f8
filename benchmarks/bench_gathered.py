"""Gathered (token-level, SparseK-shaped) attention with the Pallas Triton kernels on GPU:
correctness and timings of the strategies (STRATEGIES: how the slot K/V rows are read,
in-kernel index loads vs an XLA pre-gather, and how the backward's slot dK/dV reach the keys:
sorted per-key-tile reduction, XLA scatter-add or in-kernel atomics; plus tuning variants).

B = 1, H = 16, D = 128, bf16, causal; per (KV head, query block of 128) a union of
U = k + 127 distinct key positions drawn from the keys the block's last query may select
(s <= t - w), plus the sliding window of w keys; a per-(query, slot) selection mask keeping
~k of the U slots and float32 selection weights ("gate" mode), as SparseK produces them.
TFLOP/s are counted on the visible (query, key) pairs (window + selected, causal), 4 * D
per pair forward and 3.5x that forward+backward. cuDNN dense causal runs in the same process.

    python benchmarks/bench_gathered.py --out results.json               # GPU
    python benchmarks/bench_gathered.py --smoke                          # tiny CPU run
    python benchmarks/bench_gathered.py --strategies kernel_sorted,kernel_atomic --seqs 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_block_sparse import (  # noqa: E402
    Recorder,
    cudnn_causal,
    env_info,
    fwd_bwd,
    import_kernels,
    rel,
    timeit,
)


# name -> kernel_options (on top of tq = 64, tu = tk = 64 and the kernel defaults), most important first;
# the first N_MAIN are checked and timed at every length, the rest (tuning) at the longest only
N_MAIN = 7
STRATEGIES = [
    ("kernel_sorted", dict(gather="kernel", dkv_reduce="sorted")),
    ("kernel_scatter", dict(gather="kernel", dkv_reduce="scatter")),
    ("hybrid_xla_bwd_scatter", dict(gather="kernel", bwd_gather="xla", dkv_reduce="scatter")),
    ("kernel_atomic", dict(gather="kernel", dkv_reduce="atomic")),
    ("xla_scatter", dict(gather="xla", dkv_reduce="scatter")),
    ("kernel_sorted_fp32_partials", dict(gather="kernel", dkv_reduce="sorted", partial_dtype="float32")),
    # U = topk + bq = 1152, a multiple of the slot tile: the kernel pads neither the selection
    # mask / weights [B, K, S, U] in the forward nor slices their gradient in the backward
    # (the extra slot stays empty: same visible pairs)
    ("kernel_sorted_u_tile_multiple", dict(gather="kernel", dkv_reduce="sorted", union_slots="topk+bq")),
    # tuning around the kernel defaults (warps 4, 4, 4, 8, 4; stages 3, 3, 3, 3, 2; chunk 32)
    ("kernel_sorted_chunk64", dict(gather="kernel", dkv_reduce="sorted", reduce_chunk=64)),
    ("kernel_sorted_w8", dict(gather="kernel", dkv_reduce="sorted", num_warps=(4, 4, 8, 8, 8))),
    ("kernel_sorted_stages2", dict(gather="kernel", dkv_reduce="sorted", num_stages=(2, 2, 2, 2, 2))),
    ("kernel_scatter_u_tile_multiple", dict(gather="kernel", dkv_reduce="scatter", union_slots="topk+bq")),
]


def make_union(rng, K, S, bq, U, window, n_max):
    """int32 [1, K, nQ, U] (SparseK: U = topk + bq - 1): sorted distinct keys in
    [0, q_last - window], min(n_max, eligible) of them; the rest -1."""
    nq = S // bq
    out = np.full((1, K, nq, U), -1, np.int32)
    for kh in range(K):
        for i in range(nq):
            hi = (i + 1) * bq - 1 - window  # last eligible key of the block's last query
            if hi < 0:
                continue
            n = min(U, n_max, hi + 1)
            out[0, kh, i, :n] = np.sort(rng.choice(hi + 1, size=n, replace=False))
    return out


def visible_pairs(union, sel, S, bq, window, H):
    """Visible (query, key) pairs summed over heads: window span + eligible selected slots."""
    K = union.shape[1]
    t = jnp.arange(S)
    u = jnp.repeat(jnp.asarray(union), bq, axis=2)[:, :, :S]  # [1, K, S, U]
    ok = (u >= 0) & (u <= (t - window)[None, None, :, None] if window else u <= t[None, None, :, None])
    if sel is not None:
        ok &= sel
    win = int(np.minimum(np.arange(S) + 1, window).sum()) if window else 0
    return (int(jnp.sum(ok, dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)) + K * win) * (H // K)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="check,bench")
    ap.add_argument("--seqs", default="32768,8192", help="the first one also runs the tuning variants")
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--kv_heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget_s", type=float, default=250.0, help="skip what starts after this")
    ap.add_argument("--strategies", default=None, help="comma-separated names of STRATEGIES")
    ap.add_argument("--options", default=None, help="JSON kernel_options under every strategy's own")
    args = ap.parse_args()
    import_kernels()
    from sea_jax.kernels import gathered_attention

    t_start = time.perf_counter()
    rec = Recorder(args.out, dict(env=env_info(), args=vars(args), kind="gathered"))
    interpret = args.smoke
    B, H, D, bq = 1, 16, 128, 128
    Kh, topk, W = args.kv_heads, args.topk, args.window
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.smoke:
        H, D, bq, Kh, topk, W, seqs = 4, 32, 16, 2, 16, 8, [128]
    rng = np.random.default_rng(0)
    sections = args.sections.split(",")

    def ga(opts=None):
        def f(q, k, v, union, sel, w):
            return gathered_attention(q, k, v, union, block_q=bq, window=W, selection_mask=sel,
                                      selection_weights=w, impl="pallas_gpu", interpret=interpret,
                                      kernel_options=opts)
        return f

    def inputs(S, seed, U):
        ks = jax.random.split(jax.random.PRNGKey(seed), 7)
        q = jax.random.normal(ks[0], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, Kh, D), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, Kh, D), jnp.float32).astype(jnp.bfloat16)
        ct = jax.random.normal(ks[3], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
        union = make_union(rng, Kh, S, bq, U, W, topk + bq - 1)
        sel = jax.random.bernoulli(ks[4], min(1.0, topk / U), (B, Kh, S, U))
        w = jax.random.uniform(ks[5], (B, Kh, S, U), jnp.float32)
        return q, k, v, ct, jnp.asarray(union), sel, w

    base = {**dict(tq=min(64, bq), tu=64, tk=64), **(json.loads(args.options) if args.options else {})}
    strategies = dict(STRATEGIES)
    main_names = [n for n, _ in STRATEGIES[:N_MAIN]]
    if args.strategies:
        strategies = {n: strategies[n] for n in args.strategies.split(",")}
        main_names = list(strategies)
    over_budget = lambda: time.perf_counter() - t_start > args.budget_s

    # ---------------------------------------------------------------- correctness
    if "check" in sections:
        S = 256 if args.smoke else 3000
        ks = jax.random.split(jax.random.PRNGKey(2), 6)
        Hc, Kc = (4, 2) if args.smoke else (16, 4)
        q = jax.random.normal(ks[0], (B, S, Hc, D), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, Kc, D), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, Kc, D), jnp.float32).astype(jnp.bfloat16)
        ct = jax.random.normal(ks[3], (B, S, Hc, D), jnp.float32).astype(jnp.bfloat16)
        nq = -(-S // bq)
        U = topk + bq - 1
        union = np.full((1, Kc, nq, U), -1, np.int32)
        for kh in range(Kc):
            for i in range(nq):
                n = int(rng.integers(0, min(U, S) + 1))
                union[0, kh, i, rng.choice(U, n, replace=False)] = rng.choice(S, n, replace=False)
        union = jnp.asarray(union)
        sel = jax.random.bernoulli(ks[4], 0.8, (B, Kc, S, U))
        w = jax.random.uniform(ks[5], (B, Kc, S, U), jnp.float32)
        up = lambda x: x.astype(jnp.float32)

        def f(impl, opts, q, k, v, w):
            return gathered_attention(q, k, v, union, block_q=bq, window=W, selection_mask=sel,
                                      selection_weights=w, impl=impl, interpret=interpret,
                                      kernel_options=opts)

        ref = jax.jit(lambda *a: f("xla", None, *a))(up(q), up(k), up(v), w)
        gr = jax.jit(lambda *a: jax.vjp(lambda *b: f("xla", None, *b), *a)[1](up(ct)))(up(q), up(k), up(v), w)
        for sname, sopts in strategies.items():
            if over_budget() or sname not in main_names:
                continue

            def run_check(sname=sname, sopts=sopts):
                opts = {**base, **{k: x for k, x in sopts.items() if k != "union_slots"}}
                out = jax.jit(lambda *a: f("pallas_gpu", opts, *a))(q, k, v, w)
                g = jax.jit(lambda *a: jax.vjp(lambda *b: f("pallas_gpu", opts, *b), *a)[1](ct))(q, k, v, w)
                finite = bool(np.isfinite(np.asarray(out, np.float32)).all()) and all(
                    bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in g)
                errs = dict(out=rel(out, ref), dq=rel(g[0], gr[0]), dk=rel(g[1], gr[1]), dv=rel(g[2], gr[2]),
                            dw=rel(g[3], gr[3]))
                rec.add(section="check", name=f"S{S}_{sname}", options=opts, finite=finite, rel_err=errs,
                        tol=2e-2, passed=finite and max(errs.values()) < 2e-2)

            rec.guard("check", sname, run_check)

    # ----------------------------------------------------------------------- bench
    if "bench" in sections:
        # the main strategies at every length first, then the tuning variants at seqs[0]
        plan = [(S, n) for S in seqs for n in main_names]
        plan += [(seqs[0], n) for n in strategies if n not in main_names]
        data, fwd_ms, done_cudnn = {}, {}, set()
        for S, sname in plan:
            if over_budget():
                print(f"budget: skipped S={S} {sname}", flush=True)
                continue
            sopts = dict(strategies[sname])
            U = topk + bq if sopts.pop("union_slots", None) == "topk+bq" else topk + bq - 1
            if (S, U) not in data:
                data.clear()  # one input set on the device at a time
                data[(S, U)] = inputs(S, S, U)
            q, k, v, ct, union, sel, w = data[(S, U)]
            flops = 4 * D * visible_pairs(union, sel, S, bq, W, H)
            if not args.smoke and S not in done_cudnn:
                done_cudnn.add(S)
                causal_flops = 4 * D * H * S * (S + 1) // 2

                def cudnn(S=S, q=q, ct=ct, causal_flops=causal_flops):
                    kk = jax.random.normal(jax.random.PRNGKey(9), (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
                    t = timeit(jax.jit(cudnn_causal), q, kk, kk, reps=args.reps, inner=args.inner)
                    tb = timeit(fwd_bwd(cudnn_causal), q, kk, kk, ct, reps=args.reps, inner=args.inner)
                    rec.add(section="bench", impl="cudnn_dense_causal", S=S, fwd_ms=t * 1e3, fwdbwd_ms=tb * 1e3,
                            fwd_tflops=causal_flops / t / 1e12, fwdbwd_tflops=3.5 * causal_flops / tb / 1e12)

                rec.guard("bench", f"cudnn S={S}", cudnn)

            def one(S=S, U=U, sname=sname, opts={**base, **sopts}):
                # the forward depends on `gather` and the tiles only: timed once per such key
                fkey = (S, U, opts.get("gather", "kernel"), str(opts.get("num_warps")), str(opts.get("num_stages")))
                if fkey not in fwd_ms:
                    fwd_ms[fkey] = timeit(jax.jit(ga(opts)), q, k, v, union, sel, w,
                                          reps=args.reps, inner=args.inner)
                t = fwd_ms[fkey]
                tb = timeit(fwd_bwd(ga(opts)), q, k, v, ct, union, sel, w, reps=args.reps, inner=args.inner)
                rec.add(section="bench", impl=f"pallas_gpu_{sname}", S=S, union_slots=U, options=opts,
                        visible_pairs_per_head=flops / (4 * D * H), fwd_ms=t * 1e3, fwdbwd_ms=tb * 1e3,
                        bwd_ms=(tb - t) * 1e3, fwd_tflops=flops / t / 1e12, fwdbwd_tflops=3.5 * flops / tb / 1e12)

            rec.guard("bench", f"S={S} {sname}", one)
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    print(f"{'impl':>44} {'S':>6} {'fwd ms':>8} {'fwd TF':>7} {'f+b ms':>8} {'f+b TF':>7}")
    for e in rec.data["entries"]:
        if e.get("section") == "bench" and "fwd_ms" in e:
            print(f"{e['impl']:>44} {e['S']:>6} {e['fwd_ms']:8.3f} {e['fwd_tflops']:7.1f} "
                  f"{e['fwdbwd_ms']:8.3f} {e['fwdbwd_tflops']:7.1f}")
    for e in rec.data["entries"]:
        if "error" in e or (e.get("section") == "check" and not e.get("passed")):
            print("PROBLEM:", e.get("name"), e.get("error", e.get("rel_err")), flush=True)


if __name__ == "__main__":
    main()
