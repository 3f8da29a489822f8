"""Can a Hopper TMA gather keys 8 rows at a time without slowing the Mosaic GPU forward?

The SparseK layer's attention reads K/V rows by index. Hopper's TMA has no row gather, and a
Pallas Mosaic GPU copy into a wgmma operand tile must cover whole 8-row tiles
(benchmarks/README.md, ninth session), so the finest gather a Mosaic kernel can make is an
*octet* of 8 consecutive rows. This measures what octet copies cost: the block-sparse Mosaic
forward (``kernels/gpu_block_sparse_mosaic.py``) on one random causal layout, its keys read

* ``blocks``: one TMA copy per pipeline step (the kernel's default);
* ``octets, in place``: block_kv / 8 copies of 8 rows each from the same addresses;
* ``octets, scattered``: the same copies from a K/V copy whose octets are randomly permuted
  per KV head (``octets=`` maps each key octet to where it is stored): a real gather.

All three compute the same thing from the same keys, so their outputs must agree exactly
(checked). Timings in one process with cuDNN dense causal attention as the baseline; TFLOP/s
counted on the layout's visible pairs (4 D per pair).

    python benchmarks/bench_octet_tma.py --out benchmarks/results/octet_tma.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_block_sparse import cudnn_causal, env_info, import_kernels, kept_pairs, random_causal_mask, timeit  # noqa: E402


def random_octets(rng, B, S, K):
    """int32 [B, K, S // 8]: a random storage place for every key octet, per KV head."""
    return np.stack([np.stack([rng.permutation(S // 8) for _ in range(K)]) for _ in range(B)]).astype(np.int32)


def scatter_octets(x, where):
    """x [B, S, K, D] with key octet o of KV head h stored at rows [8 where[b, h, o], + 8)."""
    B, S, K, D = x.shape
    n = S // 8
    inverse = np.argsort(where, axis=-1).astype(np.int32)  # stored octet p holds key octet inverse[p]
    xo = x.reshape(B, n, 8, K, D)
    idx = jnp.asarray(inverse).transpose(0, 2, 1)[:, :, None, :, None]  # [B, n, 1, K, 1]
    moved = jnp.take_along_axis(xo, jnp.broadcast_to(idx, (B, n, 8, K, D)), axis=1)
    return moved.reshape(B, S, K, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--density", type=float, default=0.125)
    ap.add_argument("--block_kv", default="64,128", help="keys per pipeline step (comma list)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kernels = import_kernels()
    mosaic = importlib.import_module(kernels.__name__ + ".gpu_block_sparse_mosaic")
    H = K = 16
    D, block = 128, 128
    rows, checks = [], []
    for S in map(int, args.seqs.split(",")):
        rng = np.random.default_rng(S)
        keys = jax.random.split(jax.random.PRNGKey(S), 3)
        q = jax.random.normal(keys[0], (1, S, H, D), jnp.float32).astype(jnp.bfloat16)
        k, v = (jax.random.normal(kk, (1, S, K, D), jnp.float32).astype(jnp.bfloat16) for kk in keys[1:])
        mask = random_causal_mask(rng, K, S // block, args.density)
        layout = kernels.BlockLayout.from_mask(mask, block, block)
        kv_index, kv_count = layout.kv_index, layout.kv_count
        flops = 4 * D * kept_pairs(mask, block)
        where = random_octets(rng, 1, S, K)
        ks, vs, oct_scattered = scatter_octets(k, where), scatter_octets(v, where), jnp.asarray(where)
        oct_identity = jnp.broadcast_to(jnp.arange(S // 8, dtype=jnp.int32), (1, K, S // 8))
        t_dense = timeit(jax.jit(cudnn_causal), q, k, v, reps=args.reps, inner=args.inner)
        dense_flops = 4 * D * H * S * (S + 1) / 2
        rows.append(dict(S=S, variant="cudnn dense causal", block_kv=None, ms=t_dense * 1e3,
                         tflops=dense_flops / t_dense / 1e12))
        for bkv in map(int, args.block_kv.split(",")):
            kw = dict(seq_k=S, block_q=block, block_k=block, causal=True, window=None, scale=D ** -0.5,
                      block_kv=bkv, stages=2)

            def fwd(q, k, v, octets=None, kw=kw):
                return mosaic.block_sparse_forward_mosaic(q, k, v, kv_index, kv_count, octets=octets, **kw)

            f = jax.jit(fwd)
            variants = [("blocks", (q, k, v)), ("octets, in place", (q, k, v, oct_identity)),
                        ("octets, scattered", (q, ks, vs, oct_scattered))]
            ref = None
            for name, a in variants:
                o, lse = f(*a)
                if ref is None:
                    ref = (o, lse)
                else:
                    do = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref[0].astype(jnp.float32))))
                    dl = float(jnp.max(jnp.where(jnp.isfinite(ref[1]), jnp.abs(lse - ref[1]), 0.0)))
                    checks.append(dict(S=S, block_kv=bkv, variant=name, max_abs_out=do, max_abs_lse=dl))
                    print(f"check S={S} block_kv={bkv} {name}: max |out - blocks| {do:.3g}, |lse - blocks| {dl:.3g}")
                t = timeit(f, *a, reps=args.reps, inner=args.inner)
                rows.append(dict(S=S, variant=name, block_kv=bkv, ms=t * 1e3, tflops=flops / t / 1e12,
                                 vs_cudnn=t / t_dense))
    print(f"\n| S | variant | block_kv | fwd ms | TFLOP/s (visible pairs) | / cuDNN dense causal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['variant']} | {r['block_kv'] or ''} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r.get('vs_cudnn', 1.0):.3f} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(env=env_info(), args=vars(args), rows=rows,
                                                          checks=checks), indent=1))


if __name__ == "__main__":
    main()
