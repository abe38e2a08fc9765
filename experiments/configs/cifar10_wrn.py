"""CIFAR-10, WideResNet-28-10, the Selective-Backprop paper's settings (SPEC.md 1)."""

from sb_jax.config_lib import base_config


def get_config():
    config = base_config()
    config.dataset = "cifar10"
    config.model = "wrn"
    config.wrn_depth = 28
    config.wrn_width = 10
    config.dropout = 0.3
    config.crop_padding = 4
    config.flip = True
    config.cutout = 16
    config.num_epochs = 200
    config.batch_size = 128
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_boundaries = "60,120,160"
    config.lr_decay = 0.2
    config.eval_every = 1
    return config
