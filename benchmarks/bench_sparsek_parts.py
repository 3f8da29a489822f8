"""Where the SparseK layer's time goes: the causal prefix selection vs the gathered kernel.

At the layer's configuration (B = 1, H = K = 16, D = 128, bf16, k = 1024, window = 512,
block_q = 64, extra = k, method "bracket"), one process times:

* ``select``: ``sea_jax.ops.sparsek_select.causal_prefix_select`` on random scores u
  [B, S, K] (fwd: the union index, mask and weights; fwd+bwd: grad of sum(weight * ct)
  w.r.t. u), i.e. what SparseKAttention runs before its attention kernel; one row per
  ``--schedules`` entry (column ``schedule``: "fast" = global ranks, bitonic prefix merge,
  per-query rows generated on the fly; "parallel" = prefix merge + blocks in batches of
  ``--block_batch``, default auto; "scan" = one serial step per query block; ``name@N`` runs
  that schedule with N blocks per batched step). Every row after the first records whether
  its output equals the reference's (the scan's when it ran first, else the first schedule's:
  ``equal_to``, ``equal`` = union index, mask and overflow identical; ``max_weight_diff``,
  ``max_tau_diff``, ``max_grad_diff`` of the fwd+bwd gradient);
* ``prefix`` (``--prefix``): the carries alone, forward (fast: global ranks + bitonic prefix
  merge; parallel: the 3-key associative merge), for the breakdown;
* ``gathered_<gather>``: ``sea_jax.kernels.gathered_attention`` (Pallas Triton) on that
  selection (fwd and fwd+bwd w.r.t. q, k, v and the weights), gather "kernel" and "xla";
  ``gathered_factored``: the fused schedule's factored selection (SlotSelection: mask and
  weights generated in the kernel; fwd+bwd w.r.t. q, k, v and the slot scores).

Median of ``--reps`` calls after compile and one warm call.

    python benchmarks/bench_sparsek_parts.py --out benchmarks/results/sparsek_parts.json   # GPU
    python benchmarks/bench_sparsek_parts.py --smoke --out /tmp/p.json                     # CPU
    python benchmarks/bench_sparsek_parts.py --seqs 8192,32768 --schedules parallel,scan --gathers ""
    python benchmarks/bench_sparsek_parts.py --seqs 8192,32768 --schedules parallel,fast,fast@8,fast@24 \
        --prefix fast,parallel --gathers "" --deadline 235   # -> results/sparsek_parts_fast.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRows, compile_with_memory, env_info, time_ms  # noqa: E402

from sea_jax.kernels import SlotSelection, gathered_attention  # noqa: E402
from sea_jax.ops import sparsek_select_fast as fast  # noqa: E402
from sea_jax.ops.sparsek_select import KeyTable, causal_prefix_select, prefix_candidates  # noqa: E402


def prefix_fn(schedule, S, H, k, w, bq):
    """The carry computation of a schedule alone: u [1, S, H] -> carries (no gradient)."""
    nq = -(-S // bq)
    qpos = jnp.arange(nq * bq, dtype=jnp.int32)
    enter = jnp.where((qpos - w >= 0) & (qpos < S), qpos - w, -1).reshape(nq, 1, bq)

    def f(u):
        score = jnp.moveaxis(u, 1, 2)
        run = jnp.zeros(score.shape, jnp.int32)
        table = KeyTable(score, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), score.shape), run)
        if schedule == "parallel":
            return tuple(prefix_candidates(table, enter, 2 * k))
        order, rank = fast.global_ranks(score, run)
        ent = jnp.broadcast_to(enter, (nq, H, bq))[:, None]
        er = jnp.where(ent >= 0, jax.vmap(lambda i: jnp.take_along_axis(rank, jnp.clip(i, 0, None), -1))(ent), fast.EMPTY)
        return fast.prefix_ranks(er, 2 * k)

    return f


def compiled_fwd_out(select_fwd, u):
    return jax.block_until_ready(select_fwd(u))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="32768")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--schedules", default="parallel", help="comma list of parallel, fused, fast, fast_sorted, scan (name@N: N blocks per step; "
                         "name/factored: the SlotSelection output)")
    ap.add_argument("--prefix", default="", help="comma list of schedules whose carry computation is timed alone")
    ap.add_argument("--block_batch", type=int, default=None, help="parallel schedule: blocks per step")
    ap.add_argument("--block_q", type=int, default=64, help="query block of the selection and the kernel")
    ap.add_argument("--gathers", default="kernel,xla",
                    help="gathered kernel variants ('' = none): kernel, xla (gather modes, dense mask / weights), "
                         "factored (the fused schedule's SlotSelection)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        H, D, k, w, bq, seqs, dtype = 2, 16, 8, 8, 16, [128], jnp.float32
        impl, interpret = "pallas_gpu", True
    else:
        H, D, k, w, bq, dtype = 16, 128, 1024, 512, args.block_q, jnp.bfloat16
        seqs = [int(s) for s in args.seqs.split(",")]
        impl, interpret = "pallas_gpu", False
    rec = JsonRows(args.out, dict(env=env_info(), args=vars(args),
                                  config=dict(B=1, H=H, K=H, D=D, k=k, window=w, block_q=bq, extra=k,
                                              method="bracket", dtype=jnp.dtype(dtype).name)))
    late = lambda: args.deadline is not None and time.perf_counter() - t_start > args.deadline  # noqa: E731

    for S in seqs:
        ks = jax.random.split(jax.random.PRNGKey(S), 6)
        u = jax.random.normal(ks[0], (1, S, H), jnp.float32)
        for schedule in [p for p in args.prefix.split(",") if p]:
            def pre_part(row, schedule=schedule):
                compiled, row["fwd_mem"] = compile_with_memory(jax.jit(prefix_fn(schedule, S, H, k, w, bq)), (u,))
                row["fwd_ms"] = time_ms(compiled, (u,), args.reps)

            if not late():
                rec.guarded(dict(part="prefix", schedule=schedule, S=S), pre_part)
        outputs = {}
        for spec in args.schedules.split(","):
            schedule, _, bb = spec.partition("@")
            # "fused/factored": the selection as a SlotSelection (no [B, K, T, U] arrays)
            schedule, _, form = schedule.partition("/")
            factored = form == "factored"
            bb = int(bb) if bb else args.block_batch
            sel_fn = lambda u, schedule=schedule, bb=bb, factored=factored: causal_prefix_select(  # noqa: E731
                u, k, window=w, extra=k, block_q=bq, schedule=schedule, block_batch=bb, factored=factored,
                interpret=interpret)
            if factored:  # outputs: union, (lo, hi), (scores, thresholds), overflow, tau
                select_fwd = jax.jit(lambda u, sel_fn=sel_fn: (lambda s: (
                    s.union_index, (s.slots.select_lo, s.slots.select_hi), (s.slots.slot_scores, s.slots.threshold),
                    s.overflow, s.tau))(sel_fn(u)))
            else:
                select_fwd = jax.jit(lambda u, sel_fn=sel_fn: (lambda s: (s.union_index, s.mask, s.weight, s.overflow, s.tau))(sel_fn(u)))

            def select_fb(u, ct, sel_fn=sel_fn, factored=factored):
                def loss(s):
                    if factored:  # cotangents of the per-slot scores and per-query thresholds
                        z, thr = s.slots.slot_scores, s.slots.threshold
                        return (jnp.sum(z * ct[:, :, :z.shape[2], 0, None]) + jnp.sum(s.tau)
                                + jnp.sum(jnp.where(jnp.isfinite(thr), thr, 0)))
                    return jnp.sum(s.weight * ct) + jnp.sum(s.tau)
                return jax.grad(lambda u: loss(sel_fn(u)))(u)

            def sel_part(row, select_fwd=select_fwd, select_fb=select_fb, spec=spec):
                compiled, row["fwd_mem"] = compile_with_memory(select_fwd, (u,))
                row["fwd_ms"] = time_ms(compiled, (u,), args.reps)
                out = compiled(u)
                row["union_width"] = int(out[0].shape[-1])
                ref = outputs.get("ref")
                if ref is not None and not isinstance(out[1], tuple):  # compare with the reference schedule on the device
                    a = ref[0]
                    row["equal_to"] = ref[2]
                    row["equal"] = bool(all(jnp.array_equal(x, y) for x, y in zip(
                        (a[0], a[1], a[3]), (out[0], out[1], out[3]))))
                    row["max_weight_diff"] = float(jnp.max(jnp.abs(a[2] - out[2])))
                    row["max_tau_diff"] = float(jnp.max(jnp.abs(a[4] - out[4])))
                del out
                ct = jax.random.normal(ks[1], (1, H, S, row["union_width"]), jnp.float32)
                compiled, row["fwd_bwd_mem"] = compile_with_memory(jax.jit(select_fb), (u, ct))
                row["fwd_bwd_ms"] = time_ms(compiled, (u, ct), args.reps)
                grad = compiled(u, ct)
                if ref is not None and "equal" in row:
                    row["max_grad_diff"] = float(jnp.max(jnp.abs(ref[1] - grad)))
                    row["max_grad"] = float(jnp.max(jnp.abs(ref[1])))
                else:
                    outputs["ref"] = (compiled_fwd_out(select_fwd, u), grad, spec)

            if late():
                rec.add(dict(part="select", schedule=spec, S=S, error="skipped: deadline passed"))
                continue
            rec.guarded(dict(part="select", schedule=spec, S=S), sel_part)
        outputs.clear()
        gathers = [g for g in args.gathers.split(",") if g]
        if not gathers or late():
            continue
        union, mask, weight, _ = jax.jit(lambda u: (lambda s: (s.union_index, s.mask, s.weight, s.overflow))(
            causal_prefix_select(u, k, window=w, extra=k, block_q=bq)))(u)
        weight = weight.astype(jnp.float32)
        if "factored" in gathers:  # the fused schedule's factored selection, union rounded to 64
            fsel = jax.jit(lambda u: causal_prefix_select(u, k, window=w, extra=k, block_q=bq, schedule="fused",
                                                          union_multiple=64, factored=True, interpret=interpret))(u)
        q, kk, v, ct = (jax.random.normal(kx, (1, S, H, D), jnp.float32).astype(dtype) for kx in ks[2:6])
        for gather in gathers:
            if late():
                rec.add(dict(part=f"gathered_{gather}", S=S, error="skipped: deadline passed"))
                continue

            # the selection goes in as arguments: closed over, XLA would constant-fold the
            # backward's sort of the union at compile time
            if gather == "factored":
                sel_args = (fsel.union_index, fsel.slots.select_lo, fsel.slots.select_hi, fsel.slots.threshold)
                wt = fsel.slots.slot_scores
            else:
                sel_args, wt = (union, mask), weight

            def attn(q, kk, v, wt, sel_args, gather=gather):
                if gather == "factored":  # wt: the slot scores (the differentiable per-slot input)
                    idx, lo, hi, thr = sel_args
                    return gathered_attention(q, kk, v, idx, block_q=bq, window=w,
                                              selection=SlotSelection(wt, lo, hi, thr), impl=impl,
                                              interpret=interpret)
                idx, m = sel_args
                return gathered_attention(q, kk, v, idx, block_q=bq, window=w, selection_mask=m,
                                          selection_weights=wt, impl=impl, interpret=interpret,
                                          kernel_options=dict(gather=gather))

            def fb(q, kk, v, wt, sel_args, ct, attn=attn):
                return jax.vjp(lambda q, kk, v, wt: attn(q, kk, v, wt, sel_args), q, kk, v, wt)[1](ct)

            def ker_part(row, attn=attn, fb=fb, wt=wt, sel_args=sel_args):
                compiled, row["fwd_mem"] = compile_with_memory(jax.jit(attn), (q, kk, v, wt, sel_args))
                row["fwd_ms"] = time_ms(compiled, (q, kk, v, wt, sel_args), args.reps)
                compiled, row["fwd_bwd_mem"] = compile_with_memory(jax.jit(fb), (q, kk, v, wt, sel_args, ct))
                row["fwd_bwd_ms"] = time_ms(compiled, (q, kk, v, wt, sel_args, ct), args.reps)

            rec.guarded(dict(part=f"gathered_{gather}", S=S), ker_part)
    print("\n| S | part | schedule | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rec.data["rows"]:
        gib = lambda m: m["peak_bytes"] / 2**30 if m else float("nan")  # noqa: E731
        if "fwd_ms" in r:
            print(f"| {r['S']} | {r['part']} | {r.get('schedule', '')} | {r['fwd_ms']:.2f} | {r.get('fwd_bwd_ms', float('nan')):.2f} | "
                  f"{gib(r.get('fwd_mem')):.2f} | {gib(r.get('fwd_bwd_mem')):.2f} |")
        else:
            print(f"| {r['S']} | {r['part']} | {r.get('schedule', '')} | error: {r.get('error', '')[:80]} | | | |")
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
