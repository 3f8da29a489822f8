"""Quality experiment driver (issue 8): teacher perplexity, SEA / Performer distillation and
SparseK / sliding-window fine-tuning of SmolLM2-135M-Instruct, each time-boxed, then validation
perplexity at T = 2048 and passkey accuracy.

    # GPU (benchmarks/device_setup.sh assembles the teacher GGUF and exports SEA_TEACHER_GGUF)
    python3 benchmarks/quality.py --part 1 --out $OUT      # teacher ppl; SEA and Performer distillation
    python3 benchmarks/quality.py --part 2 --out $OUT      # SparseK and sliding fine-tuning; passkey
    # CPU smoke test of the whole driver: a tiny random teacher, byte tokens, a few steps
    python3 benchmarks/quality.py --part 1 --tiny --out /tmp/q && python3 benchmarks/quality.py --part 2 --tiny --out /tmp/q

Every run starts from the recipe presets (configs/distill_sea.yaml, distill_performer.yaml,
finetune_sparsek.yaml, finetune_sliding.yaml) with only the teacher path, the batch and (in
--tiny mode) the model size overridden, and uses the library's setup / objective / train step
(sea_jax.train.setup, sea_jax.train.step). Only the loop is the driver's own: it stops on a
wall-clock budget (``--train-seconds``) instead of a step count (the presets' LR is constant,
so a truncated run is the recipe's first steps), and its rows are random windows of T + 1
tokens of the joined training split (the paper's sampling; positions 0..T-1, like the
evaluation windows).

Every stage writes its results to ``<out>/quality_part<N>.json`` as soon as they exist and is
guarded: a failing stage is recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np

T0 = time.perf_counter()

PRESETS = {
    "sea": "distill_sea",
    "performer": "distill_performer",
    "sparsek": "finetune_sparsek",
    "sliding": "finetune_sliding",
}

# --tiny: a 2-layer model that trains in seconds on a CPU (byte tokens)
TINY_MODEL = dict(vocab_size=264, width=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=48,
                  init_std=0.1)
TINY_OPTIONS = {
    "sea": {"sea": {"k": 4, "t_m": 16, "block_q": 16, "block_k": 16, "chunk": 16}},
    "performer": {"performer": {"features": "relu", "nbf": 1.0, "chunk": 16}},
    "sparsek": {"sparsek": {"k": 4, "window": 8, "block_q": 16}},
    "sliding": {"sliding": {"window": 8, "chunk": 16}},
}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


class Results:
    """The part's JSON record, rewritten after every change."""

    def __init__(self, path: pathlib.Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**header, "stages": {}}
        self.write()

    def set(self, stage: str, value: dict[str, Any]) -> None:
        self.data["stages"][stage] = value
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default))
        tmp.replace(self.path)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def guarded(results: Results, stage: str, fn, *args, **kwargs):
    """Run one stage; record its result or its error."""
    log(f"stage {stage}: start")
    start = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
        value = {**value, "stage_seconds": time.perf_counter() - start}
        results.set(stage, value)
        log(f"stage {stage}: done in {time.perf_counter() - start:.1f}s")
        return value
    except Exception as e:  # keep the other stages
        traceback.print_exc()
        results.set(stage, {"error": f"{type(e).__name__}: {e}"[:2000], "stage_seconds": time.perf_counter() - start})
        log(f"stage {stage}: FAILED ({type(e).__name__})")
        return None


# --------------------------------------------------------------------------------------
# teacher, tokens
# --------------------------------------------------------------------------------------

