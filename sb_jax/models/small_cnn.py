"""A small CNN for 28x28 inputs (Fashion-MNIST / MNIST): the CPU default model."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models import fast_ops, layers

DOWNSAMPLING = ("conv_stride", "max_pool")


class SmallCNN(nn.Module):
    """[conv3x3 - BN - ReLU, halving the resolution] per entry of `widths`, then
    Dense-ReLU-Dropout and the head.

    `downsample="conv_stride"` (default) halves the resolution with a stride-2 conv,
    `"max_pool"` with a stride-1 conv followed by a 2x2 max pool. Both reach the same
    Fashion-MNIST error in a few epochs, but on CPU the max-pool form's train step is
    several times slower (its full-resolution conv backward and the pool's
    select-and-scatter backward dominate), so the strided form is the default.
    With the defaults on 28x28x1 input: 28 -> 14 -> 7 spatially, a 7*7*64 = 3136
    flatten, Dense 128, Dense num_classes (0.42M parameters).
    """

    num_classes: int
    widths: Sequence[int] = (32, 64)
    dense_width: int = 128
    dropout: float = 0.25
    downsample: str = "conv_stride"
    dtype: layers.Dtype = jnp.float32
    ops: str = "auto"

    def __post_init__(self):
        name = type(self).__name__
        fast_ops.check_impl(self.ops, name)
        layers.check_common(name, self.num_classes, self.dropout)
        if isinstance(self.widths, str | bytes) or not isinstance(self.widths, Sequence):
            raise ValueError(f"{name}: widths must be a sequence of ints, got {self.widths!r}.")
        if len(self.widths) == 0 or not all(layers.is_positive_int(w) for w in self.widths):
            raise ValueError(
                f"{name}: widths must be a non-empty sequence of positive ints, "
                f"got {self.widths!r}."
            )
        if not layers.is_positive_int(self.dense_width):
            raise ValueError(
                f"{name}: dense_width must be a positive int, got {self.dense_width!r}."
            )
        if self.downsample not in DOWNSAMPLING:
            raise ValueError(
                f"{name}: downsample must be one of {list(DOWNSAMPLING)}, got {self.downsample!r}."
            )
        # A tuple keeps the module hashable (lists are not).
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        layers.check_images(x, type(self).__name__)
        use_pool = self.downsample == "max_pool"
        min_side = 2 ** len(self.widths)
        if use_pool and min(x.shape[1], x.shape[2]) < min_side:
            # Strided 'SAME' convs round up and never reach zero size; pools round down.
            raise ValueError(
                f"SmallCNN with {len(self.widths)} max-pool stages needs images of at least "
                f"{min_side}x{min_side}, got {x.shape[1]}x{x.shape[2]}."
            )
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = layers.conv(
                width, 3, 1 if use_pool else 2, dtype=self.dtype, ops=self.ops, name=f"conv_{i}"
            )(x)
            x = layers.batch_norm_relu(train, dtype=self.dtype, ops=self.ops, name=f"bn_{i}")(x)
            if use_pool:
                x = fast_ops.max_pool(x, 2, impl=self.ops)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(
            self.dense_width, kernel_init=layers.dense_kernel_init, dtype=self.dtype, name="dense"
        )(x)
        x = nn.relu(x)
        features = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = layers.head(self.num_classes, dtype=self.dtype)(features)
        return layers.finish(logits, features, return_features)
