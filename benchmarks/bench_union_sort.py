"""The gathered backward's key sort of the union slots: ways to order nQ * U slots by key tile.

The sorted dK/dV reduction (kernels/gpu_gathered.py) needs, per (batch, KV head), the slots
grouped by key tile. At the SparseK layer's 32k configuration that is 16 rows of
512 * 1088 = 557,056 slots. Variants, each checked to give the same grouping:

* ``pair``: ``lax.sort((keys, pos), num_keys=1)`` (two operands);
* ``packed``: one uint32 operand ``tile << bits(N) | pos`` sorted alone (a radix sort for
  XLA), keys gathered back by ``pos`` afterwards; needs bits(tiles) + bits(N) <= 32.

    python benchmarks/bench_union_sort.py --out benchmarks/results/union_sort.json   # GPU
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

from sea_jax.kernels import gpu_gathered as gg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="32768,131072")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    K, U, bq, tk, chunk = (2, 64, 16, 16, 16) if args.smoke else (16, 1088, 64, 64, 32)
    seqs = [512] if args.smoke else [int(s) for s in args.seqs.split(",")]
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(K=K, U=U, block_q=bq, tk=tk)))
    for S in seqs:
        nq = S // bq
        rng = np.random.default_rng(S)
        # realistic unions: each block's slots hold distinct keys below the block, -1 holes at the end
        union = np.full((1, K, nq, U), -1, np.int32)
        for i in range(1, nq):
            n = min(U, i * bq)
            union[0, :, i, :n] = np.sort(rng.choice(i * bq, size=n, replace=False))[None]
        union = jnp.asarray(union)
        Skv_pad = -(-(S + 1) // tk) * tk
        ref = jax.jit(lambda un: gg._sorted_slots(un, Skv_pad, tk, chunk, method="pair"))
        for variant in ("pair", "packed"):
            fn = jax.jit(lambda un, v=variant: gg._sorted_slots(un, Skv_pad, tk, chunk, method=v))

            def one(row, fn=fn):
                row["ms"] = time_ms(fn, (union,), args.reps)
                a, b = ref(union), fn(union)
                # same grouping: the same key tile at every position and the same tile starts
                # (the order inside a tile may differ), and every slot's key read back right
                row["same_tiles"] = bool(jnp.array_equal(a[0] // tk, b[0] // tk))
                row["same_starts"] = bool(jnp.array_equal(a[2], b[2]))
                flat = jnp.where(union >= 0, union, Skv_pad).reshape(1, K, -1)
                n = flat.shape[-1]
                row["keys_match_pos"] = bool(jnp.array_equal(jnp.take_along_axis(flat, b[1][..., :n], 2), b[0][..., :n]))

            rec.guarded(dict(S=S, variant=variant), one)
    print("\n| S | variant | ms | same tiles / starts / keys |\n|---|---|---|---|")
    for r in rec.data["rows"]:
        print(f"| {r['S']} | {r['variant']} | {r.get('ms', float('nan')):.3f} | {r.get('same_tiles')} / "
              f"{r.get('same_starts')} / {r.get('keys_match_pos')} {r.get('error', '')[:60]} |")


if __name__ == "__main__":
    main()
