"""Image and sequence classification datasets as preprocessed numpy arrays.

`load_dataset` returns train / valid / test splits, standardized with the train statistics, for
MNIST, Fashion-MNIST, CIFAR-10 (files on disk or TFDS) and MNIST-1D (generated locally).

Raw files of the image datasets are looked up, first hit wins, in:

1. the `data_dir` argument,
2. the directory named by the environment variable `LOPT_DATA_DIR`,
3. the Debian location `DEBIAN_ROOT/<debian-name>` (`apt-get install dataset-fashion-mnist`
   installs `/usr/share/datasets/fashion-mnist`),
4. TFDS, when `tensorflow_datasets` imports and `LOPT_NO_TFDS` is unset.

Inside a directory `D` the files may sit in `D/<name>`, `D/<debian-name>` or `D` itself: the IDX
files (`train-images-idx3-ubyte.gz` etc., gzip or plain) for the MNISTs, the python-pickle
release `cifar-10-batches-py/` for CIFAR-10.

Preprocessed results are cached as `.npz` files under `cache_dir`, `$LOPT_CACHE_DIR/datasets`
or `~/.cache/lopt/datasets`, keyed by the arguments and a fingerprint of the source.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks import caches

DATASETS = ("mnist", "fashion_mnist", "cifar10", "mnist1d")

# Module-level so that tests can point it elsewhere and never read the real system files.
DEBIAN_ROOT = "/usr/share/datasets"

_DEBIAN_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion-mnist", "cifar10": "cifar10"}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "mnist1d": 10}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
# ITU-R BT.601 luma weights, the usual RGB -> grayscale conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Bump when preprocessing changes, so that stale caches are never served.
_CACHE_VERSION = 1
_SPLITS = ("train", "valid", "test")

# IDX element type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

RawSplits = dict[str, tuple[np.ndarray, np.ndarray]]


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a dataset was found; the message lists every place looked."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset split into 'train', 'valid' and 'test'.

    Attributes:
      name: one of `DATASETS`.
      splits: {'train'|'valid'|'test': (x float32, y int32)}.
      num_classes: number of labels.
      source: where the data came from (a path, 'generated', 'tfds', 'cache:<path>').
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    num_classes: int
    source: str


@dataclasses.dataclass(frozen=True)
class _Source:
    """A located copy of a dataset, not read yet."""

    description: str
    fingerprint: str
    load: Callable[[], RawSplits]


# ----------------------------------------------------------------------------- file readers


def _open_maybe_gzip(path: Path):
    # Sniff the gzip magic rather than trust the suffix: users rename files.
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or plain.

    Args:
      path: the file.

    Returns:
      The array, with the file's element type in native byte order and its dimensions.

    Raises:
      ValueError: naming the file, when it is not a valid IDX file (bad magic number, unknown
        type code, truncated or oversized data, broken gzip stream).
    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt deflate stream
        raise ValueError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 then a type code such as 0x08 and the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        problem = "truncated data" if actual < expected else "trailing bytes"
        raise ValueError(
            f"{path}: {problem}: dimensions {shape} need {expected} bytes of data, found {actual}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot read CIFAR-10 batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (needs a dict with b'data', b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: wrong count: {data.shape[0]} images but {labels.size} labels")
    # Channel-major rows (1024 R, 1024 G, 1024 B) -> NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar10_batches(directory: str | os.PathLike) -> RawSplits:
    """Reads the python-pickle release of CIFAR-10 (`cifar-10-batches-py`).

    Args:
      directory: the directory holding `data_batch_1` .. `data_batch_5` and `test_batch`.

    Returns:
      {'train': (images, labels), 'test': (images, labels)}: images uint8 [N, 32, 32, 3],
      labels int64 [N].

    Raises:
      ValueError: naming the file, when a batch is missing or malformed.
    """
    directory = Path(directory)
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"{directory}: incomplete CIFAR-10 directory, missing {missing}")
    train = [_read_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    test = _read_cifar_batch(directory / _CIFAR_TEST)
    return {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": test,
    }


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels [N], got shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(
            f"wrong count: {images_path} holds {len(images)} images but {labels_path} "
            f"holds {len(labels)} labels"
        )
    _check_labels(labels, num_classes, str(labels_path))
    return images[..., None], labels.astype(np.int64)


# ----------------------------------------------------------------------------------- lookup


def _fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_idx(directory: Path, name: str) -> _Source | None:
    """The IDX files of `name` in `directory`, None if there are none, ValueError if partial."""
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    found = {stem: _idx_file(directory, stem) for stem in stems}
    present = [p for p in found.values() if p is not None]
    if not present:
        return None
    missing = [f"{s}[.gz]" for s, p in found.items() if p is None]
    if missing:
        raise ValueError(f"{directory}: incomplete {name} directory, missing {missing}")

    def load() -> RawSplits:
        return {
            split: _read_idx_pair(found[img], found[lab], _NUM_CLASSES[name])
            for split, (img, lab) in _IDX_FILES.items()
        }

    return _Source(str(directory), _fingerprint_files(present), load)


def _find_cifar(directory: Path) -> _Source | None:
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    files = [directory / n for n in names]
    present = [p for p in files if p.is_file()]
    if not present:
        return None

    def load() -> RawSplits:
        raw = read_cifar10_batches(directory)
        for split, (_, y) in raw.items():
            _check_labels(y, _NUM_CLASSES["cifar10"], f"{directory} ({split})")
        return raw

    if len(present) < len(files):
        missing = [p.name for p in files if p not in present]
        raise ValueError(f"{directory}: incomplete CIFAR-10 directory, missing {missing}")
    return _Source(str(directory), _fingerprint_files(present), load)


def _candidate_dirs(root: Path, name: str) -> list[Path]:
    debian = _DEBIAN_NAMES[name]
    # Subdirectories first, so that a root holding several datasets side by side serves each
    # from its own folder before trying IDX files lying loose at its top level.
    subdirs = [root / name] + ([root / debian] if debian != name else [])
    if name == "cifar10":
        dirs = [d / _CIFAR_DIR for d in subdirs] + [root / _CIFAR_DIR] + subdirs + [root]
    else:
        dirs = subdirs + [root]
    return list(dict.fromkeys(dirs))


def _tfds_source(name: str, looked: list[str]) -> _Source | None:
    """A TFDS source, or None (recording why in `looked`) when TFDS is disabled or absent."""
    if os.environ.get("LOPT_NO_TFDS"):
        looked.append("TFDS: disabled by the environment variable LOPT_NO_TFDS")
        return None
    try:
        import tensorflow_datasets as tfds  # lazy: pulls TensorFlow, seconds to import
    except ImportError as e:
        looked.append(f"TFDS: tensorflow_datasets is not importable ({e})")
        return None

    def load() -> RawSplits:
        out = {}
        try:
            for split in ("train", "test"):
                ds = tfds.load(name, split=split, batch_size=-1, as_supervised=True)
                x, y = tfds.as_numpy(ds)
                out[split] = (np.asarray(x, np.uint8), np.asarray(y, np.int64))
        except Exception as e:  # TFDS raises many types; all mean "not here"
            looked.append(f"TFDS: tfds.load({name!r}) failed ({type(e).__name__}: {e})")
            raise DatasetNotFoundError(_not_found_message(name, looked)) from e
        return out

    version = getattr(tfds, "__version__", "unknown")
    return _Source("tfds", f"tfds-{name}-{version}", load)


def _not_found_message(name: str, looked: list[str]) -> str:
    if name == "cifar10":
        files = (
            f"{_CIFAR_DIR}/{{{','.join(_CIFAR_TRAIN)},{_CIFAR_TEST}}} (extract "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
    else:
        files = "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
    hints = [
        f"put {files} in a directory and pass load_dataset(..., data_dir=DIR) "
        "or set the environment variable LOPT_DATA_DIR=DIR",
    ]
    if name == "fashion_mnist":
        hints.append("on Debian/Ubuntu: apt-get install dataset-fashion-mnist")
    hints.append(
        "with a network: pip install 'lopt-meta[tfds]' (TFDS downloads it; unset LOPT_NO_TFDS)"
    )
    return (
        f"dataset {name!r} not found. Looked in:\n"
        + "".join(f"  - {place}\n" for place in looked)
        + "To get it:\n"
        + "".join(f"  - {hint}\n" for hint in hints)
    )


def _locate(name: str, data_dir: str | os.PathLike | None) -> _Source:
    """Finds the raw files of an image dataset, first hit wins (see the module docstring)."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    env_dir = os.environ.get("LOPT_DATA_DIR")
    if env_dir:
        roots.append(("LOPT_DATA_DIR", Path(env_dir).expanduser()))
    roots.append(("Debian", Path(DEBIAN_ROOT) / _DEBIAN_NAMES[name]))

    looked: list[str] = []
    for label, root in roots:
        if not root.is_dir():
            looked.append(f"{root} ({label}, no such directory)")
            continue
        if label == "Debian":
            dirs = [root] + ([root / _CIFAR_DIR] if name == "cifar10" else [])
        else:
            dirs = _candidate_dirs(root, name)
        for d in dirs:
            looked.append(f"{d} ({label}{'' if d.is_dir() else ', no such directory'})")
            if not d.is_dir():
                continue
            source = _find_cifar(d) if name == "cifar10" else _find_idx(d, name)
            if source is not None:
                return source
    source = _tfds_source(name, looked)
    if source is not None:
        return source
    raise DatasetNotFoundError(_not_found_message(name, looked))


