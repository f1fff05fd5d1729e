"""Byte-level text corpora: offline loading, contiguous splits, on-device sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.datasets import DatasetNotFoundError
from tasks.text import FORTUNES_DIR, TextSplit, bits_per_byte, load_text, split_blocks


def test_pydoc_corpus_is_always_there_and_split_in_contiguous_blocks():
    corpus = load_text("pydoc")
    whole = np.concatenate([corpus.splits[k] for k in ("train", "valid", "test")])
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    assert whole.tobytes() == text  # the three splits are the text, in order, nothing lost
    n = len(text)
    assert n > 400_000  # about 0.47 MB of English
    assert len(corpus.splits["train"]) == math.floor(0.9 * n)
    assert len(corpus.splits["valid"]) == math.floor(0.05 * n)


def test_split_blocks_keeps_order_and_covers_everything():
    data = np.arange(1000) % 256
    parts = split_blocks(data.astype(np.uint8))
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [900, 50, 50]
    np.testing.assert_array_equal(np.concatenate(list(parts.values())), data)


def test_text_file_in_the_data_dir_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    (tmp_path / "mine.txt").write_bytes(b"hello world. " * 200)
    corpus = load_text("mine", str(tmp_path))
    assert corpus.source == str(tmp_path / "mine.txt")
    assert bytes(corpus.splits["train"][:12]) == b"hello world."


def test_missing_corpus_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LOPT_NO_TFDS", "1")
    with pytest.raises(DatasetNotFoundError) as err:
        load_text("no_such_corpus")
    message = str(err.value)
    assert str(tmp_path / "no_such_corpus.txt") in message and "TFDS" in message


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian's fortunes is not installed")
def test_fortunes_corpus_when_installed():
    corpus = load_text("fortunes")
    assert sum(len(v) for v in corpus.splits.values()) > 1_000_000
    assert b"\n%\n" not in corpus.splits["train"].tobytes()  # separators removed


def test_sampled_targets_are_the_next_bytes():
    data = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz" * 10, np.uint8)
    split = TextSplit.from_bytes(data)
    x, y = jax.jit(split.sample, static_argnums=(1, 2))(jax.random.PRNGKey(0), 8, 16)
    assert x.shape == y.shape == (8, 16) and x.dtype == jnp.int32
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    # In this text the next byte is the next letter (z wraps to a).
    np.testing.assert_array_equal((x - ord("a") + 1) % 26, y - ord("a"))


def test_bits_per_byte():
    # A uniform guess over 256 bytes costs ln(256) nats = 8 bits per byte.
    assert float(bits_per_byte(jnp.float32(math.log(256.0)))) == pytest.approx(8.0, rel=1e-6)
