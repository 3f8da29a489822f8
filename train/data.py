"""The input pipeline (grain): documents -> tokens -> packed fixed-length rows -> batches.

Steps, for the training split:

1. Read documents (sea_jax.data.corpus: the wiki corpus with its fixed split, .txt or .jsonl
   files; or synthetic random tokens) and tokenize each, appending the tokenizer's EOS.
2. Cut every document into pieces of at most ``seq_len + 1`` tokens (so one huge .txt still
   spreads over all hosts and no piece outgrows a row).
3. Shard the pieces over hosts: process ``i`` of ``n`` keeps pieces ``i, i + n, ...``.
4. Shuffle the piece order with ``data.seed`` (a new permutation every epoch) and repeat forever.
5. Pack: concatenate pieces and split into rows of ``seq_len + 1`` tokens
   (``grain.experimental.ConcatThenSplitIterDataset``), recording per-token segment ids and
   positions; then inputs = row[:-1], targets = row[1:], and a target counts in the loss only
   when it belongs to the same piece as its input.
6. Batch ``global_batch_size / process_count`` rows per host and reshape them to
   [grad_accum_steps, micro_batch, seq_len].

The grain iterator's state (its position in the permutation and the packing buffer) is
checkpointed, so a resumed run reads exactly the batches the uninterrupted run would have read.

Every host tokenizes the whole corpus (the offline corpora here are a few MB); the per-host
shard is taken after tokenization.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterator

import grain
import jax
import numpy as np

from sea_jax.train.config import ConfigError, DataConfig

SYNTHETIC_DOCS = 1 << 20  # the synthetic source's index space (documents made on demand)


def load_tokenizer(name: str):
    from sea_jax.data.tokenizers import load_tokenizer as _load

    try:
        return _load(name)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from e


def _documents(cfg: DataConfig, split: str) -> list[str]:
    """Texts of ``split`` ("train" or "validation") for the wiki and file sources."""
    from sea_jax.data import corpus

    if cfg.source == "wiki":
        try:
            return corpus.load_texts("wiki", split)
        except FileNotFoundError as e:
            raise ConfigError(f"data.source: {e}") from e
    files = cfg.train_files if split == "train" else cfg.validation_files
    key = "data.train_files" if split == "train" else "data.validation_files"
    if split == "validation" and not files:
        # JSONL training files carry their own split (every 20th line); plain text has none
        if all(pathlib.Path(f).suffix.lower() == ".jsonl" for f in cfg.train_files):
            files, key = cfg.train_files, "data.train_files"
        else:
            return []
    texts: list[str] = []
    for path in files:
        suffix = pathlib.Path(path).suffix.lower()
        expected = ".jsonl" if cfg.source == "jsonl" else ".txt"
        if suffix != expected:
            raise ConfigError(f"{key}: {path!r} must end in {expected} for data.source={cfg.source!r}")
        if not pathlib.Path(path).is_file():
            raise ConfigError(f"{key}: file {path!r} does not exist")
        file_split = "all"
        if suffix == ".jsonl" and files is cfg.train_files and not cfg.validation_files:
            file_split = split
        try:
            texts.extend(corpus.load_texts(path, file_split, text_field=cfg.jsonl_key))
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from e
    return texts


def _pieces(token_docs: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    pieces = []
    for doc in token_docs:
        pieces.extend(doc[i : i + max_len] for i in range(0, len(doc), max_len))
    return pieces


def tokenized_pieces(cfg: DataConfig, split: str, tokenizer) -> list[np.ndarray]:
    """Token pieces (int32, each <= seq_len + 1 long, EOS closing every document) of a split."""
    texts = _documents(cfg, split)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    docs = [np.asarray(list(d) + [tokenizer.eos_id], np.int32) for d in ids]
    return _pieces(docs, cfg.seq_len + 1)


class _SyntheticDoc:
    """Document ``i``: random tokens in [0, vocab), length in [seq_len/4, 2 seq_len], drawn from
    (seed, split, i) so any host or resume reproduces it."""

    def __init__(self, seed: int, salt: int, seq_len: int, vocab: int):
        self.seed, self.salt, self.seq_len, self.vocab = seed, salt, seq_len, vocab

    def __call__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.salt, int(index)])
        length = int(rng.integers(max(self.seq_len // 4, 2), 2 * self.seq_len + 1))
        return rng.integers(0, self.vocab, size=length, dtype=np.int32)


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of seq_len + 1 tokens -> model inputs and shifted targets."""
    tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    same_piece = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "loss_mask": same_piece.astype(np.int32),
    }


