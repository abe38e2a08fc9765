"""Building blocks shared by every model in the zoo.

All models use the same conventions, fixed here so that they cannot drift apart:

* BatchNorm: flax ``momentum=0.9`` and ``epsilon=1e-5``. Flax updates
  ``ra = momentum * ra + (1 - momentum) * batch_stat``, so 0.9 is PyTorch's default
  ``momentum=0.1``. One difference remains: flax folds the *biased* batch variance into
  the running variance, PyTorch the unbiased one (a factor n / (n - 1), n = B*H*W values
  per channel; negligible for the batch sizes used here).
* Convolutions: no bias (every conv output reaches a BatchNorm before any nonlinearity),
  kernels drawn from He/Kaiming normal with ``fan_out`` (std = sqrt(2 / (k*k*out_channels))),
  as in the common PyTorch CIFAR implementations of WRN and ResNet.
* Final Dense ("head"): kernel from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's
  ``nn.Linear`` default, and zero bias (as the WRN reference code does).
* Hidden Dense layers (small CNN only): Kaiming normal with ``fan_in``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models import fast_ops

Dtype = Any

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
HEAD_NAME = "head"

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
head_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
    """Bias-free square 'SAME' convolution; parameters identical to `nn.Conv(use_bias=False)`.

    `ops` picks the formulation (`fast_ops.IMPLS`): the same function with XLA's native
    operations ("xla") or with the CPU-fast kernel gradient ("cpu"); "auto" chooses by
    backend. Parameters and checkpoints do not depend on it.
    """

    features: int
    kernel_size: int
    strides: int = 1
    feature_group_count: int = 1
    dtype: Dtype = jnp.float32
    ops: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"Conv {self.name}: {in_features} input channels do not split into "
                f"{self.feature_group_count} groups."
            )
        kernel = self.param(
            "kernel",
            conv_kernel_init,
            (
                self.kernel_size,
                self.kernel_size,
                in_features // self.feature_group_count,
                self.features,
            ),
            jnp.float32,
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return fast_ops.conv2d(
            x,
            kernel,
            self.strides,
            feature_group_count=self.feature_group_count,
            impl=self.ops,
        )


def conv(
    features: int,
    kernel_size: int,
    strides: int = 1,
    *,
    dtype: Dtype = jnp.float32,
    feature_group_count: int = 1,
    ops: str = "auto",
    name: str | None = None,
) -> Conv:
    """Bias-free square convolution with 'SAME' padding and Kaiming fan_out init."""
    return Conv(
        features,
        kernel_size,
        strides,
        feature_group_count=feature_group_count,
        dtype=dtype,
        ops=ops,
        name=name,
    )


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm over the channel axis: batch statistics in training, running ones in eval."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


class BatchNormReLU(nn.Module):
    """`nn.relu(nn.BatchNorm(...)(x))` with the same variables and function, in one module.

    Parameters (`scale`, `bias`) and statistics (`batch_stats/mean`, `/var`) are named
    and updated exactly as `nn.BatchNorm`'s, so checkpoints move freely between the two.
    In training, `ops` picks the formulation of the batch-statistics pass
    (`fast_ops.batch_norm_relu`): on the CPU a hand-written backward pass.
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Dtype = jnp.float32
    ops: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
            return nn.relu(jnp.asarray(y, self.dtype))
        y, mean, var = fast_ops.batch_norm_relu(x, scale, bias, self.epsilon, impl=self.ops)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return jnp.asarray(y, self.dtype)


def batch_norm_relu(
    train: bool, *, dtype: Dtype = jnp.float32, ops: str = "auto", name: str | None = None
) -> BatchNormReLU:
    """`batch_norm` followed by ReLU, as one module with `batch_norm`'s variables."""
    return BatchNormReLU(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        ops=ops,
        name=name,
    )


head = functools.partial(
    nn.Dense, kernel_init=head_kernel_init, bias_init=nn.initializers.zeros, name=HEAD_NAME
)
head.__doc__ = "The final Dense layer of every model; its input is what `return_features` gives."


def check_images(x: jax.Array, model_name: str) -> None:
    """Fails early, with a readable message, on input that is not a batch of images."""
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects images of shape [batch, height, width, channels], got an "
            f"array of shape {tuple(x.shape)}; add the missing batch or channel axis."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model_name} expects normalised floating point images, got dtype {x.dtype}; "
            "convert and normalise the images first."
        )


def finish(
    logits: jax.Array, features: jax.Array, return_features: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Casts to float32 (whatever the compute dtype) and packs the optional features."""
    logits = logits.astype(jnp.float32)
    if return_features:
        return logits, features.astype(jnp.float32)
    return logits


def check_common(model_name: str, num_classes: Any, dropout: Any = 0.0) -> None:
    """Validates the hyper-parameters every model shares."""
    if not is_positive_int(num_classes):
        raise ValueError(
            f"{model_name}: num_classes must be a positive integer, got {num_classes!r}."
        )
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not (0.0 <= dropout < 1.0)
    ):
        raise ValueError(f"{model_name}: dropout must be a rate in [0, 1), got {dropout!r}.")


def is_positive_int(value: Any) -> bool:
    """True for an integer >= 1 (numpy integers included, bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_width_multiplier(model_name: str, width: Any) -> None:
    """Raises ValueError unless ``width`` (a channel multiplier) is a positive real number."""
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not width > 0:
        raise ValueError(f"{model_name}: width must be a positive number, got {width!r}.")
