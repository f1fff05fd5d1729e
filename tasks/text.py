"""Byte-level text corpora for language-model tasks, offline by default.

Corpora, looked up in order (the first found wins):

* `pydoc`: the English text of the Python standard library's `pydoc_data.topics`
  (about 0.47 MB, present in every Python install: no download, no root);
* `fortunes`: Debian's fortune quotations under `/usr/share/games/fortunes`
  (`apt-get install fortunes`, about 2.5 MB);
* any other name: `<name>.txt` in `data_dir` or `LOPT_DATA_DIR`, else TFDS text datasets
  (`tiny_shakespeare`, `lm1b`) when `tensorflow_datasets` imports (users with a network).

A corpus is split into train / valid / test by contiguous blocks of bytes (90 / 5 / 5 %),
never by random lines, so no sentence straddles two splits' text. Sequences are sampled
on the device with `jax.random` inside jit (`TextSplit.sample`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tasks.datasets import DatasetNotFoundError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SPLIT_FRACTIONS = {"train": 0.9, "valid": 0.05, "test": 0.05}
VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A byte corpus split into contiguous 'train', 'valid' and 'test' blocks.

    Attributes:
      name: the corpus name.
      splits: {'train'|'valid'|'test': uint8 bytes}.
      source: where the text came from.
    """

    name: str
    splits: dict[str, np.ndarray]
    source: str


def _pydoc_text() -> bytes:
    from pydoc_data.topics import topics  # noqa: PLC0415 - stdlib, loaded only when asked

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def _fortunes_text(directory: Path) -> bytes:
    files = sorted(
        f for f in directory.iterdir() if f.is_file() and f.suffix not in (".dat", ".u8")
    )
    entries = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        # Entries are separated by lines holding only "%".
        entries += [e.strip("\n") for e in re.split(r"^%[ \t\r]*$", text, flags=re.M) if e.strip()]
    return "\n\n".join(entries).encode("utf-8")


def _tfds_text(name: str) -> bytes | None:
    if os.environ.get("LOPT_NO_TFDS"):
        return None
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError:
        return None
    parts = []
    for split in ("train", "validation", "test"):
        for ex in tfds.as_numpy(tfds.load(name, split=split)):
            parts.append(ex["text"] if isinstance(ex["text"], bytes) else bytes(ex["text"]))
    return b"\n".join(parts)


def split_blocks(data: np.ndarray) -> dict[str, np.ndarray]:
    """Contiguous train / valid / test blocks of `data` by `SPLIT_FRACTIONS`."""
    n = len(data)
    n_train = math.floor(n * SPLIT_FRACTIONS["train"])
    n_valid = math.floor(n * SPLIT_FRACTIONS["valid"])
    return {
        "train": data[:n_train],
        "valid": data[n_train : n_train + n_valid],
        "test": data[n_train + n_valid :],
    }


def load_text(name: str = "pydoc", data_dir: str | None = None) -> TextCorpus:
    """Loads corpus `name` as byte splits.

    Args:
      name: 'pydoc', 'fortunes', or a name found as `<name>.txt` in `data_dir` /
        `LOPT_DATA_DIR` or in TFDS.
      data_dir: a directory to look in first.

    Returns:
      The corpus.

    Raises:
      DatasetNotFoundError: no copy found; the message lists every place looked.
    """
    looked = []
    for label, root in (("data_dir", data_dir), ("LOPT_DATA_DIR", os.environ.get("LOPT_DATA_DIR"))):
        if root:
            path = Path(root).expanduser() / f"{name}.txt"
            if path.is_file():
                return _corpus(name, path.read_bytes(), str(path))
            looked.append(f"{label}: {path}")
    if name == "pydoc":
        return _corpus(name, _pydoc_text(), "pydoc_data.topics (Python standard library)")
    if name == "fortunes":
        if FORTUNES_DIR.is_dir() and any(FORTUNES_DIR.iterdir()):
            return _corpus(name, _fortunes_text(FORTUNES_DIR), str(FORTUNES_DIR))
        looked.append(f"{FORTUNES_DIR} (apt-get install fortunes)")
    else:
        text = _tfds_text(name)
        if text is not None:
            return _corpus(name, text, "tfds")
        looked.append("TFDS (pip install 'lopt-meta[tfds]', with a network; unset LOPT_NO_TFDS)")
    raise DatasetNotFoundError(
        f"text corpus {name!r} not found; looked in: "
        + "; ".join(looked)
        + f". Put the text in DIR/{name}.txt and set LOPT_DATA_DIR=DIR, or use 'pydoc' "
        "(always available offline)"
    )


def _corpus(name: str, text: bytes, source: str) -> TextCorpus:
    data = np.frombuffer(text, np.uint8)
    if len(data) < 1000:
        raise ValueError(f"text corpus {name!r} from {source} is too short ({len(data)} bytes)")
    return TextCorpus(name, split_blocks(data), source)


class TextSplit(struct.PyTreeNode):
    """One split's bytes on the device (a jit argument, never a constant)."""

    data: jax.Array  # [n] int32 byte values

    @classmethod
    def from_bytes(cls, data: np.ndarray) -> TextSplit:
        return cls(jnp.asarray(np.asarray(data, np.int32)))

    def sample(self, key: jax.Array, batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
        """`batch_size` windows at uniform random offsets: inputs [B, T] and next-byte
        targets [B, T] (the inputs shifted by one)."""
        n = self.data.shape[0]
        if n < seq_len + 2:
            raise ValueError(f"split of {n} bytes is shorter than a sequence of {seq_len} + 1")
        starts = jax.random.randint(key, (batch_size,), 0, n - seq_len)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(self.data, (s,), (seq_len + 1,)))(starts)
        return windows[:, :-1], windows[:, 1:]


def bits_per_byte(cross_entropy_nats: jax.Array) -> jax.Array:
    """Next-byte cross-entropy in nats converted to bits per byte."""
    return cross_entropy_nats / math.log(2.0)
