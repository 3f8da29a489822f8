"""Evaluation: windowed perplexity against an explicit per-window loop on a tiny random LM;
passkey scoring with oracle / broken stand-in models."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sea_jax import evaluation
from sea_jax.data.tokenizers import ByteTokenizer
from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel


@pytest.fixture(scope="module")
def tiny():
    cfg = LMConfig(vocab_size=37, width=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24, init_std=0.3)
    return LanguageModel(cfg, rngs=nnx.Rngs(0))


def _reference_ppl(model, tokens, T):
    total, count = 0.0, 0
    for w in range(len(tokens) // T):
        window = tokens[w * T:(w + 1) * T]
        logits = np.asarray(model(jnp.asarray(window[None])).logits[0], np.float64)
        for t in range(T - 1):
            row = logits[t] - logits[t].max()
            total -= row[window[t + 1]] - math.log(np.exp(row).sum())
            count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("T,batch", [(8, 1), (13, 3), (5, 4)])
def test_perplexity_matches_loop(tiny, T, batch):
    tokens = np.random.default_rng(T).integers(0, 37, size=61)
    got = evaluation.perplexity(tiny, tokens, seq_len=T, batch_size=batch)
    want, count = _reference_ppl(tiny, tokens, T)
    assert got["windows"] == 61 // T and got["predictions"] == count
    np.testing.assert_allclose(got["perplexity"], want, rtol=2e-5)
    assert got["perplexity"] > 1.0


def test_perplexity_max_windows_and_errors(tiny):
    tokens = np.random.default_rng(0).integers(0, 37, size=40)
    first = evaluation.perplexity(tiny, tokens[:16], seq_len=8)
    capped = evaluation.perplexity(tiny, tokens, seq_len=8, max_windows=2)
    assert capped["windows"] == 2
    np.testing.assert_allclose(capped["perplexity"], first["perplexity"], rtol=1e-6)
    with pytest.raises(ValueError, match="shorter than one window"):
        evaluation.perplexity(tiny, tokens[:5], seq_len=8)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        evaluation.perplexity(tiny, tokens, seq_len=1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluation.perplexity(tiny, tokens, seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 37\)"):
        evaluation.perplexity(tiny, np.full(16, 40), seq_len=8)


class _Out(NamedTuple):
    logits: jax.Array


class _Oracle(nnx.Module):
    """Predicts the true next token (it peeks); ``fail_above``: wrong for longer inputs;
    ``corrupt``: wrong everywhere."""

    def __init__(self, vocab, fail_above=10**9, corrupt=False):
        self.vocab, self.fail_above, self.corrupt = vocab, fail_above, corrupt

    def __call__(self, tokens):
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        if self.corrupt or tokens.shape[1] > self.fail_above:
            nxt = (nxt + 1) % self.vocab
        return _Out(jax.nn.one_hot(nxt, self.vocab))


def test_passkey_accuracy_scoring():
    tok = ByteTokenizer()
    res = evaluation.passkey_accuracy(_Oracle(259, fail_above=300), tok, lengths=(260, 400), depths=(0.0, 0.5, 1.0),
                                      samples=3, batch_size=2)
    assert res["by_length"] == {260: 1.0, 400: 0.0}
    assert len(res["cells"]) == 6 and all(c["samples"] == 3 for c in res["cells"])
    assert [c["accuracy"] for c in res["cells"]] == [1.0] * 3 + [0.0] * 3
    broken = evaluation.passkey_accuracy(_Oracle(259, corrupt=True), tok, lengths=(260,), depths=(0.5,), samples=2)
    assert broken["by_length"] == {260: 0.0}
    with pytest.raises(ValueError, match="samples must be a positive int"):
        evaluation.passkey_accuracy(_Oracle(259), tok, lengths=(200,), samples=0)


def test_passkey_on_tiny_lm_runs(tiny):
    # a random model does not retrieve; the call runs end to end through the real LM
    tok = ByteTokenizer()
    cfg = tiny.cfg.replace(vocab_size=259)
    model = LanguageModel(cfg, rngs=nnx.Rngs(1))
    res = evaluation.passkey_accuracy(model, tok, lengths=(260,), depths=(0.5,), samples=2)
    assert res["by_length"][260] == 0.0
