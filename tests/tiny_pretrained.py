"""Shared test helper: write a LanguageModel as an HF-layout Llama directory (config.json +
model.safetensors, float32), so tests can use it as a pretrained source (teacher, init_from)
without the GGUF. The layout is the one sea_jax.pretrained.safetensors reads."""

import json
import struct

import numpy as np

from sea_jax.pretrained import llama


def write_hf_dir(model, directory):
    """An HF-layout Llama directory (config.json + model.safetensors) holding ``model``."""
    cfg = model.cfg
    E, H, K, D = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    blocks = model.stages[0].blocks
    arrays = {"model.embed_tokens.weight": model.embed[...], "model.norm.weight": model.final_norm.scale[...]}
    for i in range(cfg.num_layers):
        g = lambda p: np.asarray(p[...][i], np.float32)  # noqa: E731
        arrays[llama.layer_key(i, "input_layernorm")] = g(blocks.attn_norm.scale)
        arrays[llama.layer_key(i, "post_attention_layernorm")] = g(blocks.mlp_norm.scale)
        arrays[llama.layer_key(i, "self_attn.q_proj")] = g(blocks.attn.q_proj).transpose(1, 2, 0).reshape(H * D, E)
        arrays[llama.layer_key(i, "self_attn.k_proj")] = g(blocks.attn.k_proj).transpose(1, 2, 0).reshape(K * D, E)
        arrays[llama.layer_key(i, "self_attn.v_proj")] = g(blocks.attn.v_proj).transpose(1, 2, 0).reshape(K * D, E)
        arrays[llama.layer_key(i, "self_attn.o_proj")] = g(blocks.attn.o_proj).reshape(H * D, E).T
        arrays[llama.layer_key(i, "mlp.gate_proj")] = g(blocks.mlp.gate).T
        arrays[llama.layer_key(i, "mlp.up_proj")] = g(blocks.mlp.up).T
        arrays[llama.layer_key(i, "mlp.down_proj")] = g(blocks.mlp.down).T
    header, blobs, offset = {}, [], 0
    for key, arr in arrays.items():
        raw = np.ascontiguousarray(np.asarray(arr, np.float32)).tobytes()
        header[key] = {"dtype": "F32", "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": E, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": H, "num_key_value_heads": K, "head_dim": D, "intermediate_size": cfg.mlp_dim,
        "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": True,
    }))
