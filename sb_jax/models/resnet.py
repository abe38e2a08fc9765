"""ResNet-18, CIFAR variant (He et al. 2016, as in the common PyTorch CIFAR code).

CIFAR changes from the ImageNet model: a 3x3 stride-1 stem conv and no max pool, so a
32x32 input reaches the four stages at 32, 16, 8 and 4 pixels.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models import fast_ops, layers

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (post-activation)."""

    features: int
    strides: int = 1
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = layers.conv(
            self.features, 3, self.strides, dtype=self.dtype, ops=self.ops, name="conv_0"
        )(x)
        y = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name="bn_0")(y)
        y = layers.conv(self.features, 3, dtype=self.dtype, ops=self.ops, name="conv_1")(y)
        y = layers.batch_norm(train, dtype=self.dtype, name="bn_1")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            # Projection shortcut ("option B"), as in the PyTorch CIFAR ResNets.
            shortcut = layers.conv(
                self.features, 1, self.strides, dtype=self.dtype, ops=self.ops, name="proj_conv"
            )(x)
            shortcut = layers.batch_norm(train, dtype=self.dtype, name="proj_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs; `width` scales every channel count (1.0 is the paper's)."""

    num_classes: int
    width: float = 1.0
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        fast_ops.check_impl(self.ops, name)
        layers.check_common(name, self.num_classes)
        layers.check_width_multiplier(name, self.width)
        super().__post_init__()

    def channels(self, base: int) -> int:
        """Channel count of a layer whose width-1 model has `base` channels."""
        return max(1, round(base * self.width))

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        layers.check_images(x, type(self).__name__)
        x = x.astype(self.dtype)
        x = layers.conv(self.channels(64), 3, dtype=self.dtype, ops=self.ops, name="stem_conv")(x)
        x = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name="stem_bn")(x)
        for stage, (base, stride) in enumerate(zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True)):
            for block in range(BLOCKS_PER_STAGE):
                x = BasicBlock(
                    self.channels(base),
                    stride if block == 0 else 1,
                    dtype=self.dtype,
                    ops=self.ops,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
        features = jnp.mean(x, axis=(1, 2))
        logits = layers.head(self.num_classes, dtype=self.dtype)(features)
        return layers.finish(logits, features, return_features)