def _packed(source: grain.MapDataset, seq_len: int) -> grain.IterDataset:
    rows = grain.experimental.ConcatThenSplitIterDataset(
        source.map(lambda t: {"tokens": t}).to_iter_dataset(), length_struct={"tokens": seq_len + 1}
    )
    return rows.map(_to_example)


@dataclasses.dataclass
class DataPipeline:
    """Per-host training iterator and validation batches.

    ``train_iter`` yields dicts of numpy int32 [accum, local_micro_batch, seq_len]; its
    ``get_state()``/``set_state()`` go into checkpoints. ``validation`` holds up to
    ``eval_batches`` fixed batches of the same shape (unshuffled; the last may be padded with
    rows whose loss_mask is 0)."""

    train_dataset: grain.IterDataset
    train_iter: Any
    validation: list[dict[str, np.ndarray]]
    vocab_size: int

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.train_iter


def _reshape(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def build_pipeline(
    cfg: DataConfig,
    *,
    global_batch_size: int,
    grad_accum_steps: int,
    eval_batches: int,
    model_vocab_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataPipeline:
    """The training iterator and validation batches of this host."""
    pid = jax.process_index() if process_index is None else process_index
    nproc = jax.process_count() if process_count is None else process_count
    if global_batch_size % (nproc * grad_accum_steps):
        raise ConfigError(
            f"train.global_batch_size ({global_batch_size}) must be a multiple of "
            f"process_count x train.grad_accum_steps ({nproc} x {grad_accum_steps})"
        )
    local_batch = global_batch_size // nproc

    if cfg.source == "synthetic":
        vocab = model_vocab_size
        train_src = grain.MapDataset.range(SYNTHETIC_DOCS).map(_SyntheticDoc(cfg.seed, 0, cfg.seq_len, vocab))
        val_src = grain.MapDataset.range(4096).map(_SyntheticDoc(cfg.seed, 1, cfg.seq_len, vocab))
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        vocab = tokenizer.vocab_size
        if model_vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size ({model_vocab_size}) is smaller than the vocabulary of "
                f"data.tokenizer={cfg.tokenizer!r} ({vocab})"
            )
        train_pieces = tokenized_pieces(cfg, "train", tokenizer)
        if len(train_pieces) < nproc:
            raise ConfigError(f"data: {len(train_pieces)} training pieces cannot feed {nproc} hosts")
        train_src = grain.MapDataset.source(train_pieces)
        val_src = grain.MapDataset.source(tokenized_pieces(cfg, "validation", tokenizer) or [np.zeros(0, np.int32)])

    train_local = train_src[pid::nproc].shuffle(seed=cfg.seed).repeat(None)
    train_ds = _packed(train_local, cfg.seq_len).batch(local_batch, drop_remainder=True)
    train_ds = train_ds.map(lambda b: _reshape(b, grad_accum_steps))

    validation = []
    val_local = val_src[pid::nproc]
    if len(val_local) and eval_batches > 0:
        val_iter = iter(_packed(val_local, cfg.seq_len).batch(local_batch, drop_remainder=False))
        for _ in range(eval_batches):
            batch = next(val_iter, None)
            if batch is None:
                break
            short = local_batch - batch["inputs"].shape[0]
            if short:
                batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
            if batch["loss_mask"].any():
                validation.append(_reshape(batch, grad_accum_steps))
    return DataPipeline(train_ds, iter(train_ds), validation, vocab)
