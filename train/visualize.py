"""Command line: ``sea-visualize`` (or ``python -m sea_jax.train.visualize``): for one layer and
head, the teacher's attention, SEA's estimate and SEA's selected mask side by side (PNG).

    sea-visualize --checkpoint runs/distill_sea/checkpoints --layer 10 --head 0 --out sea_l10_h0.png
    sea-visualize --teacher smollm2 --layer 10 --head 0          # SEA freshly initialised (untrained)
    sea-visualize --teacher smollm2 --text "Paris is the capital of France. ..." --seq-len 128

Panels (query rows down, key columns across, causal):

1. the teacher's attention ``softmax(q k^T / sqrt(d))`` of that layer and head (dense teacher
   run on the same tokens);
2. SEA's estimate: the compressed logits ``S_hat`` [T, t_m] of the student's layer,
   nearest-neighbour resized to each row's prefix and softmax-normalised over keys (what the
   distillation's estimate loss compares with panel 1);
3. the selected mask (the keys the sparse attention reads), with the share of the teacher's
   attention mass that falls inside it (its "recall") in the title.

The student is a sea-train checkpoint (``--checkpoint``; its teacher defaults to the run's
``distill.teacher`` or ``init_from``) or, without one, the teacher with SEA cores
(``--sea-options``) initialised from scratch. Text: ``--text`` or the first ``--seq-len``
tokens of the validation split of ``--source``. At most 1024 tokens (the pictures are T x T).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

MAX_TOKENS = 1024


class VisualizeError(ValueError):
    """A bad command-line argument; the message names it."""


def _layer_block(model, layer: int):
    """(DecoderBlock view of ``layer``, its core name)."""
    for stage in model.stages:
        if layer < stage.count:
            return stage.layer(layer), stage.attention
        layer -= stage.count
    raise AssertionError("layer index checked by the caller")


def layer_internals(model, tokens, layer: int, *, return_aux: bool):
    """Run ``model`` on tokens [1, T] up to ``layer``; returns (q [1, T, H, D], k [1, T, K, D],
    aux of that layer's core). Compiled once per (model, layer)."""
    from flax import nnx

    return nnx.jit(_layer_internals, static_argnames=("layer", "return_aux"))(
        model, tokens, layer=layer, return_aux=return_aux
    )


def _layer_internals(model, tokens, layer: int, return_aux: bool):
    import jax.numpy as jnp

    from sea_jax.train.distill import block_forward

    T = tokens.shape[1]
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.cfg.compute_dtype)
    for i in range(layer + 1):
        block, _ = _layer_block(model, i)
        want_aux = return_aux and i == layer
        x_next, q, k, _, aux = block_forward(block, x, positions, None, return_aux=want_aux)
        if i == layer:
            return q, k, aux
        x = x_next
    raise AssertionError("unreachable")


def resized_estimate(estimate: np.ndarray, T: int) -> np.ndarray:
    """estimate [T, t_m] (one head's compressed logits, causal rows) -> [T, T] probabilities:
    row t spreads its t_m cells over keys 0..t (key j reads cell floor((2j + 1) t_m / (2 (t + 1))))
    and is softmax-normalised over those keys; zero above the diagonal."""
    t_m = estimate.shape[-1]
    rows = np.arange(T)[:, None]
    keys = np.arange(T)[None, :]
    length = rows + 1
    cell = np.clip(((2 * keys + 1) * t_m) // (2 * length), 0, t_m - 1)
    logits = np.take_along_axis(estimate.astype(np.float64), cell, axis=1)
    logits = np.where(keys <= rows, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def attention_maps(teacher, student, tokens, layer: int, head: int) -> dict[str, Any]:
    """{"teacher" [T, T], "estimate" [T, T], "mask" [T, T] bool, "recall", "density"} for one
    layer and head (tokens [1, T], T <= 1024)."""
    import jax.numpy as jnp

    from sea_jax import distill as losses
    from sea_jax.ops.sea_select import row_geometry

    T = tokens.shape[1]
    q_t, k_t, _ = layer_internals(teacher, tokens, layer, return_aux=False)
    row_start, row_length = row_geometry(None, 1, T, causal=True)[:2]
    p_teacher = np.asarray(losses.attention_probs(q_t.astype(jnp.float32), k_t.astype(jnp.float32),
                                                  row_start, row_length))[0, head]
    _, _, aux = layer_internals(student, tokens, layer, return_aux=True)
    if "mask" not in aux:
        raise VisualizeError(f"--seq-len: the SEA core returns its mask only up to aux_mask_max_len tokens, got {T}")
    estimate = resized_estimate(np.asarray(aux["estimate"], np.float32)[0, :, head], T)
    mask = np.asarray(aux["mask"])[0, head]
    causal = np.tril(np.ones((T, T), bool))
    return {
        "teacher": p_teacher,
        "estimate": estimate,
        "mask": mask,
        "recall": float((p_teacher * mask).sum() / T),
        "density": float(mask.sum() / causal.sum()),
    }


def plot(maps: dict[str, Any], out: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Write the three panels to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), constrained_layout=True)
    vmax = max(float(maps["teacher"].max()), float(maps["estimate"].max()), 1e-6)
    norm = PowerNorm(gamma=0.35, vmin=0.0, vmax=vmax)  # attention is heavy-tailed: show the small entries too
    panels = [
        ("teacher attention", maps["teacher"], dict(cmap="viridis", norm=norm)),
        ("SEA estimate (resized, softmax)", maps["estimate"], dict(cmap="viridis", norm=norm)),
        (f"SEA mask: {maps['density']:.1%} of causal keys, recall {maps['recall']:.1%}",
         maps["mask"].astype(np.float32), dict(cmap="gray_r", vmin=0.0, vmax=1.0)),
    ]
    for ax, (name, image, kw) in zip(axes, panels):
        im = ax.imshow(image, interpolation="nearest", aspect="equal", **kw)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sea-visualize", description="Teacher attention, SEA estimate and SEA mask of one layer/head (PNG).",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", default=None, help="sea-train checkpoint of a SEA student (default: none)")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--teacher", default=None,
                        help="pretrained source (smollm2, .gguf, HF directory); default: the checkpoint's distill.teacher")
    parser.add_argument("--sea-options", default=None,
                        help='without --checkpoint: JSON options of the fresh SEA cores, e.g. \'{"k": 16, "t_m": 64}\'')
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--text", default=None, help="text to run (default: the validation split of --source)")
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--seq-len", type=int, default=256, help=f"tokens (2..{MAX_TOKENS})")
    parser.add_argument("--tokenizer", default=None, help="byte | gpt2 | smollm2 (default: the teacher's / checkpoint's)")
    parser.add_argument("--out", default="attention.png")
    return parser


