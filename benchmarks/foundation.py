r"""The foundation's reference run: traditional training of the default config.

  python -m benchmarks.foundation --out=benchmarks/results

Trains experiments/configs/fashion_mnist.py (small CNN, traditional SGD) from scratch,
measures the forward and train-step cost per example of the same model, and writes
foundation_<backend>.json with the final/best test error, training wall time,
examples/s and the costs.
"""

import json
import os
import shutil
import tempfile

import jax
from absl import app, flags

from experiments import cli
from experiments.configs import fashion_mnist
from sb_jax import config_lib, costs, metrics_io, train
from sb_jax.models import create_model

_OUT = flags.DEFINE_string("out", "benchmarks/results", "Output directory.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Override num_epochs (0: the config's).")


def main(argv):
    del argv
    cli.setup_logging()
    config = fashion_mnist.get_config()
    if _EPOCHS.value:
        config.num_epochs = _EPOCHS.value
    model = create_model(config.model, 10, **config_lib.model_kwargs(config))
    step_costs = costs.measure_step_costs(model, (28, 28, 1), batch_size=config.batch_size)
    workdir = tempfile.mkdtemp(prefix="foundation_")
    try:
        summary = train.train_and_evaluate(config, workdir)
        curve = metrics_io.read_metrics(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "command": "python -m benchmarks.foundation",
        "config": "experiments/configs/fashion_mnist.py",
        "backend": jax.default_backend(),
        "final_test_error": summary["final_test_error"],
        "best_test_error": summary["best_test_error"],
        "train_wall_s": summary["wall_s"],
        "examples_per_s": summary["examples_per_s"],
        "epochs": config.num_epochs,
        "step_costs": step_costs,
        "curve": [{k: r[k] for k in ("epoch", "wall_s", "test_error", "train_loss")}
                  for r in curve],
    }
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, f"foundation_{jax.default_backend()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    app.run(main)
