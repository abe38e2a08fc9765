"""Tests of the model zoo: shapes, BatchNorm/dropout train-vs-eval semantics, features,
parameter counts against independent formulas, and input validation."""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax import models
from sb_jax.models import benchmark, layers
from sb_jax.models.mobilenet_v2 import CIFAR_STAGES, round_channels

NUM_CLASSES = 7
BATCH = 4

# Small configurations of every model, so the whole file stays fast on a CPU.
# name -> (kwargs, shape of one example, width of the features).
SMALL_CONFIGS = {
    "small_cnn": (dict(widths=(4, 8), dense_width=16, dropout=0.5), (12, 12, 1), 16),
    "resnet18": (dict(width=0.125), (8, 8, 3), 64),
    "wrn": (dict(depth=10, width=1, dropout=0.5), (8, 8, 3), 64),
    "mobilenet_v2": (dict(width=0.25, dropout=0.5), (8, 8, 3), 1280),
}
HAS_DROPOUT = {"small_cnn": True, "resnet18": False, "wrn": True, "mobilenet_v2": True}


def _key(seed):
    # The RBG generator: jitted init of the deep models compiles several times faster with
    # it than with the default threefry on CPU (11.5 s -> 2.7 s of CPU for ResNet-18).
    return jax.random.key(seed, impl="rbg")


def _init(name, kwargs, example_shape, seed=0):
    model = models.create_model(name, NUM_CLASSES, **kwargs)
    x = jax.random.normal(_key(seed + 100), (BATCH, *example_shape), jnp.float32)
    variables = model.init({"params": _key(seed), "dropout": _key(seed + 1)}, x, train=False)
    return model, variables, x


def _run_unoptimised(fn):
    """jit-compiles and runs `fn()` with XLA's backend optimisations off. These tests
    check semantics on tiny arrays, so compile time dominates and -O0 roughly halves it."""
    return jax.jit(fn).lower().compile({"xla_backend_optimization_level": 0})()


def _probe(model, example_shape):
    """Everything the per-model tests look at, from two compiled calls (init, then the
    rest), with the eval passes and the train passes each batched into one vmapped graph:
    compiling the deep models as few times as possible is what keeps this file fast."""
    x = _run_unoptimised(lambda: jax.random.normal(_key(1), (BATCH, *example_shape)))
    # Same shape as x, same first two examples, different others.
    x_mod = x.at[2:].set(jax.random.normal(_key(2), (BATCH - 2, *example_shape)))
    variables = _run_unoptimised(lambda: model.init({"params": _key(3)}, x, train=False))
    labels = jnp.arange(BATCH) % NUM_CLASSES

    def evaluate(x):
        # mutable=["batch_stats"] so that an (erroneous) update would be visible.
        (logits, features), state = model.apply(
            variables, x, train=False, return_features=True, mutable=["batch_stats"]
        )
        return logits, features, state["batch_stats"]

    def loss(params, x, key):
        (logits, features), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
            return_features=True,
        )
        value = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels])
        return value, (logits, features, updates["batch_stats"])

    def train(x, key):
        return loss(variables["params"], x, key)[1]

    def run():
        eval_logits, eval_features, eval_stats = jax.vmap(evaluate)(jnp.stack([x, x_mod]))
        # Variants: (x, key a), (x_mod, key a), (x, key b).
        train_logits, train_features, train_stats = jax.vmap(train)(
            jnp.stack([x, x_mod, x]), jnp.stack([_key(4), _key(4), _key(5)])
        )
        return dict(
            eval_logits=eval_logits[0],
            eval_features=eval_features[0],
            eval_stats=jax.tree.map(lambda leaf: leaf[0], eval_stats),
            eval_logits_mod=eval_logits[1],
            train_logits=train_logits[0],
            train_features=train_features[0],
            train_stats=jax.tree.map(lambda leaf: leaf[0], train_stats),
            train_logits_mod=train_logits[1],
            train_logits_key_b=train_logits[2],
            grads=jax.grad(loss, has_aux=True)(variables["params"], x, _key(4))[0],
        )

    return jax.tree.map(np.asarray, dict(variables=variables, **_run_unoptimised(run)))


