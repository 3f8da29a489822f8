"""Command line: ``sea-eval`` (or ``python -m sea_jax.train.evaluate``): quality of a model.

    sea-eval --checkpoint runs/distill_sea/checkpoints           # latest step of a sea-train run
    sea-eval --checkpoint runs/distill_sea/checkpoints --step 500
    sea-eval --checkpoint exported.npz --tokenizer smollm2        # train.checkpoint.export_params
    sea-eval --teacher smollm2                                    # the GGUF teacher, dense
    sea-eval --teacher path/to/model.gguf --attention sliding --attention-options '{"sliding": {"window": 256}}'
    sea-eval --teacher smollm2 --no-passkey --max-windows 8 --json ppl.json

Two measurements (sea_jax.evaluation):

* validation perplexity with non-overlapping windows of ``--seq-len`` tokens (default 2048) of
  the validation split of ``--source`` (default: the wiki corpus's fixed split);
* passkey retrieval accuracy for every length in ``--passkey-lengths`` and depth in
  ``--passkey-depths`` (``--passkey-samples`` prompts each).

It prints a table and writes the results as JSON (``--json``; default
``<checkpoint directory>/eval.json`` for a checkpoint, nothing for a teacher).

``--attention-options`` (a JSON object name -> options) overrides the attention options the
model was built with (e.g. SEA's "dynamic k" ``{"sea": {"k": 32}}``); ``--attention`` swaps the
cores of a ``--teacher`` (training-free: new cores start from their initialisation).
Bad arguments exit with status 2 and a message naming the argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class EvalError(ValueError):
    """A bad command-line argument; the message names it."""


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

def _merge_options(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]] | None) -> dict:
    merged = {name: dict(opts) for name, opts in (base or {}).items()}
    for name, opts in (extra or {}).items():
        merged[name] = {**merged.get(name, {}), **opts}
    return merged


def load_checkpoint_model(path: str, *, step: int | None = None, dtype: str | None = None,
                          attention_options: dict | None = None):
    """(model, LMConfig, tokenizer name or None) from a sea-train checkpoint directory, one
    step's folder, or a ``.npz`` written by ``export_params``.

    dtype: compute dtype instead of the one trained with (parameters stay float32);
    attention_options: merged into the model's attention options."""
    from sea_jax.train.params import ModelParts

    p = pathlib.Path(path)
    if p.suffix == ".npz":
        from sea_jax.train.checkpoint import load_exported

        if not p.is_file():
            raise EvalError(f"--checkpoint: no such file {path!r}")
        model, lm_config = load_exported(p)
        params_rest = None
        tokenizer = None
    else:
        from sea_jax.train.checkpoint import load_params, read_config

        try:
            params, rest, lm_config = load_params(p, step)
            tokenizer = read_config(p, step).data.tokenizer
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--checkpoint: {e}") from e
        params_rest = (params, rest)
        model = None
    changes = {}
    if dtype is not None:
        changes["dtype"] = dtype
    if attention_options:
        changes["attention_options"] = _merge_options(lm_config.attention_options, attention_options)
    if changes:
        try:
            lm_config = dataclasses.replace(lm_config, **changes)
        except ValueError as e:
            raise EvalError(f"--attention-options/--dtype: {e}") from e
    if params_rest is None:
        from sea_jax.train.params import split_model

        params_rest = split_model(model)
    return ModelParts.build(lm_config).merge(*params_rest), lm_config, tokenizer


def load_teacher_model(source: str, *, dtype: str | None = None, attention: str = "dense",
                       attention_options: dict | None = None):
    """(model, LMConfig, tokenizer object or None) of a pretrained source ("smollm2", a .gguf
    file, an HF safetensors directory), with ``attention`` cores in every layer."""
    from sea_jax.pretrained import load_pretrained

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        loaded = load_pretrained(source, attention=attention, attention_options=attention_options, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"--teacher: {e}") from e
    return loaded.model, loaded.config, loaded.tokenizer


# --------------------------------------------------------------------------------------
# evaluation and report
# --------------------------------------------------------------------------------------

def evaluate_model(model, tokenizer, *, source: str = "wiki", seq_len: int = 2048, batch_size: int = 1,
                   max_windows: int | None = None, passkey_lengths: Sequence[int] = DEFAULT_LENGTHS,
                   passkey_depths: Sequence[float] = DEFAULT_DEPTHS, passkey_samples: int = 5,
                   perplexity: bool = True, passkey: bool = True, seed: int = 0) -> dict[str, Any]:
    """{"perplexity": sea_jax.evaluation.perplexity's dict (+ "tokens"), "passkey":
    passkey_accuracy's dict}; a part that is switched off is absent."""
    from sea_jax import evaluation
    from sea_jax.data import corpus

    result: dict[str, Any] = {}
    if perplexity:
        tokens = corpus.load_tokens(source, "validation", tokenizer)
        ppl = evaluation.perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
        result["perplexity"] = {**ppl, "source": str(source), "split_tokens": int(len(tokens))}
    if passkey:
        pk = evaluation.passkey_accuracy(model, tokenizer, lengths=tuple(passkey_lengths), depths=tuple(passkey_depths),
                                         samples=passkey_samples, batch_size=batch_size, seed=seed)
        # JSON keys are strings; keep them explicit
        pk["by_length"] = {str(k): v for k, v in pk["by_length"].items()}
        result["passkey"] = pk
    return result


