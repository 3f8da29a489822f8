"""Where the time of one attention layer call goes: GPU kernel times from a profiler trace.

Builds the same functions as bench_layers.py (``dense_cudnn``, ``sparsek`` with k = 1024,
w = 512, selection included; ``sea`` with k = 64, T_M = 256, block granularity; ``sea_token``:
the same with token granularity; B = 1, H = 16, D = 128, bf16), times them like bench_layers
(median of ``--reps`` calls), then records ``--trace_reps`` calls under
``jax.profiler.trace`` and sums the device events of the trace by kernel name (Pallas
kernels keep their Python names; XLA's fusions, sorts and copies keep their HLO names).
Prints, per function, the kernels that make up most of the device time, and the same time
summed per ``jax.named_scope`` of the library (``sparsek_*``, ``gathered_*``: the stages of
the selection and of the kernels' XLA glue, read from the compiled HLO's op_names), and
writes all of them to JSON:

    python benchmarks/profile_layer.py --seq 32768 --out benchmarks/results/profile_layer_32k.json

``--explain N`` also lists the N slowest XLA kernels with their named scope, result shape
and jax op_name (from the compiled HLO): what each unscoped fusion, scatter or slice came from.

Device time per call is the sum of kernel durations divided by ``--trace_reps``; the gap to
the wall time is launch / host overhead and idle device time between kernels.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layers import dense_functions, sea_functions, sparsek_functions  # noqa: E402
from common import SEA_LAYER, SPARSEK_LAYER, env_info, kernel_options_json, time_ms  # noqa: E402

from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sea import SEAOptions  # noqa: E402
from sea_jax.attention.sparsek import SparseKOptions  # noqa: E402


def device_kernel_times(xplane_path, timeline=None):
    """{kernel name: [count, total ns]} over the device planes of a trace, and the planes' names;
    ``timeline`` (a list) also receives every kernel as (start ns, end ns, name)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    totals = collections.defaultdict(lambda: [0, 0.0])
    planes = []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        planes.append(plane.name)
        for line in plane.lines:
            # the per-stream lines hold the kernels; skip the summary lines (XLA Ops / Modules)
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                t = totals[event.name]
                t[0] += 1
                t[1] += event.duration_ns
                if timeline is not None:
                    timeline.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    return dict(totals), planes


def launch_gaps(timeline, trace_reps, split_ns=300_000):
    """Idle device time between consecutive kernels (any stream) within a call, per call: the
    calls are told apart by idle stretches longer than ``split_ns`` (the host waiting for the
    previous call). Returns (mean idle ms per call, [(idle us, kernel before, kernel after)])."""
    events = sorted(timeline)
    gaps, end = [], None
    for i, (start, stop, name) in enumerate(events):
        if end is not None and 0 < start - end < split_ns:
            gaps.append(((start - end) / 1e3, events[i - 1][2], name))
        end = stop if end is None else max(end, stop)
    return sum(g[0] for g in gaps) / 1e3 / trace_reps, sorted(gaps, reverse=True)


SCOPE_RE = re.compile(r"\b(sparsek_[a-z_]+|gathered_[a-z_]+)")