@functools.cache
def _probe_small_config(name):
    kwargs, example_shape, feature_width = SMALL_CONFIGS[name]
    model = models.create_model(name, NUM_CLASSES, **kwargs)
    return dict(
        name=name,
        feature_width=feature_width,
        **_probe(model, example_shape),
    )


@pytest.fixture(params=list(SMALL_CONFIGS))
def probe(request):
    return _probe_small_config(request.param)


def test_available_models():
    assert models.available_models() == ["small_cnn", "resnet18", "wrn", "mobilenet_v2"]
    assert set(SMALL_CONFIGS) == set(models.available_models())


def test_shapes_dtypes_and_collections(probe):
    assert set(probe["variables"]) == {"params", "batch_stats"}
    assert models.HEAD_NAME in probe["variables"]["params"]
    for mode in ("eval", "train"):
        logits, features = probe[f"{mode}_logits"], probe[f"{mode}_features"]
        assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == jnp.float32
        assert features.shape == (BATCH, probe["feature_width"])
        assert features.dtype == jnp.float32
        chex.assert_trees_all_equal_shapes(
            probe[f"{mode}_stats"], probe["variables"]["batch_stats"]
        )


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logits_are_head_of_features(probe, mode):
    head = probe["variables"]["params"][models.HEAD_NAME]
    features = np.asarray(probe[f"{mode}_features"], np.float64)
    expected = features @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    np.testing.assert_allclose(probe[f"{mode}_logits"], expected, rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_running_stats_and_leaves_them_alone(probe):
    """In eval mode an example's output does not depend on the rest of the batch."""
    np.testing.assert_allclose(
        probe["eval_logits_mod"][:2], probe["eval_logits"][:2], rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_equal(probe["eval_stats"], probe["variables"]["batch_stats"])


def test_train_mode_uses_batch_stats_and_updates_running_stats(probe):
    # Same dropout key and shapes, so the same dropout masks: the first two examples'
    # logits change only through the batch statistics of the other two.
    assert not np.allclose(probe["train_logits_mod"][:2], probe["train_logits"][:2], atol=1e-4)
    changed = jax.tree.map(
        lambda new, old: bool(np.any(new != old)),
        probe["train_stats"],
        probe["variables"]["batch_stats"],
    )
    assert all(jax.tree.leaves(changed)), "every BatchNorm layer must update its running stats"


def test_dropout_only_in_train_mode(probe):
    """Eval mode needs no dropout key (the probe passes none); train mode uses it."""
    differs = not np.allclose(probe["train_logits_key_b"], probe["train_logits"], atol=1e-5)
    assert differs == HAS_DROPOUT[probe["name"]]


def test_every_parameter_gets_a_gradient(probe):
    dead = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(probe["grads"])
        if not np.any(g != 0)
    ]
    assert not dead, f"parameters without gradient: {dead}"


def test_batch_norm_matches_numpy_reference():
    """First conv -> BN -> ReLU of the small CNN against NumPy, in both modes.

    The small CNN's `bn_0` is `layers.BatchNormReLU`, so its output is after the ReLU.
    """
    model, variables, x = _init("small_cnn", dict(widths=(6,), dense_width=8), (8, 8, 1))
    rng = np.random.default_rng(0)
    old_mean = rng.normal(size=6).astype(np.float32)
    old_var = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, size=6).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    variables = {
        "params": {**variables["params"], "bn_0": {"scale": scale, "bias": bias}},
        "batch_stats": {"bn_0": {"mean": old_mean, "var": old_var}},
    }
    momentum, eps = 0.9, 1e-5
    assert (models.BN_MOMENTUM, models.BN_EPSILON) == (momentum, eps)

    def run(train):
        return model.apply(
            variables,
            x,
            train=train,
            rngs={"dropout": _key(0)},
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
        )

    _, state = run(train=True)
    conv_out = np.asarray(state["intermediates"]["conv_0"]["__call__"][0], np.float64)
    bn_out = np.asarray(state["intermediates"]["bn_0"]["__call__"][0])
    batch_mean = conv_out.mean(axis=(0, 1, 2))
    batch_var = conv_out.var(axis=(0, 1, 2))  # biased, as flax folds it in
    expected = np.maximum((conv_out - batch_mean) / np.sqrt(batch_var + eps) * scale + bias, 0)
    np.testing.assert_allclose(bn_out, expected, rtol=1e-4, atol=1e-4)
    new_stats = state["batch_stats"]["bn_0"]
    np.testing.assert_allclose(
        new_stats["mean"], momentum * old_mean + (1 - momentum) * batch_mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        new_stats["var"], momentum * old_var + (1 - momentum) * batch_var, rtol=1e-5, atol=1e-6
    )

    _, state = run(train=False)
    conv_out = np.asarray(state["intermediates"]["conv_0"]["__call__"][0], np.float64)
    bn_out = np.asarray(state["intermediates"]["bn_0"]["__call__"][0])
    expected = np.maximum((conv_out - old_mean) / np.sqrt(old_var + eps) * scale + bias, 0)
    np.testing.assert_allclose(bn_out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(state["batch_stats"]["bn_0"]["mean"], old_mean)
    np.testing.assert_array_equal(state["batch_stats"]["bn_0"]["var"], old_var)


# ---------------------------------------------------------------------------------------
# Parameter counts: the model's (from jax.eval_shape) against formulas written from the
# architecture descriptions, and against the published sizes.


def _bn(c):
    return 2 * c


def _conv(k, cin, cout):
    return k * k * cin * cout


def _head(c, classes):
    return c * classes + classes


def _wrn_count(depth, k, classes):
    n = (depth - 4) // 6
    total, cin = _conv(3, 3, 16), 16
    for base, stride in zip((16, 32, 64), (1, 2, 2), strict=True):
        cout = base * k
        for block in range(n):
            s = stride if block == 0 else 1
            total += _bn(cin) + _conv(3, cin, cout) + _bn(cout) + _conv(3, cout, cout)
            if s != 1 or cin != cout:
                total += _conv(1, cin, cout)
            cin = cout
    return total + _bn(cin) + _head(cin, classes)


def _resnet18_count(width, classes):
    def ch(c):
        return max(1, round(c * width))

    total, cin = _conv(3, 3, ch(64)) + _bn(ch(64)), ch(64)
    for base, stride in zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True):
        cout = ch(base)
        for block in range(2):
            s = stride if block == 0 else 1
            total += _conv(3, cin, cout) + _bn(cout) + _conv(3, cout, cout) + _bn(cout)
            if s != 1 or cin != cout:
                total += _conv(1, cin, cout) + _bn(cout)
            cin = cout
    return total + _head(cin, classes)