def _mnist1d_source() -> _Source:
    version = importlib.metadata.version("mnist1d")

    def load() -> RawSplits:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = 5000  # 4000 train / 1000 test with the default train_split 0.8
        args.seed = 42  # fixed: `seed` of load_dataset only picks the valid split
        # make_dataset reseeds the global RNGs; restore them so callers see no side effect.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)  # generated locally; never its download path
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {"train": (data["x"], data["y"]), "test": (data["x_test"], data["y_test"])}

    return _Source("generated", f"mnist1d-{version}", load)


# ---------------------------------------------------------------------------- preprocessing


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] box-filter weights: the overlap of each output cell with each input cell."""
    edges = np.arange(n_out + 1, dtype=np.float64) * n_in / n_out
    cells = np.arange(n_in, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], cells[None, :])
    hi = np.minimum(edges[1:, None], cells[None, :] + 1)
    w = np.clip(hi - lo, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_area(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resizes images to `resolution` x `resolution` by area averaging (a box filter).

    Args:
      images: float [N, H, W, C].
      resolution: the output height and width.

    Returns:
      float32 [N, resolution, resolution, C]; each output pixel is the mean of the input area
      it covers (fractional overlaps weighted by their area).
    """
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    if h % resolution == 0 and w % resolution == 0:
        # Exact blocks: a reshape-mean is faster and bit-for-bit the plain average.
        fh, fw = h // resolution, w // resolution
        return images.reshape(n, resolution, fh, resolution, fw, c).mean(axis=(2, 4))
    wh, ww = _area_weights(h, resolution), _area_weights(w, resolution)
    nchw = images.transpose(0, 3, 1, 2)
    out = wh @ nchw @ ww.T  # separable: rows then columns, batched over N and C
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """Converts RGB images [..., 3] to luminance [..., 1]; single-channel images pass through."""
    if images.shape[-1] == 1:
        return images
    return (np.asarray(images, np.float32) @ _LUMA)[..., None]


