"""Model zoo: flax linen image classifiers sharing one calling convention.

model = create_model("wrn", num_classes=10, depth=28, width=10, dropout=0.3)
variables = model.init({"params": k1, "dropout": k2}, x, train=False)
logits, updates = model.apply(variables, x, train=True, rngs={"dropout": k3},
                              mutable=["batch_stats"])
logits, features = model.apply(variables, x, train=False, return_features=True)
"""

from sb_jax.models.layers import BN_EPSILON, BN_MOMENTUM, HEAD_NAME
from sb_jax.models.mobilenet_v2 import MobileNetV2
from sb_jax.models.registry import available_models, create_model, model_kwargs, param_count
from sb_jax.models.resnet import ResNet18
from sb_jax.models.small_cnn import SmallCNN
from sb_jax.models.wide_resnet import WideResNet

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "HEAD_NAME",
    "MobileNetV2",
    "ResNet18",
    "SmallCNN",
    "WideResNet",
    "available_models",
    "create_model",
    "model_kwargs",
    "param_count",
]
