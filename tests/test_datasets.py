"""Tests of tasks.datasets on small fixtures written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from tasks import datasets
from tasks.datasets import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    load_dataset,
    read_cifar10_batches,
    read_idx,
    resize_area,
    split_train_valid,
    to_grayscale,
)

SHARED_MNIST_TEST = Path(__file__).resolve().parents[2] / "shared/datasets/mnist-test"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------- fixtures


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Writes `array` (uint8) as an IDX file, the format of the MNIST distribution."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist(
    directory: Path, n_train: int = 50, n_test: int = 20, seed: int = 0, compress: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes the four MNIST IDX files of random (hence distinct) 28x28 images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    raw = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", x, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", y, compress)
        raw[split] = (x, y)
    return raw


RED_AT = (5, 7)  # (row, col) of a pure red pixel in the first training image
GREEN_AT = (30, 2)  # (row, col) of a pure green pixel in the first test image


def write_cifar(directory: Path, per_batch: int = 2) -> Path:
    """Writes a CIFAR-10 python-pickle release with `per_batch` images per batch."""
    batches = directory / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        if name == "data_batch_1":
            data[0] = 0
            data[0, 0 * 1024 + RED_AT[0] * 32 + RED_AT[1]] = 255  # channel-major: R plane first
        if name == "test_batch":
            data[0] = 0
            data[0, 1 * 1024 + GREEN_AT[0] * 32 + GREEN_AT[1]] = 255
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    return batches


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keeps every test off the real cache, TFDS, LOPT_DATA_DIR and /usr/share/datasets."""
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LOPT_NO_TFDS", "1")
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", str(tmp_path / "debian"))


def rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x}


# ---------------------------------------------------------------------------------- readers


def test_read_idx_roundtrip_gzip_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a, compress=False)), a)


