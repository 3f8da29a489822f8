"""Gathered (token-level, SparseK-shaped) attention with the Pallas Triton kernels on GPU:
correctness, gather strategy (in-kernel index loads vs XLA pre-gather), tuning, timings.

B = 1, H = 16, D = 128, bf16, causal; per (KV head, query block of 128) a union of
U = k + 127 distinct key positions drawn from the keys the block's last query may select
(s <= t - w), plus the sliding window of w keys; a per-(query, slot) selection mask keeping
~k of the U slots and float32 selection weights ("gate" mode), as SparseK produces them.
TFLOP/s are counted on the visible (query, key) pairs (window + selected, causal), 4 * D
per pair forward and 3.5x that forward+backward. cuDNN dense causal runs in the same process.

    python benchmarks/bench_gathered.py --out results.json               # GPU
    python benchmarks/bench_gathered.py --smoke                          # tiny CPU run
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


def make_union(rng, K, S, bq, topk, window):
    """int32 [1, K, nQ, U], U = topk + bq - 1: sorted distinct keys in [0, q_last - window]."""
    nq = S // bq
    U = topk + bq - 1
    out = np.full((1, K, nq, U), -1, np.int32)
    for kh in range(K):
        for i in range(nq):
            hi = (i + 1) * bq - 1 - window  # last eligible key of the block's last query
            if hi < 0:
                continue
            n = min(U, hi + 1)
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
    ap.add_argument("--sections", default="check,tune,bench")
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--kv_heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget_s", type=float, default=300.0)
    ap.add_argument("--options", default=None, help="JSON kernel_options for the bench section")
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

    def inputs(S, seed):
        ks = jax.random.split(jax.random.PRNGKey(seed), 7)
        q = jax.random.normal(ks[0], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, S, Kh, D), jnp.float32).astype(jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, S, Kh, D), jnp.float32).astype(jnp.bfloat16)
        ct = jax.random.normal(ks[3], (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
        union = make_union(rng, Kh, S, bq, topk, W)
        U = union.shape[-1]
        sel = jax.random.bernoulli(ks[4], min(1.0, topk / U), (B, Kh, S, U))
        w = jax.random.uniform(ks[5], (B, Kh, S, U), jnp.float32)
        return q, k, v, ct, jnp.asarray(union), sel, w

    # ---------------------------------------------------------------- correctness
    if "check" in sections:
        S = 256 if args.smoke else 3000
        for gather, am in [("kernel", False), ("xla", False), ("kernel", True)]:
            def run_check(gather=gather, am=am):
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

                opts = dict(gather=gather, always_mask=am, tq=min(64, bq))
                out = jax.jit(lambda *a: f("pallas_gpu", opts, *a))(q, k, v, w)
                ref = jax.jit(lambda *a: f("xla", None, *a))(up(q), up(k), up(v), w)
                g = jax.jit(lambda *a: jax.vjp(lambda *b: f("pallas_gpu", opts, *b), *a)[1](ct))(q, k, v, w)
                gr = jax.jit(lambda *a: jax.vjp(lambda *b: f("xla", None, *b), *a)[1](up(ct)))(up(q), up(k), up(v), w)
                finite = bool(np.isfinite(np.asarray(out, np.float32)).all()) and all(
                    bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in g)
                errs = dict(out=rel(out, ref), dq=rel(g[0], gr[0]), dk=rel(g[1], gr[1]), dv=rel(g[2], gr[2]),
                            dw=rel(g[3], gr[3]))
                rec.add(section="check", name=f"S{S}_gather_{gather}_always_mask_{am}", finite=finite, rel_err=errs, tol=2e-2,
                        passed=finite and max(errs.values()) < 2e-2)

            rec.guard("check", f"gather {gather}", run_check)

    best = dict(json.loads(args.options)) if args.options else {}
    # ------------------------------------------------------------- tuning + strategy
    if "tune" in sections:
        S = seqs[-1]
        q, k, v, ct, union, sel, w = inputs(S, 0)
        flops = 4 * D * visible_pairs(union, sel, S, bq, W, H)
        # both gather strategies side by side, most promising first (the loop stops at --budget_s)
        grid = [dict(gather=g, tq=tq, tu=tu, tk=tk, num_warps=(nw,) * 4, num_stages=(ns,) * 4, always_mask=am)
                for tq, tu, tk, nw, ns, am in [(128, 64, 64, 8, 2, False), (64, 64, 64, 4, 2, False),
                                               (128, 64, 64, 4, 2, False), (128, 64, 64, 8, 3, False),
                                               (128, 128, 128, 8, 2, False), (128, 64, 64, 8, 2, True)]
                for g in ["kernel", "xla"]]
        if args.smoke:
            grid = [dict(gather=g, tq=16, tu=16, tk=16, always_mask=False) for g in ["kernel", "xla"]]
        results = []
        for opts in grid:
            if time.perf_counter() - t_start > args.budget_s:
                break

            def one(opts=opts):
                t = timeit(jax.jit(ga(opts)), q, k, v, union, sel, w, reps=args.reps, inner=args.inner)
                rec.add(section="tune_fwd", S=S, options=opts, ms=t * 1e3, tflops=flops / t / 1e12)
                results.append((t, opts))

            rec.guard("tune_fwd", str(opts), one)
        # fwd+bwd for the best forward config of each gather strategy
        for g in ["kernel", "xla"]:
            cands = sorted([r for r in results if r[1]["gather"] == g], key=lambda r: r[0])[:2]
            for _, opts in cands:
                def one(opts=opts):
                    t = timeit(fwd_bwd(ga(opts)), q, k, v, ct, union, sel, w, reps=args.reps, inner=args.inner)
                    rec.add(section="tune_fwdbwd", S=S, options=opts, ms=t * 1e3, tflops=3.5 * flops / t / 1e12)
                    results.append((t * 1e6, opts, "fb"))  # keep fwd+bwd apart (x1e6)

                rec.guard("tune_fwdbwd", str(opts), one)
        fb = [r for r in results if len(r) == 3]
        if fb:
            best = dict(min(fb, key=lambda r: r[0])[1])
        elif results:
            best = dict(min(results, key=lambda r: r[0])[1])
        rec.add(section="tune_best", options=best)

    # ----------------------------------------------------------------------- bench
    if "bench" in sections:
        for S in seqs:
            q, k, v, ct, union, sel, w = inputs(S, S)
            flops = 4 * D * visible_pairs(union, sel, S, bq, W, H)
            causal_flops = 4 * D * H * S * (S + 1) // 2
            if not args.smoke:
                def base(S=S, q=q, ct=ct, causal_flops=causal_flops):
                    kk = jax.random.normal(jax.random.PRNGKey(9), (B, S, H, D), jnp.float32).astype(jnp.bfloat16)
                    t = timeit(jax.jit(cudnn_causal), q, kk, kk, reps=args.reps, inner=args.inner)
                    tb = timeit(fwd_bwd(cudnn_causal), q, kk, kk, ct, reps=args.reps, inner=args.inner)
                    rec.add(section="bench", impl="cudnn_dense_causal", S=S, fwd_ms=t * 1e3, fwdbwd_ms=tb * 1e3,
                            fwd_tflops=causal_flops / t / 1e12, fwdbwd_tflops=3.5 * causal_flops / tb / 1e12)

                rec.guard("bench", f"cudnn S={S}", base)
            strategies = [best.get("gather", "kernel")]
            strategies += [g for g in ["kernel", "xla"] if g not in strategies]
            for g in strategies:
                opts = {**best, "gather": g}

                def one(S=S, opts=opts):
                    t = timeit(jax.jit(ga(opts)), q, k, v, union, sel, w, reps=args.reps, inner=args.inner)
                    tb = timeit(fwd_bwd(ga(opts)), q, k, v, ct, union, sel, w, reps=args.reps, inner=args.inner)
                    rec.add(section="bench", impl=f"pallas_gpu_gather_{opts['gather']}", S=S, options=opts,
                            visible_pairs_per_head=flops / (4 * D * H), fwd_ms=t * 1e3, fwdbwd_ms=tb * 1e3,
                            fwd_tflops=flops / t / 1e12, fwdbwd_tflops=3.5 * flops / tb / 1e12)

                rec.guard("bench", f"S={S} {opts}", one)
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    print(f"{'impl':>28} {'S':>6} {'fwd ms':>8} {'fwd TF':>7} {'f+b ms':>8} {'f+b TF':>7}")
    for e in rec.data["entries"]:
        if e.get("section") == "bench" and "fwd_ms" in e:
            print(f"{e['impl']:>28} {e['S']:>6} {e['fwd_ms']:8.3f} {e['fwd_tflops']:7.1f} "
                  f"{e['fwdbwd_ms']:8.3f} {e['fwdbwd_tflops']:7.1f}")
    for e in rec.data["entries"]:
        if "error" in e or (e.get("section") == "check" and not e.get("passed")):
            print("PROBLEM:", e.get("name"), e.get("error", e.get("rel_err")), flush=True)


if __name__ == "__main__":
    main()
