"""Quality evaluation of a LanguageModel: validation perplexity and passkey retrieval.

**Perplexity** follows the SEA paper's protocol (research/sea.md section 2.4): the token
stream of the validation split is cut into non-overlapping windows of ``seq_len`` tokens
(default 2048; the tail shorter than a window is dropped); every window is scored on its own
(positions 0..seq_len-1) on its seq_len - 1 next-token predictions, and

    perplexity = exp(sum of negative log-likelihoods / number of predictions).

**Passkey accuracy** (``sea_jax.data.synthetic``): for each (length, depth) ``samples``
prompts; a prompt counts when the argmax at every answer position is the answer token
(teacher-forced; equal to greedy decoding of the answer).

The model runs with whatever attention it was built with: this module adds no array with two
sequence axes (the log-softmax and the argmax over the vocabulary happen inside the jitted
forward, so no [batch, seq, vocab] logits leave the device).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sea_jax.data import corpus, synthetic


@nnx.jit
def _window_nll(model, tokens):
    """tokens [B, T] -> (sum of NLL over the B (T - 1) predictions [B], float32)."""
    logits = model(tokens).logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll, axis=1)


@nnx.jit
def _argmax(model, tokens):
    """tokens [B, T] -> argmax of the next-token logits [B, T] int32."""
    return jnp.argmax(model(tokens).logits, axis=-1).astype(jnp.int32)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def perplexity(
    model,
    tokens: np.ndarray,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on a 1-D token stream with non-overlapping windows.

    tokens: [num_tokens] int; seq_len: window length T (>= 2); batch_size: windows per forward
    call (the last call is padded with repeated windows that are not counted); max_windows:
    score only the first windows (None = all). Returns {"perplexity", "nll", "predictions",
    "windows", "seq_len", "seconds"}.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window needs a prediction), got {seq_len}")
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    rows = corpus.windows(np.asarray(tokens), seq_len)
    if max_windows is not None:
        rows = rows[:max_windows]
    if rows.shape[0] == 0:
        raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than one window of {seq_len}")
    vocab = model.cfg.vocab_size
    if rows.min() < 0 or rows.max() >= vocab:
        raise ValueError(f"tokens must be in [0, {vocab}) for this model")
    start = time.perf_counter()
    total = 0.0
    for i in range(0, rows.shape[0], batch_size):
        chunk = rows[i : i + batch_size]
        n = chunk.shape[0]
        if n < batch_size:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        sums = np.asarray(_window_nll(model, jnp.asarray(chunk, jnp.int32)), np.float64)
        total += float(sums[:n].sum())
    predictions = rows.shape[0] * (seq_len - 1)
    nll = total / predictions
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "predictions": predictions,
        "windows": int(rows.shape[0]),
        "seq_len": seq_len,
        "seconds": time.perf_counter() - start,
    }


def validation_perplexity(model, tokenizer, *, source: str = "wiki", seq_len: int = 2048, **kwargs) -> dict[str, Any]:
    """:func:`perplexity` on the validation split of ``source`` (default: the wiki corpus's
    fixed split, SPEC section 6) tokenized with ``tokenizer``."""
    tokens = corpus.load_tokens(source, "validation", tokenizer)
    return perplexity(model, tokens, seq_len=seq_len, **kwargs)


def passkey_accuracy(
    model,
    tokenizer,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096, 8192),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 5,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Passkey retrieval accuracy for every (length, depth).

    Returns {"by_length": {length: accuracy}, "cells": [{"length", "depth", "accuracy",
    "correct", "samples"}], "seconds"}."""
    _check_positive("samples", samples)
    _check_positive("batch_size", batch_size)
    if not lengths or not depths:
        raise ValueError("lengths and depths must be non-empty")
    start = time.perf_counter()
    cells, by_length = [], {}
    for length in lengths:
        hits_at_length = 0
        for d_index, depth in enumerate(depths):
            tokens, answer_start, _ = synthetic.passkey_batch(
                tokenizer, int(length), float(depth), samples, seed=seed + 7919 * int(length) + d_index
            )
            correct = []
            for i in range(0, samples, batch_size):
                chunk, starts = tokens[i : i + batch_size], answer_start[i : i + batch_size]
                n = chunk.shape[0]
                if n < batch_size:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
                    starts = np.concatenate([starts, np.repeat(starts[-1:], batch_size - n)])
                pred = np.asarray(_argmax(model, jnp.asarray(chunk)))
                correct.extend(synthetic.answer_correct(pred, chunk, starts)[:n].tolist())
            hits = int(sum(correct))
            hits_at_length += hits
            cells.append({"length": int(length), "depth": float(depth), "accuracy": hits / samples,
                          "correct": hits, "samples": samples})
        by_length[int(length)] = hits_at_length / (samples * len(depths))
    return {"by_length": by_length, "cells": cells, "seconds": time.perf_counter() - start}


__all__ = ["perplexity", "validation_perplexity", "passkey_accuracy"]
