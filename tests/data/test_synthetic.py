"""Synthetic tasks: passkey prompts (exact length, needle depth, answer), teacher-forced
scoring, MQAR structure; checked by decoding the text and by explicit loops."""

import numpy as np
import pytest

from sea_jax.data import synthetic
from sea_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("length", [400, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_sample_layout(length, depth):
    s = synthetic.passkey_sample(TOK, length, depth, seed=length)
    assert s.tokens.shape == (length,) and s.tokens.dtype == np.int32
    text = TOK.decode(s.tokens)
    key = str(s.passkey)
    assert len(key) == 5
    assert text.startswith(synthetic.PASSKEY_INTRO)
    assert text.endswith(synthetic.PASSKEY_QUESTION + " " + key)
    assert TOK.decode(s.answer) == " " + key
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    assert TOK.decode(s.tokens[s.needle_start:s.needle_start + len(needle)]) == needle
    assert text.count(key) == 3  # twice in the needle, once as the answer
    # depth: the fraction of filler tokens before the needle
    intro = len(TOK.encode(synthetic.PASSKEY_INTRO))
    n_fill = length - intro - len(needle) - len(synthetic.PASSKEY_QUESTION) - len(" " + key)
    assert s.needle_start - intro == round(depth * n_fill)


def test_passkey_batch_distinct_and_deterministic():
    tokens, starts, samples = synthetic.passkey_batch(TOK, 300, 0.5, 4, seed=3)
    assert tokens.shape == (4, 300) and starts.shape == (4,)
    assert len({s.passkey for s in samples}) == 4
    again, _, _ = synthetic.passkey_batch(TOK, 300, 0.5, 4, seed=3)
    np.testing.assert_array_equal(tokens, again)
    other, _, _ = synthetic.passkey_batch(TOK, 300, 0.5, 4, seed=4)
    assert not np.array_equal(tokens, other)


def test_passkey_errors():
    with pytest.raises(ValueError, match="depth must be a number in"):
        synthetic.passkey_sample(TOK, 500, 1.5)
    with pytest.raises(ValueError, match="length must be >= "):
        synthetic.passkey_sample(TOK, 20, 0.5)
    with pytest.raises(ValueError, match="length must be an int"):
        synthetic.passkey_sample(TOK, 500.0, 0.5)
    with pytest.raises(ValueError, match="count must be an int"):
        synthetic.passkey_batch(TOK, 500, 0.5, 0)


def test_answer_correct_against_loop():
    rng = np.random.default_rng(0)
    B, T = 6, 12
    tokens = rng.integers(0, 5, size=(B, T))
    starts = np.array([8, 9, 11, 8, 10, 6])
    pred = np.zeros((B, T), int)
    pred[:, :-1] = tokens[:, 1:]  # perfect next-token predictions
    pred[1, 9] += 1  # wrong on an answer token (predicts tokens[1, 10])
    pred[2, 3] += 1  # wrong before the answer: does not matter
    pred[3, 7] += 1  # wrong at answer_start - 1 (predicts the first answer token)
    pred[4, T - 1] += 1  # the last position predicts nothing
    want = []
    for b in range(B):
        want.append(all(pred[b, t - 1] == tokens[b, t] for t in range(starts[b], T)))
    got = synthetic.answer_correct(pred, tokens, starts)
    np.testing.assert_array_equal(got, want)
    assert list(got) == [True, False, True, False, True, True]


@pytest.mark.parametrize("seq_len,num_pairs,vocab", [(32, 4, 64), (33, 5, 20), (14, 6, 16)])
def test_mqar_structure(seq_len, num_pairs, vocab):
    batch = synthetic.mqar_batch(3, seq_len, num_pairs, vocab, seed=seq_len)
    x, y, m = batch["inputs"], batch["targets"], batch["loss_mask"]
    assert x.shape == y.shape == m.shape == (3, seq_len)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    for b in range(3):
        table = {}
        for i in range(num_pairs):
            k, v = int(x[b, 2 * i]), int(x[b, 2 * i + 1])
            assert 1 <= k < vocab // 2 <= v < vocab and k not in table
            table[k] = v
        assert m[b, : 2 * num_pairs].sum() == 0
        for t in range(2 * num_pairs, seq_len):
            if m[b, t]:
                assert int(x[b, t]) in table and int(y[b, t]) == table[int(x[b, t])]
        assert m[b].sum() == (seq_len - 2 * num_pairs) // 2
        assert (x[b] > 0).all()
    # an oracle that looks the value up scores 1, a constant predictor scores ~0
    oracle = np.zeros_like(x)
    for b in range(3):
        table = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(num_pairs)}
        oracle[b] = [table.get(int(t), 0) for t in x[b]]
    assert synthetic.mqar_accuracy(oracle, batch) == 1.0
    assert synthetic.mqar_accuracy(np.zeros_like(x), batch) == 0.0


def test_mqar_errors():
    with pytest.raises(ValueError, match="seq_len must be an int >= 10"):
        synthetic.mqar_batch(1, 9, 4, 64)
    with pytest.raises(ValueError, match="num_pairs must be <= "):
        synthetic.mqar_batch(1, 100, 8, 16)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        synthetic.mqar_batch(1, 100, 1, 2)
