"""The SparseK layer's gathered forward, dQ and window dK/dV kernels alone, under config variants.

Captures the padded arguments of the gathered kernel call inside SparseKAttention (k = 1024,
w = 512, B = 1, H = K = 16, D = 128, bf16: bench_layers.py's layer and inputs) and times each
named kernel (``fwd``: forward, ``dq``: dQ + threshold gradient, ``win``: window dK/dV) with
the layer's own config and with each ``--variants`` entry (JSON of GatheredGpuConfig fields:
tq, tk, range_branch, warps, stages; warps / stages are the 6-tuples of the kernels in the order forward,
dQ, window dK/dV, slot dK/dV, sorted reduction, key-major dK/dV). Each variant's output is
compared with the layer config's (max |difference|). Median wall ms of ``--reps`` jitted calls.

    python benchmarks/sweep_layer_kernels.py --variants '{"stages": [4, 4, 4, 3, 3, 3]};{"tk": 128}'
    python benchmarks/sweep_layer_kernels.py --smoke      # CPU, interpret mode

The slot tile ``tu`` cannot be varied here: the captured union is padded to the layer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_key_dkv import capture_layer_call, layer_and_inputs  # noqa: E402
from common import JsonRows, env_info, time_ms  # noqa: E402

from sea_jax.kernels import gpu_gathered as gg  # noqa: E402

KERNELS = {
    "fwd": lambda c, a, shapes: gg._forward(c, a, shapes)[0],
    "dq": lambda c, a, shapes: gg._dq(c, a, shapes)[0],
    # on the key-major path the window kernel also adds the key-major kernel's rows (computed
    # once beforehand: "parts")
    "win": lambda c, a, shapes: gg._dkv_window(c, a, shapes, parts=a.get("parts"))[0],
}
FIELDS = ("tq", "tk", "range_branch", "warps", "stages")


def variant_config(cfg, text):
    """cfg with the JSON object ``text``'s fields replaced (clear errors for the others)."""
    fields = json.loads(text)
    bad = sorted(set(fields) - set(FIELDS))
    if bad:
        raise ValueError(f"--variants: unknown fields {bad}; allowed: {list(FIELDS)}")
    fields = {n: tuple(x) if isinstance(x, list) else x for n, x in fields.items()}
    for n in ("warps", "stages"):
        if n in fields and len(fields[n]) != 6:
            raise ValueError(f"--variants: {n} needs 6 entries, got {fields[n]}")
    return dataclasses.replace(cfg, **fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--kernels", default="fwd,dq,win", help=f"comma list of {sorted(KERNELS)}")
    ap.add_argument("--variants", default='{"stages": [4, 4, 4, 3, 3, 3]};{"stages": [2, 2, 2, 3, 3, 3]}',
                    help="';'-separated JSON objects of config fields (tq, tk, warps, stages)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret mode)")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; allowed: {sorted(KERNELS)}")
    if args.smoke:
        args.reps = 1
    _, module, (q, k, v, x, do) = layer_and_inputs(args.seq, 16, args.smoke)
    (_, S, H, D), K = q.shape, k.shape[2]
    cfg, (qp, kp, vp, wsel, sel, seg, union, slot_tiles) = capture_layer_call(module, q, k, v, x)
    shapes = gg._shapes(qp, kp, union)
    arrays = gg._arrays(cfg, qp, kp, vp, sel, wsel, seg, union, slot_tiles)
    o, lse = jax.jit(lambda a: gg._forward(cfg, a, shapes))(arrays)
    dop = gg._pad_to(gg._pad_to(do, 1, qp.shape[1]), 3, qp.shape[3])
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), dop.astype(jnp.float32))
    arrays.update(do=dop, lse=lse, delta=delta)
    if cfg.key_major:
        arrays["parts"] = jax.jit(lambda a: gg._dkv_keys(cfg, a, shapes)[:3])(arrays)
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(
        S=S, H=H, K=K, D=D, block_q=cfg.block_q, tq=cfg.tq, tk=cfg.tk, tu=cfg.tu,
        warps=cfg.warps, stages=cfg.stages)))
    variants = ["{}"] + [t for t in args.variants.split(";") if t.strip()]
    for name in kernels:
        ref = None
        for text in variants:
            def body(row, text=text, name=name):
                nonlocal ref
                c = variant_config(cfg, text)
                f = jax.jit(lambda a: KERNELS[name](c, a, shapes))
                out = f(arrays).astype(jnp.float32)
                if ref is None:
                    ref = out
                else:
                    row["max_diff_vs_layer_config"] = float(jnp.max(jnp.abs(out - ref)))
                row["ms"] = time_ms(f, (arrays,), args.reps)

            rec.guarded(dict(kernel=name, variant=text), body)
    print("\n| kernel | variant | ms | max diff vs the layer's config |\n|---|---|---|---|")
    for r in rec.data["rows"]:
        ms = f"{r['ms']:.3f}" if "ms" in r else "error: " + r.get("error", "")[:80]
        print(f"| {r['kernel']} | {r['variant']} | {ms} | {r.get('max_diff_vs_layer_config', '')} |")


if __name__ == "__main__":
    main()
