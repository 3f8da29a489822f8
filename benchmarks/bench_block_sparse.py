"""Block-sparse attention (Pallas Triton kernels) on GPU: correctness, tuning, timings.

B = 1, H = 16, D = 128, bf16, causal, layout blocks 128 x 128, one random layout per head
(G = H). Density d keeps, for query block i, its diagonal block plus random earlier blocks,
max(1, round(d * (i + 1))) blocks in all: d = 1 is exactly causal. TFLOP/s are counted on
the kept (query, key) pairs: 4 * D * pairs forward, 3.5x that forward+backward. The cuDNN
dense causal baseline (``jax.nn.dot_product_attention(implementation="cudnn")``, TFLOP/s on
the S (S + 1) / 2 causal pairs) runs in the same process.

Timing: each number is the median over ``--reps`` samples of ``--inner`` back-to-back calls
(after compile and one warm call), divided by ``--inner``.

    python benchmarks/bench_block_sparse.py --out results.json          # GPU: all sections
    python benchmarks/bench_block_sparse.py --sections check --smoke    # tiny CPU run

Sections: ``check`` (kernel vs the XLA reference at realistic odd shapes, fwd and grads),
``tune`` (tiles / warps / stages sweep at S = 32k, d = 12.5 %), ``bench`` (the table).
Imports only jax, numpy and sea_jax.kernels (loaded without the rest of sea_jax when flax
is missing, as on the GPU machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import platform
import statistics
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ shared helpers
def import_kernels():
    """sea_jax.kernels, without importing sea_jax/__init__ (flax) when that is unavailable."""
    if "sea_jax.kernels" in sys.modules:
        return sys.modules["sea_jax.kernels"]
    if importlib.util.find_spec("flax") is not None:
        try:
            import sea_jax.kernels as kernels

            return kernels
        except Exception:  # noqa: BLE001 - fall back to the stub below
            for name in [m for m in sys.modules if m == "sea_jax" or m.startswith("sea_jax.")]:
                del sys.modules[name]
    pkg = types.ModuleType("sea_jax")
    pkg.__path__ = [str(ROOT / "sea_jax")]
    sys.modules["sea_jax"] = pkg
    spec = importlib.util.spec_from_file_location(
        "sea_jax.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sea_jax.kernels"] = mod
    spec.loader.exec_module(mod)
    pkg.kernels = mod
    return mod


def timeit(fn, *args, reps=7, inner=3):
    """Median seconds per call (compile + one warm call excluded)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def fwd_bwd(f):
    """jit(q, k, v, ct, *rest) -> (dq, dk, dv): one forward with residuals + the backward."""

    def g(q, k, v, ct, *rest):
        _, vjp = jax.vjp(lambda q, k, v: f(q, k, v, *rest), q, k, v)
        return vjp(ct)

    return jax.jit(g)


def cudnn_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def env_info():
    info = dict(jax=jax.__version__, backend=jax.default_backend(), python=platform.python_version())
    try:
        info["device"] = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


