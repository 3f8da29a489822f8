"""Training throughput of the real train step (sea_jax.train): tokens/s and MFU per preset and
attention core.

    python benchmarks/bench_train.py --presets gpu_135m_4k gpu_135m_16k gpu_135m_32k \\
        --attentions dense sparsek sea --out benchmarks/results/train_h100.json

For every (preset, attention) pair a child process (so that one out-of-memory or a stuck
compile cannot end the others; ``--run-timeout`` seconds each, ``--deadline`` for all) builds
the run exactly as ``sea-train`` does (train/setup.py: mesh over all local devices, parameter
and optimizer shardings; train/step.py: the jitted, donated train step with the preset's
remat policy and bf16 compute over fp32 master weights), fills a fresh random-init state,
takes ``--warmup + --steps`` batches from the synthetic data source of train/data.py
(random tokens packed into rows; the data pipeline is not timed: batches are placed on the
devices before the clock starts), runs ``--warmup`` steps, then times ``--steps`` steps one by
one (``block_until_ready`` after each) and reports the median.

tokens/s = global_batch_size x seq_len / median step time.
MFU = model FLOPs per token (train/step.py ``model_flops_per_token``: 6 x matmul parameters
+ 6 L H D T for causal attention, so SparseK and SEA are credited with dense-attention FLOPs,
a "dense-equivalent" MFU) x tokens/s / (devices x peak bf16 FLOP/s of the device kind,
train/metrics.py: 989e12 for an H100 SXM).

The dense core on GPU is cuDNN flash attention (``jax.nn.dot_product_attention(
implementation="cudnn")``; the gpu presets pack without document masks for that reason):
the dense rows are the cuDNN baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback


def child(args) -> dict:
    """One (preset, attention) measurement in this process; returns the row."""
    import jax
    import numpy as np

    from sea_jax.train.config import parse_config
    from sea_jax.train.data import build_pipeline
    from sea_jax.train.metrics import peak_flops_per_device
    from sea_jax.train.setup import build_setup, make_objective, memory_line
    from sea_jax.train.state import init_state
    from sea_jax.train.step import BATCH_KEYS, make_train_step, model_flops_per_token

    row: dict = {"preset": args.preset, "attention": args.attention}
    t0 = time.perf_counter()
    name, options = parse_variant(args.attention)
    overrides = [f"--model.attention={name}", "--data.source=synthetic", "--metrics.progress_bar=false"]
    if options:
        cfg0 = parse_config(overrides, preset=args.preset)
        merged = dict(cfg0.model.attention_options or {})
        merged[name] = {**merged.get(name, {}), **options}
        overrides.append(f"--model.attention_options={json.dumps(merged)}")
    cfg = parse_config(overrides + list(args.override), preset=args.preset)
    setup = build_setup(cfg)
    loss_fn, extra = make_objective(cfg, setup)
    m = cfg.model
    row.update(seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch_size, devices=setup.mesh.size,
               mesh=dict(setup.mesh.shape), params_m=round(setup.parts.param_count() / 1e6, 2),
               remat=m.remat, dtype=m.dtype, layers=m.num_layers, width=m.width,
               attention_options=(m.attention_options or {}).get(name, {}),
               device_kind=jax.devices()[0].device_kind, backend=jax.default_backend())
    state = init_state(setup.parts, setup.opt, setup.shardings, cfg.train.seed)
    with jax.set_mesh(setup.mesh):
        step_fn = make_train_step(setup.parts, setup.opt, setup.mesh, setup.shardings, setup.batch_sharding,
                                  loss_fn=loss_fn, extra=extra)
        t_c = time.perf_counter()
        compiled = step_fn.lower(state, setup.abstract_batch(), extra).compile()
        row["compile_s"] = round(time.perf_counter() - t_c, 1)
    row["memory"] = memory_line(compiled)
    data = build_pipeline(cfg.data, global_batch_size=cfg.train.global_batch_size,
                          grad_accum_steps=cfg.train.grad_accum_steps, eval_batches=0,
                          model_vocab_size=cfg.model.vocab_size)
    n = args.warmup + args.steps
    batches = []
    for _ in range(n):
        local = next(data.train_iter)
        batches.append({k: jax.make_array_from_process_local_data(setup.batch_sharding, local[k], setup.batch_shape)
                        for k in BATCH_KEYS})
    jax.block_until_ready(batches)
    times, losses = [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, extra)
        jax.block_until_ready(state)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    median = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops_per_token = model_flops_per_token(setup.parts, cfg.data.seq_len)
    peak = cfg.metrics.peak_flops_per_device or peak_flops_per_device()
    row.update(step_ms_median=round(median * 1e3, 2), step_ms_min=round(min(times) * 1e3, 2),
               step_ms_all=[round(x * 1e3, 2) for x in times], tokens_per_step=tokens,
               tokens_per_s=round(tokens / median, 1), flops_per_token=flops_per_token,
               losses=[round(x, 4) for x in losses], finite=bool(np.all(np.isfinite(losses))))
    if peak:
        row["peak_flops_per_device"] = peak
        row["mfu"] = round(flops_per_token * tokens / median / (setup.mesh.size * peak), 4)
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["peak_gib_device0"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def parse_variant(text: str) -> tuple[str, dict]:
    """"sea" -> ("sea", {}); "sea:granularity=block,k=32" -> ("sea", {"granularity": "block",
    "k": 32}) (values parsed as JSON when they parse, else kept as strings)."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def parent(args) -> None:
    start = time.perf_counter()
    rows = []
    meta = {"command": " ".join(sys.argv), "warmup": args.warmup, "steps": args.steps, "override": args.override}
    for preset in args.presets:
        for attention in args.attentions:
            left = args.deadline - (time.perf_counter() - start)
            base = {"preset": preset, "attention": attention}
            if left < 20:
                rows.append({**base, "error": "skipped: deadline reached"})
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", preset, "--attention", attention,
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            for o in args.override:
                cmd.append(f"--override={o}")
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.run_timeout, left))
                lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
                if proc.returncode == 0 and lines:
                    row = json.loads(lines[-1][4:])
                else:
                    row = {**base, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                row = {**base, "error": f"timeout after {time.perf_counter() - t:.0f}s", "stderr_tail": err[-800:]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("step_ms_all", "losses")}), flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print_table(rows)


