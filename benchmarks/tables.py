"""Markdown tables of the GPU benchmark JSONs in benchmarks/results/ (for README.md).

    python benchmarks/tables.py [results_dir]
"""

from __future__ import annotations

import json
import math
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _load(d, name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _f(x, fmt="{:.2f}"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def kernel_table(data, title):
    env = data["meta"]["env"]
    print(f"\n### {title} ({env.get('device', env['backend'])}, jax {env['jax']}, triton {env.get('triton', '?')})\n")
    bench = [e for e in data["entries"] if e.get("section") == "bench"]
    base = {e["S"]: e for e in bench if e.get("impl") == "cudnn_dense_causal" and "fwd_ms" in e}
    print("| S | impl | density | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd / cuDNN | fwd+bwd / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in bench:
        if "fwd_ms" not in e:
            print(f"| {e.get('S', '')} | {e.get('name', e.get('impl', ''))} | | error: {e.get('error', '')[:80]} | | | | | |")
            continue
        b = base.get(e["S"])
        r1 = e["fwd_ms"] / b["fwd_ms"] if b else None
        r2 = e["fwdbwd_ms"] / b["fwdbwd_ms"] if b else None
        dens = e.get("density", "")
        print(f"| {e['S']} | {e['impl']} | {dens} | {_f(e['fwd_ms'], '{:.3f}')} | {_f(e['fwd_tflops'], '{:.0f}')} | "
              f"{_f(e['fwdbwd_ms'], '{:.3f}')} | {_f(e['fwdbwd_tflops'], '{:.0f}')} | {_f(r1)} | {_f(r2)} |")
    checks = [e for e in data["entries"] if e.get("section") == "check"]
    if checks:
        print("\nCorrectness vs the XLA reference (relative L2 errors):\n")
        for e in checks:
            if "error" in e:
                print(f"- {e.get('name')}: error {e['error'][:200]}")
            else:
                errs = ", ".join(f"{k} {v:.1e}" for k, v in e["rel_err"].items())
                print(f"- {e['name']}: {'pass' if e['passed'] else 'FAIL'} ({errs}; tol {e['tol']})")
    best = [e for e in data["entries"] if e.get("section") == "tune_best"]
    if best:
        print(f"\nTuned options used: `{json.dumps(best[-1]['options'])}`")


def layers_table(data):
    env = data["meta"]["env"]
    print(f"\n### Layers, fwd+bwd ({env.get('device', env['backend'])}, jax {env['jax']})\n")
    rows = data["rows"]
    base = {r["S"]: r for r in rows if r["name"] == "dense_cudnn" and "fwd_bwd_ms" in r}
    print("| S | layer | fwd ms | fwd+bwd ms | fwd+bwd / cuDNN | fwd peak GiB | fwd+bwd peak GiB |")
    print("|---|---|---|---|---|---|---|")
    gib = lambda m: m["peak_bytes"] / 2**30 if m else None  # noqa: E731
    for r in rows:
        if "fwd_bwd_ms" not in r:
            print(f"| {r['S']} | {r['name']} | error: {r.get('error', '')[:100]} | | | "
                  f"{_f(gib(r.get('fwd_mem')))} | {_f(gib(r.get('fwd_bwd_mem')))} |")
            continue
        b = base.get(r["S"])
        print(f"| {r['S']} | {r['name']} | {_f(r['fwd_ms'])} | {_f(r['fwd_bwd_ms'])} | "
              f"{_f(r['fwd_bwd_ms'] / b['fwd_bwd_ms'] if b else None, '{:.3f}')} | "
              f"{_f(gib(r.get('fwd_mem')))} | {_f(gib(r.get('fwd_bwd_mem')))} |")


def sea_table(data):
    print(f"\n### SEA layer vs cuDNN ({data['device']}, jax {data['jax']})\n")
    rows = data["rows"]
    base = {r["S"]: r for r in rows if r["name"] == "dense_cudnn" and "error" not in r}
    print("| S | impl | fwd ms | fwd+bwd ms | fwd / cuDNN | fwd+bwd / cuDNN | fwd peak MiB | fwd+bwd peak MiB | "
          "visited / causal blocks | estimate+select+layout fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['S']} | {r['name']} | error: {r['error'][:100]} | | | | | | | |")
            continue
        b = base.get(r["S"])
        mib = lambda k: r[k] / 2**20 if r.get(k) else None  # noqa: E731
        print(f"| {r['S']} | {r['name']} | {_f(r['fwd_ms'])} | {_f(r['fwd_bwd_ms'])} | "
              f"{_f(r['fwd_ms'] / b['fwd_ms'] if b else None, '{:.1f}')} | "
              f"{_f(r['fwd_bwd_ms'] / b['fwd_bwd_ms'] if b else None, '{:.1f}')} | "
              f"{_f(mib('fwd_peak_bytes'), '{:.0f}')} | {_f(mib('fwd_bwd_peak_bytes'), '{:.0f}')} | "
              f"{_f(r.get('visited_fraction_of_causal_blocks'), '{:.3f}')} | "
              f"{_f(r.get('estimate_select_layout_fwd_ms'))} |")


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else RESULTS
    for name, title in (("block_sparse_bench.json", "Block-sparse kernel"), ("gathered_bench.json", "Gathered kernel")):
        data = _load(d, name)
        if data:
            kernel_table(data, title)
    data = _load(d, "layers_bench.json")
    if data:
        layers_table(data)
    data = _load(d, "sea_bench.json")
    if data:
        sea_table(data)


if __name__ == "__main__":
    main()
