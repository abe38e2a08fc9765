"""``load_dataset``: one call from a dataset name to host arrays ready for the device.

Order of operations, all deterministic for ``seed``:

1. Read the raw train/test splits (``sources.SOURCES``), in file order.
2. Validation: ``validation_size`` examples drawn uniformly at random from the training
   split are set aside, with their *clean* labels (the held-out set measures true
   accuracy, and AdaptSB's signal needs clean labels). The rest keep file order.
3. Subset: ``train_subset`` examples of the rest, drawn uniformly at random, kept in
   file order.
4. Ids: the remaining training examples get dense ids 0..N-1 in that order; the id is
   the row index of every per-example array, and ``train_source_index[id]`` is the
   example's index in the source's training split.
5. Label noise (``noise.corrupt_labels``) on the training labels by id; with "shuffle"
   the first fraction *by id* (file order, as the original did) is permuted.
6. Per-channel mean/std of the training images (after steps 2-3), in [0, 1] scale.

Each random step draws from its own stream ``default_rng([seed, step])``, so e.g.
changing ``validation_size`` does not change the noise permutation's random draws.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from sb_jax.data import noise as noise_lib
from sb_jax.data import sources

# Stream tags for np.random.default_rng([seed, tag]).
_VALIDATION_STREAM = 1
_SUBSET_STREAM = 2
_NOISE_STREAM = 3

# Rows per chunk in the statistics pass, to bound temporary memory on big sets.
_STATS_CHUNK = 8192


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset in host memory; row ``i`` of every ``train_*`` array is example id i."""

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]: the labels to train on (noisy with label noise)
    clean_train_labels: np.ndarray  # int32 [N]: the labels before noise
    noisy: np.ndarray  # bool [N]: True where train_labels != clean_train_labels
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    val_images: np.ndarray  # uint8 [V, H, W, C], V = validation_size (may be 0)
    val_labels: np.ndarray  # int32 [V], always clean
    num_classes: int
    mean: np.ndarray  # float32 [C]: per-channel mean of train images in [0, 1] scale
    std: np.ndarray  # float32 [C]: per-channel std (population) of train images
    train_source_index: np.ndarray  # int64 [N]: index in the source's training split
    val_source_index: np.ndarray  # int64 [V]

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_val(self) -> int:
        return int(self.val_labels.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def noisy_ids(self) -> np.ndarray:
        """int32 ids of the training examples whose label was corrupted."""
        return np.flatnonzero(self.noisy).astype(np.int32)


def available_datasets() -> list[str]:
    """Names ``load_dataset`` accepts."""
    return sorted(sources.SOURCES)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 ``[N, H, W, C]`` images, in [0, 1].

    Sums are exact integers accumulated chunk by chunk, so a 600k-image set needs no
    float copy of itself.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute image statistics of an empty training set")
    num_channels = images.shape[-1]
    total = np.zeros(num_channels, np.int64)
    total_sq = np.zeros(num_channels, np.int64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].reshape(-1, num_channels).astype(np.int64)
        total += chunk.sum(axis=0)
        total_sq += (chunk * chunk).sum(axis=0)
    count = images.size // num_channels
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    # Floor at one grey level so a constant channel cannot divide by zero in `normalize`.
    std = np.maximum(np.sqrt(var), 1.0)
    return (mean / 255.0).astype(np.float32), (std / 255.0).astype(np.float32)


def _check_count(value: object, what: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    label_noise: float = 0.0,
    noise_kind: str = "shuffle",
    validation_size: int = 0,
    seed: int = 0,
    train_subset: int | None = None,
) -> Dataset:
    """Loads ``name`` into host memory with the module docstring's steps.

    Args:
      name: one of ``available_datasets()``.
      data_dir: folder with IDX files (mnist, fashion_mnist) or a TFDS data_dir.
      label_noise: fraction in [0, 1] of training labels to corrupt.
      noise_kind: "shuffle" (the original's) or "symmetric"; see ``noise.py``.
      validation_size: examples carved from the training split, with clean labels.
      seed: seeds validation carving, subsetting and noise (non-negative).
      train_subset: keep only this many training examples (after validation).

    Raises:
      ValueError: with a one-line message for any bad argument or missing/bad data.
    """
    if name not in sources.SOURCES:
        raise ValueError(f"unknown dataset {name!r}: choose one of {available_datasets()}")
    noise_lib.check_noise_args(label_noise, noise_kind)
    _check_count(validation_size, "validation_size")
    _check_count(seed, "seed")
    _check_count(train_subset, "train_subset", allow_none=True)
    if train_subset == 0:
        raise ValueError("train_subset must be positive (or None for the whole training set)")

    raw = sources.SOURCES[name](data_dir)
    num_source = raw.train_labels.shape[0]
    if validation_size >= num_source:
        raise ValueError(
            f"validation_size {validation_size} leaves no training examples: {name} has "
            f"{num_source}; use a smaller validation_size"
        )

    is_val = np.zeros(num_source, bool)
    if validation_size:
        rng = np.random.default_rng([seed, _VALIDATION_STREAM])
        is_val[rng.choice(num_source, size=validation_size, replace=False)] = True
    val_index = np.flatnonzero(is_val)
    train_index = np.flatnonzero(~is_val)
    if train_subset is not None:
        if train_subset > train_index.shape[0]:
            raise ValueError(
                f"train_subset {train_subset} exceeds the {train_index.shape[0]} training "
                f"examples of {name} left after validation; use a smaller train_subset"
            )
        rng = np.random.default_rng([seed, _SUBSET_STREAM])
        train_index = np.sort(rng.choice(train_index, size=train_subset, replace=False))

    clean_labels = raw.train_labels[train_index].astype(np.int32)
    labels, noisy = noise_lib.corrupt_labels(
        clean_labels,
        raw.num_classes,
        label_noise,
        noise_kind,
        rng=np.random.default_rng([seed, _NOISE_STREAM]),
    )
    # Fancy indexing copies; skip it when every example is kept (SVHN+extra is 1.9 GB).
    keep_all = train_index.shape[0] == num_source
    train_images = raw.train_images if keep_all else raw.train_images[train_index]
    mean, std = channel_stats(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=labels,
        clean_train_labels=clean_labels,
        noisy=noisy,
        test_images=raw.test_images,
        test_labels=raw.test_labels.astype(np.int32),
        val_images=raw.train_images[val_index],
        val_labels=raw.train_labels[val_index].astype(np.int32),
        num_classes=raw.num_classes,
        mean=mean,
        std=std,
        train_source_index=train_index.astype(np.int64),
        val_source_index=val_index.astype(np.int64),
    )
