"""Load a Llama-family HF checkpoint from a local directory (config.json + *.safetensors).

The safetensors format is small enough to read directly (and reading it ourselves keeps bf16
working without torch): 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any

import ml_dtypes
import numpy as np

from sea_jax.pretrained import llama

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (memory-mapped, read-only)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from None
    data_start = 8 + header_len
    file_size = path.stat().st_size
    blob = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(file_size - data_start,)) \
        if file_size > data_start else np.zeros((0,), np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}; supported: {sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > blob.shape[0]:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets {begin, end} for {info['dtype']} {shape}")
        tensors[name] = blob[begin:end].view(dtype).reshape(shape)
    return tensors


def hf_llama_architecture(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """LMConfig architecture fields from an HF Llama ``config.json`` dict."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral", None):
        raise ValueError(f"{source}: model_type must be 'llama' (or 'mistral'), got {model_type!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act must be 'silu', got {config['hidden_act']!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias / mlp_bias are not supported")
    if config.get("sliding_window") not in (None, 0):
        raise ValueError(f"{source}: sliding_window attention checkpoints are not supported")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{source}: rope scaling {rope_type!r} is not supported")
    rope_base = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    try:
        width = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        return dict(
            vocab_size=int(config["vocab_size"]),
            width=width,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or width // num_heads),
            mlp_dim=int(config["intermediate_size"]),
            rope_base=float(rope_base),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"{source}: missing key {err.args[0]!r}") from None


def _tokenizer_from_directory(directory: pathlib.Path, config: dict[str, Any]):
    """The directory's tokenizer.json as a BPETokenizer, or None when there is none."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    import tokenizers

    from sea_jax.data.tokenizers import BPETokenizer

    backend = tokenizers.Tokenizer.from_file(str(path))
    special = {}
    tok_cfg_path = directory / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        for role in ("bos", "eos", "pad"):
            token = tok_cfg.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                special[role] = backend.token_to_id(token)
    eos = special.get("eos", config.get("eos_token_id", 0))
    eos = eos[0] if isinstance(eos, list) else eos
    bos = special.get("bos", config.get("bos_token_id", eos))
    pad = special.get("pad", config.get("pad_token_id", eos))
    return BPETokenizer(directory.name, backend, bos_id=int(bos), eos_id=int(eos), pad_id=int(pad if pad is not None else eos))


def load_safetensors_directory(
    directory: str | os.PathLike,
    *,
    attention: str = "dense",
    attention_options=None,
    layer_attention=None,
    seed: int = 0,
    **config_overrides,
):
    """(model, tokenizer or None, config) from an HF Llama directory: config.json and one or
    more *.safetensors files (shards are merged); tokenizer.json is used when present."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected an HF Llama checkpoint directory)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    config = json.loads(config_path.read_text())
    architecture = hf_llama_architecture(config, str(config_path))
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        for name, value in read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"{directory}: tensor {name!r} appears in more than one shard")
            tensors[name] = value
    if architecture["tie_embeddings"] and "lm_head.weight" in tensors:
        # some exports store the tied matrix twice; it must really be the embedding
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{directory}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        del tensors["lm_head.weight"]
    cfg = llama.make_config(
        architecture, attention=attention, attention_options=attention_options,
        layer_attention=layer_attention, **config_overrides,
    )
    model = llama.build_language_model(cfg, tensors, source=str(directory), seed=seed)
    return model, _tokenizer_from_directory(directory, config), cfg
