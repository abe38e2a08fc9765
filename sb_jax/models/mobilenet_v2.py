"""MobileNetV2 (Sandler et al., CVPR 2018), CIFAR variant for 32x32 inputs.

CIFAR adaptation (the one of the widely used PyTorch CIFAR code): the stem conv has
stride 1 instead of 2 and the second stage (24 channels) stride 1 instead of 2. The
other strides are the paper's, so a 32x32 input is reduced 32 -> 16 -> 8 -> 4 (total
stride 8 instead of 32) and the last feature map is 4x4, like 224/32 = 7 in ImageNet.
Everything else is the paper's: inverted residual blocks (1x1 expand by t = 6, 3x3
depthwise, 1x1 linear projection), ReLU6, a residual only where stride is 1 and the
channel count is unchanged, a final 1x1 conv to 1280 channels, global average pool and
the head. Channel counts are multiplied by `width` and rounded to multiples of 8 as in
the paper's reference implementation; the 1280 is never scaled below 1x.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models import fast_ops, layers

# (expansion t, output channels c, repeats n, first stride s); the second row's stride is
# 2 in the ImageNet model.
CIFAR_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_WIDTH = 32
LAST_WIDTH = 1280
CHANNEL_DIVISOR = 8


def round_channels(channels: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Nearest multiple of `divisor` (at least `divisor`) that loses at most 10 %."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (linear), + residual."""

    features: int
    strides: int
    expansion: int
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        hidden = in_features * self.expansion
        y = x
        if self.expansion != 1:
            y = layers.conv(hidden, 1, dtype=self.dtype, ops=self.ops, name="expand_conv")(y)
            y = nn.relu6(layers.batch_norm(train, dtype=self.dtype, name="expand_bn")(y))
        y = layers.conv(
            hidden,
            3,
            self.strides,
            feature_group_count=hidden,
            dtype=self.dtype,
            ops=self.ops,
            name="depthwise_conv",
        )(y)
        y = nn.relu6(layers.batch_norm(train, dtype=self.dtype, name="depthwise_bn")(y))
        y = layers.conv(self.features, 1, dtype=self.dtype, ops=self.ops, name="project_conv")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="project_bn")(y)
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2, CIFAR variant (see module docstring); dropout precedes the head."""

    num_classes: int
    width: float = 1.0
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        fast_ops.check_impl(self.ops, name)
        layers.check_common(name, self.num_classes, self.dropout)
        layers.check_width_multiplier(name, self.width)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        layers.check_images(x, type(self).__name__)
        x = x.astype(self.dtype)
        x = layers.conv(
            round_channels(STEM_WIDTH * self.width),
            3,
            dtype=self.dtype,
            ops=self.ops,
            name="stem_conv",
        )(x)
        x = nn.relu6(layers.batch_norm(train, dtype=self.dtype, name="stem_bn")(x))
        for stage, (expansion, channels, repeats, stride) in enumerate(CIFAR_STAGES):
            for block in range(repeats):
                x = InvertedResidual(
                    round_channels(channels * self.width),
                    stride if block == 0 else 1,
                    expansion,
                    dtype=self.dtype,
                    ops=self.ops,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
        last = round_channels(LAST_WIDTH * max(1.0, self.width))
        x = layers.conv(last, 1, dtype=self.dtype, ops=self.ops, name="last_conv")(x)
        x = nn.relu6(layers.batch_norm(train, dtype=self.dtype, name="last_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        features = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = layers.head(self.num_classes, dtype=self.dtype)(features)
        return layers.finish(logits, features, return_features)
