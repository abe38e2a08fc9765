"""SVHN (train + extra), WideResNet-16-8, the Selective-Backprop paper's settings.

No crop or flip (digits are not mirror-symmetric); cutout 20; CIFAR-100's schedule.
"""

from sb_jax.config_lib import base_config


def get_config():
    config = base_config()
    config.dataset = "svhn_cropped_extra"  # train + extra: 604,388 images
    config.model = "wrn"
    config.wrn_depth = 16
    config.wrn_width = 8
    config.dropout = 0.4
    config.crop_padding = 0
    config.flip = False
    config.cutout = 20
    config.num_epochs = 200
    config.batch_size = 128
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_boundaries = "60,120"
    config.lr_decay = 0.1
    return config
