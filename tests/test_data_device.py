"""Tests of the on-device pipeline: normalisation, augmentation, permutation, gather."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax.data import device

B, H, W, C = 6, 9, 7, 3


def _images(seed=0, shape=(B, H, W, C)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------- slow NumPy references


def _crop_reference(images, offsets, padding, pad_value):
    fill = np.broadcast_to(np.asarray(pad_value, np.float32), (images.shape[-1],))
    out = np.empty_like(images)
    for b in range(images.shape[0]):
        padded = np.empty((H + 2 * padding, W + 2 * padding, C), np.float32)
        padded[...] = fill
        padded[padding : padding + H, padding : padding + W] = images[b]
        top, left = offsets[b]
        out[b] = padded[top : top + H, left : left + W]
    return out


def _flip_reference(images, flips):
    flipped = [image[:, ::-1] if f else image for image, f in zip(images, flips, strict=True)]
    return np.stack(flipped)


def _cutout_reference(images, centers, size):
    out = images.copy()
    for b in range(images.shape[0]):
        row, col = centers[b]
        top, left = row - size // 2, col - size // 2
        r0, r1 = max(top, 0), min(top + size, H)
        c0, c1 = max(left, 0), min(left + size, W)
        out[b, r0:r1, c0:c1] = 0.0
    return out


# ------------------------------------------------------------------------ tests


def test_normalize_matches_numpy():
    images = np.random.default_rng(1).integers(0, 256, (B, H, W, C)).astype(np.uint8)
    mean = np.array([0.1, 0.5, 0.9], np.float32)
    std = np.array([0.2, 0.3, 0.4], np.float32)
    got = device.normalize(jnp.asarray(images), mean, std)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        device.black_level(mean, std), device.normalize(jnp.zeros((C,), jnp.uint8), mean, std)
    )


@pytest.mark.parametrize("padding", [1, 3])
@pytest.mark.parametrize("pad_value", [0.0, -1.5, np.array([1.0, 2.0, 3.0], np.float32)])
def test_crop_with_offsets_matches_numpy(padding, pad_value):
    images = _images()
    offsets = np.random.default_rng(2).integers(0, 2 * padding + 1, (B, 2)).astype(np.int32)
    offsets[0] = (0, 0)  # Corners and the centre are all represented.
    offsets[1] = (2 * padding, 2 * padding)
    offsets[2] = (padding, padding)
    got = device.crop_with_offsets(jnp.asarray(images), jnp.asarray(offsets), padding, pad_value)
    np.testing.assert_array_equal(got, _crop_reference(images, offsets, padding, pad_value))
    np.testing.assert_array_equal(got[2], images[2])  # Centre offset is the identity.


def test_flip_with_mask_matches_numpy():
    images = _images()
    flips = np.array([True, False, True, True, False, False])
    got = device.flip_with_mask(jnp.asarray(images), jnp.asarray(flips))
    np.testing.assert_array_equal(got, _flip_reference(images, flips))


@pytest.mark.parametrize("size", [1, 4, 5, 20])
def test_cutout_with_centers_matches_numpy(size):
    images = _images()
    centers = np.array([[0, 0], [H - 1, W - 1], [4, 3], [0, W - 1], [H - 1, 0], [2, 5]], np.int32)
    got = device.cutout_with_centers(jnp.asarray(images), jnp.asarray(centers), size)
    expected = _cutout_reference(images, centers, size)
    np.testing.assert_array_equal(got, expected)
    # An interior square is exactly size x size; one at a corner is clipped.
    zeroed = (np.asarray(got) == 0).all(axis=-1).sum(axis=(1, 2))
    if size <= 5:
        assert zeroed[2] == size * size
        assert zeroed[0] == (size - size // 2) ** 2


def test_apply_augment_composes_crop_flip_cutout():
    images = _images(3)
    rng = np.random.default_rng(4)
    params = device.AugmentParams(
        crop_offsets=jnp.asarray(rng.integers(0, 5, (B, 2)), jnp.int32),
        flips=jnp.asarray(rng.random(B) < 0.5),
        cutout_centers=jnp.asarray(np.stack([rng.integers(0, H, B), rng.integers(0, W, B)], 1),
                                   jnp.int32),
    )
    pad = np.array([0.5, -0.5, 2.0], np.float32)
    got = device.apply_augment(
        jnp.asarray(images), params, crop_padding=2, flip=True, cutout=3, pad_value=pad
    )
    expected = _crop_reference(images, np.asarray(params.crop_offsets), 2, pad)
    expected = _flip_reference(expected, np.asarray(params.flips))
    expected = _cutout_reference(expected, np.asarray(params.cutout_centers), 3)
    np.testing.assert_array_equal(got, expected)


def test_augment_identity_when_everything_off():
    images = jnp.asarray(_images())
    out = device.augment(jax.random.key(0), images, crop_padding=0, flip=False, cutout=0)
    np.testing.assert_array_equal(out, images)


def test_augment_is_augment_params_applied():
    images = jnp.asarray(_images(5))
    key = jax.random.key(9)
    params = device.sample_augment_params(key, B, H, W, 2)
    expected = device.apply_augment(images, params, crop_padding=2, flip=True, cutout=3)
    got = device.augment(key, images, crop_padding=2, flip=True, cutout=3)
    np.testing.assert_array_equal(got, expected)


def test_sample_augment_params_ranges_and_independence():
    params = device.sample_augment_params(jax.random.key(1), 4000, H, W, 3)
    offsets = np.asarray(params.crop_offsets)
    centers = np.asarray(params.cutout_centers)
    assert offsets.min() == 0 and offsets.max() == 6
    np.testing.assert_array_equal(np.unique(offsets), np.arange(7))
    np.testing.assert_array_equal(np.unique(centers[:, 0]), np.arange(H))
    np.testing.assert_array_equal(np.unique(centers[:, 1]), np.arange(W))
    assert abs(np.asarray(params.flips).mean() - 0.5) < 0.05
    # Rows and columns are drawn independently (not the same number twice).
    assert np.mean(offsets[:, 0] == offsets[:, 1]) < 0.3


def test_augment_jitted_per_example_and_no_retrace():
    images = jnp.broadcast_to(jnp.asarray(_images(6, (1, H, W, C))), (64, H, W, C))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, batch):
        return device.augment(key, batch, crop_padding=2, flip=True, cutout=3)

    out_a = run(jax.random.key(0), images)
    out_b = run(jax.random.key(1), images)
    assert out_a.shape == images.shape and out_a.dtype == jnp.float32
    # Identical inputs come out different: the randomness is per example.
    flat = np.asarray(out_a).reshape(64, -1)
    assert len({row.tobytes() for row in flat}) > 32
    assert not np.array_equal(out_a, out_b)
    np.testing.assert_array_equal(run(jax.random.key(0), images), out_a)


def test_augment_rejects_negative_sizes():
    with pytest.raises(ValueError, match="non-negative"):
        device.augment(jax.random.key(0), jnp.asarray(_images()), crop_padding=-1)


@pytest.mark.parametrize("num_examples, chunk_size", [(10, 4), (12, 4), (5, 8), (1, 1)])
def test_epoch_permutation(num_examples, chunk_size):
    fn = jax.jit(device.epoch_permutation, static_argnums=(1, 2))
    ids, valid = fn(jax.random.key(3), num_examples, chunk_size)
    num_chunks = -(-num_examples // chunk_size)
    assert ids.shape == valid.shape == (num_chunks, chunk_size)
    assert ids.dtype == jnp.int32 and valid.dtype == jnp.bool_
    ids, valid = np.asarray(ids), np.asarray(valid)
    np.testing.assert_array_equal(np.sort(ids[valid]), np.arange(num_examples))
    assert valid.sum() == num_examples
    assert valid.reshape(-1)[:num_examples].all()  # Padding only at the end.
    np.testing.assert_array_equal(ids[~valid], 0)


def test_epoch_permutation_differs_by_key():
    a, _ = device.epoch_permutation(jax.random.key(0), 100, 10)
    b, _ = device.epoch_permutation(jax.random.key(1), 100, 10)
    assert not np.array_equal(a, b)
    assert not np.array_equal(np.asarray(a).reshape(-1), np.arange(100))


@pytest.mark.parametrize("num_examples, chunk_size", [(0, 4), (5, 0)])
def test_epoch_permutation_bad_sizes(num_examples, chunk_size):
    with pytest.raises(ValueError, match="must be positive"):
        device.epoch_permutation(jax.random.key(0), num_examples, chunk_size)


def test_gather_matches_numpy_indexing():
    images = np.random.default_rng(7).integers(0, 256, (20, 4, 4, 1)).astype(np.uint8)
    labels = np.arange(20, dtype=np.int32) * 3
    ids = np.array([[3, 0, 19], [7, 7, 2]], np.int32)
    got_images, got_labels = jax.jit(device.gather)(
        jnp.asarray(images), jnp.asarray(labels), jnp.asarray(ids)
    )
    np.testing.assert_array_equal(got_images, images[ids])
    np.testing.assert_array_equal(got_labels, labels[ids])
    assert got_images.dtype == jnp.uint8


def test_pipeline_end_to_end_under_jit():
    """Permutation -> gather -> normalize -> augment, one jitted step per chunk."""
    images = np.random.default_rng(8).integers(0, 256, (10, H, W, C)).astype(np.uint8)
    labels = np.arange(10, dtype=np.int32)
    mean, std = np.full(C, 0.5, np.float32), np.full(C, 0.25, np.float32)

    @jax.jit
    def step(key, ids):
        batch, batch_labels = device.gather(jnp.asarray(images), jnp.asarray(labels), ids)
        x = device.normalize(batch, mean, std)
        x = device.augment(key, x, crop_padding=1, flip=True, cutout=2,
                           pad_value=device.black_level(mean, std))
        return x, batch_labels

    ids, valid = device.epoch_permutation(jax.random.key(0), 10, 4)
    seen = []
    for chunk in range(ids.shape[0]):
        x, y = step(jax.random.key(chunk), ids[chunk])
        assert x.shape == (4, H, W, C)
        seen.extend(np.asarray(y)[np.asarray(valid[chunk])].tolist())
    assert sorted(seen) == list(range(10))
