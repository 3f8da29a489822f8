"""Synthetic long-range tasks generated in code at any length (SPEC section 6).

**Passkey retrieval** (Mohtashami & Jaggi 2023): a random number hidden at a chosen depth of
repetitive filler text; the model must continue "What is the pass key? The pass key is" with
it. Built from token pieces (each piece encoded once), so any total length is exact::

    prompt = intro | filler ... | needle | filler ... | question      answer = digits
    needle   = " The pass key is 71432. Remember it. 71432 is the pass key."
    question = " What is the pass key? The pass key is"

``depth`` (0..1) is the fraction of the filler placed before the needle. Scoring is
teacher-forced: the sample counts as retrieved when the model's argmax at every answer
position is the answer token, which is exactly "greedy decoding emits the answer".

**Multi-query associative recall** (MQAR, Arora et al. 2023): ``num_pairs`` key-value pairs,
then queries (a key, then its value) drawn from those keys until the row is full; the loss
and accuracy count the value predicted after each query key. Keys come from
[1, vocab_size / 2), values from [vocab_size / 2, vocab_size); 0 is never used (padding).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """tokens: [length] int32, the prompt followed by the answer tokens; answer_start: index
    of the first answer token (predicted from position answer_start - 1); passkey: the number;
    needle_start: token index where the needle begins; depth: the requested depth."""

    tokens: np.ndarray
    answer_start: int
    passkey: int
    needle_start: int
    depth: float

    @property
    def answer(self) -> np.ndarray:
        return self.tokens[self.answer_start:]


def _check_int(name, value, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def passkey_sample(tokenizer, length: int, depth: float, *, seed: int = 0, digits: int = 5) -> PasskeySample:
    """One passkey prompt of exactly ``length`` tokens (prompt + answer).

    tokenizer: any sea_jax tokenizer (``encode``); length: total tokens; depth: in [0, 1],
    where the needle sits within the filler; seed: draws the passkey; digits: its length.
    """
    _check_int("length", length, 1)
    _check_int("digits", digits, 1)
    if not (isinstance(depth, (int, float, np.floating)) and 0.0 <= float(depth) <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    rng = np.random.default_rng(seed)
    passkey = int(rng.integers(10 ** (digits - 1), 10**digits))
    intro = tokenizer.encode(PASSKEY_INTRO)
    filler = tokenizer.encode(PASSKEY_FILLER)
    needle = tokenizer.encode(f" The pass key is {passkey}. Remember it. {passkey} is the pass key.")
    question = tokenizer.encode(PASSKEY_QUESTION)
    answer = tokenizer.encode(f" {passkey}")
    fixed = len(intro) + len(needle) + len(question) + len(answer)
    n_fill = length - fixed
    if n_fill < 0:
        raise ValueError(f"length must be >= {fixed} for this tokenizer (intro, needle, question, answer), got {length}")
    fill = (filler * (n_fill // max(len(filler), 1) + 1))[:n_fill]
    before = int(round(float(depth) * n_fill))
    tokens = intro + fill[:before] + needle + fill[before:] + question + answer
    assert len(tokens) == length
    return PasskeySample(
        tokens=np.asarray(tokens, np.int32),
        answer_start=length - len(answer),
        passkey=passkey,
        needle_start=len(intro) + before,
        depth=float(depth),
    )


def passkey_batch(tokenizer, length: int, depth: float, count: int, *, seed: int = 0, digits: int = 5):
    """``count`` samples at one (length, depth) with distinct seeds. Returns (tokens [count,
    length] int32, answer_start [count] int32, samples). The answer length can differ between
    passkeys (a tokenizer may merge digits), hence one answer_start per row."""
    _check_int("count", count, 1)
    samples = [passkey_sample(tokenizer, length, depth, seed=seed * 1_000_003 + i, digits=digits) for i in range(count)]
    tokens = np.stack([s.tokens for s in samples])
    return tokens, np.asarray([s.answer_start for s in samples], np.int32), samples


def answer_correct(logits_argmax: np.ndarray, tokens: np.ndarray, answer_start: np.ndarray) -> np.ndarray:
    """Teacher-forced retrieval: [batch] bool, True when argmax at every position
    answer_start - 1 .. length - 2 predicts the next (answer) token.

    logits_argmax: [batch, length] int (argmax of the logits at each position);
    tokens: [batch, length]; answer_start: [batch]."""
    logits_argmax = np.asarray(logits_argmax)
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    if logits_argmax.shape != (B, T):
        raise ValueError(f"logits_argmax must have shape {(B, T)}, got {logits_argmax.shape}")
    pos = np.arange(T - 1)[None, :]
    in_answer = pos >= (np.asarray(answer_start)[:, None] - 1)
    hit = logits_argmax[:, :-1] == tokens[:, 1:]
    return np.all(hit | ~in_answer, axis=1)


# --------------------------------------------------------------------------------------
# multi-query associative recall
# --------------------------------------------------------------------------------------

def mqar_batch(batch: int, seq_len: int, num_pairs: int, vocab_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """MQAR rows. Returns {"inputs", "targets", "loss_mask"} each [batch, seq_len] int32.

    Row layout: k_1 v_1 ... k_n v_n, then (key, value) queries of random earlier keys until
    seq_len (a final odd slot holds a query key with no target). targets[t] = inputs[t + 1];
    loss_mask is 1 exactly at query-key positions whose next token is the value.
    """
    for name, value, low in (("batch", batch, 1), ("num_pairs", num_pairs, 1), ("vocab_size", vocab_size, 4)):
        _check_int(name, value, low)
    _check_int("seq_len", seq_len, 2 * num_pairs + 2)
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"num_pairs must be <= vocab_size // 2 - 1 = {half - 1} (distinct keys), got {num_pairs}")
    rng = np.random.default_rng(seed)
    inputs = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.int32)
    n_query = (seq_len - 2 * num_pairs) // 2
    for b in range(batch):
        keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
        values = rng.integers(half, vocab_size, size=num_pairs)
        inputs[b, 0 : 2 * num_pairs : 2] = keys
        inputs[b, 1 : 2 * num_pairs : 2] = values
        which = rng.integers(0, num_pairs, size=n_query + 1)
        q0 = 2 * num_pairs
        inputs[b, q0 : q0 + 2 * n_query : 2] = keys[which[:n_query]]
        inputs[b, q0 + 1 : q0 + 2 * n_query : 2] = values[which[:n_query]]
        mask[b, q0 : q0 + 2 * n_query : 2] = 1
        if (seq_len - q0) % 2:
            inputs[b, -1] = keys[which[-1]]
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    return {"inputs": inputs, "targets": targets, "loss_mask": mask}


def mqar_accuracy(logits_argmax: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    """Fraction of query positions (loss_mask = 1) whose argmax is the target value."""
    mask = np.asarray(batch["loss_mask"]).astype(bool)
    if not mask.any():
        raise ValueError("the batch has no query positions")
    return float(np.mean(np.asarray(logits_argmax)[mask] == np.asarray(batch["targets"])[mask]))


__all__: Sequence[str] = (
    "PasskeySample", "passkey_sample", "passkey_batch", "answer_correct", "mqar_batch", "mqar_accuracy",
    "PASSKEY_INTRO", "PASSKEY_FILLER", "PASSKEY_QUESTION",
)
