"""Model registry: build any model of the zoo by name."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sb_jax.models.mobilenet_v2 import MobileNetV2
from sb_jax.models.resnet import ResNet18
from sb_jax.models.small_cnn import SmallCNN
from sb_jax.models.wide_resnet import WideResNet

_MODELS: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "wrn": WideResNet,
    "mobilenet_v2": MobileNetV2,
}
# Dataclass fields that are flax plumbing or given positionally, not hyper-parameters.
_NOT_KWARGS = frozenset({"parent", "name", "num_classes"})


def available_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(_MODELS)


def model_kwargs(name: str) -> dict[str, Any]:
    """The hyper-parameters `create_model(name, ...)` accepts, with their defaults."""
    cls = _model_class(name)
    return {
        field.name: field.default
        for field in dataclasses.fields(cls)
        if field.name not in _NOT_KWARGS and field.init
    }


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds model `name` with a `num_classes`-way head.

    Every model is called as `model.apply(variables, x, train=..., return_features=...)`
    with x a float [B, H, W, C] batch and returns float32 logits [B, num_classes], or
    `(logits, features)` where features are the inputs of the final Dense layer
    (parameters under `params['head']`; in train mode they carry the dropout mask of
    the models with dropout before the head, small_cnn and mobilenet_v2). Every model has
    a `batch_stats` collection.

    Raises:
      ValueError: unknown name, unknown keyword, or an invalid hyper-parameter value.
    """
    allowed = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for model {name!r}; valid ones are {sorted(allowed)}."
        )
    return _model_class(name)(num_classes=num_classes, **kwargs)


def param_count(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of trainable parameters (`params` only), found without allocating them."""
    shapes = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0), "dropout": jax.random.key(1)},
            jnp.zeros(tuple(input_shape), jnp.float32),
            train=False,
        )
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def _model_class(name: str) -> type[nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {available_models()}.")
    return _MODELS[name]