def print_table(rows) -> None:
    dense = {r["preset"]: r for r in rows if r.get("attention") == "dense" and "tokens_per_s" in r}
    print(f"\n{'preset':<14} {'attention':<9} {'T':>6} {'batch':>5} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} "
          f"{'vs dense':>8} {'compile s':>9}  memory")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['preset']:<14} {r['attention']:<9} {'':>6} {'':>5} {'':>9} {'':>10} {'':>6} {'':>8} {'':>9}  "
                  f"{r.get('error', '?')}")
            continue
        ref = dense.get(r["preset"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['preset']:<14} {r['attention']:<9} {r['seq_len']:>6} {r['global_batch']:>5} "
              f"{r['step_ms_median']:>9.1f} {r['tokens_per_s']:>10.0f} {mfu:>6} {ratio:>8} {r['compile_s']:>9.1f}  "
              f"{r.get('peak_gib_device0', '')} GiB peak; {r['memory']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpu_135m_4k", "gpu_135m_16k", "gpu_135m_32k"])
    p.add_argument("--attentions", nargs="+", default=["dense", "sparsek", "sea"],
                   help='cores, optionally with options: "sea:granularity=block" (the Pallas block-sparse kernels)')
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--override", action="append", default=[], help="a config override, e.g. --override=--train.global_batch_size=2")
    p.add_argument("--run-timeout", type=float, default=150.0, help="seconds for one (preset, attention) child")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--out", default=None, help="JSON file (rewritten after every row)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--attention", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        try:
            print("ROW " + json.dumps(child(args)), flush=True)
        except Exception:  # noqa: BLE001 - the parent records the error
            traceback.print_exc()
            sys.exit(1)
    else:
        parent(args)


if __name__ == "__main__":
    main()
