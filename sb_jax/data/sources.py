"""Where each dataset's raw arrays come from: IDX files, TFDS, or scikit-learn.

A source is a function ``data_dir -> RawData`` registered in ``SOURCES`` under the
dataset's name. It returns whole splits as host NumPy arrays in file order; everything
else (validation split, subset, label noise, statistics) happens in ``dataset.py``, the
same way for every source.

TFDS datasets are read with ``tfds.data_source`` (random access over ArrayRecord files,
no TensorFlow needed). They must be prepared beforehand, in ArrayRecord format, on a
machine with internet access:
``tfds build cifar10 --file_format=array_record --data_dir=DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from sb_jax.data.idx import read_idx

# Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# File stems shared by MNIST and Fashion-MNIST; each may be plain or `.gz`.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# scikit-learn digits: a fixed split, independent of the experiment seed, so every run
# is evaluated on the same 297 test images.
DIGITS_NUM_TRAIN = 1500
DIGITS_SPLIT_SEED = 0

# Examples per batched TFDS read: large enough to amortise per-call overhead, small
# enough that the list of decoded dicts stays a few hundred MB at most.
_TFDS_READ_CHUNK = 4096


class RawData(NamedTuple):
    """Whole train and test splits in file order, as read from disk."""

    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    num_classes: int


def _one_line(text: str) -> str:
    """First line of an exception message, without decoration."""
    lines = [line.strip() for line in str(text).strip().strip("\"'").splitlines()]
    return next((line for line in lines if line), "")


def _check_arrays(name: str, where: str, raw: RawData) -> RawData:
    """Validates shapes, dtypes and label range of freshly read splits."""
    for split, images, labels in (
        ("train", raw.train_images, raw.train_labels),
        ("test", raw.test_images, raw.test_labels),
    ):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"{name} {split} images from {where} have shape {images.shape} and dtype "
                f"{images.dtype}, expected uint8 [N, H, W, C]; the files are not this dataset"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"{name} {split} split from {where} has {images.shape[0]} images but "
                f"{labels.shape[0] if labels.ndim else 'scalar'} labels; the files do not "
                "belong together, download them again"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= raw.num_classes):
            raise ValueError(
                f"{name} {split} labels from {where} fall outside [0, {raw.num_classes}); "
                "the files are not this dataset"
            )
    if raw.train_images.shape[1:] != raw.test_images.shape[1:]:
        raise ValueError(
            f"{name} from {where}: train images {raw.train_images.shape[1:]} and test images "
            f"{raw.test_images.shape[1:]} differ in shape; the files do not belong together"
        )
    return raw


# ---------------------------------------------------------------------------- IDX


def find_idx_files(directory: str) -> dict[str, str | None]:
    """Maps each IDX role to its file in ``directory`` (plain preferred), or None."""
    found: dict[str, str | None] = {}
    for role, stem in IDX_FILES.items():
        found[role] = None
        for candidate in (stem, stem + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
    return found


def load_idx_directory(name: str, directory: str, num_classes: int = 10) -> RawData:
    """Reads the four MNIST-style IDX files from ``directory``."""
    found = find_idx_files(directory)
    missing = [IDX_FILES[role] + "[.gz]" for role, path in found.items() if path is None]
    if missing:
        raise ValueError(
            f"{name}: {directory} lacks {', '.join(missing)}; put all four IDX files "
            "there (or point --data_dir at the folder that holds them)"
        )
    arrays = {role: read_idx(path) for role, path in found.items()}
    for role in ("train_images", "test_images"):
        if arrays[role].ndim != 3 or arrays[role].dtype != np.uint8:
            raise ValueError(
                f"{found[role]} holds {arrays[role].dtype} {arrays[role].shape}, expected "
                "uint8 [N, H, W] images; the file is not an image IDX file"
            )
    for role in ("train_labels", "test_labels"):
        if arrays[role].ndim != 1:
            raise ValueError(
                f"{found[role]} holds shape {arrays[role].shape}, expected [N] labels; "
                "the file is not a label IDX file"
            )
    raw = RawData(
        train_images=arrays["train_images"][..., None],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"][..., None],
        test_labels=arrays["test_labels"].astype(np.int32),
        num_classes=num_classes,
    )
    return _check_arrays(name, directory, raw)


# ---------------------------------------------------------------------------- TFDS


def read_data_source(source: Any, chunk_size: int = _TFDS_READ_CHUNK) -> tuple[np.ndarray, ...]:
    """Reads a whole random-access source of ``{'image', 'label'}`` dicts into arrays.

    Uses the batched ``__getitems__`` when the source has it (one ArrayRecord read per
    chunk instead of one per example), else ``__getitem__``.
    """
    num_examples = len(source)
    read_many = getattr(source, "__getitems__", None)
    images: np.ndarray | None = None
    labels = np.empty((num_examples,), np.int32)
    for start in range(0, num_examples, chunk_size):
        keys = list(range(start, min(num_examples, start + chunk_size)))
        examples = read_many(keys) if read_many is not None else [source[k] for k in keys]
        batch = np.stack([np.asarray(example["image"]) for example in examples])
        if images is None:
            images = np.empty((num_examples,) + batch.shape[1:], batch.dtype)
        images[start : start + len(keys)] = batch
        labels[start : start + len(keys)] = [int(example["label"]) for example in examples]
    if images is None:
        raise ValueError(f"TFDS source {source!r} is empty; rebuild the dataset")
    return images, labels


def _tfds_hint(tfds_name: str, data_dir: str | None) -> str:
    target = data_dir or "DIR"
    return (
        f"on a machine with internet run `tfds build {tfds_name} --file_format=array_record "
        f"--data_dir={target}`, copy {target} here and pass --data_dir={target}"
    )


def load_tfds(
    tfds_name: str,
    data_dir: str | None,
    train_splits: Sequence[str] = ("train",),
    test_split: str = "test",
) -> RawData:
    """Reads prepared TFDS splits with ``tfds.data_source`` (no download, no TensorFlow).

    Several ``train_splits`` are concatenated in the order given.
    """
    import tensorflow_datasets as tfds  # Deferred: IDX and digits users don't need it.

    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    sources = {}
    for split in (*train_splits, test_split):
        try:
            sources[split] = tfds.data_source(
                tfds_name, split=split, data_dir=data_dir, download=False
            )
        except (KeyError, NotImplementedError, OSError, ValueError, AssertionError) as e:
            # Checked only after a failure, so mocked TFDS (which ignores data_dir) works.
            if data_dir is not None and not os.path.isdir(os.path.join(data_dir, tfds_name)):
                reason = f"it has no {tfds_name}/ folder"
            elif isinstance(e, NotImplementedError):
                # tfds reports a missing or TFRecord-format dataset this way.
                reason = "it is missing or not in ArrayRecord format, which data_source needs"
            else:
                reason = f"{type(e).__name__}: {_one_line(e)}"
            raise ValueError(
                f"TFDS dataset {tfds_name!r} split {split!r} is not available in {where} "
                f"({reason}); {_tfds_hint(tfds_name, data_dir)}"
            ) from None
    label_feature = sources[test_split].dataset_info.features["label"]
    train = [read_data_source(sources[split]) for split in train_splits]
    test_images, test_labels = read_data_source(sources[test_split])
    raw = RawData(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=int(label_feature.num_classes),
    )
    return _check_arrays(tfds_name, f"TFDS ({where})", raw)


def _tfds_source(
    tfds_name: str, train_splits: Sequence[str] = ("train",)
) -> Callable[[str | None], RawData]:
    def load(data_dir: str | None) -> RawData:
        return load_tfds(tfds_name, data_dir, train_splits=train_splits)

    return load


# ----------------------------------------------------------------- IDX, then TFDS


def _idx_or_tfds_source(
    name: str, tfds_name: str, system_dirs: Sequence[str] = ()
) -> Callable[[str | None], RawData]:
    """IDX files in ``data_dir`` (else in ``system_dirs``), else TFDS."""

    def load(data_dir: str | None) -> RawData:
        if data_dir is not None and not os.path.isdir(data_dir):
            raise ValueError(
                f"data_dir {data_dir} does not exist or is not a directory; pass the folder "
                f"holding the {name} IDX files or a TFDS data_dir"
            )
        candidates = [data_dir] if data_dir is not None else list(system_dirs)
        for directory in candidates:
            if any(path is not None for path in find_idx_files(directory).values()):
                # Some IDX files are there: read them, reporting any missing or bad one.
                return load_idx_directory(name, directory)
        try:
            return load_tfds(tfds_name, data_dir)
        except ValueError as e:
            looked = ", ".join(candidates) if candidates else "nowhere"
            raise ValueError(
                f"{name}: no IDX files ({', '.join(IDX_FILES.values())}, plain or .gz) in "
                f"{looked}, and TFDS failed: {e}"
            ) from None

    return load


# -------------------------------------------------------------------- scikit-learn


def load_digits_raw(data_dir: str | None = None) -> RawData:
    """scikit-learn's 8x8 digits (bundled, no download), scaled 0..16 -> 0..255.

    A fixed permutation (seed ``DIGITS_SPLIT_SEED``) puts the first 1500 images in train
    and the other 297 in test. ``data_dir`` is ignored.
    """
    del data_dir  # The data ships with scikit-learn.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(labels.shape[0])
    train, test = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
    raw = RawData(images[train], labels[train], images[test], labels[test], num_classes=10)
    return _check_arrays("digits", "scikit-learn", raw)


SOURCES: dict[str, Callable[[str | None], RawData]] = {
    "fashion_mnist": _idx_or_tfds_source(
        "fashion_mnist", "fashion_mnist", system_dirs=(DEBIAN_FASHION_MNIST_DIR,)
    ),
    "mnist": _idx_or_tfds_source("mnist", "mnist"),
    "cifar10": _tfds_source("cifar10"),
    "cifar100": _tfds_source("cifar100"),
    "svhn_cropped": _tfds_source("svhn_cropped"),
    # The paper's SVHN setting: train + extra (604,388 images) as the training set.
    "svhn_cropped_extra": _tfds_source("svhn_cropped", train_splits=("train", "extra")),
    "digits": load_digits_raw,
}
