"""The grain input pipeline (sea_jax.train.data): packing, host sharding, shuffling by seed,
gradient-accumulation layout, and exact iterator restore through the checkpoint handler.

A JSONL corpus of 100 short documents, each starting with a unique tag ``<017>`` and at most
one row long, so every document is one piece and the rows, concatenated, are the documents in
shuffled order. The reference
is plain Python: each row segment is looked up in the document list. Byte tokenizer, CPU only,
a few seconds.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("draccus")

from sea_jax.train.config import parse_config  # noqa: E402
from sea_jax.train.data import build_pipeline  # noqa: E402

SEQ = 24
EOS = 257  # the byte tokenizer's EOS


def _docs(n: int = 100) -> list[str]:
    # varying lengths of 6..24 tokens (with EOS): rows of 25 cut documents at every offset, but
    # no document is longer than a row, so the pipeline never cuts one into pieces
    return [f"<{i:03d}>" + "abcdefghij"[i % 10] * (i % 19) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in _docs()) + "\n")
    return path


def _pipeline(corpus, *, seed=0, batch=4, accum=1, pid=0, nproc=1, eval_batches=0):
    cfg = parse_config(["--data.source=jsonl", f"--data.train_files=[{corpus}]", f"--data.seq_len={SEQ}",
                        f"--data.seed={seed}"], preset="tiny")
    return build_pipeline(cfg.data, global_batch_size=batch, grad_accum_steps=accum, eval_batches=eval_batches,
                          model_vocab_size=264, process_index=pid, process_count=nproc)


def _rows(batch: dict) -> list[dict]:
    """[accum, micro, seq] arrays -> list of per-row dicts."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    return [{k: flat[k][r] for k in flat} for r in range(flat["inputs"].shape[0])]


def _check_rows(batch: dict) -> list[int]:
    """Check the packed rows of ``batch`` against the documents' rules and return the token
    stream they hold (the rows of seq_len + 1 tokens, concatenated)."""
    stream = []
    for row in _rows(batch):
        inputs, targets, pos, seg, mask = (row[k].tolist() for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask"))
        assert len(inputs) == SEQ and min(seg) > 0, "training rows are fully packed (no padding)"
        assert inputs[1:] == targets[:-1], "targets are the inputs shifted by one"
        for u in range(SEQ):
            # positions restart at every segment start (also where a document continues from
            # the previous row) and count up inside it
            assert pos[u] == (0 if u == 0 or seg[u] != seg[u - 1] else pos[u - 1] + 1), (u, pos, seg)
            # no document is longer than a row, so every document ends with EOS: a target
            # counts exactly when its input is not the EOS that ends a document
            assert mask[u] == int(inputs[u] != EOS), (u, inputs, mask)
            if u and inputs[u - 1] == EOS:
                assert seg[u] != seg[u - 1], "a new document is a new segment"
        stream.extend(inputs + targets[-1:])
    return stream


def _documents_in(stream: list[int]) -> list[int]:
    """Ids of the complete documents of a token stream, in order (checked byte for byte)."""
    docs = {t: i for i, t in enumerate(_docs())}
    found, current = [], []
    for token in stream:
        if token == EOS:
            text = bytes(current).decode()
            if found or text.startswith("<"):  # the stream starts at a document start
                assert text in docs, f"{text!r} is not a document"
                found.append(docs[text])
            current = []
        else:
            current.append(token)
    return found


TRAIN_DOCS = {i for i in range(100) if i % 20 != 0}  # JSONL: every 20th line is validation


def test_packing_matches_the_documents(corpus):
    data = _pipeline(corpus)
    stream = []
    for _ in range(30):  # 120 rows of 25 tokens: more than one epoch (~1.4k tokens)
        stream.extend(_check_rows(next(data.train_iter)))
    seen = _documents_in(stream)
    first_epoch = seen[: len(TRAIN_DOCS)]
    assert sorted(first_epoch) == sorted(TRAIN_DOCS), "each training document once per epoch, nothing else"
    assert first_epoch != sorted(first_epoch), "the document order is shuffled"
    assert seen[len(TRAIN_DOCS):] != first_epoch[: len(seen) - len(TRAIN_DOCS)], "each epoch reshuffles"


def test_validation_batches_are_the_validation_split(corpus):
    data = _pipeline(corpus, eval_batches=3)
    assert 1 <= len(data.validation) <= 3
    tags = []
    for batch in data.validation:
        assert batch["inputs"].shape == (1, 4, SEQ)
        for row in _rows(batch):
            real = row["segment_ids"] > 0
            assert row["loss_mask"][~real].sum() == 0, "padding never counts"
            tags += [int(t) for t in re.findall(rb"<(\d{3})>", bytes(row["inputs"][real].astype(np.uint8).tolist()))]
    assert tags and all(t % 20 == 0 for t in tags), tags


def test_shuffle_is_fixed_by_seed(corpus):
    def first(seed):
        return np.concatenate([next(_pipeline(corpus, seed=seed).train_iter)["inputs"] for _ in range(1)])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_hosts_read_disjoint_shards(corpus):
    per_host = []
    for pid in range(2):
        data = _pipeline(corpus, batch=4, pid=pid, nproc=2)  # 2 rows per host
        stream = []
        for _ in range(30):
            batch = next(data.train_iter)
            assert batch["inputs"].shape == (1, 2, SEQ)
            stream.extend(_check_rows(batch))
        per_host.append(set(_documents_in(stream)))
    assert per_host[0] and per_host[1] and not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == TRAIN_DOCS


def test_accumulation_layout_is_the_same_rows(corpus):
    one = next(_pipeline(corpus, batch=4, accum=1).train_iter)
    two = next(_pipeline(corpus, batch=4, accum=2).train_iter)
    assert two["inputs"].shape == (2, 2, SEQ)
    for k in one:
        np.testing.assert_array_equal(two[k].reshape(1, 4, SEQ), one[k])


@pytest.mark.parametrize("position", [0, 1, 2, 3, 5, 8])
def test_iterator_restores_exactly_through_the_checkpoint_handler(corpus, tmp_path, position):
    """The saved state goes through JSON (lists, not tuples); the restored iterator must yield
    exactly the batches the uninterrupted one does (regression: grain's packing compared its
    empty-remainder sentinel with a tuple and silently replayed stale tokens)."""
    from etils import epath

    from sea_jax.train.checkpoint import DataIteratorHandler, DataRestore, DataSave

    it = _pipeline(corpus).train_iter
    for _ in range(position):
        next(it)
    directory = epath.Path(tmp_path / "data")
    directory.mkdir()
    DataIteratorHandler().save(directory, args=DataSave(it))
    expected = [next(it) for _ in range(3)]
    fresh = _pipeline(corpus).train_iter
    restored = DataIteratorHandler().restore(directory, args=DataRestore(fresh))
    for want in expected:
        got = next(restored)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} after restoring position {position}")


def test_restore_with_another_process_count_is_refused(corpus, tmp_path):
    from etils import epath

    from sea_jax.train.checkpoint import DataIteratorHandler, DataRestore
    from sea_jax.train.config import ConfigError

    directory = epath.Path(tmp_path / "data")
    directory.mkdir()
    (directory / "process_0-of-2.json").write_text("{}")
    (directory / "process_1-of-2.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape("different number of processes")):
        DataIteratorHandler().restore(directory, args=DataRestore(_pipeline(corpus).train_iter))
