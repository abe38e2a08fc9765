"""Synthetic label noise, deterministic for a seed.

Two kinds:

* ``"shuffle"`` (the original Selective-Backprop code's method): the labels of the first
  ``round(fraction * N)`` training examples (by id) are randomly permuted among
  themselves. A permuted label can land on its own value (and often does for small
  class counts: about 1/K of them), so the number of examples whose label actually
  changed is a bit below the fraction; ``noisy`` marks only those. The class histogram
  is unchanged.
* ``"symmetric"``: ``round(fraction * N)`` examples chosen uniformly at random get a
  label drawn uniformly from the *other* K - 1 classes, so every chosen example is
  corrupted.
"""

from __future__ import annotations

import numpy as np

NOISE_KINDS = ("shuffle", "symmetric")


def check_noise_args(fraction: float, kind: str) -> None:
    """Raises a one-line ValueError for a bad noise fraction or kind."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(
            f"label noise fraction {fraction} is outside [0, 1]: pass a fraction such as "
            "0.2 for 20 % of training labels"
        )
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown label noise kind {kind!r}: use one of {list(NOISE_KINDS)}")


def corrupt_labels(
    labels: np.ndarray,
    num_classes: int,
    fraction: float,
    kind: str = "shuffle",
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(noisy_labels int32 [N], noisy bool [N])`` for clean ``labels``.

    ``noisy[i]`` is True exactly where ``noisy_labels[i] != labels[i]``.
    """
    check_noise_args(fraction, kind)
    rng = np.random.default_rng(rng)
    labels = np.asarray(labels, dtype=np.int32)
    num_corrupted = int(round(float(fraction) * labels.shape[0]))
    new_labels = labels.copy()
    if num_corrupted > 0:
        if kind == "shuffle":
            new_labels[:num_corrupted] = rng.permutation(labels[:num_corrupted])
        else:
            if num_classes < 2:
                raise ValueError("symmetric label noise needs at least 2 classes")
            chosen = rng.choice(labels.shape[0], size=num_corrupted, replace=False)
            # An offset in 1..K-1 modulo K is uniform over the other classes.
            offsets = rng.integers(1, num_classes, size=num_corrupted)
            new_labels[chosen] = (labels[chosen] + offsets) % num_classes
    return new_labels, new_labels != labels