def test_read_idx_big_endian_int32(tmp_path):
    a = np.array([1, -2, 70000], ">i4")
    path = tmp_path / "i4"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + np.array([3], ">u4").tobytes() + a.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, [1, -2, 70000])


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(b"\x12\x34\x08\x01" + np.array([2], ">u4").tobytes() + b"\x00\x01")
    with pytest.raises(ValueError, match="magic") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">u4").tobytes() + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated_gzip_stream(tmp_path):
    full = write_idx(tmp_path / "full.gz", np.random.default_rng(0).integers(0, 256, (20, 28, 28)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(cut)


def test_read_cifar_pixel_layout(tmp_path):
    raw = read_cifar10_batches(write_cifar(tmp_path))
    x, y = raw["train"]
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (10,)
    r, c = RED_AT
    np.testing.assert_array_equal(x[0, r, c], [255, 0, 0])
    assert x[0].sum() == 255  # nothing else lit
    xt, yt = raw["test"]
    assert xt.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(xt[0, GREEN_AT[0], GREEN_AT[1]], [0, 255, 0])


def test_read_cifar_incomplete_and_corrupt(tmp_path):
    batches = write_cifar(tmp_path)
    (batches / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        read_cifar10_batches(batches)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    (batches / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        read_cifar10_batches(batches)


# ----------------------------------------------------------------------------------- lookup


def test_unknown_name():
    with pytest.raises(ValueError, match="mnist1d"):
        load_dataset("imagenet")
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10", "mnist1d")


def test_lookup_order(tmp_path, monkeypatch):
    arg_dir, env_dir = tmp_path / "arg", tmp_path / "env"
    write_mnist(arg_dir / "mnist", n_train=30)  # D/<name>
    write_mnist(env_dir, n_train=40)  # files directly in D
    write_mnist(tmp_path / "debian" / "mnist", n_train=50)  # Debian layout
    monkeypatch.setenv("LOPT_DATA_DIR", str(env_dir))

    ds = load_dataset("mnist", str(arg_dir), valid_size=5)
    assert ds.source == str(arg_dir / "mnist") and len(ds.splits["train"][0]) == 25
    ds = load_dataset("mnist", valid_size=5)
    assert ds.source == str(env_dir) and len(ds.splits["train"][0]) == 35
    monkeypatch.delenv("LOPT_DATA_DIR")
    ds = load_dataset("mnist", valid_size=5)
    assert ds.source == str(tmp_path / "debian" / "mnist")
    assert len(ds.splits["train"][0]) == 45


def test_debian_layout_and_names(tmp_path):
    # The Debian package name 'fashion-mnist', with uncompressed files, under a data_dir ...
    write_mnist(tmp_path / "data" / "fashion-mnist", compress=False)
    ds = load_dataset("fashion_mnist", str(tmp_path / "data"))
    assert ds.source == str(tmp_path / "data" / "fashion-mnist")
    # ... and under the Debian root.
    write_mnist(tmp_path / "debian" / "fashion-mnist", n_train=60)
    ds = load_dataset("fashion_mnist")
    assert ds.source == str(tmp_path / "debian" / "fashion-mnist")
    assert sum(len(ds.splits[k][1]) for k in ("train", "valid")) == 60


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    arg_dir, env_dir = tmp_path / "nothing-here", tmp_path / "empty-env"
    env_dir.mkdir()
    monkeypatch.setenv("LOPT_DATA_DIR", str(env_dir))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion_mnist", str(arg_dir))
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    for place in (
        arg_dir,
        env_dir,
        env_dir / "fashion_mnist",
        env_dir / "fashion-mnist",
        tmp_path / "debian" / "fashion-mnist",
    ):
        assert str(place) in msg
    for hint in ("LOPT_NO_TFDS", "apt-get install dataset-fashion-mnist", "LOPT_DATA_DIR"):
        assert hint in msg
    assert "lopt-meta[tfds]" in msg


def test_not_found_without_tfds_installed(monkeypatch):
    monkeypatch.delenv("LOPT_NO_TFDS")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(DatasetNotFoundError, match="TFDS: tensorflow_datasets is not importable"):
        load_dataset("cifar10")


def test_tfds_fallback(monkeypatch):
    class FakeTfds(types.ModuleType):
        fail = False

        def load(self, name, split, batch_size, as_supervised):
            assert (name, batch_size, as_supervised) == ("cifar10", -1, True)
            if self.fail:
                raise RuntimeError("no network")
            n = 10 if split == "train" else 4
            x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            return x, np.arange(n) % 10

        def as_numpy(self, ds):
            return ds

    fake = FakeTfds("tensorflow_datasets")
    monkeypatch.delenv("LOPT_NO_TFDS")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = load_dataset("cifar10", valid_size=2)
    assert ds.source == "tfds" and ds.splits["test"][0].shape == (4, 32, 32, 3)
    fake.fail = True
    with pytest.raises(DatasetNotFoundError, match="no network"):
        load_dataset("cifar10", valid_size=3)  # other arguments: a cache miss, so a reload


def test_corrupt_idx_in_data_dir(tmp_path):
    write_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ValueError, match="magic") as e:
        load_dataset("mnist", str(tmp_path))
    assert str(bad) in str(e.value)


def test_incomplete_and_mismatched_idx_dir(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))  # 20 images
    with pytest.raises(ValueError, match="wrong count"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", str(tmp_path))


# ---------------------------------------------------------------------------- preprocessing


def _area_reference(images: np.ndarray, resolution: int) -> np.ndarray:
    """Area resize in float64 without fractional weights: repeat every pixel until the size
    is a multiple of the output (the least common multiple), then average whole blocks."""
    n, h, w, c = images.shape
    lh, lw = np.lcm(h, resolution), np.lcm(w, resolution)
    up = np.repeat(np.repeat(np.float64(images), lh // h, axis=1), lw // w, axis=2)
    blocks = up.reshape(n, resolution, lh // resolution, resolution, lw // resolution, c)
    return blocks.mean(axis=(2, 4))


# resize_area computes in float32 (weights rounded to float32, sums of a few terms): a few
# units in the last place of values of order one, so rtol=2e-6 (~16 ulp).
RESIZE_RTOL = 2e-6


def test_resize_area_hand_values():
    # 28 -> 8: each output cell covers 3.5 input pixels (the fractional-weights path).
    img = np.zeros((1, 28, 28, 1), np.float32)
    img[0, :, 3] = 1.0  # column 3 is split half/half between output columns 0 and 1
    out = resize_area(img, 8)
    assert out.shape == (1, 8, 8, 1)
    np.testing.assert_allclose(out[0, :, :2, 0], 0.5 / 3.5, rtol=RESIZE_RTOL)
    # Cells that cover no lit pixel sum only products with zero: exactly zero.
    np.testing.assert_array_equal(out[0, :, 2:, 0], 0.0)
    half = np.zeros((1, 28, 28, 1), np.float32)
    half[0, :, :14] = 1.0
    np.testing.assert_allclose(
        resize_area(half, 8)[0, 0, :, 0], [1, 1, 1, 1, 0, 0, 0, 0], rtol=RESIZE_RTOL, atol=0
    )
    # 32 -> 8: exact 4x4 blocks (the reshape-mean path).
    img = np.zeros((1, 32, 32, 3), np.float32)
    img[0, 0, 0, 0] = 16.0
    out = resize_area(img, 8)
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(out[0, 0, 0, 0], 1.0, rtol=RESIZE_RTOL)
    np.testing.assert_allclose(out.sum(), 1.0, rtol=RESIZE_RTOL)
    np.testing.assert_array_equal(out.reshape(-1)[1:], 0.0)  # means of zeros: exactly zero


@pytest.mark.parametrize("size, resolution", [(32, 8), (28, 8), (28, 7), (30, 8), (13, 5)])
def test_resize_area_matches_an_independent_reference(size, resolution):
    x = np.random.default_rng(size).random((3, size, size, 2), np.float32)
    got = resize_area(x, resolution)
    assert got.shape == (3, resolution, resolution, 2) and got.dtype == np.float32
    # float32 weights and sums over at most 5x5 overlapping pixels of [0, 1): a few ulp of
    # values around 0.5, hence rtol=1e-5 with atol=1e-6 for the rare cell near zero.
    np.testing.assert_allclose(got, _area_reference(x, resolution), rtol=1e-5, atol=1e-6)


def test_grayscale_weights():
    red = np.zeros((1, 2, 2, 3), np.float32)
    red[..., 0] = 1.0
    # One float32 product with an exact 1.0 (plus exact zeros): only 0.299's float32 rounding.
    np.testing.assert_allclose(to_grayscale(red), 0.299, rtol=1e-6)
    gray = np.ones((1, 2, 2, 1), np.float32)
    assert to_grayscale(gray) is gray


def test_mnist_pipeline(tmp_path):
    raw = write_mnist(tmp_path)
    ds = load_dataset("mnist", str(tmp_path), resolution=8, valid_size=0.2, seed=3)
    assert isinstance(ds, Dataset) and ds.name == "mnist" and ds.num_classes == 10
    assert set(ds.splits) == {"train", "valid", "test"}
    (xtr, ytr), (xva, yva), (xte, yte) = (ds.splits[k] for k in ("train", "valid", "test"))
    assert xtr.shape == (40, 8, 8, 1) and xva.shape == (10, 8, 8, 1) and xte.shape == (20, 8, 8, 1)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32
    # Standardized in float32 over 2,560 values: mean 0 and std 1 up to float32 round-off.
    assert abs(xtr.mean()) < 1e-5 and abs(xtr.std() - 1) < 1e-4
    # Whole pipeline: scale, resize, split, standardize with the train statistics, here in
    # float64 with the independent area reference.
    tr, va = split_train_valid(50, 0.2, 3)
    pre = _area_reference(raw["train"][0][..., None] / 255.0, 8)
    mean, std = pre[tr].mean(), pre[tr].std()
    # float32 pipeline (resize, mean/std over 2,560 values) against float64: values of order
    # one agree to ~1e-6; atol=1e-4 also covers the float32 statistics.
    np.testing.assert_allclose(xtr, (pre[tr] - mean) / std, atol=1e-4)
    np.testing.assert_allclose(xva, (pre[va] - mean) / std, atol=1e-4)
    np.testing.assert_array_equal(yva, raw["train"][1][va])
    pre_test = _area_reference(raw["test"][0][..., None] / 255.0, 8)
    np.testing.assert_allclose(xte, (pre_test - mean) / std, atol=1e-4)
    np.testing.assert_array_equal(yte, raw["test"][1])


def test_cifar_pipeline_and_grayscale(tmp_path):
    write_cifar(tmp_path / "cifar10")  # D/cifar10/cifar-10-batches-py
    ds = load_dataset("cifar10", str(tmp_path), valid_size=2)
    xtr = ds.splits["train"][0]
    assert xtr.shape == (8, 32, 32, 3) and ds.splits["valid"][0].shape == (2, 32, 32, 3)
    # Per-channel standardization in float32 over 8,192 values: float32 round-off only.
    np.testing.assert_allclose(xtr.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(xtr.std(axis=(0, 1, 2)), 1, atol=1e-4)
    # The red pixel keeps its place and channel through the pipeline.
    tr, va = split_train_valid(10, 2, 0)
    x0 = ds.splits["train"][0][0] if 0 in tr else ds.splits["valid"][0][0]
    assert np.unravel_index(np.argmax(x0[..., 0]), (32, 32)) == RED_AT
    gray = load_dataset("cifar10", str(tmp_path), grayscale=True, resolution=8, valid_size=2)
    assert gray.splits["train"][0].shape == (8, 8, 8, 1)
    assert gray.splits["test"][0].shape == (2, 8, 8, 1)


def test_grayscale_is_noop_for_mnist(tmp_path):
    write_mnist(tmp_path)
    a = load_dataset("mnist", str(tmp_path), grayscale=True)
    b = load_dataset("mnist", str(tmp_path))
    assert a.splits["train"][0].shape[-1] == 1 and b.source.startswith("cache:")
    np.testing.assert_array_equal(a.splits["train"][0], b.splits["train"][0])


def test_valid_split_deterministic_and_disjoint(tmp_path):
    write_mnist(tmp_path)
    a = load_dataset("mnist", str(tmp_path), valid_size=7, cache_dir=str(tmp_path / "c1"))
    b = load_dataset("mnist", str(tmp_path), valid_size=7, cache_dir=str(tmp_path / "c2"))
    assert not b.source.startswith("cache:")  # rebuilt, not read back
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.splits[k][0], b.splits[k][0])
    xtr, xva = a.splits["train"][0], a.splits["valid"][0]
    assert len(xtr) == 43 and len(xva) == 7
    assert not rows(xtr) & rows(xva) and len(rows(xtr) | rows(xva)) == 50
    other = load_dataset("mnist", str(tmp_path), valid_size=7, seed=1)
    assert rows(other.splits["valid"][0]) != rows(xva)


def test_split_train_valid_sizes_and_errors():
    tr, va = split_train_valid(100, 0.1, 0)
    assert len(va) == 10 and len(tr) == 90
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(100))
    np.testing.assert_array_equal(split_train_valid(100, 0.1, 0)[1], va)
    assert len(split_train_valid(100, 25, 0)[1]) == 25
    for bad in (0, 0.0, 1.0, 100, -3):
        with pytest.raises(ValueError):
            split_train_valid(100, bad, 0)
    with pytest.raises(TypeError):
        split_train_valid(100, True, 0)


# ------------------------------------------------------------------------------------ cache


def test_cache_hit_corrupt_cache_and_fingerprint(tmp_path):
    write_mnist(tmp_path / "data")
    first = load_dataset("mnist", str(tmp_path / "data"))
    assert first.source == str(tmp_path / "data")
    second = load_dataset("mnist", str(tmp_path / "data"))
    assert second.source.startswith("cache:")
    cache_file = Path(second.source.removeprefix("cache:"))
    assert cache_file.parent == tmp_path / "cache" / "datasets" and cache_file.suffix == ".npz"
    assert [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]  # no temp left
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.splits[k][0], second.splits[k][0])
        np.testing.assert_array_equal(first.splits[k][1], second.splits[k][1])

    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # as if killed mid-write, no replace
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = load_dataset("mnist", str(tmp_path / "data"))
    assert rebuilt.source == str(tmp_path / "data") and caught
    assert load_dataset("mnist", str(tmp_path / "data")).source.startswith("cache:")

    # New raw files (another size and mtime) change the fingerprint: no stale cache hit.
    write_mnist(tmp_path / "data", n_train=60, seed=5)
    st = (tmp_path / "data" / "train-images-idx3-ubyte.gz").stat()
    os.utime(tmp_path / "data" / "train-images-idx3-ubyte.gz", ns=(st.st_atime_ns, 10**18))
    fresh = load_dataset("mnist", str(tmp_path / "data"))
    assert fresh.source == str(tmp_path / "data") and len(fresh.splits["train"][1]) == 54


def test_mnist1d_generated_and_cached():
    state = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d")
    assert ds.source == "generated" and ds.num_classes == 10
    (xtr, ytr), (xva, yva), (xte, yte) = (ds.splits[k] for k in ("train", "valid", "test"))
    assert xtr.shape == (3600, 40) and xva.shape == (400, 40) and xte.shape == (1000, 40)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32
    assert set(np.unique(ytr)) <= set(range(10)) and len(yva) == 400 and len(yte) == 1000
    # Standardized in float32 over 144,000 values: float32 round-off only.
    assert abs(xtr.mean()) < 1e-5 and abs(xtr.std() - 1) < 1e-4
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global RNG untouched
    # resolution / grayscale are ignored for mnist1d, so this is the same cache entry.
    again = load_dataset("mnist1d", resolution=8, grayscale=True)
    assert again.source.startswith("cache:")
    np.testing.assert_array_equal(again.splits["test"][0], xte)


# ------------------------------------------------------------------------- real data (optional)


def test_real_mnist_test_split():
    images = SHARED_MNIST_TEST / "t10k-images-idx3-ubyte.gz"
    if not images.is_file():
        pytest.skip(f"{images} is absent")
    x = read_idx(images)
    y = read_idx(SHARED_MNIST_TEST / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.min() == 0 and y.max() == 9
    # Only the test split is there: loading must refuse rather than half-load.
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(SHARED_MNIST_TEST))


def test_real_debian_fashion_mnist(monkeypatch):
    if not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} is absent (apt-get install dataset-fashion-mnist)")
    x = read_idx(DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz")
    y = read_idx(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and y.min() == 0 and y.max() == 9
    monkeypatch.setattr(datasets, "DEBIAN_ROOT", str(DEBIAN_FASHION.parent))
    ds = load_dataset("fashion_mnist", resolution=7)
    assert ds.source == str(DEBIAN_FASHION)
    assert ds.splits["train"][0].shape == (54000, 7, 7, 1)
    assert ds.splits["test"][1].shape == (10000,)
