"""RHO-LOSS: selection against a NumPy reference, and the irreducible-loss model."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax import irreducible_loss
from sb_jax.data import load_dataset
from sb_jax.models import create_model
from sb_jax.selection import ChunkScores, make_policy, rho_loss
from sb_jax.selection.baselines import topk_count


@pytest.fixture(autouse=True)
def fresh_trace_counter():
    chex.clear_trace_counter()


def chunk(ids, valid, losses) -> ChunkScores:
    ids = jnp.asarray(ids, jnp.int32)
    valid = jnp.asarray(valid, bool)
    return ChunkScores(
        ids=ids, valid=valid, scored=valid,
        losses=jnp.where(valid, jnp.asarray(losses, jnp.float32), 0.0),
        logits=jnp.zeros((ids.shape[0], 3), jnp.float32),
        labels=jnp.zeros(ids.shape, jnp.int32),
    )


def reference_rho_select(losses, irreducible, ids, valid, beta):
    """Top round(n/(beta+1)) (halves up, at least one) valid examples by loss - IL."""
    valid = np.asarray(valid)
    n = int(valid.sum())
    if n == 0:
        return np.array([], int)
    keep = max(1, topk_count(n, beta))
    reducible = np.asarray(losses, np.float32) - np.asarray(irreducible, np.float32)[ids]
    order = sorted(np.flatnonzero(valid), key=lambda i: (-reducible[i], i))  # Ties: first.
    return np.sort(order[:keep])


def selected_positions(selection) -> np.ndarray:
    valid = np.asarray(selection.valid)
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()
    return np.asarray(selection.indices)[:count]


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_select_matches_numpy_reference(beta):
    num_examples, size = 40, 8
    policy = rho_loss(beta, batch_size=size, prime_epochs=0)
    assert policy.set_irreducible_loss is not None and not policy.needs_heldout_grad
    rng = np.random.default_rng(int(beta))
    irreducible = rng.lognormal(size=num_examples).astype(np.float32)
    state = policy.set_irreducible_loss(policy.init(num_examples, jax.random.key(0)),
                                        jnp.asarray(irreducible))
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    for step in range(12):
        ids = rng.choice(num_examples, size, replace=False)
        valid = rng.random(size) < (1.0 if step % 3 else 0.6)  # Some partial chunks.
        losses = rng.lognormal(size=size)
        selection, new_state = select(chunk(ids, valid, losses), state, jnp.int32(1))
        np.testing.assert_array_equal(
            selected_positions(selection),
            reference_rho_select(losses, irreducible, ids, valid, beta),
        )
        chex.assert_trees_all_equal(new_state, state)  # The state never changes.


def test_high_irreducible_loss_examples_are_skipped():
    """Examples the held-out model cannot fit either (mislabeled) are not backpropagated."""
    policy = rho_loss(1.0, batch_size=4, prime_epochs=0)
    state = policy.init(4, jax.random.key(0))
    losses = [5.0, 4.0, 1.0, 0.5]  # topk would keep ids 0 and 1.
    scores = chunk(np.arange(4), np.ones(4, bool), losses)
    selection, _ = policy.select(scores, state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(selection), [0, 1])
    state = policy.set_irreducible_loss(state, jnp.asarray([4.9, 0.1, 0.2, 0.1]))
    selection, _ = policy.select(scores, state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(selection), [1, 2])


def test_priming_keeps_every_valid_example():
    policy = rho_loss(3.0, batch_size=6, prime_epochs=1)
    state = policy.init(6, jax.random.key(0))
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    assert not np.any(np.asarray(policy.needs_scoring(state, jnp.arange(6), valid,
                                                      jnp.int32(0))))
    selection, _ = policy.select(chunk(np.arange(6), valid, np.zeros(6)), state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(selection), np.flatnonzero(valid))


def test_state_shapes_and_bad_irreducible_loss_shape():
    policy = make_policy("rho_loss", beta=2.0, batch_size=8)
    state = policy.init(30, jax.random.key(0))
    chex.assert_shape(state.irreducible_loss, (30,))
    assert state.irreducible_loss.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"irreducible_loss must have shape \(30,\)"):
        policy.set_irreducible_loss(state, jnp.zeros((29,)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=2.0, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(beta=2.0, prime_epochs=-1), "prime_epochs must be an integer >= 0"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy("rho_loss", **kwargs)


@pytest.fixture(scope="module")
def noisy_digits():
    return load_dataset("digits", label_noise=0.3, validation_size=300, seed=0)


def _training_kwargs(ds):
    """The irreducible-loss model's data and a small, quick training setting."""
    return dict(
        heldout_images=ds.val_images, heldout_labels=ds.val_labels,
        train_images=ds.train_images, train_labels=ds.train_labels, mean=ds.mean, std=ds.std,
        num_epochs=4, batch_size=32, learning_rate=0.05, eval_batch_size=256,
    )


def test_irreducible_losses_flag_the_mislabeled_examples(noisy_digits):
    ds = noisy_digits
    model = create_model("small_cnn", ds.num_classes)
    kwargs = _training_kwargs(ds)
    losses = irreducible_loss.irreducible_losses(model, key=jax.random.key(0), **kwargs)
    assert losses.shape == (ds.num_train,) and losses.dtype == np.float32
    assert np.all(np.isfinite(losses)) and np.all(losses >= 0)
    # Trained on clean held-out labels, the model disagrees with the corrupted labels.
    assert np.median(losses[ds.noisy]) > 5 * np.median(losses[~ds.noisy])
    again = irreducible_loss.irreducible_losses(model, key=jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(losses, again)  # Deterministic given the key.


def test_cosine_schedule_and_flips_are_used_and_deterministic(noisy_digits):
    ds = noisy_digits
    model = create_model("small_cnn", ds.num_classes)
    kwargs = dict(_training_kwargs(ds), key=jax.random.key(0))
    plain = irreducible_loss.irreducible_losses(model, **kwargs)
    cosine = irreducible_loss.irreducible_losses(model, lr_schedule="cosine", **kwargs)
    flipped = irreducible_loss.irreducible_losses(model, lr_schedule="cosine", flip=True,
                                                  **kwargs)
    # Each option changes the trained model (so it is really applied) ...
    assert not np.allclose(plain, cosine) and not np.allclose(cosine, flipped)
    # ... and keeps it deterministic and useful.
    np.testing.assert_array_equal(
        flipped, irreducible_loss.irreducible_losses(model, lr_schedule="cosine", flip=True,
                                                     **kwargs))
    assert np.median(flipped[ds.noisy]) > 5 * np.median(flipped[~ds.noisy])


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(num_epochs=0), "num_epochs must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(heldout_images=np.zeros((0, 8, 8, 1), np.uint8),
              heldout_labels=np.zeros((0,), np.int32)), "set validation_size > 0"),
    ],
)
def test_irreducible_losses_bad_arguments(override, message, noisy_digits):
    ds = noisy_digits
    kwargs = dict(
        heldout_images=ds.val_images, heldout_labels=ds.val_labels,
        train_images=ds.train_images, train_labels=ds.train_labels, mean=ds.mean, std=ds.std,
        key=jax.random.key(0),
    )
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        irreducible_loss.irreducible_losses(create_model("small_cnn", 10), **kwargs)