def _mobilenet_v2_count(width, classes):
    stem = round_channels(32 * width)
    total, cin = _conv(3, 3, stem) + _bn(stem), stem
    for t, c, n, _ in CIFAR_STAGES:
        cout = round_channels(c * width)
        for _ in range(n):
            hidden = cin * t
            if t != 1:
                total += _conv(1, cin, hidden) + _bn(hidden)
            total += 9 * hidden + _bn(hidden)  # depthwise: one 3x3 filter per channel
            total += _conv(1, hidden, cout) + _bn(cout)
            cin = cout
    last = round_channels(1280 * max(1.0, width))
    return total + _conv(1, cin, last) + _bn(last) + _head(last, classes)


def _small_cnn_count(widths, dense, side, channels, classes):
    total, cin = 0, channels
    for w in widths:
        total += _conv(3, cin, w) + _bn(w)
        cin, side = w, side // 2
    return total + (side * side * cin + 1) * dense + _head(dense, classes)


@pytest.mark.parametrize(
    "name,kwargs,input_shape,classes,expected,published",
    [
        ("wrn", dict(depth=28, width=10), (1, 32, 32, 3), 10, _wrn_count(28, 10, 10), 36.5e6),
        ("wrn", dict(depth=16, width=8), (1, 32, 32, 3), 10, _wrn_count(16, 8, 10), 11.0e6),
        ("wrn", dict(depth=10, width=2), (1, 32, 32, 3), 100, _wrn_count(10, 2, 100), None),
        ("resnet18", {}, (1, 32, 32, 3), 10, _resnet18_count(1.0, 10), 11.2e6),
        ("resnet18", dict(width=0.5), (1, 32, 32, 3), 10, _resnet18_count(0.5, 10), None),
        ("mobilenet_v2", {}, (1, 32, 32, 3), 10, _mobilenet_v2_count(1.0, 10), 2.24e6),
        ("mobilenet_v2", dict(width=0.5), (1, 32, 32, 3), 10, _mobilenet_v2_count(0.5, 10), None),
        ("small_cnn", {}, (1, 28, 28, 1), 10, _small_cnn_count((32, 64), 128, 28, 1, 10), None),
        (
            "small_cnn",
            dict(widths=(8, 16, 32), dense_width=64, downsample="max_pool"),
            (1, 32, 32, 3),
            100,
            _small_cnn_count((8, 16, 32), 64, 32, 3, 100),
            None,
        ),
    ],
)
def test_param_counts(name, kwargs, input_shape, classes, expected, published):
    count = models.param_count(models.create_model(name, classes, **kwargs), input_shape)
    assert count == expected
    if published is not None:
        assert math.isclose(count, published, rel_tol=0.01), (count, published)


