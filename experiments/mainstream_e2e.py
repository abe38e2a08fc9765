r"""Mainstream end to end: train and profile the apps, plan, run the schedules on a stream.

  python -m experiments.mainstream_e2e --config=experiments/configs/mainstream_e2e.py \
      --out=runs/mainstream_e2e [--config.duration_s=300]
  python -m experiments.mainstream_e2e --config=experiments/configs/mainstream_e2e.py:gpu \
      --out=runs/mainstream_e2e_gpu

Writes report.json, report.md and the profile directory (profile/) under --out.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mainstream_jax.e2e import pipeline, runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/mainstream_e2e.py", "Config file (ml_collections)."
)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def main(argv):
    del argv
    # Before any JAX computation: the dispatch mode is fixed when the backend starts.
    runtime.set_cpu_inline_dispatch(bool(_CONFIG.value.get("cpu_inline_dispatch", False)))
    try:
        pipeline.validate_config(_CONFIG.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = pipeline.run_e2e(_CONFIG.value, _OUT.value, log=logging.info)
    print(pipeline.format_report(report))
    return 0


if __name__ == "__main__":
    app.run(main)
