"""Stage timings of the fast SparseK selection (schedule="fast") at the layer's configuration.

Each row times a prefix of the per-block work (lax.map over the same block batches as the
selection), so differences between rows are the cost of a stage:

* ``carries``: global ranks + bitonic prefix merge;
* ``list``: + each block's sorted list and its gathers (slots, runs, scores);
* ``structure``: + per-query run ranges, hidden entering keys, k-th / C-th positions;
* ``solve``: + the SparseK threshold (``--solver bracket``: the reference solver over
  generated rows; ``sorted``: the iteration on statistics read off the sorted list);
* ``forward``: the whole selection; ``fwd_bwd``: with the gradient of sum(weight * ct) + sum(tau).

    python benchmarks/profile_sparsek_select.py --seqs 32768 --out benchmarks/results/sparsek_select_stages.json
    python benchmarks/profile_sparsek_select.py --seqs 32768 --solver sorted --out /tmp/stages_sorted.json
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRows, env_info, time_ms  # noqa: E402

from sea_jax.ops import sparsek_select_fast as fast  # noqa: E402
from sea_jax.ops.sparsek_select import causal_prefix_select, default_block_batch  # noqa: E402


def staged(u, k, w, bq, stage, block_batch, solver):
    B, S, K = u.shape
    c = 2 * k
    score = jnp.moveaxis(u, 1, 2)
    run = jnp.zeros(score.shape, jnp.int32)
    nq = -(-S // bq)
    qpos = jnp.arange(nq * bq, dtype=jnp.int32)
    enter = jnp.where((qpos - w >= 0) & (qpos < S), qpos - w, -1)
    order, rank = fast.global_ranks(score, run)
    er = jnp.where(enter >= 0, jnp.take_along_axis(rank, jnp.clip(enter, 0, None)[None, None].repeat(K, 1), -1), fast.EMPTY)
    er = jnp.moveaxis(er.reshape(B, K, nq, bq), 2, 0)
    carry, ev = fast.prefix_ranks(er, c)
    if stage == "carries":
        return carry[..., :8], ev
    qrun = jnp.zeros((nq, B, bq), jnp.int32)

    def one(args):
        carry_q, ev_q, ent_q, qpos_q, qrun_q = args
        lst = jnp.sort(jnp.concatenate([carry_q, ent_q], -1), axis=-1)
        M = lst.shape[-1]
        has = lst != fast.EMPTY
        slot = jnp.where(has, fast._take(order, lst), -1)
        lrun = jnp.where(has, fast._take(run, slot), -1)
        z = jnp.where(has, fast._take(score, slot), 0)
        if stage == "list":
            return jnp.sum(z, -1) + jnp.sum(lrun, -1)
        base = qpos_q[0] - w
        tin = jnp.where(has & (slot >= base), slot - base, -1)
        qr = qrun_q[:, None, :]
        s = jnp.sum(lrun[..., None, :] > qr[..., None], axis=-1, dtype=jnp.int32)
        e = jnp.sum(lrun[..., None, :] >= qr[..., None], axis=-1, dtype=jnp.int32)
        spos = jnp.where(ent_q != fast.EMPTY, jnp.sum(lst[..., None, :] < ent_q[..., None], axis=-1, dtype=jnp.int32), M)
        t = jnp.arange(bq, dtype=jnp.int32)
        inv = (t > t[:, None]) & (spos[..., None, :] >= s[..., None]) & (spos[..., None, :] < e[..., None])
        ahead = (spos[..., :, None] < spos[..., None, :]).astype(jnp.float32)
        before = jnp.einsum("...it,...tu->...iu", inv.astype(jnp.float32), ahead,
                            precision=lax.Precision.HIGHEST).astype(jnp.int32)
        vb = spos[..., None, :] - s[..., None] - before
        nvis = jnp.where(qr >= 0, e - s - jnp.sum(inv, axis=-1, dtype=jnp.int32), 0)
        kpos = fast._nth_visible(s, inv, vb, jnp.minimum(nvis, k))
        last = fast._nth_visible(s, inv, vb, jnp.minimum(nvis, c))
        theta = jnp.where(nvis > k, fast._take(z, kpos), 0)
        r = fast._Rows(s, e, tin, last, kpos, nvis, theta, inv, spos, vb)
        if stage == "structure":
            return (kpos + last).astype(jnp.float32) + theta
        return fast._solve(z, r, k, solver)

    bb = block_batch or default_block_batch(B, K, bq, c, budget_bytes=1 << 32)
    return lax.map(one, (carry, ev, er, qpos.reshape(nq, bq), qrun), batch_size=min(bb, nq))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="32768")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block_batch", type=int, default=None)
    ap.add_argument("--solver", default="bracket", help="bracket (schedule fast) or sorted (schedule fast_sorted)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    H, k, w, bq = (2, 8, 8, 16) if args.smoke else (16, 1024, 512, 64)
    seqs = [128] if args.smoke else [int(s) for s in args.seqs.split(",")]
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args), config=dict(B=1, K=H, k=k, window=w, block_q=bq, extra=k)))
    for S in seqs:
        u = jax.random.normal(jax.random.PRNGKey(S), (1, S, H), jnp.float32)
        for stage in ("carries", "list", "structure", "solve"):
            f = jax.jit(lambda u, stage=stage: staged(u, k, w, bq, stage, args.block_batch, args.solver))
            rec.guarded(dict(stage=stage, S=S), lambda row, f=f: row.update(ms=time_ms(f, (u,), args.reps)))
        schedule = "fast_sorted" if args.solver == "sorted" else "fast"
        sel = lambda u: causal_prefix_select(u, k, window=w, extra=k, block_q=bq, schedule=schedule,  # noqa: E731
                                             block_batch=args.block_batch)
        fwd = jax.jit(lambda u: (lambda s: (s.union_index, s.mask, s.weight, s.tau, s.overflow))(sel(u)))
        rec.guarded(dict(stage="forward", S=S), lambda row: row.update(ms=time_ms(fwd, (u,), args.reps)))
        ct = jax.random.normal(jax.random.PRNGKey(1), (1, H, S, k + bq - 1), jnp.float32)
        fb = jax.jit(jax.grad(lambda u, ct: (lambda s: jnp.sum(s.weight * ct) + jnp.sum(s.tau))(sel(u))))
        rec.guarded(dict(stage="fwd_bwd", S=S), lambda row: row.update(ms=time_ms(fb, (u, ct), args.reps)))
    print("\n| S | stage | ms |\n|---|---|---|")
    for r in rec.data["rows"]:
        print(f"| {r['S']} | {r['stage']} | {r.get('ms', float('nan')):.2f} | {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
