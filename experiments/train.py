r"""Trains a model with a selection policy; all settings come from a config file.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --workdir=/tmp/fmnist --config.selector=sb --config.beta=2

Re-running the same command on the same --workdir resumes from its last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from sb_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (experiments/configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info(
        "done: final test error %.2f%%, best %.2f%%, %.1f s training, %d examples backpropagated",
        summary["final_test_error"], summary["best_test_error"], summary["wall_s"],
        summary["examples_backward"],
    )


if __name__ == "__main__":
    app.run(main)
