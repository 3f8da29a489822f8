"""The selected keys' dK/dV of the SparseK layer: key-major kernel vs per-slot kernel + reduction.

Captures the gathered kernel's arguments inside the real layer (``SparseKAttention``, k = 1024,
window = 512, the benchmark's inputs of bench_layers.py: B = 1, H = 16, D = 128, bf16), then
times, each alone (median of ``--reps`` after a warm call):

* ``slots``: the per-slot dK/dV kernel + the union's key sort + the sorted reduction (the path
  for selections without key intervals);
* ``keys`` with each ``--variants`` entry: the key-major kernel (``_dkv_keys``: key tiles by
  ``_key_tiles`` included; its float32 rows of the selected keys, which the window kernel
  adds, and the key scores' gradient), with its visited work: ``hull / pairs`` = (key, query) pairs the
  tiles visit over the selected pairs (the per-block unions' ratio ``union / pairs`` for the
  slot kernel);
* cuDNN dense causal forward+backward of the same q, k, v (the baseline, same process).

    python benchmarks/bench_key_dkv.py --seq 32768 --out benchmarks/results/key_dkv.json   # GPU
    python benchmarks/bench_key_dkv.py --smoke                                             # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRows, env_info, time_ms  # noqa: E402
from profile_gathered_bwd import spy_gathered  # noqa: E402

from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sparsek import SparseKAttention, SparseKOptions  # noqa: E402
from sea_jax.kernels import gpu_gathered as gg  # noqa: E402

DEFAULT_VARIANTS = ('{};{"key_group": 4};{"key_group": 16};{"key_tiles": [32, 64]};{"key_tiles": [64, 128]};'
                    '{"key_tiles": [128, 64]};{"num_warps": [4, 4, 4, 8, 4, 8]};{"num_stages": [3, 3, 3, 3, 3, 2]}')


def layer_and_inputs(seq, kv_heads, smoke):
    """(opts, SparseKAttention module, (q, k, v, x, do)): bench_layers.py's layer (k = 1024,
    w = 512, H = 16, D = 128, bf16) and inputs at ``seq``; ``smoke``: a tiny interpret-mode one."""
    if smoke:
        S, H, K, D, dtype = 256, 2, 2, 16, jnp.float32
        opts = SparseKOptions(k=16, window=8, block_q=16, impl="pallas_gpu", interpret=True, schedule="fast")
    else:
        S, H, K, D, dtype = seq, 16, kv_heads, 128, jnp.bfloat16
        opts = SparseKOptions(k=1024, window=512)
    module = SparseKAttention(AttentionDims(H, K, D, H * D), opts, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.PRNGKey(S), 5)  # bench_layers.py's inputs
    q = jax.random.normal(ks[0], (1, S, H, D), jnp.float32).astype(dtype)
    k, v = (jax.random.normal(kk, (1, S, K, D), jnp.float32).astype(dtype) for kk in ks[1:3])
    x = jax.random.normal(ks[3], (1, S, H * D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[4], (1, S, H, D), jnp.float32).astype(dtype)
    return opts, module, (q, k, v, x, do)


def capture_layer_call(module, q, k, v, x):
    """(cfg, padded custom-VJP arguments) of the gathered kernel call inside the layer."""
    with spy_gathered() as seen:
        jax.block_until_ready(module(q, k, v, x=x).out)
    return seen["cfg"], seen["args"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--kv_heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="';'-separated JSON objects of key-major options: key_tiles, key_group, and "
                         "num_warps / num_stages (6 entries; the last is the key-major kernel's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret mode)")
    args = ap.parse_args()
    opts, module, (q, k, v, x, do) = layer_and_inputs(args.seq, args.kv_heads, args.smoke)
    (_, S, H, D), K, dtype = q.shape, k.shape[2], q.dtype

    cfg, (qp, kp, vp, wsel, sel, seg, union, slot_tiles) = capture_layer_call(module, q, k, v, x)
    if not cfg.key_major:
        raise SystemExit("the layer's selection has no key intervals: nothing to compare")
    shapes = gg._shapes(qp, kp, union)
    B, Sq_pad, _, Dp, Skv_pad, _, U_pad = shapes
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(
        S=S, H=H, K=K, D=D, k=opts.k, window=opts.window, block_q=cfg.block_q, U=U_pad,
        dtype=jnp.dtype(dtype).name)))

    arrays = gg._arrays(cfg, qp, kp, vp, sel, wsel, seg, union, slot_tiles)
    o, lse = jax.jit(lambda a: gg._forward(cfg, a, shapes))(arrays)
    dop = gg._pad_to(gg._pad_to(do, 1, Sq_pad), 3, Dp)
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), dop.astype(jnp.float32))
    arrays.update(do=dop, lse=lse, delta=delta)
    zeros = jnp.zeros(kp.shape, jnp.float32)

    # selected (key, query) pairs per KV head and batch row (the key intervals), and the per-block unions
    kend = arrays["kend"]
    start = jnp.arange(Skv_pad, dtype=jnp.int32) + cfg.w
    pairs = float(jnp.sum(jnp.maximum(kend - start, 0)))
    union_work = float(jnp.sum(slot_tiles) * cfg.tu * cfg.block_q)
    summary = []

    def stage(name, fn, *a, extra=dict):
        fn = jax.jit(fn)

        def body(row):
            row.update(extra())  # (inside the guard: a variant that does not fit is an error row)
            row["ms"] = time_ms(fn, a, args.reps)

        row = rec.guarded(dict(stage=name), body)
        if "ms" in row:
            summary.append(row)

    # (timing only: the captured keys have no spare padding row when the tiles divide them, so
    # the per-slot kernel's empty slots land on the last key's row)
    slots_cfg = dataclasses.replace(cfg, key_major=False)
    stage("slots: slot kernel + key sort + sorted reduction",
          lambda a, z: gg._dkv_slots(slots_cfg, a, shapes, z, z), arrays, zeros,
          extra=lambda: dict(visited_over_pairs=round(union_work / pairs, 3)))
    for text in [t for t in args.variants.split(";") if t.strip()]:
        o_ = json.loads(text)
        c = cfg
        if "key_tiles" in o_:
            c = dataclasses.replace(c, key_tk=o_["key_tiles"][0], key_tq=o_["key_tiles"][1])
        if "key_group" in o_:
            c = dataclasses.replace(c, key_group=o_["key_group"])
        if "num_warps" in o_:
            c = dataclasses.replace(c, warps=tuple(o_["num_warps"]))
        if "num_stages" in o_:
            c = dataclasses.replace(c, stages=tuple(o_["num_stages"]))
        def tile_stats(c=c):
            # the arrays were padded for the layer's own tiles: other tiles must fit them
            if Skv_pad % c.key_tk or cfg.block_q % c.key_tq:
                raise ValueError(f"key_tiles ({c.key_tk}, {c.key_tq}) must divide the padded keys {Skv_pad} "
                                 f"and block_q {cfg.block_q}")
            _, _, count = jax.jit(lambda e: gg._key_tiles(c, e))(kend)
            hull = float(jnp.sum(count) * c.key_tq * c.key_tk)
            return dict(visited_over_pairs=round(hull / pairs, 3), longest_tile_query_tiles=int(jnp.max(count)))

        stage(f"keys {text}", lambda a, c=c: gg._dkv_keys(c, a, shapes), arrays, extra=tile_stats)
        stage(f"key tiles alone {text}", lambda e, c=c: gg._key_tiles(c, e), kend)
    if not args.smoke:
        stage("cudnn dense causal fwd+bwd", lambda q, k, v, ct: jax.vjp(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            q, k, v)[1](ct), q, jnp.repeat(k, H // K, 2), jnp.repeat(v, H // K, 2), do)
    print(f"\nselected (key, query) pairs per KV head: {pairs / (B * K):.4g}; S = {S}, K = {K}")
    print("| stage | ms | visited / selected pairs |\n|---|---|---|")
    for r in summary:
        print(f"| {r['stage']} | {r['ms']:.3f} | {r.get('visited_over_pairs', '')} |")


if __name__ == "__main__":
    main()
