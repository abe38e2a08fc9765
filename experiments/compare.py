r"""The main job: traditional training against Selective-Backprop, with a speedup table.

  python -m experiments.compare --workdir=runs/compare

Trains the config (default: Fashion-MNIST, small CNN) once per selector and seed, then
prints and writes (compare.json, error_vs_time.png, error_vs_backprops.png) the time
and backpropagated examples each selector needs to reach the baseline's final test
error + 0.25 / 0.5 / 1 points. Re-running resumes unfinished runs.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from sb_jax import comparison

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "fashion_mnist.py"),
    "Base config file; each selector overrides `selector` (and `beta`).", lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Directory for all runs and results.")
_SELECTORS = flags.DEFINE_list("selectors", ["traditional", "sb"], "Selectors to compare.")
_BETA = flags.DEFINE_float("beta", 2.0, "Selectivity of the selective policies.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (one run per selector and seed).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if "traditional" not in _SELECTORS.value:
        raise app.UsageError("--selectors must include 'traditional' (it defines the targets)")
    variants = {
        name: ({"selector": name} if name == "traditional"
               else {"selector": name, "beta": _BETA.value})
        for name in _SELECTORS.value
    }
    seeds = [int(s) for s in _SEEDS.value]
    os.makedirs(_WORKDIR.value, exist_ok=True)
    runs = comparison.run_variants(_CONFIG.value, variants, seeds, _WORKDIR.value)
    result = comparison.compare(runs)
    result["plots"] = comparison.plot_runs(runs, _WORKDIR.value, _CONFIG.value.dataset)
    with open(os.path.join(_WORKDIR.value, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(comparison.analysis.format_table(result["policies"], result["targets"]))
    print(f"results: {os.path.join(_WORKDIR.value, 'compare.json')}")


if __name__ == "__main__":
    app.run(main)
