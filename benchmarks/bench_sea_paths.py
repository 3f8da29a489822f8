"""The SEA layer with each form of its estimator's linear attention and of its top-k selection.

``SEAOptions(linear_schedule=...)`` picks the causal linear attention's schedule ("scan": a
sequential ``lax.scan`` over chunks; "parallel": all chunks at once through an associative scan
over chunk states), ``SEAOptions(select_impl=...)`` how the top-k cells are found ("xla": a
stable sort, ``lax.top_k`` past ``sort_rows``; "pallas": the radix-select kernel of
``sea_jax.kernels.gpu_top_budget``), ``granularity`` / ``impl`` the sparse attention ("block"
or "token" (exact); "auto" -> the Pallas block-sparse kernel on a GPU, with the selection's
cells as a CellMask for "token"; "xla" -> the module's blockwise XLA path). This script builds
the layer (k = 64, T_M = 256) for each ``--variants`` entry
``schedule/chunk/select[/granularity[/impl]]`` (default block / auto) in one process, with
cuDNN dense causal as the baseline, and prints / writes per S: compile seconds, the median time
of interleaved rounds, the compiled temporaries and each variant's largest output difference to
the first variant (on a GPU float32 matmuls run at TF32, so near-tied cells can flip between
forms; block and token granularity attend different keys):

    python3 benchmarks/bench_sea_paths.py --seqs 8192,32768 --out benchmarks/results/sea_paths.json
    python3 benchmarks/bench_sea_paths.py --variants scan/64/xla,parallel/64/xla,parallel/64/pallas  # schedules
    python3 benchmarks/bench_sea_paths.py --smoke --out /tmp/s.json   # tiny CPU run (interpret mode)
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
from bench_layers import dense_functions, sea_functions  # noqa: E402
from common import JsonRows, env_info, time_ms  # noqa: E402

from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sea import SEAOptions  # noqa: E402

DEFAULT_VARIANTS = "parallel/64/pallas/block,parallel/64/pallas/token,parallel/64/xla/token/xla"


def _variant(text):
    parts = text.split("/")
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError
        schedule, chunk, select, granularity, impl = parts + ["block", "auto"][len(parts) - 3:]
        return schedule, int(chunk), select, granularity, impl
    except ValueError:
        raise ValueError(f"--variants entries are schedule/chunk/select[/granularity[/impl]] "
                         f"(e.g. parallel/64/pallas/token), got {text!r}") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of schedule/chunk/select[/granularity[/impl]]: scan|parallel / int / "
                         "xla|pallas / block|token / auto|xla|pallas_gpu")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sea_paths.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, Pallas kernels in interpret mode")
    args = ap.parse_args()
    variants = [_variant(v) for v in args.variants.split(",")]
    if args.smoke:
        H, D, dtype, seqs = 2, 16, jnp.float32, [96]
        base = dict(k=4, t_m=16, block_q=16, block_k=16, kernel_interpret=True)
        args.reps, args.rounds = 1, 1
    else:
        H, D, dtype = 16, 128, jnp.bfloat16
        seqs = [int(s) for s in args.seqs.split(",")]
        base = dict(k=64, t_m=256)
    dims = AttentionDims(H, H, D, H * D)
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(B=1, H=H, D=D, **base)))
    names = ["/".join(map(str, v)) for v in variants]
    print("| S | cuDNN fwd / fwd+bwd ms | " + " | ".join(f"{n} fwd / fwd+bwd" for n in names)
          + " | compile fwd+bwd s | temp GiB fwd+bwd | out diff to the first |")
    print("|---" * (len(names) + 5) + "|")
    for S in seqs:
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (1, S, H, D), dtype)
        k, v = (jax.random.normal(key, (1, S, H, D), dtype) for key in (kk, kv))
        row = dict(S=S)
        paths, outs = {}, {}
        for name, (schedule, chunk, select, granularity, impl) in zip(names, variants):
            if args.smoke and impl == "auto":
                impl = "pallas_gpu"  # interpret mode on the CPU
            opts = SEAOptions(**base, chunk=chunk, linear_schedule=schedule, select_impl=select,
                              granularity=granularity, impl=impl)
            (params,), fwd, fwd_bwd = sea_functions(dims, opts)
            a = (params, q, k, v)
            t0 = time.perf_counter()
            cf = fwd.lower(*a).compile()
            cb = fwd_bwd.lower(*a).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            mem = cb.memory_analysis()
            row[f"{name}_temp_gib"] = mem.temp_size_in_bytes / 2**30 if mem is not None else None
            outs[name] = np.asarray(cf(*a), np.float32)
            paths[name] = (cf, cb, a)
        dense = {}
        if not args.smoke:
            _, dfwd, dfb = dense_functions("cudnn")
            dense = {"cudnn": (dfwd.lower(q, k, v).compile(), dfb.lower(q, k, v).compile(), (q, k, v))}
        times = {}
        for _ in range(args.rounds):
            for name, (cf, cb, a) in {**dense, **paths}.items():
                times.setdefault(f"{name}_fwd", []).append(time_ms(cf, a, args.reps))
                times.setdefault(f"{name}_fwd_bwd", []).append(time_ms(cb, a, args.reps))
        row.update({key: float(np.median(val)) for key, val in times.items()}, rounds=times)
        for name in names:
            row[f"{name}_out_diff"] = float(np.max(np.abs(outs[name] - outs[names[0]])))
        rec.add(row)
        c = lambda n: f"{row.get(n + '_fwd', float('nan')):.2f} / {row.get(n + '_fwd_bwd', float('nan')):.2f}"  # noqa: E731
        def per(key, fmt):
            vals = (row[f"{n}_{key}"] for n in names)
            return " / ".join(format(float("nan") if x is None else x, fmt) for x in vals)

        print(f"| {S} | {c('cudnn')} | " + " | ".join(c(n) for n in names)
              + f" | {per('compile_s', '.1f')} | {per('temp_gib', '.2f')} | {per('out_diff', '.1e')} |", flush=True)


if __name__ == "__main__":
    main()