def split_train_valid(n: int, valid_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Picks validation rows out of a training split, deterministically.

    Args:
      n: rows in the original training split.
      valid_size: a fraction in (0, 1) of `n`, or an absolute count (int).
      seed: seed of the permutation.

    Returns:
      (train_indices, valid_indices): disjoint, sorted, covering range(n).
    """
    if isinstance(valid_size, bool) or not isinstance(valid_size, int | float | np.number):
        raise TypeError(f"valid_size must be an int or a float, got {valid_size!r}")
    if isinstance(valid_size, float | np.floating):
        if not 0.0 < valid_size < 1.0:
            raise ValueError(f"a fractional valid_size must lie in (0, 1), got {valid_size}")
        n_valid = int(round(valid_size * n))
    else:
        n_valid = int(valid_size)
    if not 0 < n_valid < n:
        raise ValueError(
            f"valid_size={valid_size!r} gives {n_valid} validation rows out of {n} training "
            "rows; both train and valid must be non-empty"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) mean and std, two-pass in float64 chunks to bound memory."""
    c = x.shape[-1]
    count = x.size // c
    total = np.zeros(c)
    for i in range(0, len(x), chunk):
        total += x[i : i + chunk].reshape(-1, c).sum(axis=0, dtype=np.float64)
    mean = total / count
    sq = np.zeros(c)
    for i in range(0, len(x), chunk):
        sq += np.square(x[i : i + chunk].reshape(-1, c).astype(np.float64) - mean).sum(axis=0)
    std = np.sqrt(sq / count)
    return mean, np.where(std > 0, std, 1.0)  # a constant channel stays finite


def _preprocess(
    raw: RawSplits,
    *,
    image: bool,
    resolution: int | None,
    grayscale: bool,
    valid_size: int | float,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    def prep_x(x: np.ndarray) -> np.ndarray:
        if not image:
            return np.asarray(x, np.float32)
        x = np.asarray(x, np.float32) / 255.0
        if grayscale:
            x = to_grayscale(x)
        if resolution is not None:
            x = resize_area(x, resolution)
        return x

    x_train, y_train = raw["train"]
    train_idx, valid_idx = split_train_valid(len(y_train), valid_size, seed)
    x_train = prep_x(x_train)
    splits = {
        "train": (x_train[train_idx], y_train[train_idx]),
        "valid": (x_train[valid_idx], y_train[valid_idx]),
        "test": (prep_x(raw["test"][0]), raw["test"][1]),
    }
    # Images: per-channel statistics; sequences (mnist1d): one scalar over all features.
    stats_x = splits["train"][0] if image else splits["train"][0].reshape(-1, 1)
    mean, std = _channel_stats(stats_x)
    if not image:
        mean, std = mean[0], std[0]
    out = {}
    for k, (x, y) in splits.items():
        x = np.ascontiguousarray(x, np.float32)
        x -= mean.astype(np.float32)
        x /= std.astype(np.float32)
        out[k] = (x, np.asarray(y, np.int32))
    return out


# -------------------------------------------------------------------------------------- cache


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return caches.cache_dir("datasets")


def _read_cache(path: Path, meta: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The cached splits, or None when the file is absent, corrupt or for other arguments."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["meta"]) != meta:
                return None
            splits = {k: (f[f"x_{k}"], f[f"y_{k}"]) for k in _SPLITS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring corrupt dataset cache {path} ({e}); rebuilding", stacklevel=3)
        return None
    for x, y in splits.values():
        if x.dtype != np.float32 or y.dtype != np.int32 or len(x) != len(y):
            warnings.warn(f"ignoring malformed dataset cache {path}; rebuilding", stacklevel=3)
            return None
    return splits


def _write_cache(path: Path, meta: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Writes atomically (temp file + os.replace): a killed process leaves no partial cache."""
    arrays = {"meta": np.array(meta)}
    for k, (x, y) in splits.items():
        arrays[f"x_{k}"], arrays[f"y_{k}"] = x, y
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
        ) as f:
            tmp = f.name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        # A read-only or full disk costs a rebuild next time, not a failure now.
        warnings.warn(f"could not write dataset cache {path} ({e})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------- public API


def locate_dataset(name: str, data_dir: str | None = None) -> str:
    """Finds a dataset's raw files without loading them (a cheap availability check).

    Args:
      name: one of `DATASETS`.
      data_dir: a directory to look in first (as for `load_dataset`).

    Returns:
      Where the data would come from ('generated locally' for mnist1d).

    Raises:
      ValueError: an unknown name.
      DatasetNotFoundError: no copy anywhere; the message lists every place looked.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if name == "mnist1d":
        return "generated locally (mnist1d package)"
    return _locate(name, data_dir).description


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    resolution: int | None = None,
    grayscale: bool = False,
    valid_size: int | float = 0.1,
    cache_dir: str | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads a dataset as standardized float32 train / valid / test splits.

    Images (mnist, fashion_mnist, cifar10) come as [N, H, W, C] (C=1 for the MNISTs, 3 for
    cifar10), scaled to [0, 1], optionally converted to grayscale and resized, then standardized
    per channel with the train split's mean and std. mnist1d comes as [N, 40], generated with
    the `mnist1d` package (fixed generator seed 42), standardized with the train split's scalar
    mean and std; `resolution` and `grayscale` are ignored for it.

    Args:
      name: one of `DATASETS`.
      data_dir: a directory to look in first for the raw files (see the module docstring).
      resolution: resize images to resolution x resolution by area averaging; None keeps them.
      grayscale: convert cifar10 to one luminance channel (no-op for the MNISTs).
      valid_size: the validation split carved out of the original train split: a fraction in
        (0, 1) or an absolute count. 'test' is always the official test split.
      cache_dir: where preprocessed results are cached; default `$LOPT_CACHE_DIR/datasets`
        or `~/.cache/lopt/datasets`.
      seed: seed of the train / valid permutation.

    Returns:
      A `Dataset`; its `source` says where the data came from ('cache:<path>' on a cache hit).

    Raises:
      ValueError: for an unknown name or bad arguments, or raw files that are corrupt or
        incomplete (the message names the file).
      DatasetNotFoundError: when no copy of the raw files is found anywhere.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    image = name != "mnist1d"
    if not image:
        resolution, grayscale = None, False  # meaningless for 1-D sequences
    elif name != "cifar10":
        grayscale = False  # the MNISTs are already single-channel; share their cache entry
    if resolution is not None and (isinstance(resolution, bool) or int(resolution) <= 0):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    resolution = None if resolution is None else int(resolution)
    # Fail on a bad valid_size before any expensive loading.
    if isinstance(valid_size, bool) or not isinstance(valid_size, int | float | np.number):
        raise TypeError(f"valid_size must be an int or a float, got {valid_size!r}")

    source = _locate(name, data_dir) if image else _mnist1d_source()
    meta = json.dumps(
        {
            "version": _CACHE_VERSION,
            "name": name,
            "resolution": resolution,
            "grayscale": bool(grayscale),
            "valid_size": repr(valid_size),
            "seed": int(seed),
            "source": source.fingerprint,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(meta.encode()).hexdigest()[:20]
    cache_path = _cache_root(cache_dir) / f"{name}-{key}.npz"

    num_classes = _NUM_CLASSES[name]
    cached = _read_cache(cache_path, meta)
    if cached is not None:
        return Dataset(name, cached, num_classes, f"cache:{cache_path}")

    raw = source.load()
    splits = _preprocess(
        raw,
        image=image,
        resolution=resolution,
        grayscale=grayscale,
        valid_size=valid_size,
        seed=seed,
    )
    _write_cache(cache_path, meta, splits)
    return Dataset(name, splits, num_classes, source.description)