def _student_and_teacher(args):
    from sea_jax.pretrained import load_pretrained
    from sea_jax.train.evaluate import EvalError, load_checkpoint_model

    teacher_src, tok_name = args.teacher, args.tokenizer
    if args.checkpoint is not None:
        if args.sea_options is not None:
            raise VisualizeError("--sea-options applies without --checkpoint only (a checkpoint keeps its options)")
        try:
            student, _, ckpt_tok = load_checkpoint_model(args.checkpoint, step=args.step, dtype="float32")
        except EvalError as e:
            raise VisualizeError(str(e)) from e
        tok_name = tok_name or ckpt_tok
        if teacher_src is None and not args.checkpoint.endswith(".npz"):
            from sea_jax.train.checkpoint import read_config

            cfg = read_config(args.checkpoint, args.step)
            teacher_src = cfg.distill.teacher if cfg.objective == "distill" else cfg.init_from
        if teacher_src is None:
            raise VisualizeError("--teacher: the checkpoint names no teacher; pass --teacher")
    elif teacher_src is None:
        raise VisualizeError("--teacher: pass a pretrained source (or --checkpoint of a distillation run)")
    try:
        teacher = load_pretrained(teacher_src, attention="dense", dtype="float32")
    except (FileNotFoundError, ValueError) as e:
        raise VisualizeError(f"--teacher: {e}") from e
    if args.checkpoint is None:
        try:
            options = json.loads(args.sea_options) if args.sea_options else {}
            if not isinstance(options, dict):
                raise ValueError("expected a JSON object")
            student = load_pretrained(teacher_src, attention="sea", attention_options={"sea": options},
                                      dtype="float32").model
        except (ValueError, TypeError) as e:
            raise VisualizeError(f"--sea-options: {e}") from e
    return student, teacher, teacher_src, tok_name


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp

    from sea_jax.data import corpus
    from sea_jax.data.tokenizers import load_tokenizer

    if not 2 <= args.seq_len <= MAX_TOKENS:
        raise VisualizeError(f"--seq-len must be in [2, {MAX_TOKENS}], got {args.seq_len}")
    student, teacher, teacher_src, tok_name = _student_and_teacher(args)
    s_cfg, t_cfg = student.cfg, teacher.model.cfg
    if (s_cfg.num_layers, s_cfg.num_heads, s_cfg.vocab_size) != (t_cfg.num_layers, t_cfg.num_heads, t_cfg.vocab_size):
        raise VisualizeError(
            f"--teacher: layers/heads/vocabulary {(t_cfg.num_layers, t_cfg.num_heads, t_cfg.vocab_size)} differ from "
            f"the student's {(s_cfg.num_layers, s_cfg.num_heads, s_cfg.vocab_size)}"
        )
    names = s_cfg.layer_names()
    if not 0 <= args.layer < s_cfg.num_layers or names[args.layer] != "sea":
        sea_layers = [i for i, n in enumerate(names) if n == "sea"]
        raise VisualizeError(f"--layer must be a SEA layer of the student, one of {sea_layers}, got {args.layer}")
    if not 0 <= args.head < s_cfg.num_heads:
        raise VisualizeError(f"--head must be in [0, {s_cfg.num_heads}), got {args.head}")
    try:
        tokenizer = load_tokenizer(tok_name) if tok_name else teacher.tokenizer
    except (FileNotFoundError, ValueError) as e:
        raise VisualizeError(f"--tokenizer: {e}") from e
    if tokenizer is None:
        raise VisualizeError("--tokenizer: the teacher ships no tokenizer; pass --tokenizer")
    if args.text is not None:
        ids = corpus.tokenize(args.text, tokenizer)
    else:
        try:
            ids = corpus.load_tokens(args.source, "validation", tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise VisualizeError(f"--source: {e}") from e
    if len(ids) < 2:
        raise VisualizeError("--text: needs at least 2 tokens")
    ids = ids[: args.seq_len]
    if ids.max() >= s_cfg.vocab_size:
        raise VisualizeError(f"--tokenizer: ids reach {ids.max()}, beyond the model's vocabulary {s_cfg.vocab_size}")
    tokens = jnp.asarray(ids, jnp.int32)[None]
    maps = attention_maps(teacher.model, student, tokens, args.layer, args.head)
    who = args.checkpoint or "untrained SEA cores"
    title = f"layer {args.layer}, head {args.head}, {tokens.shape[1]} tokens; teacher {teacher_src}; student {who}"
    out = plot(maps, args.out, title=title)
    print(f"wrote {out} (mask density {maps['density']:.3f}, teacher mass inside the mask {maps['recall']:.3f})")
    return {"out": str(out), "recall": maps["recall"], "density": maps["density"], "tokens": int(tokens.shape[1])}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except VisualizeError as e:
        print(f"sea-visualize: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
