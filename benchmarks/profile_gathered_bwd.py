"""Where the gathered kernel's time goes: each Pallas call of forward and backward alone.

At the SparseK layer's configuration (B = 1, H = K = 16, D = 128, bf16, k = 1024, window = 512,
block_q = 64) on the fused schedule's factored selection (or ``--form dense``: the [B, K, T, U]
mask and weights), times the stages of :mod:`sea_jax.kernels.gpu_gathered` one by one:
forward, dQ (+ threshold gradient), window dK/dV, slot dK/dV (per-slot partial sums), the
key sort of the union and the sorted reduction; plus the whole custom-VJP forward+backward
and cuDNN dense causal in the same run. Median of ``--reps`` calls after a warm call.

    python benchmarks/profile_gathered_bwd.py --out benchmarks/results/gathered_stages.json   # GPU
    python benchmarks/profile_gathered_bwd.py --smoke                                         # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRows, env_info, kernel_options_json, time_ms  # noqa: E402

from sea_jax.kernels import gathered_attention  # noqa: E402
from sea_jax.kernels import gpu_gathered as gg  # noqa: E402
from sea_jax.ops.sparsek_select import causal_prefix_select  # noqa: E402


@contextlib.contextmanager
def spy_gathered():
    """Within the block, gathered_attention_gpu records the (cfg, padded arguments) of its
    custom-VJP function in the yielded dict (keys "cfg", "args") instead of running it."""
    seen = {}
    original = gg._attention

    def spy(cfg, *args):
        seen["cfg"], seen["args"] = cfg, args
        return jnp.zeros_like(args[0])

    gg._attention = spy
    try:
        yield seen
    finally:
        gg._attention = original


def capture(q, k, v, union, block_q, window, sel_kw, interpret):
    """(cfg, padded arguments of the custom-VJP function) of one gathered_attention_gpu call."""
    with spy_gathered() as seen:
        gathered_attention(q, k, v, union, block_q=block_q, window=window, impl="pallas_gpu",
                           interpret=interpret, **sel_kw)
    return seen["cfg"], seen["args"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--form", default="factored", choices=("factored", "dense"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret mode)")
    ap.add_argument("--options", default="{}", help="JSON kernel_options of the gathered kernel, e.g. "
                    "'{\"num_warps\": [4, 4, 4, 4, 4]}'; several separated by ';' are timed in turn (fwd+bwd only)")
    args = ap.parse_args()
    if args.smoke:
        S, H, D, k, w, bq, dtype, interpret = 256, 2, 16, 8, 8, 16, jnp.float32, True
    else:
        S, H, D, k, w, bq, dtype, interpret = args.seq, 16, 128, 1024, 512, 64, jnp.bfloat16, False
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    u = jax.random.normal(ks[0], (1, S, H), jnp.float32)
    q, kk, v, do = (jax.random.normal(x, (1, S, H, D), jnp.float32).astype(dtype) for x in ks[1:5])
    factored = args.form == "factored"
    sel = jax.jit(lambda u: causal_prefix_select(u, k, window=w, extra=k, block_q=bq, schedule="fused",
                                                 union_multiple=64, factored=factored, interpret=interpret))(u)
    if factored:
        sel_kw = dict(selection=sel.slots)
    else:
        sel_kw = dict(selection_mask=sel.mask, selection_weights=sel.weight.astype(jnp.float32))
    cfg, vjp_args = capture(q, kk, v, sel.union_index, bq, w, sel_kw, interpret)
    qp, kp, vp, wsel, selm, seg, union, slot_tiles = vjp_args
    shapes = gg._shapes(qp, kp, union)
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(
        S=S, H=H, K=H, D=D, k=k, window=w, block_q=bq, U=int(union.shape[-1]), dtype=jnp.dtype(dtype).name)))

    def stage(name, fn, *a):
        fn = jax.jit(fn)
        rec.guarded(dict(stage=name), lambda row: row.update(ms=time_ms(fn, a, args.reps)))

    def arrays(do=None, lse=None, delta=None, c=cfg):
        a = gg._arrays(c, qp, kp, vp, selm, wsel, seg, union, slot_tiles)
        if do is not None:
            a.update(do=do, lse=lse, delta=delta)
        return a

    o, lse = jax.jit(lambda: gg._forward(cfg, arrays(), shapes))()
    dop = gg._pad_to(gg._pad_to(do, 1, shapes[1]), 3, shapes[3])
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), dop.astype(jnp.float32))
    # the per-slot backward's stages (the key-major path: bench_key_dkv.py)
    bcfg = cfg.__class__(**{**cfg.__dict__, "gather": cfg.bwd_gather, "key_major": False})
    full = arrays(dop, lse, delta, bcfg)
    # every array goes in as an argument (closed over, XLA would constant-fold e.g. the key sort)
    stage("forward", lambda a: gg._forward(cfg, a, shapes), arrays())
    stage("dq" + ("+dthreshold" if factored else ""), lambda a: gg._dq(bcfg, a, shapes), full)
    if bcfg.window is not None:
        stage("window_dkv", lambda a: gg._dkv_window(bcfg, a, shapes), full)
    zeros = jnp.zeros(kp.shape, jnp.float32)
    stage("slot_dkv+sorted_reduce", lambda a, z: gg._dkv_slots(bcfg, a, shapes, z, z), full, zeros)
    B, _, _, Dp, _, K, U_pad = shapes
    part = jnp.ones((B, K, union.shape[2], U_pad, Dp), jnp.dtype(bcfg.partial_dtype))
    stage("sorted_reduce (incl. key sort)",
          lambda un, p, z: gg._reduce_sorted(bcfg, un, p, p, z, z, kp.dtype), union, part, zeros)
    stage("union_key_sort", lambda un: gg._sorted_slots(un, shapes[4], bcfg.tk, bcfg.reduce_chunk), union)

    def whole(q, kk, v, ct, idx, sel_kw, opts=None):
        f = lambda q, kk, v: gathered_attention(q, kk, v, idx, block_q=bq, window=w,  # noqa: E731
                                                impl="pallas_gpu", interpret=interpret, kernel_options=opts,
                                                **sel_kw)
        out, vjp = jax.vjp(f, q, kk, v)
        return out, vjp(ct)

    stage("gathered fwd+bwd", whole, q, kk, v, do, sel.union_index, sel_kw)
    for text in [t for t in args.options.split(";") if t.strip() not in ("", "{}")]:
        opts = kernel_options_json(text)
        stage(f"gathered fwd+bwd {text}", lambda *a, opts=opts: whole(*a, opts=opts),
              q, kk, v, do, sel.union_index, sel_kw)
    if not args.smoke:
        stage("cudnn dense causal fwd+bwd", lambda q, kk, v, ct: jax.vjp(
            lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn"),
            q, kk, v)[1](ct), q, kk, v, do)
    print(f"\n| stage ({args.form}, S = {S}) | ms |\n|---|---|")
    for r in rec.data["rows"]:
        print(f"| {r['stage']} | {r['ms']:.3f} |" if "ms" in r else f"| {r['stage']} | error: {r.get('error', '')[:80]} |")


if __name__ == "__main__":
    main()