class Recorder:
    """Accumulates results, prints progress, rewrites the JSON after every entry."""

    def __init__(self, path, meta):
        self.path = path
        self.data = dict(meta=meta, entries=[])

    def add(self, **entry):
        self.data["entries"].append(entry)
        print(json.dumps(entry), flush=True)
        if self.path:
            pathlib.Path(self.path).write_text(json.dumps(self.data, indent=1))

    def guard(self, section, name, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one failure must not end the run
            self.add(section=section, name=name, error=f"{type(e).__name__}: {str(e)[:800]}",
                     trace=traceback.format_exc()[-1500:], seconds=time.perf_counter() - t)
            return None


# ------------------------------------------------------------------------ layouts
def random_causal_mask(rng, G, nq, density):
    """bool [1, G, nq, nq]: diagonal + random earlier blocks, max(1, round(d (i+1))) per row."""
    m = np.zeros((1, G, nq, nq), bool)
    for g in range(G):
        for i in range(nq):
            n = max(1, int(round(density * (i + 1))))
            m[0, g, i, i] = True
            if n > 1:
                m[0, g, i, rng.choice(i, size=n - 1, replace=False)] = True
    return m


def kept_pairs(mask, block):
    """Visible causal (query, key) pairs of a block mask [1, G, nq, nk] (summed over G)."""
    nq = mask.shape[2]
    diag = np.eye(nq, dtype=bool)[None, None]
    full = np.tril(np.ones((nq, nq), bool), -1)[None, None]
    return int((mask & full).sum()) * block * block + int((mask & diag).sum()) * block * (block + 1) // 2


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="check,tune,bench")
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--densities", default="1.0,0.25,0.125,0.0625")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--budget_s", type=float, default=420.0, help="skip remaining tuning after this")
    ap.add_argument("--options", default=None, help="JSON kernel_options for the bench section")
    ap.add_argument("--forwards", default="auto",
                    help="comma list of forward kernels for the check and bench sections: auto, triton, mosaic")
    ap.add_argument("--fwd_grid", default=None,
                    help="JSON list of forward kernel_options to tune instead of the built-in grid; "
                         "with it the backward grid is skipped and --options gives the backward knobs")
    args = ap.parse_args()
    K = import_kernels()
    from sea_jax.kernels import BlockLayout, block_sparse_attention

    t_start = time.perf_counter()
    rec = Recorder(args.out, dict(env=env_info(), args=vars(args), kind="block_sparse"))
    interpret = args.smoke
    B, H, D, blk = 1, 16, 128, 128
    if args.smoke:
        H, D, blk = 2, 32, 16
    rng = np.random.default_rng(0)
    sections = args.sections.split(",")

    def bs(opts=None, **kw):
        return lambda q, k, v, lay: block_sparse_attention(
            q, k, v, lay, impl="pallas_gpu", interpret=interpret, kernel_options=opts, **kw)

    # ---------------------------------------------------------------- correctness
    if "check" in sections:
        S_chk = 200 if args.smoke else 3000
        Hc, Kc = (4, 2) if args.smoke else (16, 4)
        cases = [(jnp.bfloat16, D, "gate", None, None), (jnp.bfloat16, D, "gate", 900, {"always_mask": True}),
                 (jnp.float16, 64, None, 700, {"forward": "triton"}), (jnp.float32, D, "log", None, None)]
        if "mosaic" in args.forwards.split(","):  # the Mosaic GPU forward (no weights), Triton backward
            cases += [(jnp.bfloat16, D, None, None, {"forward": "mosaic"}),
                      (jnp.float16, 64, None, 700, {"forward": "mosaic"}),
                      (jnp.bfloat16, D, None, 900, {"forward": "mosaic", "mosaic_block_kv": 64, "mosaic_stages": 3})]
        for dtype, d, wmode, window, copts in cases:
            name = f"S{S_chk}_H{Hc}_K{Kc}_D{d}_{jnp.dtype(dtype).name}_{wmode}_w{window}_{copts}"

            def run_check(dtype=dtype, d=d, wmode=wmode, window=window, name=name, copts=copts):
                ks = jax.random.split(jax.random.PRNGKey(1), 5)
                q = jax.random.normal(ks[0], (B, S_chk, Hc, d), jnp.float32).astype(dtype)
                k = jax.random.normal(ks[1], (B, S_chk, Kc, d), jnp.float32).astype(dtype)
                v = jax.random.normal(ks[2], (B, S_chk, Kc, d), jnp.float32).astype(dtype)
                ct = jax.random.normal(ks[3], (B, S_chk, Hc, d), jnp.float32).astype(dtype)
                w = jax.random.uniform(ks[4], (B, S_chk, Kc), jnp.float32) if wmode else None
                nq = -(-S_chk // blk)
                mask = random_causal_mask(rng, Kc, nq, 0.3)
                mask[0, 0, 2] = False  # an empty row
                lay = BlockLayout.from_mask(mask, blk, blk)
                kw = dict(key_weights=w, weight_mode=wmode or "gate", window=window)
                up = lambda x: x.astype(jnp.float32)

                def f(impl, q, k, v, w):
                    return block_sparse_attention(q, k, v, lay, impl=impl, interpret=interpret,
                                                  kernel_options=copts if impl == "pallas_gpu" else None,
                                                  **{**kw, "key_weights": w})

                out = jax.jit(lambda *a: f("pallas_gpu", *a))(q, k, v, w)
                ref = jax.jit(lambda *a: f("xla", *a))(up(q), up(k), up(v), w)
                if w is None:  # no weights: differentiate q, k, v only (a weights input would change the path)
                    g = jax.jit(lambda *a: jax.vjp(lambda *b: f("pallas_gpu", *b, None), *a)[1](ct))(q, k, v)
                    gr = jax.jit(lambda *a: jax.vjp(lambda *b: f("xla", *b, None), *a)[1](up(ct)))(up(q), up(k), up(v))
                else:
                    g = jax.jit(lambda *a: jax.vjp(lambda *b: f("pallas_gpu", *b), *a)[1](ct))(q, k, v, w)
                    gr = jax.jit(lambda *a: jax.vjp(lambda *b: f("xla", *b), *a)[1](up(ct)))(up(q), up(k), up(v), w)
                finite = bool(np.isfinite(np.asarray(out, np.float32)).all()) and all(
                    bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in g)
                errs = dict(out=rel(out, ref), dq=rel(g[0], gr[0]), dk=rel(g[1], gr[1]), dv=rel(g[2], gr[2]))
                if w is not None:
                    errs["dw"] = rel(g[3], gr[3])
                tol = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3, jnp.float32: 5e-3}[dtype]
                rec.add(section="check", name=name, options=copts, finite=finite, rel_err=errs, tol=tol,
                        passed=finite and max(errs.values()) < tol)

            rec.guard("check", name, run_check)

    # ---------------------------------------------------------------------- tuning
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.smoke:
        seqs = [256]
    dens = [float(x) for x in args.densities.split(",")]

    def inputs(S, seed=0):
        ks = jax.random.split(jax.random.PRNGKey(seed), 4)
        mk = lambda kk, h: jax.random.normal(kk, (B, S, h, D), jnp.float32).astype(jnp.bfloat16)
        return mk(ks[0], H), mk(ks[1], H), mk(ks[2], H), mk(ks[3], H)

    best = dict(json.loads(args.options)) if args.options else {}
    if "tune" in sections:
        S = seqs[-1]
        q, k, v, ct = inputs(S)
        mask = random_causal_mask(rng, H, S // blk, 0.125)
        lay = BlockLayout.from_mask(mask, blk, blk)
        flops = 4 * D * kept_pairs(mask, blk)
        # most promising first: the loop stops at --budget_s
        fwd_grid = [dict(fwd_tiles=t, num_warps=(8, 4, 4), num_stages=(st, 2, 2), always_mask=am)
                    for st in [3, 2] for t in [(128, 64), (128, 128)] for am in [False, True]]
        fwd_grid += [dict(fwd_tiles=(64, 128), num_warps=(4, 4, 4), num_stages=(3, 2, 2), always_mask=False),
                     dict(fwd_tiles=(128, 64), num_warps=(8, 4, 4), num_stages=(4, 2, 2), always_mask=False)]
        if args.fwd_grid:
            fwd_grid = [{**best, **o} for o in json.loads(args.fwd_grid)]
        if args.smoke:
            fwd_grid = [dict(fwd_tiles=(16, 16), num_warps=(4, 4, 4), num_stages=(2, 2, 2), always_mask=False)]
        results = []
        for opts in fwd_grid:
            if time.perf_counter() - t_start > args.budget_s:
                break

            def one(opts=opts):
                t = timeit(jax.jit(bs(opts)), q, k, v, lay, reps=args.reps, inner=args.inner)
                rec.add(section="tune_fwd", S=S, density=0.125, options=opts, ms=t * 1e3,
                        tflops=flops / t / 1e12)
                results.append((t, opts))

            rec.guard("tune_fwd", str(opts), one)
        if results:
            fbest = min(results, key=lambda r: r[0])[1]
            best.update(fwd_tiles=fbest["fwd_tiles"], always_mask=fbest["always_mask"])
            fw, fs = fbest["num_warps"][0], fbest["num_stages"][0]
        else:
            fw, fs = 8, 3
        if args.fwd_grid:  # backward knobs from --options; only the forward's slot changes
            warps = list(best.get("num_warps", (fw, 4, 4)))
            stages = list(best.get("num_stages", (fs, 2, 2)))
            warps[0], stages[0] = fw, fs
            best["num_warps"], best["num_stages"] = tuple(warps), tuple(stages)
        bwd_grid = []
        for t, w, st in [] if args.fwd_grid else [((64, 64), 4, 2), ((128, 64), 8, 2), ((64, 128), 8, 2), ((64, 64), 4, 3)]:
            for part, key, slot in [("dq", "dq_tiles", 1), ("dkv", "dkv_tiles", 2)]:
                warps, stages = [fw, 4, 4], [fs, 2, 2]
                warps[slot], stages[slot] = w, st
                bwd_grid.append((part, {key: t, "num_warps": tuple(warps), "num_stages": tuple(stages)}))
        if args.smoke:
            bwd_grid = [("dq", dict(dq_tiles=(16, 16), num_warps=(4, 4, 4), num_stages=(2, 2, 2)))]
        bres = {"dq": [], "dkv": []}
        for part, opts in bwd_grid:
            if time.perf_counter() - t_start > args.budget_s:
                break
            o = {**best, **opts}

            def one(o=o, part=part):
                t = timeit(fwd_bwd(bs(o)), q, k, v, ct, lay, reps=args.reps, inner=args.inner)
                rec.add(section="tune_fwdbwd", part=part, S=S, density=0.125, options=o, ms=t * 1e3,
                        tflops=3.5 * flops / t / 1e12)
                bres[part].append((t, o))

            rec.guard("tune_fwdbwd", f"{part} {o}", one)
        warps, stages = list(best.get("num_warps", (fw, 4, 4))), list(best.get("num_stages", (fs, 2, 2)))
        warps[0], stages[0] = fw, fs
        if bres["dq"]:
            b = min(bres["dq"], key=lambda r: r[0])[1]
            best["dq_tiles"] = b["dq_tiles"]
            warps[1], stages[1] = b["num_warps"][1], b["num_stages"][1]
        if bres["dkv"]:
            b = min(bres["dkv"], key=lambda r: r[0])[1]
            best["dkv_tiles"] = b["dkv_tiles"]
            warps[2], stages[2] = b["num_warps"][2], b["num_stages"][2]
        best["num_warps"], best["num_stages"] = tuple(warps), tuple(stages)
        rec.add(section="tune_best", options=best)

    # ----------------------------------------------------------------------- bench
    if "bench" in sections:
        opts = best or None
        for S in seqs:
            q, k, v, ct = inputs(S, seed=S)
            causal_flops = 4 * D * H * S * (S + 1) // 2
            if not args.smoke:
                def base(S=S, q=q, k=k, v=v, ct=ct, causal_flops=causal_flops):
                    t = timeit(jax.jit(cudnn_causal), q, k, v, reps=args.reps, inner=args.inner)
                    tb = timeit(fwd_bwd(cudnn_causal), q, k, v, ct, reps=args.reps, inner=args.inner)
                    rec.add(section="bench", impl="cudnn_dense_causal", S=S, density=1.0, fwd_ms=t * 1e3,
                            fwdbwd_ms=tb * 1e3, fwd_tflops=causal_flops / t / 1e12,
                            fwdbwd_tflops=3.5 * causal_flops / tb / 1e12)

                rec.guard("bench", f"cudnn S={S}", base)
            for d in dens:
                mask = random_causal_mask(rng, H, S // blk, d)  # one layout for every forward kernel
                for fwd in args.forwards.split(","):
                    o = {**(opts or {}), "forward": fwd}

                    def one(S=S, d=d, q=q, k=k, v=v, ct=ct, mask=mask, o=o, fwd=fwd):
                        lay = BlockLayout.from_mask(mask, blk, blk)
                        flops = 4 * D * kept_pairs(mask, blk)
                        t = timeit(jax.jit(bs(o)), q, k, v, lay, reps=args.reps, inner=args.inner)
                        tb = timeit(fwd_bwd(bs(o)), q, k, v, ct, lay, reps=args.reps, inner=args.inner)
                        rec.add(section="bench", impl="pallas_gpu" if fwd == "auto" else f"pallas_gpu[{fwd}]",
                                S=S, density=d,
                                kept_fraction=float(mask.sum() / (H * (S // blk) * (S // blk + 1) / 2)),
                                fwd_ms=t * 1e3, fwdbwd_ms=tb * 1e3, fwd_tflops=flops / t / 1e12,
                                fwdbwd_tflops=3.5 * flops / tb / 1e12, options=o)

                    rec.guard("bench", f"S={S} d={d} {fwd}", one)
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    # final table
    print(f"{'impl':>20} {'S':>6} {'dens':>6} {'fwd ms':>8} {'fwd TF':>7} {'f+b ms':>8} {'f+b TF':>7}")
    for e in rec.data["entries"]:
        if e.get("section") == "bench" and "fwd_ms" in e:
            print(f"{e['impl']:>20} {e['S']:>6} {e['density']:>6} {e['fwd_ms']:8.3f} {e['fwd_tflops']:7.1f} "
                  f"{e['fwdbwd_ms']:8.3f} {e['fwdbwd_tflops']:7.1f}")
    for e in rec.data["entries"]:
        if "error" in e or (e.get("section") == "check" and not e.get("passed")):
            print("PROBLEM:", e.get("name"), e.get("error", e.get("rel_err")), flush=True)


if __name__ == "__main__":
    main()