def kernel_scopes(hlo_text):
    """{kernel name: named scope} from a compiled executable's HLO text: the innermost
    ``sparsek_*`` / ``gathered_*`` jax.named_scope in each instruction's op_name (XLA names
    a fusion's kernel after its instruction, "." and "-" becoming "_")."""
    out = {}
    for m in re.finditer(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', hlo_text):
        scopes = SCOPE_RE.findall(m.group(2))
        name = re.sub(r"[.\-]", "_", m.group(1))
        if scopes and name not in out:
            out[name] = scopes[-1]
    return out


def kernel_origins(hlo_text):
    """{kernel name: "result shape <- op_name"} for every instruction of a compiled
    executable's HLO text that carries an op_name (to trace unscoped kernels back to the
    jax operation that made them)."""
    out = {}
    for m in re.finditer(r'%([\w.\-]+) = ([^ ]+) [^\n]*?metadata=\{op_name="([^"]*)"', hlo_text):
        name = re.sub(r"[.\-]", "_", m.group(1))
        out.setdefault(name, f"{m.group(2)[:60]} <- {m.group(3)[-150:]}")
    return out


def by_scope(kernels, scopes):
    """Kernel times summed per named scope (Pallas kernels under their own names, e.g. "kernel
    gathered_fwd"; cub sorts: "cub_sort"; unmapped XLA kernels: "other")."""
    totals = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for k in kernels:
        name = re.sub(r"__\d+$", "", k["name"])
        scope = scopes.get(name) or scopes.get(k["name"])
        if scope is None and SCOPE_RE.fullmatch(name):
            scope = f"kernel {name}"  # a Pallas kernel (its custom call keeps the kernel's name)
        if scope is None:
            scope = "cub_sort" if "cub::" in name else ("copies" if "emcpy" in name else "other")
        t = totals[scope]
        t[0] += k["ms"]
        t[1] += k["calls"]
        t[2] += 1
    return sorted(({"scope": n, "ms": ms, "calls": c, "kernels": nk} for n, (ms, c, nk) in totals.items()),
                  key=lambda r: -r["ms"])


def profile(fn, args, trace_reps, timeline=None):
    jax.block_until_ready(fn(*args))
    tmp = tempfile.mkdtemp(prefix="sea_prof_")
    try:
        with jax.profiler.trace(tmp):
            for _ in range(trace_reps):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
        totals, planes = device_kernel_times(paths[0], timeline)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kernels = sorted(({"name": n, "calls": c / trace_reps, "ms": ns / trace_reps / 1e6}
                      for n, (c, ns) in totals.items()), key=lambda r: -r["ms"])
    return kernels, planes


def print_table(title, wall_ms, kernels, top):
    total = sum(k["ms"] for k in kernels)
    print(f"\n{title}: wall {wall_ms:.2f} ms, device kernels {total:.2f} ms")
    print(f"  {'ms':>8} {'%':>6} {'calls':>6}  kernel")
    for k in kernels[:top]:
        print(f"  {k['ms']:8.3f} {100 * k['ms'] / max(total, 1e-9):6.1f} {k['calls']:6.1f}  {k['name'][:110]}")
    rest = kernels[top:]
    if rest:
        print(f"  {sum(k['ms'] for k in rest):8.3f}         ({len(rest)} more kernels)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--layers", default="dense_cudnn,sparsek")
    ap.add_argument("--kv_heads", type=int, default=16, help="KV heads (16 query heads; < 16: GQA)")
    ap.add_argument("--options", default="{}", help="JSON of SparseKOptions fields for 'sparsek'")
    ap.add_argument("--kernel_options", default=None,
                    help="JSON of gathered_attention kernel_options for 'sparsek' (e.g. '{\"num_warps\": "
                         "[4, 4, 4, 4, 4]}': forward, dQ, window dK/dV, slot dK/dV, reduction)")
    ap.add_argument("--sea_kernel_options", default=None,
                    help="JSON of block_sparse_attention kernel_options for 'sea' / 'sea_token' (e.g. "
                         "'{\"dkv_major\": \"queries\", \"dkv_tiles\": [64, 32]}')")
    ap.add_argument("--threshold_options", default=None,
                    help="JSON of list_threshold options for 'sparsek' (e.g. '{\"search_arity\": 16}')")
    ap.add_argument("--select_options", default=None,
                    help="JSON of list_select options for 'sparsek' (e.g. '{\"num_warps\": 2, \"chunk\": 32}')")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trace_reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--explain", type=int, default=0,
                    help="print the named scope, result shape and op_name of the N slowest XLA kernels")
    ap.add_argument("--gaps", type=int, default=0,
                    help="print the idle device time between kernels per call and the N longest gaps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    H, D, S, K = 16, 128, args.seq, args.kv_heads
    if K < 1 or H % K:
        raise ValueError(f"--kv_heads must divide the 16 query heads, got {K}")
    dims = AttentionDims(H, K, D, H * D)
    sk = SparseKOptions(**{**SPARSEK_LAYER, **json.loads(args.options)})
    kq, kk, kv, kx = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (1, S, H, D), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, S, K, D), jnp.bfloat16) for key in (kk, kv))
    x = jax.random.normal(kx, (1, S, H * D), jnp.bfloat16)
    if args.kernel_options:  # the layer passes none: hand these to every gathered_attention call
        import sea_jax.kernels as sea_kernels

        opts = kernel_options_json(args.kernel_options)
        sea_kernels.gathered_attention = functools.partial(sea_kernels.gathered_attention, kernel_options=opts)
    if args.threshold_options:  # the selection passes none: hand these to its threshold kernel
        import sea_jax.kernels.gpu_sparsek_threshold as threshold_kernel

        threshold_kernel.list_threshold = functools.partial(threshold_kernel.list_threshold,
                                                            **json.loads(args.threshold_options))
    if args.select_options:  # likewise for the walk that also keeps the structure (the default)
        import sea_jax.kernels.gpu_sparsek_threshold as threshold_kernel

        threshold_kernel.list_select = functools.partial(threshold_kernel.list_select,
                                                         **json.loads(args.select_options))
    out = dict(env=env_info(), args=vars(args), rows=[])
    for name in args.layers.split(","):
        if name == "dense_cudnn":
            extra, fwd, fwd_bwd = dense_functions("cudnn")
            fargs = (q, k, v)
        elif name == "sparsek":
            extra, fwd, fwd_bwd = sparsek_functions(dims, sk)
            fargs = (*extra, q, k, v, x)
        elif name in ("sea", "sea_token"):  # bench_layers.py's SEA settings (fwd+bwd loss includes the estimate)
            gran = "block" if name == "sea" else "token"
            ko = kernel_options_json(args.sea_kernel_options) if args.sea_kernel_options else None
            extra, fwd, fwd_bwd = sea_functions(dims, SEAOptions(**SEA_LAYER, granularity=gran, impl="auto",
                                                                 kernel_options=ko))
            fargs = (*extra, q, k, v)
        else:
            raise ValueError(f"--layers: unknown layer {name!r}; allowed: dense_cudnn, sparsek, sea, sea_token")
        for part, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            t0 = time.perf_counter()
            compiled = fn.lower(*fargs).compile()
            wall = time_ms(compiled, fargs, args.reps)
            timeline = []
            kernels, planes = profile(compiled, fargs, args.trace_reps, timeline)
            scopes = by_scope(kernels, kernel_scopes(compiled.as_text()))
            idle_ms, gaps = launch_gaps(timeline, args.trace_reps)
            row = dict(name=name, part=part, S=S, wall_ms=wall, device_ms=sum(k["ms"] for k in kernels),
                       idle_ms=idle_ms, gaps_us=[g[0] for g in gaps],
                       planes=planes, kernels=kernels, scopes=scopes, seconds=time.perf_counter() - t0)
            out["rows"].append(row)
            print_table(f"{name} {part} S={S}", wall, kernels, args.top)
            if args.gaps:
                n_gaps = len(gaps) / args.trace_reps
                print(f"  idle device time between kernels: {idle_ms:.3f} ms per call ({n_gaps:.0f} gaps); longest:")
                for us, before, after in gaps[:args.gaps]:
                    print(f"    {us:8.1f} us  {before[:60]}  ->  {after[:60]}")
            print("  by named scope (jax.named_scope in the op_name of each kernel's HLO instruction):")
            for r in scopes:
                print(f"  {r['ms']:8.3f} {r['calls']:6.1f} calls {r['kernels']:4d} kernels  {r['scope']}")
            if args.explain:
                hlo = compiled.as_text()
                origins, scoped = kernel_origins(hlo), kernel_scopes(hlo)
                xla = [dict(kern, scope=scoped.get(base, "other"), origin=origins.get(base, "?"))
                       for kern in kernels for base in [re.sub(r"__\d+$", "", kern["name"])]
                       if "cub::" not in kern["name"] and not SCOPE_RE.fullmatch(kern["name"])]
                print(f"  the {args.explain} slowest XLA kernels (scope, result shape <- op_name):")
                for kern in xla[:args.explain]:
                    print(f"  {kern['ms']:8.3f} {kern['calls']:4.0f}x {kern['name'][:28]:28} {kern['scope'][:18]:18} "
                          f"{kern['origin']}")
                row["explained"] = xla[:args.explain]
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
            del compiled


if __name__ == "__main__":
    main()
