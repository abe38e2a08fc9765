"""On-device input pipeline: batching, shuffling, normalisation and augmentation.

The whole training set sits on the device as uint8 (CIFAR-10 is 150 MB, SVHN+extra
1.9 GB), so an epoch is a permutation of ids and a batch is a gather; nothing waits on
the host. Every function here is pure and jittable with static shapes; integer
arguments (``crop_padding``, ``cutout``, ``chunk_size``, ...) must be static.

Augmentation follows the torchvision pipeline the original used: random crop with
padding, then horizontal flip, then cutout (DeVries & Taylor 2017). It is split into
``sample_augment_params`` (all the randomness) and ``apply_augment`` (a deterministic
function of explicit offsets), so the tests can check ``apply_augment`` exactly against
a NumPy reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class AugmentParams(NamedTuple):
    """Per-example random choices of one augmentation call."""

    crop_offsets: jax.Array  # int32 [B, 2]: (top, left) in the padded image, in [0, 2p]
    flips: jax.Array  # bool [B]: flip left-right
    cutout_centers: jax.Array  # int32 [B, 2]: (row, col) of the cut square's centre


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 ``[..., C]`` images -> float32 ``(x / 255 - mean) / std`` per channel."""
    scaled = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def black_level(mean: jax.Array, std: jax.Array) -> jax.Array:
    """The normalised value of a 0 pixel, the ``pad_value`` torchvision's crop gives.

    torchvision pads with black *before* normalising; ``augment`` runs after
    normalisation, so pass ``pad_value=black_level(mean, std)`` to reproduce that.
    """
    return -jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)


def crop_with_offsets(
    images: jax.Array, offsets: jax.Array, padding: int, pad_value: float | jax.Array = 0.0
) -> jax.Array:
    """Pads ``[B, H, W, C]`` by ``padding`` with ``pad_value`` and crops H x W at ``offsets``.

    ``pad_value`` is a scalar or a per-channel ``[C]`` vector.
    """
    if padding == 0:
        return images
    batch, height, width, channels = images.shape
    fill = jnp.broadcast_to(jnp.asarray(pad_value, images.dtype), (channels,))
    padded = jnp.broadcast_to(fill, (batch, height + 2 * padding, width + 2 * padding, channels))
    padded = padded.at[:, padding : padding + height, padding : padding + width].set(images)

    def crop_one(image: jax.Array, offset: jax.Array) -> jax.Array:
        start = (offset[0], offset[1], jnp.zeros((), offset.dtype))
        return jax.lax.dynamic_slice(image, start, (height, width, channels))

    return jax.vmap(crop_one)(padded, offsets)


def flip_with_mask(images: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirrors left-right the images of ``[B, H, W, C]`` where ``flips[b]``."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def cutout_with_centers(images: jax.Array, centers: jax.Array, size: int) -> jax.Array:
    """Zeroes a ``size`` x ``size`` square centred at ``centers[b]``, clipped at borders.

    The square spans rows ``[r - size // 2, r - size // 2 + size)`` (same for columns):
    DeVries & Taylor's for even sizes, exactly ``size`` wide for odd ones. Zero is the
    dataset mean after normalisation, which is what their code filled.
    """
    if size == 0:
        return images
    _, height, width, _ = images.shape
    top = centers[:, 0:1] - size // 2  # [B, 1]
    left = centers[:, 1:2] - size // 2
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top) & (rows < top + size)  # [B, H]
    in_cols = (cols >= left) & (cols < left + size)  # [B, W]
    inside = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def sample_augment_params(
    rng: jax.Array, batch: int, height: int, width: int, crop_padding: int
) -> AugmentParams:
    """Independent uniform crop offsets, fair-coin flips and cutout centres per example."""
    crop_rng, flip_rng, cutout_rng = jax.random.split(rng, 3)
    crop_offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * crop_padding + 1)
    flips = jax.random.bernoulli(flip_rng, 0.5, (batch,))
    cutout_centers = jax.random.randint(
        cutout_rng, (batch, 2), 0, jnp.array([height, width], jnp.int32)
    )
    return AugmentParams(crop_offsets.astype(jnp.int32), flips, cutout_centers.astype(jnp.int32))


def apply_augment(
    images: jax.Array,
    params: AugmentParams,
    *,
    crop_padding: int,
    flip: bool,
    cutout: int,
    pad_value: float | jax.Array = 0.0,
) -> jax.Array:
    """Crop, then flip, then cutout, with the choices in ``params``."""
    images = crop_with_offsets(images, params.crop_offsets, crop_padding, pad_value)
    if flip:
        images = flip_with_mask(images, params.flips)
    return cutout_with_centers(images, params.cutout_centers, cutout)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    crop_padding: int = 0,
    flip: bool = False,
    cutout: int = 0,
    pad_value: float | jax.Array = 0.0,
) -> jax.Array:
    """Augments normalised float ``[B, H, W, C]`` images, independently per example.

    Args:
      rng: PRNG key.
      images: normalised images (see ``normalize``).
      crop_padding: pad by this much and crop back at a uniform offset (0: no crop).
      flip: mirror left-right with probability 1/2.
      cutout: side of the zeroed square (0: no cutout).
      pad_value: value of the crop padding; ``black_level(mean, std)`` for torchvision's.

    With ``crop_padding=0, flip=False, cutout=0`` it returns ``images`` unchanged.
    """
    if crop_padding < 0 or cutout < 0:
        raise ValueError(
            f"crop_padding ({crop_padding}) and cutout ({cutout}) must be non-negative"
        )
    if crop_padding == 0 and not flip and cutout == 0:
        return images
    batch, height, width, _ = images.shape
    params = sample_augment_params(rng, batch, height, width, crop_padding)
    return apply_augment(
        images, params, crop_padding=crop_padding, flip=flip, cutout=cutout, pad_value=pad_value
    )


def epoch_permutation(
    rng: jax.Array, num_examples: int, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """A random order of ids ``0..num_examples-1`` cut into chunks of ``chunk_size``.

    Returns ``(ids int32 [num_chunks, chunk_size], valid bool [num_chunks, chunk_size])``.
    The last chunk is padded with id 0 and ``valid=False``, so gathers stay in range and
    the shapes are the same every epoch.
    """
    if num_examples <= 0 or chunk_size <= 0:
        raise ValueError(
            f"num_examples ({num_examples}) and chunk_size ({chunk_size}) must be positive"
        )
    num_chunks = -(-num_examples // chunk_size)
    total = num_chunks * chunk_size
    order = jax.random.permutation(rng, num_examples).astype(jnp.int32)
    ids = jnp.zeros((total,), jnp.int32).at[:num_examples].set(order)
    valid = np.arange(total) < num_examples  # Static: depends only on the shapes.
    return ids.reshape(num_chunks, chunk_size), jnp.asarray(valid.reshape(num_chunks, chunk_size))


def gather(images: jax.Array, labels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows ``ids`` (any shape) of the on-device ``images`` and ``labels``."""
    # "clip" keeps any stray id in range instead of filling with NaN-like values.
    return jnp.take(images, ids, axis=0, mode="clip"), jnp.take(labels, ids, axis=0, mode="clip")