def make_tiny_teacher(directory: pathlib.Path) -> str:
    """A random tiny Llama written as an HF safetensors directory (the --tiny teacher)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from flax import nnx
    from tiny_pretrained import write_hf_dir

    from sea_jax.model.config import LMConfig
    from sea_jax.model.transformer import LanguageModel

    if not (directory / "config.json").exists():
        model = LanguageModel(LMConfig(**TINY_MODEL), rngs=nnx.Rngs(0))
        write_hf_dir(model, directory)
    return str(directory)


def load_tokens(tokenizer, split: str) -> np.ndarray:
    from sea_jax.data import corpus

    return corpus.load_tokens("wiki", split, tokenizer)


# --------------------------------------------------------------------------------------
# time-boxed training through the library's setup and train step
# --------------------------------------------------------------------------------------

def build_config(kind: str, args, teacher: str, extra: tuple[str, ...] = ()):
    from sea_jax.train.config import parse_config

    overrides = [
        f"--init_from={teacher}",
        f"--data.seq_len={args.seq_len}",
        f"--train.global_batch_size={args.batch}",
        f"--train.grad_accum_steps={args.accum}",
        "--train.steps=1000000",  # the schedule is constant; the loop stops on time
        f"--output_dir={args.out}/run_{kind}",
    ]
    if kind in ("sea", "performer"):
        overrides.append(f"--distill.teacher={teacher}")
    if args.tiny:
        overrides += ["--data.tokenizer=byte", "--model.dtype=float32", "--model.remat=none",
                      f"--model.attention_options={json.dumps(TINY_OPTIONS[kind])}"]
    return parse_config(overrides + list(getattr(args, "overrides", {}).get(kind, [])) + list(extra),
                        preset=PRESETS[kind])


def random_windows(tokens: np.ndarray, rng: np.random.Generator, accum: int, batch: int, T: int) -> dict:
    """[accum, batch, T] rows: windows of T + 1 tokens at random offsets of the token stream."""
    starts = rng.integers(0, len(tokens) - T - 1, size=(accum, batch))
    rows = tokens[starts[..., None] + np.arange(T + 1)]
    ones = np.ones((accum, batch, T), np.int32)
    return {
        "inputs": rows[..., :-1].astype(np.int32),
        "targets": rows[..., 1:].astype(np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (accum, batch, T)).copy(),
        "segment_ids": ones,
        "loss_mask": ones,
    }


def train_timeboxed(kind: str, args, teacher: str, train_tokens: np.ndarray, budget, *, max_steps: int | None = None,
                    overrides: tuple[str, ...] = ()):
    """(trained model, record) for one recipe, trained until ``budget()`` seconds of wall time
    have passed after the compile (budget is called once the step is compiled, so it can count
    what the compile took) or ``max_steps`` steps are done."""
    import jax

    from sea_jax.train.params import split_model
    from sea_jax.train.setup import build_setup, make_objective, resolve_pretrained
    from sea_jax.train.state import state_from_params
    from sea_jax.train.step import make_train_step

    cfg = build_config(kind, args, teacher, overrides)
    cfg, pretrained = resolve_pretrained(cfg)
    setup = build_setup(cfg)
    loss_fn, extra = make_objective(cfg, setup)
    state = state_from_params(*split_model(pretrained), setup.opt, setup.shardings, cfg.train.seed)
    del pretrained
    with jax.set_mesh(setup.mesh):
        step_fn = make_train_step(setup.parts, setup.opt, setup.mesh, setup.shardings, setup.batch_sharding,
                                  loss_fn=loss_fn, extra=extra)
    rng = np.random.default_rng(args.seed)
    T, B, A = cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.grad_accum_steps

    def batch():
        rows = random_windows(train_tokens, rng, A, B // A, T)
        return {k: jax.device_put(v, setup.batch_sharding) for k, v in rows.items()}

    start = time.perf_counter()
    state, metrics = step_fn(state, batch(), extra)
    first = jax.device_get(metrics)
    compile_seconds = time.perf_counter() - start
    log(f"{kind}: compiled + step 1 in {compile_seconds:.1f}s, loss {float(first['loss']):.4f}")
    history = [{"step": 1, **{k: float(v) for k, v in first.items()}}]
    seconds = budget()
    log(f"{kind}: training for at most {seconds:.0f}s" + (f" or {max_steps} steps" if max_steps else ""))
    steps, train_start = 1, time.perf_counter()
    while time.perf_counter() - train_start < seconds and (max_steps is None or steps < max_steps):
        state, metrics = step_fn(state, batch(), extra)
        steps += 1
        if steps % args.log_every == 0:
            m = jax.device_get(metrics)
            history.append({"step": steps, **{k: float(v) for k, v in m.items()}})
            if not math.isfinite(history[-1]["loss"]):
                raise FloatingPointError(f"{kind}: loss {history[-1]['loss']} at step {steps}")
            log(f"{kind}: step {steps} loss {history[-1]['loss']:.4f}")
    last = jax.device_get(metrics)
    jax.block_until_ready(state["params"])
    train_seconds = time.perf_counter() - train_start
    history.append({"step": steps, **{k: float(v) for k, v in last.items()}})
    model = setup.parts.merge(state["params"], state["rest"])
    record = {
        "preset": PRESETS[kind],
        "attention": list(cfg.model.layer_names())[:1] + ["..."],
        "attention_options": cfg.model.attention_options,
        "objective": cfg.objective,
        "learning_rates": {"default": cfg.optim.lr, **{g.name: g.lr for g in cfg.optim.groups}},
        "steps": steps,
        "step_cap": max_steps,
        "time_budget_seconds": seconds,
        "config_overrides": list(getattr(args, "overrides", {}).get(kind, [])) + list(overrides),
        "grad_accum_steps": A,
        "batch": B,
        "seq_len": T,
        "training_tokens": steps * B * T,
        "compile_and_first_step_seconds": compile_seconds,
        "train_seconds_after_first_step": train_seconds,
        "wall_seconds": compile_seconds + train_seconds,
        "seconds_per_step": train_seconds / max(steps - 1, 1),
        "history": history,
    }
    del extra
    return model, record


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------

def eval_ppl(model, val_tokens: np.ndarray, args) -> dict[str, Any]:
    from sea_jax import evaluation

    return evaluation.perplexity(model, val_tokens, seq_len=args.seq_len, batch_size=args.eval_batch,
                                 max_windows=args.eval_windows)


def eval_passkey(model, tokenizer, args) -> dict[str, Any]:
    from sea_jax import evaluation

    out = evaluation.passkey_accuracy(model, tokenizer, lengths=args.passkey_lengths, depths=args.passkey_depths,
                                      samples=args.passkey_samples, batch_size=1, seed=args.seed)
    out["by_length"] = {str(k): v for k, v in out["by_length"].items()}
    return out


def visualize_sea(student, teacher, val_tokens, png: pathlib.Path, args) -> dict[str, Any]:
    """The sea-visualize picture (teacher attention, SEA estimate, SEA mask) of the distilled
    student for a middle layer, head 0, on the first validation tokens."""
    import jax.numpy as jnp

    from sea_jax.train import visualize

    T = min(args.visualize_tokens, len(val_tokens))
    layer = student.cfg.num_layers // 2
    tokens = jnp.asarray(val_tokens[:T], jnp.int32)[None]
    maps = visualize.attention_maps(teacher, student, tokens, layer, 0)
    path = visualize.plot(maps, png,
                          title=f"distilled SEA student, layer {layer}, head 0, first {T} validation tokens")
    return {"png": path.name, "layer": layer, "head": 0, "tokens": T, "recall": maps["recall"],
            "density": maps["density"]}


def remaining() -> float:
    return ARGS.deadline - (time.perf_counter() - T0)


def _retry_overrides(kind: str, error: Exception, args, tried: tuple[str, ...]) -> tuple[str, ...] | None:
    """Overrides for a second attempt after ``error``, or None: out of memory -> twice the
    gradient accumulation; a SparseK Pallas failure -> the XLA path."""
    text = f"{type(error).__name__}: {error}"
    if ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()) and not any("accum" in t for t in tried):
        return tried + (f"--train.grad_accum_steps={args.accum * 2}",)
    if kind == "sparsek" and not any("impl" in t for t in tried) and ("Triton" in text or "Pallas" in text
                                                                         or "Mosaic" in text or "pallas" in text):
        opts = TINY_OPTIONS["sparsek"]["sparsek"] if args.tiny else {"k": 64, "window": 256}
        return tried + (f"--model.attention_options={json.dumps({'sparsek': {**opts, 'impl': 'xla'}})}",)
    return None


def train_and_eval(results: Results, kind: str, args, teacher, tokenizer, train_tokens, val_tokens, models, *,
                   first: bool, max_steps: int | None = None):
    """Train one recipe (the first of a part gets half of what is left after its compile, minus
    the reserves; the second trains for the first's step count or until the reserve) and
    evaluate its perplexity."""

    def budget():
        left = remaining() - args.tail_reserve
        if first:
            return max(min(args.train_seconds, (left - args.second_overhead - args.eval_reserve) / 2), 5.0)
        return max(left - args.eval_reserve, 5.0)

    def stage():
        overrides: tuple[str, ...] = ()
        while True:
            try:
                model, record = train_timeboxed(kind, args, teacher, train_tokens, budget, max_steps=max_steps,
                                                overrides=overrides)
                break
            except Exception as e:
                retry = _retry_overrides(kind, e, args, overrides)
                if retry is None or remaining() < 120:
                    raise
                traceback.print_exc()
                log(f"{kind}: retrying with {retry} after {type(e).__name__}")
                results.set(f"train_{kind}_first_attempt", {"error": f"{type(e).__name__}: {e}"[:2000]})
                overrides = retry
        models[kind] = model
        results.set(f"train_{kind}", record)
        ppl = eval_ppl(model, val_tokens, args)
        log(f"{kind}: validation perplexity {ppl['perplexity']:.3f} ({ppl['windows']} windows)")
        return {**record, "perplexity": ppl}

    return guarded(results, f"train_{kind}", stage)


# --------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--teacher", default=os.environ.get("SEA_TEACHER_GGUF", "smollm2"))
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random teacher, byte tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--train-seconds", type=float, default=240.0, help="at most this much training per model")
    p.add_argument("--deadline", type=float, default=560.0, help="seconds after start by which all must end")
    p.add_argument("--eval-reserve", type=float, default=40.0, help="seconds kept for a perplexity evaluation")
    p.add_argument("--second-overhead", type=float, default=70.0, help="expected load + compile of the 2nd model")
    p.add_argument("--tail-reserve", type=float, default=None,
                   help="seconds kept at the end for the passkey stages (default: 0 part 1, 150 part 2)")
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows (default: all)")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--passkey-lengths", default="4096,8192")
    p.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--passkey-samples", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--visualize-tokens", type=int, default=512)
    p.add_argument("--models", default=None, help=f"comma-separated subset/order of {sorted(PRESETS)} "
                   "(default: sea,performer for part 1, sparsek,sliding for part 2)")
    p.add_argument("--max-steps", type=int, default=None, help="step cap of the first model (time still bounds it)")
    p.add_argument("--tag", default="", help="suffix of the output file names (quality_part<N><tag>.json)")
    p.add_argument("--skip-teacher", action="store_true", help="part 1: skip the teacher perplexity")
    p.add_argument("--override", action="append", default=[], metavar="KIND:--KEY=VALUE",
                   help="extra sea-train override for one recipe, e.g. 'sea:--distill.weights.hidden_mse=0.05'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.passkey_lengths = tuple(int(v) for v in args.passkey_lengths.split(","))
    args.passkey_depths = tuple(float(v) for v in args.passkey_depths.split(","))
    args.overrides = {}
    for item in args.override:
        kind, _, flag = item.partition(":")
        if kind not in PRESETS or not flag.startswith("--"):
            p.error(f"--override must look like KIND:--key=value with KIND in {sorted(PRESETS)}, got {item!r}")
        args.overrides.setdefault(kind, []).append(flag)
    if args.models is not None and not set(args.models.split(",")) <= set(PRESETS):
        p.error(f"--models must name some of {sorted(PRESETS)}, got {args.models!r}")
    if args.tail_reserve is None:
        args.tail_reserve = 0.0 if args.part == 1 else 150.0
    ARGS = args

    import jax

    from sea_jax.pretrained import load_pretrained

    out = pathlib.Path(args.out)
    teacher = args.teacher
    if args.tiny:
        teacher = make_tiny_teacher(pathlib.Path(tempfile.gettempdir()) / "sea_quality_tiny_teacher")
    header = {
        "part": args.part, "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__, "teacher": teacher, "tiny": args.tiny,
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }
    results = Results(out / f"quality_part{args.part}{args.tag}.json", header)
    log(f"part {args.part} on {header['device_kind']}, teacher {teacher}")

    teacher_bf16 = load_pretrained(teacher, attention="dense", dtype="float32" if args.tiny else "bfloat16")
    if args.tiny:
        from sea_jax.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer("byte")
    else:
        tokenizer = teacher_bf16.tokenizer
    val_tokens = load_tokens(tokenizer, "validation")
    train_tokens = load_tokens(tokenizer, "train")
    results.data["tokens"] = {"validation": int(len(val_tokens)), "train": int(len(train_tokens))}
    log(f"tokens: validation {len(val_tokens)}, train {len(train_tokens)}")
    models: dict[str, Any] = {}

    pair = ("sea", "performer") if args.part == 1 else ("sparsek", "sliding")
    if args.models is not None:
        pair = tuple(args.models.split(","))
    if args.part == 1 and not args.skip_teacher:
        guarded(results, "teacher_perplexity", lambda: {
            "dtype": teacher_bf16.config.dtype, "perplexity": eval_ppl(teacher_bf16.model, val_tokens, args)})
    # the baseline gets the same budget: the step count (= training tokens) of the first
    done = train_and_eval(results, pair[0], args, teacher, tokenizer, train_tokens, val_tokens, models, first=len(pair) > 1,
                          max_steps=args.max_steps)
    if len(pair) > 1:
        train_and_eval(results, pair[1], args, teacher, tokenizer, train_tokens, val_tokens, models, first=False,
                       max_steps=args.max_steps if done is None else done["steps"])
    if args.part == 1 and "sea" in models:
        if remaining() > 30:
            guarded(results, "visualize_sea", visualize_sea, models["sea"], teacher_bf16.model, val_tokens,
                    out / f"quality_sea_attention{args.tag}.png", args)
        else:
            results.set("visualize_sea", {"error": "skipped: out of time"})
    if args.part == 2:
        for name, model in (("teacher", teacher_bf16.model), ("sparsek", models.get("sparsek")),
                            ("sliding", models.get("sliding"))):
            if model is None:
                continue
            if remaining() < 20:
                results.set(f"passkey_{name}", {"error": "skipped: out of time"})
                continue
            guarded(results, f"passkey_{name}", lambda m=model: {"passkey": eval_passkey(m, tokenizer, args)})
    log(f"part {args.part} finished; results in {results.path}")
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