def test_wrn_block_structure():
    model = models.create_model("wrn", 10, depth=16, width=2)
    shapes = jax.eval_shape(lambda: model.init(_key(0), jnp.zeros((1, 8, 8, 3)), train=False))
    params = shapes["params"]
    blocks = sorted(k for k in params if k.startswith("stage"))
    assert blocks == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (0, 1)]
    # Widths change in the first block of every stage (16 -> 32 for k = 2): projections.
    assert all("proj_conv" in params[f"stage{s}_block0"] for s in (1, 2, 3))
    assert not any("proj_conv" in params[f"stage{s}_block1"] for s in (1, 2, 3))
    # WRN-10-1: the first stage keeps 16 channels at stride 1, so the shortcut is identity.
    shapes = jax.eval_shape(
        lambda: models.create_model("wrn", 10, depth=10, width=1).init(
            _key(0), jnp.zeros((1, 8, 8, 3)), train=False
        )
    )
    assert "proj_conv" not in shapes["params"]["stage1_block0"]


def test_initialisation_scales():
    """Convs: Kaiming normal, fan_out; head: U(+-1/sqrt(fan_in)), zero bias."""
    conv = layers.conv(256, 3)
    kernel = conv.init(_key(0), jnp.zeros((1, 4, 4, 64)))["params"]["kernel"]
    assert "bias" not in conv.init(_key(0), jnp.zeros((1, 4, 4, 64)))["params"]
    np.testing.assert_allclose(np.std(kernel), math.sqrt(2.0 / (9 * 256)), rtol=0.02)
    head = layers.head(10).init(_key(0), jnp.zeros((1, 640)))["params"]
    bound = 1.0 / math.sqrt(640)
    assert np.abs(head["kernel"]).max() <= bound
    np.testing.assert_allclose(np.std(head["kernel"]), bound / math.sqrt(3.0), rtol=0.03)
    np.testing.assert_array_equal(head["bias"], 0.0)


