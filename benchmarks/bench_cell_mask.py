"""Block-sparse attention with and without a CellMask (SEA's token selection), cuDNN dense causal
in the same process.

A synthetic SEA-like layout: every query block visits its diagonal block and up to ``--blocks``
random earlier key blocks per head; the cell mask selects ``--density`` of t_m = 256 cells per
row (causal prefixes). Variants: ``none`` (the layout alone, block granularity), ``cells`` (the
cell mask), ``cells_nofloat`` (the cell mask without the float32 cell path:
``sea_jax.kernels.cell_mask.FLOAT_PATH = False``), ``cells_w8`` (8 warps in the forward and dQ
kernels), ``cells_dkv_w8`` (8 warps in the dK/dV kernel). Prints a table, writes JSON:

    python3 benchmarks/bench_cell_mask.py --seq 32768 --out benchmarks/results/cell_mask_32k.json
    python3 benchmarks/bench_cell_mask.py --smoke --out /tmp/c.json   # tiny CPU run (interpret mode)
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

import sea_jax.kernels.cell_mask as cell_mask_module  # noqa: E402
from sea_jax.kernels import BlockLayout, CellMask, block_sparse_attention  # noqa: E402

VARIANTS = ("none", "cells", "cells_nofloat", "cells_w8", "cells_dkv_w8")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--blocks", type=int, default=12, help="random earlier key blocks per query block and head")
    ap.add_argument("--density", type=float, default=0.05, help="fraction of selected cells")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cell_mask.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run, kernels in interpret mode")
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown {v!r}; allowed: {VARIANTS}")
    H, D, M, block, dtype = (2, 16, 16, 16, jnp.float32) if args.smoke else (16, 128, 256, 64, jnp.bfloat16)
    S = 96 if args.smoke else args.seq
    nq = -(-S // block)
    rng = np.random.default_rng(0)
    mask = np.zeros((1, H, nq, nq), bool)
    for i in range(nq):
        mask[0, :, i, i] = True
        for h in range(H):
            mask[0, h, i, rng.choice(i, min(i, args.blocks), replace=False)] = True
    layout = BlockLayout.from_mask(mask, block, block, max_kv_blocks=args.blocks + 1, max_q_blocks=nq)
    cells = CellMask(jnp.asarray(rng.random((1, S, H, M)) < args.density), jnp.zeros((1, S), jnp.int32),
                     jnp.arange(1, S + 1, dtype=jnp.int32)[None])
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, S, H, D), dtype) for key in (kq, kk, kv))
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(B=1, H=H, D=D, t_m=M, block=block)))

    def functions(cm, opts):
        kw = dict(cell_mask=cm, impl="pallas_gpu", interpret=args.smoke, kernel_options=opts)
        fwd = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout, **kw))
        loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, layout, **kw).astype(jnp.float32))  # noqa: E731
        return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    print("| variant | fwd ms | fwd+bwd ms | fwd+bwd / cuDNN |")
    print("|---|---|---|---|")
    base = None
    if not args.smoke:
        dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
        dloss = lambda q, k, v: jnp.sum(dense(q, k, v).astype(jnp.float32))  # noqa: E731
        tf, tb = time_ms(jax.jit(dense), (q, k, v), args.reps), time_ms(jax.jit(jax.grad(dloss, (0, 1, 2))), (q, k, v), args.reps)
        base = tb
        rec.add(dict(variant="cudnn_dense_causal", S=S, fwd_ms=tf, fwd_bwd_ms=tb))
        print(f"| cuDNN dense causal | {tf:.2f} | {tb:.2f} | 1.000 |", flush=True)
    for name in variants:
        cell_mask_module.FLOAT_PATH = name != "cells_nofloat"
        opts = {"cells_w8": {"num_warps": (8, 8, 4)}, "cells_dkv_w8": {"num_warps": (4, 4, 8)}}.get(name, {})
        fwd, fwd_bwd = functions(None if name == "none" else cells, opts)
        tf, tb = time_ms(fwd, (q, k, v), args.reps), time_ms(fwd_bwd, (q, k, v), args.reps)
        rec.add(dict(variant=name, S=S, fwd_ms=tf, fwd_bwd_ms=tb))
        ratio = f"{tb / base:.3f}" if base else "-"
        print(f"| {name} | {tf:.2f} | {tb:.2f} | {ratio} |", flush=True)
    cell_mask_module.FLOAT_PATH = True


if __name__ == "__main__":
    main()
