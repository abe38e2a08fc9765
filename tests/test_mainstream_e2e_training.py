"""Fine-tuning with k frozen layers: frozen really stays frozen; stem features are exact."""

import jax
import numpy as np
import pytest

from mainstream_jax.e2e import basenet, training

TINY = dict(widths=(4, 8), strides=(1, 2), stem_width=4, stem_strides=2, hidden=8)
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def setup():
    spec = basenet.mobilenet_spec(**TINY)
    base_model = basenet.ChokepointNet(spec, 3)
    app_model = basenet.ChokepointNet(spec, 1)
    # A learnable 3-class task: the class sets the brightness.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 192)
    images = (30 + 80 * labels[:, None, None, None] + rng.integers(0, 40, (192, *SHAPE)))
    images = images.astype(np.uint8)
    base = training.train_base(base_model, basenet.init_variables(base_model, SHAPE, 0),
                               images, labels, mean=0.5, std=0.3, epochs=8, batch_size=32,
                               learning_rate=1e-2, seed=0, test_images=images,
                               test_labels=labels)
    return spec, base_model, app_model, base, images[:96]


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def test_base_training_learns(setup):
    base = setup[3]
    # 48 steps of a tiny net: well above chance (1/3), with the loss clearly down.
    assert base.losses[-3:].mean() < 0.8 * base.losses[:3].mean()
    assert base.test_accuracy > 0.6


@pytest.mark.parametrize("k", [4, 7])
def test_frozen_layers_stay_frozen_and_branch_trains(setup, k):
    spec, base_model, app_model, base, images = setup
    base_vars = base.variables
    x = training.normalize(images, 0.5, 0.3)
    positives = np.stack([np.arange(96) % 3 == 0, np.arange(96) % 4 == 1])
    init = training.init_branches(app_model, base_vars, k, 2, SHAPE, seed=5)
    feats = training.stem_features(base_model, base_vars, x, k)
    tuned = training.finetune_branches(app_model, init, feats, positives, k, steps=3,
                                       batch_size=8, learning_rate=1e-2, seed=0)
    assert tuned.losses.shape == (3, 2)
    base_leaves = _leaves(base_vars)
    for a in range(2):
        full = training.assemble_app(base_vars, training.unstack(tuned.branches, a), spec, k)
        got = _leaves(full)
        for name in spec.layer_names[:k]:  # frozen: bit-identical to the base network
            for path, v in got.items():
                if name in path:
                    np.testing.assert_array_equal(v, base_leaves[path])
        # The branch's trainable parameters moved away from their initial values.
        init_a = _leaves(training.unstack(init, a))
        moved = [not np.array_equal(v, init_a[p]) for p, v in got.items()
                 if "params" in p and p in init_a]
        assert moved and all(moved)
        # Full app network on images == its branch on the frozen stem's features.
        out_full = app_model.apply(full, x[:16], 0, None, False)
        out_branch = app_model.apply(training.unstack(tuned.branches, a), feats[:16], k, None,
                                     False)
        np.testing.assert_allclose(out_full, out_branch, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        training.branch_logits(app_model, tuned.branches, feats[:16], k)[1],
        np.asarray(app_model.apply(training.unstack(tuned.branches, 1), feats[:16], k, None,
                                   False))[:, 0], rtol=1e-5, atol=1e-6)


def test_finetune_rejects_apps_without_positives(setup):
    spec, base_model, app_model, base, images = setup
    base_vars = base.variables
    init = training.init_branches(app_model, base_vars, 7, 1, SHAPE, seed=5)
    feats = training.stem_features(base_model, base_vars,
                                   training.normalize(images, 0.5, 0.3), 7)
    with pytest.raises(ValueError, match="positive and negative"):
        training.finetune_branches(app_model, init, feats, np.zeros((1, 96), bool), 7,
                                   steps=1, batch_size=8, learning_rate=1e-2, seed=0)
    with pytest.raises(ValueError, match="even"):
        training.finetune_branches(app_model, init, feats, np.arange(96)[None] % 2 == 0, 7,
                                   steps=1, batch_size=7, learning_rate=1e-2, seed=0)


def test_calibrated_inference_equals_training_mode(setup):
    spec, base_model, app_model, base, images = setup
    base_vars = base.variables
    x = training.normalize(images[:64], 0.5, 0.3)
    for start in (0, 3):
        h = base_model.apply(base_vars, x, 0, start, False)
        cal = training.calibrate_batch_stats(base_model, base_vars, h, start)
        train_out, _ = base_model.apply(cal, h, start, None, True, mutable=["batch_stats"])
        np.testing.assert_allclose(base_model.apply(cal, h, start, None, False), train_out,
                                   rtol=1e-3, atol=1e-4)
        # Layers below `start` keep their statistics.
        for name in spec.layer_names[:start]:
            for a, b in zip(jax.tree.leaves(cal["batch_stats"].get(name, {})),
                            jax.tree.leaves(base_vars["batch_stats"].get(name, {})), strict=True):
                np.testing.assert_array_equal(a, b)

