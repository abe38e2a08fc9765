"""scikit-learn's 8x8 digits: zero-setup data for smoke tests and laptops (seconds)."""

from sb_jax.config_lib import base_config


def get_config():
    config = base_config()
    config.dataset = "digits"
    config.model = "small_cnn"
    config.num_epochs = 5
    config.batch_size = 32
    config.scoring_batch_size = 32
    config.history_size = 256
    config.learning_rate = 0.05
    config.lr_schedule = "constant"
    config.eval_batch_size = 512
    return config
