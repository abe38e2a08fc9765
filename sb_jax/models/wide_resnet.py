"""Wide residual networks, WRN-depth-k (Zagoruyko & Komodakis, BMVC 2016).

Pre-activation blocks (BN-ReLU-conv), dropout between the two 3x3 convs, n = (depth-4)/6
blocks in each of three stages of width 16k, 32k and 64k (strides 1, 2, 2) after a 16
channel stem conv; a final BN-ReLU, global average pool and the Dense head. As in the
authors' code, when a block changes shape its 1x1 projection shortcut reads the
*pre-activated* input; otherwise the shortcut is the raw input.

The SB paper's models: WRN-28-10 with dropout 0.3 (CIFAR) and WRN-16-8 with dropout 0.4
(SVHN).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models import fast_ops, layers

STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
STEM_WIDTH = 16


def blocks_per_stage(depth: int) -> int:
    """n = (depth - 4) / 6, the number of blocks in each stage."""
    if not layers.is_positive_int(depth) or (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(
            f"WideResNet: depth must be 6n+4 for an integer n >= 1 (10, 16, 22, 28, 40, ...), "
            f"got {depth!r}."
        )
    return (depth - 4) // 6


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut."""

    features: int
    strides: int = 1
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        preact = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name="bn_0")(x)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = layers.conv(
                self.features, 1, self.strides, dtype=self.dtype, ops=self.ops, name="proj_conv"
            )(preact)
        else:
            shortcut = x
        y = layers.conv(
            self.features, 3, self.strides, dtype=self.dtype, ops=self.ops, name="conv_0"
        )(preact)
        y = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name="bn_1")(y)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = layers.conv(self.features, 3, dtype=self.dtype, ops=self.ops, name="conv_1")(y)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-`depth`-`width` with `dropout` inside every block."""

    num_classes: int
    depth: int = 28
    width: int = 10
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        fast_ops.check_impl(self.ops, name)
        layers.check_common(name, self.num_classes, self.dropout)
        blocks_per_stage(self.depth)
        if not layers.is_positive_int(self.width):
            raise ValueError(
                f"{name}: width (the widening factor k) must be an integer >= 1, "
                f"got {self.width!r}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        layers.check_images(x, type(self).__name__)
        x = x.astype(self.dtype)
        x = layers.conv(STEM_WIDTH, 3, dtype=self.dtype, ops=self.ops, name="stem_conv")(x)
        n = blocks_per_stage(self.depth)
        for stage, (base, stride) in enumerate(zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True)):
            for block in range(n):
                x = WideBasicBlock(
                    base * self.width,
                    stride if block == 0 else 1,
                    self.dropout,
                    dtype=self.dtype,
                    ops=self.ops,
                    name=f"stage{stage + 1}_block{block}",
                )(x, train)
        x = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name="final_bn")(x)
        features = jnp.mean(x, axis=(1, 2))
        logits = layers.head(self.num_classes, dtype=self.dtype)(features)
        return layers.finish(logits, features, return_features)
