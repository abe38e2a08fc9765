"""Fashion-MNIST with the small CNN: the CPU default (a few minutes on 2 cores)."""

from sb_jax.config_lib import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model = "small_cnn"
    config.num_epochs = 10
    config.batch_size = 128
    config.learning_rate = 0.05  # 0.1 is the paper's for WRNs; the small CNN prefers less.
    config.lr_schedule = "cosine"
    config.flip = True  # clothing is left-right symmetric; crops hurt at 28x28.
    config.dropout = 0.0
    return config