# Configs (JSON, ml_collections) hold dtypes as strings.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, "bfloat16"])
def test_bfloat16_compute_returns_float32(dtype):
    model, variables, x = _init(
        "small_cnn", dict(widths=(4,), dense_width=8, dtype=dtype), (8, 8, 1)
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits, features = model.apply(variables, x, train=False, return_features=True)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32


def test_jitted_forward_traces_once():
    model, variables, x = _init("small_cnn", dict(widths=(4,), dense_width=8), (8, 8, 1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x):
        return model.apply(variables, x, train=False)

    forward(variables, x)
    forward(jax.tree.map(lambda v: v + 1.0, variables), x * 2.0)


@pytest.mark.parametrize("downsample", ["conv_stride", "max_pool"])
def test_small_cnn_downsampling(downsample):
    model, variables, x = _init(
        "small_cnn", dict(widths=(4, 8), dense_width=8, downsample=downsample), (8, 8, 1)
    )
    # Two halvings: 8x8 -> 2x2 before the flatten.
    assert variables["params"]["dense"]["kernel"].shape == (2 * 2 * 8, 8)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (BATCH, NUM_CLASSES)
    # Odd sizes: strided 'SAME' convs round up (7 -> 4 -> 2), pools round down (7 -> 3 -> 1).
    side = 2 if downsample == "conv_stride" else 1
    odd = model.init(_key(0), jnp.zeros((1, 7, 7, 1)), train=False)
    assert odd["params"]["dense"]["kernel"].shape == (side * side * 8, 8)


def test_list_widths_are_accepted_and_hashable():
    model = models.create_model("small_cnn", 10, widths=[4, 8])
    assert model.widths == (4, 8)
    hash(model)


# ---------------------------------------------------------------------------------------
# Bad input.


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown model 'vgg'.*small_cnn.*mobilenet_v2"):
        models.create_model("vgg", 10)


def test_unknown_kwarg_lists_valid_ones():
    with pytest.raises(ValueError, match=r"\['widht'\].*'wrn'.*'depth'.*'dropout'.*'width'"):
        models.create_model("wrn", 10, widht=10)
    with pytest.raises(ValueError, match="valid ones are"):
        models.create_model("resnet18", 10, dropout=0.3)


def test_model_kwargs_reports_defaults():
    assert models.model_kwargs("wrn") == dict(
        depth=28, width=10, dropout=0.0, dtype=jnp.float32, ops="auto"
    )


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("wrn", dict(depth=27), "depth must be 6n\\+4"),
        ("wrn", dict(depth=4), "depth must be 6n\\+4"),
        ("wrn", dict(depth=28.0), "depth must be 6n\\+4"),
        ("wrn", dict(width=0), "width .* integer >= 1"),
        ("wrn", dict(width=2.5), "width .* integer >= 1"),
        ("wrn", dict(dropout=1.0), "dropout must be a rate in \\[0, 1\\)"),
        ("wrn", dict(dropout=-0.1), "dropout must be a rate"),
        ("small_cnn", dict(widths=()), "widths must be a non-empty"),
        ("small_cnn", dict(widths=(32, 0)), "widths must be a non-empty"),
        ("small_cnn", dict(widths=32), "widths must be a sequence"),
        ("small_cnn", dict(dense_width=0), "dense_width must be a positive int"),
        ("small_cnn", dict(dropout=True), "dropout must be a rate"),
        ("small_cnn", dict(downsample="avg"), "downsample must be one of"),
        ("resnet18", dict(width=0), "width must be a positive number"),
        ("resnet18", dict(width="1"), "width must be a positive number"),
        ("mobilenet_v2", dict(width=-1.0), "width must be a positive number"),
        ("mobilenet_v2", dict(dropout=1.5), "dropout must be a rate"),
    ],
)
def test_bad_hyper_parameters(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.create_model(name, 10, **kwargs)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "wrn", "mobilenet_v2"])
@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_bad_num_classes(name, num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        models.create_model(name, num_classes)


@pytest.mark.parametrize(
    "x,message",
    [
        (jnp.zeros((8, 8, 1)), "shape \\[batch, height, width, channels\\]"),
        (jnp.zeros((2, 8, 8, 1), jnp.int32), "floating point"),
        (jnp.zeros((2, 3, 3, 1)), "needs images of at least 4x4"),
    ],
)
def test_bad_images(x, message):
    model = models.create_model(
        "small_cnn", 10, widths=(4, 8), dense_width=8, downsample="max_pool"
    )
    with pytest.raises(ValueError, match=message):
        model.init(_key(0), x, train=False)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="depth must be"):
        models.WideResNet(num_classes=10, depth=11)
    assert isinstance(models.SmallCNN(num_classes=10), nn.Module)


def test_benchmark_times_forward_and_train_step():
    model = models.create_model("small_cnn", NUM_CLASSES, widths=(4,), dense_width=8)
    timing = benchmark.time_model(
        model, (8, 8, 1), BATCH, num_classes=NUM_CLASSES, repeats=2, warmup=1, rng_impl="rbg"
    )
    assert timing.repeats == 2
    assert 0 < timing.forward_ms < 60_000 and 0 < timing.train_step_ms < 60_000
