r"""Trains a model with a selection policy; all settings come from a config file.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py \
      --workdir=/tmp/fmnist --config.selector=sb --config.beta=2

Re-running the same command on the same --workdir resumes from its last checkpoint.

Many hosts: start the same command on every host with --num_processes, --process_id and
--coordinator_address (or --distributed alone where JAX detects the cluster: TPU pods,
SLURM, Open MPI), and --config.num_devices=0 to use every device (WORKSPACE.md, "Running
on GPU/TPU and on many hosts").
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from sb_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (experiments/configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, plots.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Join a multi-process run with jax.distributed.initialize (implied by the flags below; "
    "alone it lets JAX detect the cluster: TPU pod slices, SLURM, Open MPI).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0's coordinator, e.g. 10.0.0.1:1234."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the run (0 = detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index, 0..num_processes-1.")
_CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", "", ["", "gloo", "mpi"],
    "Cross-process collectives for the CPU backend (multi-process CPU runs need gloo).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value:
        if _NUM_PROCESSES.value and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise app.UsageError(
                f"--process_id={_PROCESS_ID.value} must be in [0, {_NUM_PROCESSES.value})"
            )
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value,
                                        cpu_collectives=_CPU_COLLECTIVES.value)
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info(
        "done: final test error %.2f%%, best %.2f%%, %.1f s training, %d examples backpropagated",
        summary["final_test_error"], summary["best_test_error"], summary["wall_s"],
        summary["examples_backward"],
    )


if __name__ == "__main__":
    app.run(main)
