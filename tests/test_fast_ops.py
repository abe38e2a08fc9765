"""The CPU-fast conv/pool formulations compute XLA's functions and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from sb_jax.models import create_model, fast_ops, layers


def _xla_conv(x, kernel, strides):
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class ConvTest(parameterized.TestCase):
    @parameterized.parameters(
        # (batch, size, in, out, kernel, stride): odd sizes and strides exercise SAME padding.
        (4, 8, 3, 5, 3, 1),
        (6, 9, 4, 8, 3, 2),
        (16, 7, 2, 3, 1, 2),
        (3, 6, 8, 8, 1, 1),
        (12, 5, 3, 4, 5, 1),
    )
    def test_conv_and_its_gradients_match_xla(self, batch, size, cin, cout, k, stride):
        key_x, key_w, key_dy = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(key_x, (batch, size, size, cin))
        kernel = jax.random.normal(key_w, (k, k, cin, cout))
        want, want_vjp = jax.vjp(lambda a, b: _xla_conv(a, b, stride), x, kernel)
        got, got_vjp = jax.vjp(lambda a, b: fast_ops.conv2d(a, b, stride, impl="cpu"), x, kernel)
        dy = jax.random.normal(key_dy, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_vjp(dy), want_vjp(dy), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)

    def test_kernel_gradient_against_numpy_reference(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(5, 4, 4, 2)).astype(np.float32)
        dy = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
        kernel = jnp.zeros((3, 3, 2, 3))
        _, vjp = jax.vjp(lambda k: fast_ops.conv2d(jnp.asarray(x), k, 1, impl="cpu"), kernel)
        (got,) = vjp(jnp.asarray(dy))
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        want = np.zeros((3, 3, 2, 3), np.float64)
        for i in range(3):
            for j in range(3):
                for h in range(4):
                    for w in range(4):
                        want[i, j] += padded[:, h + i, w + j, :].T @ dy[:, h, w, :]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    @parameterized.parameters(
        # batch, bytes per example, kernel bytes -> examples per chunk
        (128, 100_000, 1_000, 8),  # 1 MiB / 100 kB = 10 -> largest divisor of 128 <= 10
        (128, 2_000_000, 1_000, 4),  # at most 32 chunks
        (128, 64_000, 9_437_184, 128),  # a kernel bigger than the batch: no chunking
        (30, 100_000, 1_000, 10),  # divisors of 30
        (7, 10, 10, 7),
    )
    def test_kernel_grad_chunk(self, batch, example_bytes, kernel_bytes, want):
        got = fast_ops.kernel_grad_chunk(batch, example_bytes, kernel_bytes)
        self.assertEqual(got, want)
        self.assertEqual(batch % got, 0)

    def test_grouped_conv_uses_xla(self):
        x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
        kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 4))
        got = fast_ops.conv2d(x, kernel, 1, feature_group_count=4, impl="cpu")
        want = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4,
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)

    def test_conv_module_has_nn_conv_parameters(self):
        x = jnp.ones((2, 5, 5, 3))
        ours = layers.conv(4, 3, 2, ops="cpu").init(jax.random.key(0), x)
        theirs = nn.Conv(4, (3, 3), (2, 2), padding="SAME", use_bias=False,
                         kernel_init=layers.conv_kernel_init).init(jax.random.key(0), x)
        self.assertEqual(jax.tree.map(jnp.shape, ours), jax.tree.map(jnp.shape, theirs))
        np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])


class MaxPoolTest(parameterized.TestCase):
    @parameterized.parameters((8, 2), (9, 2), (9, 3), (7, 2))
    def test_pool_and_gradient_match_flax_including_ties(self, size, window):
        x = jax.random.normal(jax.random.key(3), (3, size, size, 5))
        # Rounding creates ties inside windows; ReLU-like zeros create all-tie windows.
        x = jnp.maximum(jnp.round(x * 2) / 2, 0.0)
        pool_flax = lambda a: nn.max_pool(a, (window, window), strides=(window, window))  # noqa: E731
        pool_cpu = lambda a: fast_ops.max_pool(a, window, impl="cpu")  # noqa: E731
        want, want_vjp = jax.vjp(pool_flax, x)
        got, got_vjp = jax.vjp(pool_cpu, x)
        np.testing.assert_array_equal(got, want)
        dy = jax.random.normal(jax.random.key(4), want.shape)
        # select_and_scatter routes each window's gradient to its first maximum: bitwise.
        np.testing.assert_array_equal(got_vjp(dy)[0], want_vjp(dy)[0])

    def test_too_small_input_is_rejected(self):
        with pytest.raises(ValueError, match="needs a larger input"):
            fast_ops.max_pool(jnp.ones((1, 1, 4, 1)), 2, impl="cpu")


class BatchNormReLUTest(parameterized.TestCase):
    """`layers.BatchNormReLU` is `nn.relu(nn.BatchNorm(...))`: values, gradients, state."""

    def _inputs(self, shape):
        key_x, key_w = jax.random.split(jax.random.key(3))
        x = 1.5 * jax.random.normal(key_x, shape) + 0.2
        channels = shape[-1]
        # Negative scales flip which side of the mean ReLU keeps: both signs are covered.
        params = {"scale": jnp.linspace(-1.0, 2.0, channels),
                  "bias": jnp.linspace(-0.3, 0.3, channels)}
        stats = {"mean": jnp.linspace(-0.1, 0.1, channels), "var": jnp.linspace(0.5, 2.0, channels)}
        return x, jax.random.normal(key_w, shape), params, stats

    def test_variables_are_batch_norms(self):
        x = jnp.ones((2, 5, 5, 3))
        want = layers.batch_norm(True).init(jax.random.key(0), x)
        got = layers.batch_norm_relu(True).init(jax.random.key(0), x)
        self.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, w)
            self.assertEqual(g.dtype, w.dtype)

    @parameterized.product(ops=["xla", "cpu"], shape=[(8, 7, 7, 4), (3, 5, 6, 5), (64, 2)])
    def test_training_matches_flax(self, ops, shape):
        x, weights, params, stats = self._inputs(shape)
        flax_bn = layers.batch_norm(True)
        ours = layers.batch_norm_relu(True, ops=ops)

        def loss(module, relu):
            def fn(p, inputs):
                y, new = module.apply({"params": p, "batch_stats": stats}, inputs,
                                      mutable=["batch_stats"])
                y = nn.relu(y) if relu else y
                return jnp.sum(y * weights), (y, new["batch_stats"])
            return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))

        (l_want, (y_want, s_want)), g_want = loss(flax_bn, True)(params, x)
        (l_got, (y_got, s_got)), g_got = loss(ours, False)(params, x)
        np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(l_got, l_want, rtol=1e-5, atol=1e-4)
        for got, want in zip(jax.tree.leaves((g_got, s_got)), jax.tree.leaves((g_want, s_want)),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    @parameterized.parameters("xla", "cpu")
    def test_eval_uses_running_statistics(self, ops):
        x, _, params, stats = self._inputs((4, 5, 5, 3))
        variables = {"params": params, "batch_stats": stats}
        want = nn.relu(layers.batch_norm(False).apply(variables, x))
        got = layers.batch_norm_relu(False, ops=ops).apply(variables, x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def test_custom_backward_is_a_full_vjp(self):
        # Cotangents on the batch mean and variance too (zero in training, where they only
        # feed running averages): the hand-written backward must still be the exact VJP.
        x, dy, params, _ = self._inputs((6, 4, 4, 3))
        args = (x, params["scale"], params["bias"])
        want_out, want_vjp = jax.vjp(
            lambda *a: fast_ops.batch_norm_relu(*a, 1e-5, impl="xla"), *args)
        got_out, got_vjp = jax.vjp(
            lambda *a: fast_ops.batch_norm_relu(*a, 1e-5, impl="cpu"), *args)
        cotangents = (dy, jnp.array([0.3, -1.0, 2.0]), jnp.array([1.5, 0.2, -0.7]))
        for got, want in zip(jax.tree.leaves((got_out, got_vjp(cotangents))),
                             jax.tree.leaves((want_out, want_vjp(cotangents))), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def test_bfloat16_keeps_float32_statistics(self):
        x, _, params, stats = self._inputs((4, 5, 5, 3))
        variables = {"params": params, "batch_stats": stats}
        x16 = x.astype(jnp.bfloat16)
        evaluated = layers.batch_norm_relu(False, dtype=jnp.bfloat16).apply(variables, x16)
        y, new = layers.batch_norm_relu(True, dtype=jnp.bfloat16, ops="cpu").apply(
            variables, x16, mutable=["batch_stats"])
        flax_y, flax_new = nn.BatchNorm(
            use_running_average=False, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON,
            dtype=jnp.bfloat16).apply(variables, x16, mutable=["batch_stats"])
        self.assertEqual(y.dtype, jnp.bfloat16)
        self.assertEqual(evaluated.dtype, jnp.bfloat16)
        self.assertEqual(new["batch_stats"]["mean"].dtype, jnp.float32)
        np.testing.assert_allclose(y.astype(jnp.float32), nn.relu(flax_y).astype(jnp.float32),
                                   rtol=1e-2, atol=1e-2)
        for got, want_leaf in zip(jax.tree.leaves(new), jax.tree.leaves(flax_new), strict=True):
            np.testing.assert_allclose(got, want_leaf, rtol=1e-5, atol=1e-6)


class ImplTest(parameterized.TestCase):
    def test_auto_resolves_by_backend(self):
        want = "cpu" if jax.default_backend() == "cpu" else "xla"
        self.assertEqual(fast_ops.resolve_impl("auto"), want)
        self.assertEqual(fast_ops.resolve_impl("xla"), "xla")

    @parameterized.parameters("small_cnn", "resnet18", "wrn", "mobilenet_v2")
    def test_models_reject_unknown_ops(self, name):
        with pytest.raises(ValueError, match="ops must be one of"):
            create_model(name, 10, ops="gpu")


def _loss_and_grads(model, variables, x, y):
    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            rngs={"dropout": jax.random.key(5)}, mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("small_cnn", {"downsample": "max_pool", "widths": (4, 8), "dense_width": 16}, (28, 28, 1)),
        ("small_cnn", {"downsample": "conv_stride", "widths": (4, 8), "dense_width": 16},
         (28, 28, 1)),
        ("resnet18", {"width": 0.125}, (8, 8, 3)),
        ("wrn", {"depth": 10, "width": 1}, (8, 8, 3)),
    ],
)
def test_models_compute_the_same_function_with_either_ops(name, kwargs, shape):
    # MobileNetV2 is left out for test time (50 convs to compile twice); its dense convs
    # are the 1x1 case of ConvTest and its depthwise ones always use XLA's operation.
    x = jax.random.normal(jax.random.key(6), (4, *shape))
    y = jnp.arange(4) % 10
    plain = create_model(name, 10, ops="xla", **kwargs)
    fast = create_model(name, 10, ops="cpu", **kwargs)
    variables = plain.init(jax.random.key(7), x, train=False)
    np.testing.assert_allclose(
        fast.apply(variables, x, train=False), plain.apply(variables, x, train=False),
        rtol=1e-5, atol=1e-5,
    )
    loss_plain, grads_plain = _loss_and_grads(plain, variables, x, y)
    loss_fast, grads_fast = _loss_and_grads(fast, variables, x, y)
    np.testing.assert_allclose(loss_fast, loss_plain, rtol=1e-5)
    for g_fast, g_plain in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_plain),
                               strict=True):
        np.testing.assert_allclose(g_fast, g_plain, rtol=1e-4, atol=1e-5)