def format_table(name: str, result: dict[str, Any]) -> str:
    """A plain-text table of one model's results."""
    lines = [f"model: {name}"]
    if "perplexity" in result:
        p = result["perplexity"]
        lines.append(
            f"  validation perplexity (T={p['seq_len']}, {p['windows']} windows, {p['predictions']} predictions): "
            f"{p['perplexity']:.3f}  (nll {p['nll']:.4f}, {p['seconds']:.1f} s)"
        )
    if "passkey" in result:
        cells = result["passkey"]["cells"]
        depths = sorted({c["depth"] for c in cells})
        lengths = sorted({c["length"] for c in cells})
        lines.append("  passkey accuracy   " + "".join(f"{'d=' + format(d, 'g'):>8}" for d in depths) + f"{'all':>8}")
        for length in lengths:
            row = {c["depth"]: c["accuracy"] for c in cells if c["length"] == length}
            lines.append(
                f"  {'T=' + str(length):<18} " + "".join(f"{row[d]:>8.2f}" for d in depths)
                + f"{result['passkey']['by_length'][str(length)]:>8.2f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 2, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or min(values) < 0 or max(values) > 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of objects (core name -> options), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sea-eval", description="Validation perplexity and passkey accuracy of a checkpoint or the teacher.",
        allow_abbrev=False,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="sea-train checkpoint directory, one step's folder, or an exported .npz")
    which.add_argument("--teacher", help="pretrained source: smollm2, a .gguf file or an HF safetensors directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--attention", default="dense", help="--teacher only: core of every layer (default dense)")
    parser.add_argument("--attention-options", type=_json_object, default=None,
                        help='JSON, e.g. \'{"sea": {"k": 32}}\': merged into the model\'s attention options')
    parser.add_argument("--tokenizer", default=None,
                        help="byte | gpt2 | smollm2 (default: the checkpoint's data.tokenizer / the teacher's own)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: the model's)")
    parser.add_argument("--source", default="wiki", help="validation text: wiki or a .jsonl path (default wiki)")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window T (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows / prompts per forward call")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    parser.add_argument("--passkey-lengths", type=_int_list, default=list(DEFAULT_LENGTHS))
    parser.add_argument("--passkey-depths", type=_float_list, default=list(DEFAULT_DEPTHS))
    parser.add_argument("--passkey-samples", type=int, default=5, help="prompts per (length, depth)")
    parser.add_argument("--seed", type=int, default=0, help="passkey prompt seed")
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--no-passkey", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here (default: <checkpoint>/eval.json)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, print; returns the JSON record."""
    from sea_jax.data.tokenizers import load_tokenizer

    for name in ("seq_len", "batch_size", "passkey_samples"):
        value = getattr(args, name)
        if value < 1 or (name == "seq_len" and value < 2):
            raise EvalError(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {value}")
    if args.max_windows is not None and args.max_windows < 1:
        raise EvalError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.no_perplexity and args.no_passkey:
        raise EvalError("--no-perplexity and --no-passkey together leave nothing to evaluate")
    if args.checkpoint is not None and args.attention != "dense":
        raise EvalError("--attention applies to --teacher only (a checkpoint keeps its cores; use --attention-options)")
    start = time.perf_counter()
    if args.checkpoint is not None:
        model, lm_config, tok_name = load_checkpoint_model(
            args.checkpoint, step=args.step, dtype=args.dtype, attention_options=args.attention_options
        )
        name = args.checkpoint if args.step is None else f"{args.checkpoint}@{args.step}"
        tokenizer = None
        tok_name = args.tokenizer or tok_name
        if tok_name is None:
            raise EvalError("--tokenizer: an exported .npz records no tokenizer; pass --tokenizer")
    else:
        model, lm_config, tokenizer = load_teacher_model(
            args.teacher, dtype=args.dtype, attention=args.attention, attention_options=args.attention_options
        )
        name = f"{args.teacher} ({args.attention})"
        tok_name = args.tokenizer
        if tokenizer is None and tok_name is None:
            raise EvalError(f"--tokenizer: {args.teacher!r} ships no tokenizer; pass --tokenizer")
    if tok_name is not None:
        try:
            tokenizer = load_tokenizer(tok_name)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--tokenizer: {e}") from e
    if tokenizer.vocab_size > lm_config.vocab_size:
        raise EvalError(
            f"--tokenizer: its vocabulary ({tokenizer.vocab_size}) exceeds the model's ({lm_config.vocab_size})"
        )
    load_seconds = time.perf_counter() - start
    try:
        result = evaluate_model(
            model, tokenizer, source=args.source, seq_len=args.seq_len, batch_size=args.batch_size,
            max_windows=args.max_windows, passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
            passkey_samples=args.passkey_samples, perplexity=not args.no_perplexity, passkey=not args.no_passkey,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from e
    record = {
        "model": name,
        "attention": list(lm_config.layer_names()),
        "attention_options": lm_config.attention_options,
        "dtype": lm_config.dtype,
        "load_seconds": load_seconds,
        **result,
    }
    print(format_table(name, result), flush=True)
    out = args.json
    if out is None and args.checkpoint is not None and not args.checkpoint.endswith(".npz"):
        out = str(pathlib.Path(args.checkpoint) / "eval.json")
    if out is not None:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(json.dumps(record, indent=2, default=_json_default))
        print(f"wrote {out}", flush=True)
    return record


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except EvalError as e:
        print(f"sea-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
