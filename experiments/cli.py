"""Shared set-up of the absl entry points."""

from absl import logging


def setup_logging() -> None:
    """INFO lines from our code; orbax/matplotlib/jax chatter only at WARNING and up."""

    def keep(record) -> bool:
        noisy = ("/orbax/", "/matplotlib/", "/jax/_src/")
        return record.levelno >= 30 or not any(part in record.pathname for part in noisy)

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(keep)
