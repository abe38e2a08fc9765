"""Datasets in host memory (``load_dataset``) and the on-device input pipeline (``device``).

See ``dataset.py`` for the order of operations and ``device.py`` for batching and
augmentation inside jit.
"""

from sb_jax.data.dataset import Dataset, available_datasets, channel_stats, load_dataset
from sb_jax.data.device import (
    AugmentParams,
    apply_augment,
    augment,
    black_level,
    epoch_permutation,
    gather,
    normalize,
    sample_augment_params,
)
from sb_jax.data.noise import NOISE_KINDS, corrupt_labels

__all__ = [
    "NOISE_KINDS",
    "AugmentParams",
    "Dataset",
    "apply_augment",
    "augment",
    "available_datasets",
    "black_level",
    "channel_stats",
    "corrupt_labels",
    "epoch_permutation",
    "gather",
    "load_dataset",
    "normalize",
    "sample_augment_params",
]
