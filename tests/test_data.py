"""Tests of dataset loading, id bookkeeping, label noise and bad-input errors."""

from __future__ import annotations

import collections
import functools
import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from sb_jax import data
from sb_jax.data import dataset as dataset_lib
from sb_jax.data import idx, noise, sources

FASHION_DIR = sources.DEBIAN_FASHION_MNIST_DIR
HAVE_FASHION = all(p is not None for p in sources.find_idx_files(FASHION_DIR).values())


def _assert_one_line_value_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------ IDX


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    """Builds IDX bytes by hand from the format's definition (not via write_idx)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                    (np.float32, 0x0D), (np.float64, 0x0E)]
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_matches_hand_built_file(tmp_path, dtype, code, suffix):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    path = str(tmp_path / ("x.idx" + suffix))
    opener = gzip.open if suffix else open
    with opener(path, "wb") as f:
        f.write(_idx_bytes(array, code))
    loaded = idx.read_idx(path)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.dtype.byteorder in ("=", "|")
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_round_trip(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, (4, 6, 7)).astype(np.uint8)
    path = str(tmp_path / ("r.idx" + suffix))
    idx.write_idx(path, array)
    np.testing.assert_array_equal(idx.read_idx(path), array)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"\x00\x00", "truncated"),
        (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad magic"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated inside its header"),
        (_idx_bytes(np.zeros((3, 4), np.uint8), 0x08)[:-1], "truncated"),
        (_idx_bytes(np.zeros((3, 4), np.uint8), 0x08) + b"\x00", "longer than its header"),
    ],
)
def test_parse_idx_rejects_bad_bytes(payload, fragment):
    with pytest.raises(ValueError) as excinfo:
        idx.parse_idx(payload, source="some/file")
    _assert_one_line_value_error(excinfo, "some/file", fragment)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "t.idx.gz"
    idx.write_idx(str(path), np.ones((50, 9, 9), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError) as excinfo:
        idx.read_idx(path)
    _assert_one_line_value_error(excinfo, str(path), "truncated")


def test_missing_idx_file_names_the_file(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        idx.read_idx(tmp_path / "nope.gz")
    _assert_one_line_value_error(excinfo, "nope.gz", "does not exist")


# ------------------------------------------------------------ Fashion-MNIST (real)


@pytest.fixture(scope="module")
def fashion():
    return data.load_dataset("fashion_mnist")


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST IDX files not in {FASHION_DIR}")
def test_real_fashion_mnist(fashion):
    assert fashion.train_images.shape == (60000, 28, 28, 1)
    assert fashion.test_images.shape == (10000, 28, 28, 1)
    assert fashion.train_images.dtype == np.uint8 and fashion.train_labels.dtype == np.int32
    assert fashion.num_classes == 10 and fashion.image_shape == (28, 28, 1)
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(fashion.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(fashion.test_labels), np.full(10, 1000))
    np.testing.assert_array_equal(fashion.train_labels, fashion.clean_train_labels)
    assert not fashion.noisy.any() and fashion.num_val == 0
    np.testing.assert_array_equal(fashion.train_source_index, np.arange(60000))
    scaled = fashion.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(fashion.mean, [scaled.mean()], rtol=1e-6)
    np.testing.assert_allclose(fashion.std, [scaled.std()], rtol=1e-6)
    # The raw IDX file, read independently, agrees with the loader's first label.
    with gzip.open(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")) as f:
        raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(fashion.train_labels, raw_labels)


# ----------------------------------------------------------------- IDX fixtures


def _write_idx_set(directory, num_train=30, num_test=12, gz=(True, False, True, False)):
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 5, 4)).astype(np.uint8),
        "train_labels": rng.integers(0, 10, num_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 5, 4)).astype(np.uint8),
        "test_labels": rng.integers(0, 10, num_test).astype(np.uint8),
    }
    for (role, array), zipped in zip(arrays.items(), gz, strict=True):
        name = sources.IDX_FILES[role] + (".gz" if zipped else "")
        idx.write_idx(os.path.join(directory, name), array)
    return arrays


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_data_dir(tmp_path, name):
    arrays = _write_idx_set(str(tmp_path))
    ds = data.load_dataset(name, str(tmp_path))
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"][..., None])
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_images, arrays["test_images"][..., None])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.image_shape == (5, 4, 1) and ds.num_train == 30 and ds.num_test == 12


def test_idx_data_dir_missing_file(tmp_path):
    _write_idx_set(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("fashion_mnist", str(tmp_path))
    _assert_one_line_value_error(excinfo, str(tmp_path), "t10k-labels-idx1-ubyte")


def test_idx_data_dir_truncated_file(tmp_path):
    _write_idx_set(str(tmp_path))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("fashion_mnist", str(tmp_path))
    _assert_one_line_value_error(excinfo, str(path), "truncated")


def test_idx_data_dir_label_count_mismatch(tmp_path):
    _write_idx_set(str(tmp_path))
    idx.write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(29, np.uint8))
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("fashion_mnist", str(tmp_path))
    _assert_one_line_value_error(excinfo, "30 images but 29 labels")


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("fashion_mnist", str(tmp_path / "absent"))
    _assert_one_line_value_error(excinfo, "absent", "does not exist")


def test_data_dir_without_the_dataset_idx_or_tfds(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("fashion_mnist", str(tmp_path))
    _assert_one_line_value_error(
        excinfo, "no IDX files", str(tmp_path), "tfds build fashion_mnist", "--data_dir"
    )


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_tfds_data_dir_without_the_dataset(tmp_path, name):
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset(name, str(tmp_path))
    _assert_one_line_value_error(
        excinfo,
        name,
        str(tmp_path),
        f"no {name}/ folder",
        f"tfds build {name} --file_format=array_record",
    )


def test_tfds_data_dir_with_an_unreadable_dataset_folder(tmp_path):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # E.g. a half-copied build.
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset("cifar10", str(tmp_path))
    _assert_one_line_value_error(excinfo, "cifar10", "ArrayRecord", "tfds build cifar10")


# ---------------------------------------------------------------------------- TFDS


class _BoundGetitemsMock(tfds.testing.PickableDataSourceMock):
    """tfds 4.9.10's mock sets ``__getitems__`` to a partial that misses ``self``.

    ``__getitems__`` is not a magic method ``unittest.mock`` knows, so the partial is
    stored as a plain attribute and called without the mock; bind it here so the
    loader's batched read path runs against the mock.
    """

    def __setattr__(self, name, value):
        if name == "__getitems__" and isinstance(value, functools.partial):
            value = functools.partial(value, self)
        super().__setattr__(name, value)


@pytest.fixture
def mock_tfds():
    # USE_CODE builds the mock from the dataset class alone: no metadata files, no TF.
    with tfds.testing.mock_data(
        num_examples=13,
        policy=tfds.testing.MockPolicy.USE_CODE,
        mock_array_record_data_source=_BoundGetitemsMock(),
    ):
        yield


@pytest.mark.parametrize(
    "name, num_train, shape, num_classes",
    [
        ("cifar10", 13, (32, 32, 3), 10),
        ("cifar100", 13, (32, 32, 3), 100),
        ("mnist", 13, (28, 28, 1), 10),
        ("svhn_cropped", 13, (32, 32, 3), 10),
        ("svhn_cropped_extra", 26, (32, 32, 3), 10),
    ],
)
def test_tfds_through_loader(mock_tfds, name, num_train, shape, num_classes):
    ds = data.load_dataset(name, validation_size=3, label_noise=0.5)
    assert ds.train_images.shape == (num_train - 3, *shape)
    assert ds.val_images.shape == (3, *shape)
    assert ds.test_images.shape == (13, *shape)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == num_classes
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < num_classes
    assert ds.mean.shape == ds.std.shape == (shape[-1],)


def test_tfds_batched_and_single_reads_agree(mock_tfds):
    source = tfds.data_source("cifar10", split="train", download=False)
    images, labels = sources.read_data_source(source, chunk_size=5)
    expected = [source[i] for i in range(len(source))]
    np.testing.assert_array_equal(images, np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(labels, [e["label"] for e in expected])

    class PerItemOnly:  # A source without __getitems__ takes the per-example path.
        def __len__(self):
            return len(source)

        def __getitem__(self, key):
            return source[key]

    images_one, labels_one = sources.read_data_source(PerItemOnly(), chunk_size=4)
    np.testing.assert_array_equal(images_one, images)
    np.testing.assert_array_equal(labels_one, labels)


# -------------------------------------------------------------------------- digits


def test_digits_split_and_scaling():
    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1500, 8, 8, 1) and ds.test_images.shape == (297, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255
    reference = load_digits()
    expected = np.round(reference.images * 255.0 / 16.0).astype(np.uint8)
    # Train + test is a partition of scikit-learn's 1797 images, labels kept with them.
    both = np.concatenate([ds.train_images, ds.test_images])[..., 0]
    both_labels = np.concatenate([ds.train_labels, ds.test_labels])
    as_multiset = lambda images, labels: collections.Counter(
        (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )
    assert as_multiset(both, both_labels) == as_multiset(expected, reference.target)
    # The split is fixed: it does not move with the experiment seed.
    other = data.load_dataset("digits", seed=5)
    np.testing.assert_array_equal(other.test_images, ds.test_images)


# -------------------------------------------------------------- ids and splitting


def test_validation_split_and_ids():
    full = data.load_dataset("digits")
    ds = data.load_dataset("digits", validation_size=200, seed=3)
    assert ds.num_train == 1300 and ds.num_val == 200
    assert np.all(np.diff(ds.train_source_index) > 0)  # File order.
    everything = np.concatenate([ds.train_source_index, ds.val_source_index])
    np.testing.assert_array_equal(np.sort(everything), np.arange(1500))
    np.testing.assert_array_equal(ds.train_images, full.train_images[ds.train_source_index])
    np.testing.assert_array_equal(ds.val_images, full.train_images[ds.val_source_index])
    np.testing.assert_array_equal(ds.val_labels, full.train_labels[ds.val_source_index])
    again = data.load_dataset("digits", validation_size=200, seed=3)
    np.testing.assert_array_equal(again.val_source_index, ds.val_source_index)
    moved = data.load_dataset("digits", validation_size=200, seed=4)
    assert not np.array_equal(moved.val_source_index, ds.val_source_index)


def test_validation_keeps_clean_labels_under_noise():
    full = data.load_dataset("digits")
    ds = data.load_dataset("digits", validation_size=100, label_noise=1.0, noise_kind="symmetric")
    np.testing.assert_array_equal(ds.val_labels, full.train_labels[ds.val_source_index])
    np.testing.assert_array_equal(
        ds.clean_train_labels, full.train_labels[ds.train_source_index]
    )
    assert ds.noisy.all()


def test_train_subset():
    full = data.load_dataset("digits")
    ds = data.load_dataset("digits", validation_size=100, train_subset=250, seed=1)
    assert ds.num_train == 250 and ds.noisy.shape == (250,)
    assert not set(ds.train_source_index) & set(ds.val_source_index)
    assert np.all(np.diff(ds.train_source_index) > 0)
    np.testing.assert_array_equal(ds.train_labels, full.train_labels[ds.train_source_index])
    scaled = ds.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, [scaled.mean()], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [scaled.std()], rtol=1e-6)


def test_channel_stats_matches_numpy(monkeypatch):
    monkeypatch.setattr(dataset_lib, "_STATS_CHUNK", 7)  # Several chunks, ragged end.
    images = np.random.default_rng(2).integers(0, 256, (30, 5, 6, 3)).astype(np.uint8)
    mean, std = dataset_lib.channel_stats(images)
    scaled = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32


# --------------------------------------------------------------------- label noise


def _labels(n=2000, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n).astype(np.int32)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_shuffle_noise_permutes_the_first_fraction(fraction):
    clean = _labels()
    noisy_labels, noisy = noise.corrupt_labels(clean, 10, fraction, "shuffle", rng=7)
    cut = int(round(fraction * clean.size))
    np.testing.assert_array_equal(noisy_labels[cut:], clean[cut:])
    np.testing.assert_array_equal(np.sort(noisy_labels[:cut]), np.sort(clean[:cut]))
    np.testing.assert_array_equal(noisy, noisy_labels != clean)
    # About 1/K of permuted labels land on their own value: the count is a bit below.
    assert noisy.sum() <= cut
    if cut:
        assert noisy.sum() >= 0.8 * cut
    again, _ = noise.corrupt_labels(clean, 10, fraction, "shuffle", rng=7)
    np.testing.assert_array_equal(again, noisy_labels)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 1.0])
def test_symmetric_noise(fraction):
    clean = _labels(n=20000)
    noisy_labels, noisy = noise.corrupt_labels(clean, 10, fraction, "symmetric", rng=3)
    assert noisy.sum() == int(round(fraction * clean.size))
    np.testing.assert_array_equal(noisy, noisy_labels != clean)
    assert noisy_labels.min() >= 0 and noisy_labels.max() < 10
    if fraction:
        # The new label is uniform over the other 9 classes: offsets 1..9 equally likely.
        offsets = (noisy_labels[noisy] - clean[noisy]) % 10
        counts = np.bincount(offsets, minlength=10)
        assert counts[0] == 0
        expected = noisy.sum() / 9
        assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))
        # Chosen ids are spread over the whole set, not the first fraction.
        if fraction < 1:
            assert noisy[: clean.size // 2].mean() == pytest.approx(fraction, abs=0.02)
            assert noisy[clean.size // 2 :].mean() == pytest.approx(fraction, abs=0.02)
    again, _ = noise.corrupt_labels(clean, 10, fraction, "symmetric", rng=3)
    np.testing.assert_array_equal(again, noisy_labels)


def test_noise_through_load_dataset():
    ds = data.load_dataset("digits", label_noise=0.2, seed=11)
    np.testing.assert_array_equal(ds.noisy, ds.train_labels != ds.clean_train_labels)
    np.testing.assert_array_equal(ds.noisy_ids, np.flatnonzero(ds.noisy))
    assert not ds.noisy[300:].any()  # "shuffle": only the first 20 % (300 ids).
    assert 0.8 * 300 <= ds.noisy.sum() <= 300
    other_seed = data.load_dataset("digits", label_noise=0.2, seed=12)
    assert not np.array_equal(other_seed.train_labels, ds.train_labels)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(name="imagenet"), ["unknown dataset 'imagenet'", "digits"]),
        (dict(name="digits", label_noise=-0.1), ["-0.1", "outside [0, 1]"]),
        (dict(name="digits", label_noise=1.5), ["1.5", "outside [0, 1]"]),
        (dict(name="digits", label_noise=float("nan")), ["nan", "outside [0, 1]"]),
        (dict(name="digits", noise_kind="pairflip"), ["'pairflip'", "shuffle"]),
        (dict(name="digits", validation_size=1500), ["validation_size 1500", "1500"]),
        (dict(name="digits", validation_size=-1), ["validation_size", "-1"]),
        (dict(name="digits", train_subset=0), ["train_subset", "positive"]),
        (dict(name="digits", train_subset=1401, validation_size=100), ["1401", "1400"]),
        (dict(name="digits", seed=-3), ["seed", "-3"]),
    ],
)
def test_bad_arguments(kwargs, fragments):
    with pytest.raises(ValueError) as excinfo:
        data.load_dataset(**kwargs)
    _assert_one_line_value_error(excinfo, *fragments)


def test_available_datasets():
    names = data.available_datasets()
    for name in ["fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "mnist", "digits"]:
        assert name in names
