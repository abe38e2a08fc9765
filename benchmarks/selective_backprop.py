r"""Selective-Backprop against its baselines on Fashion-MNIST, end to end.

  python -m benchmarks.selective_backprop --out=benchmarks/results/sb_fashion_mnist
  python -m benchmarks.selective_backprop --label_noise=0.2 \
      --out=benchmarks/results/sb_fashion_mnist_noise20
  # AdaptSB's suite (traditional, sb, adapt_sb, rho_loss at beta 2; every variant trains
  # on the same training set with 5,000 examples carved out for validation):
  python -m benchmarks.selective_backprop --suite=adapt --label_noise=0.4 \
      --out=benchmarks/results/adapt_fashion_mnist_noise40

Runs traditional, sb (beta 1, 2, 3), stale_sb (n = 3, beta 2), random (beta 2) and
kath18 (beta 2) with the same epoch budget and seeds, one after the other in this
process, and writes to --out:
  results.json   per policy: final/best error, wall time and backpropagated examples to
                 the targets (traditional's final error + 0.25/0.5/1 points), speedups,
                 measured vs. cost-model epoch times, mislabeled share of backprops;
                 plus the measured forward / train-step costs, both of the bare model
                 and of the trainer's own pieces (gather + augment included).
  error_vs_time.png, error_vs_backprops.png
  priorities_<variant>_seed<s>.png   learned priorities over training (AdaptSB)
Runs live in --workdir (default: --out/runs, not committed); a re-run resumes them.
"""

import copy
import json
import os
import shutil
import statistics

import jax
from absl import app, flags

from experiments import cli
from experiments.configs import fashion_mnist
from sb_jax import analysis, comparison, config_lib, costs, train
from sb_jax.models import create_model

_OUT = flags.DEFINE_string("out", "benchmarks/results/sb_fashion_mnist", "Results directory.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory (default: /tmp/sb_bench_<out>).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Epoch budget (0: the config's).")
_NOISE = flags.DEFINE_float("label_noise", 0.0, "Fraction of training labels shuffled.")
_POLICIES = flags.DEFINE_list("policies", [], "Subset of the variants (default: all).")
_SUITE = flags.DEFINE_enum("suite", "sb", ["sb", "adapt"], "Which set of variants to run.")
_SUBSET = flags.DEFINE_integer("train_subset", 0, "Train on the first N examples (smoke runs).")

VARIANTS = {
    "traditional": {"selector": "traditional"},
    "sb_beta1": {"selector": "sb", "beta": 1.0},
    "sb_beta2": {"selector": "sb", "beta": 2.0},
    "sb_beta3": {"selector": "sb", "beta": 3.0},
    "stale_sb_n3": {"selector": "stale_sb", "beta": 2.0, "staleness": 3},
    "random_beta2": {"selector": "random", "beta": 2.0},
    "kath18_beta2": {"selector": "kath18", "beta": 2.0},
}

# AdaptSB and RHO-LOSS need a clean held-out split; every variant of this suite trains on
# the same (reduced) training set so their errors are comparable.
ADAPT_VALIDATION_SIZE = 5000
ADAPT_VARIANTS = {
    "traditional": {"selector": "traditional"},
    "sb_beta2": {"selector": "sb", "beta": 2.0},
    "adapt_sb_beta2": {"selector": "adapt_sb", "beta": 2.0},
    "rho_loss_beta2": {"selector": "rho_loss", "beta": 2.0},
}


UNIT_KEYS = ("forward_per_example_s", "train_step_per_example_s")
# Per epoch in results.json: enough to redo every figure of the table and the cost model.
CURVE_KEYS = ("epoch", "wall_s", "examples_backward", "examples_scored", "test_error",
              *(f"unit_{k}" for k in UNIT_KEYS), "unit_samples")


def _in_run_unit_costs(record: dict) -> dict | None:
    """The unit costs the run timed in between its own dispatches over this record's
    epoch (config.unit_cost_every), or None for a run made without them."""
    if f"unit_{UNIT_KEYS[0]}" not in record:
        return None
    return {k: record[f"unit_{k}"] for k in UNIT_KEYS}


def epoch_cost_model(runs, run_costs=None, skip_epochs: int = 1) -> dict:
    """Measured vs. predicted seconds per epoch, over the epochs after priming.

    With `run_costs`, `run_costs[i]` are the unit costs (forward/train-step seconds per
    example) measured next to run `runs[i]` (see `main`); without, each epoch's own
    in-run timings (`_in_run_unit_costs`), and epochs without them are left out.
    """
    measured, predicted, per_run = [], [], []
    for i, records in enumerate(runs):
        run_measured, run_predicted = [], []
        for prev, cur in zip(records, records[1:], strict=False):
            if cur["epoch"] <= skip_epochs:
                continue
            unit = run_costs[i] if run_costs is not None else _in_run_unit_costs(cur)
            if unit is None:
                continue
            run_measured.append(cur["wall_s"] - prev["wall_s"])
            run_predicted.append(costs.predicted_epoch_seconds(
                cur["examples_scored"] - prev["examples_scored"],
                cur["examples_backward"] - prev["examples_backward"], unit))
        if run_measured:
            per_run.append(sum(run_measured) / sum(run_predicted))
        measured += run_measured
        predicted += run_predicted
    if not measured:
        return {}
    m, p = statistics.mean(measured), statistics.mean(predicted)
    return {"measured_epoch_s": m, "predicted_epoch_s": p, "measured_over_predicted": m / p,
            "per_run_measured_over_predicted": per_run}


def _mean_costs(samples):
    return {key: statistics.mean(sample[key] for sample in samples)
            for key, value in samples[0].items() if isinstance(value, float)}


def main(argv):
    del argv
    cli.setup_logging()
    base = fashion_mnist.get_config()
    base.label_noise = _NOISE.value
    base.tensorboard = False
    base.unit_cost_every = 16  # ~20 % more time outside wall_s, 10-30 samples an epoch
    if _EPOCHS.value:
        base.num_epochs = _EPOCHS.value
    if _SUBSET.value:
        base.train_subset = _SUBSET.value
    suite = VARIANTS
    if _SUITE.value == "adapt":
        suite = ADAPT_VARIANTS
        base.validation_size = ADAPT_VALIDATION_SIZE
    variants = {k: v for k, v in suite.items() if not _POLICIES.value or k in _POLICIES.value}
    if "traditional" not in variants:
        raise app.UsageError("the variants must include 'traditional' (it defines targets)")
    seeds = [int(s) for s in _SEEDS.value]
    os.makedirs(_OUT.value, exist_ok=True)
    workdir = _WORKDIR.value or os.path.join(
        "/tmp", "sb_bench_" + os.path.basename(os.path.normpath(_OUT.value)))

    model = create_model(base.model, 10, **config_lib.model_kwargs(base))
    # The trainer's own scoring and train-step pieces, built from an SB run's config (the
    # pieces do not depend on the policy, except that AdaptSB's scoring also returns
    # features).
    pieces_config = copy.deepcopy(base)
    pieces_config.selector, pieces_config.beta = "sb", 2.0
    pieces = train.setup_run(pieces_config)
    pieces_state = pieces.fresh_state()

    # The machine's speed drifts (other jobs, thermal state), so the step costs are
    # measured just before every run and once after the last; each run's cost model uses
    # the mean of the measurements on either side of it.
    cost_samples = []

    def measure_costs(name=None, seed=None):
        bare = costs.measure_step_costs(model, (28, 28, 1), batch_size=base.batch_size)
        trainer = costs.measure_trainer_costs(
            pieces.fns, pieces_state, pieces.data, chunk_size=pieces.policy.chunk_size,
            batch_size=base.batch_size)
        cost_samples.append({"before_run": name, "seed": seed, **bare,
                             **{f"trainer_{k}": v for k, v in trainer.items()}})

    runs = comparison.run_variants(base, variants, seeds, workdir, before_each=measure_costs)
    measure_costs()
    # Sample i was taken just before run i, sample i + 1 just after it; a variant's runs
    # come in seed order, as in `runs`.
    run_costs = {name: [] for name in variants}
    for i, sample in enumerate(cost_samples[:-1]):
        run_costs[sample["before_run"]].append(_mean_costs(cost_samples[i:i + 2]))
    step_costs = _mean_costs(cost_samples)
    step_costs["samples"] = cost_samples
    result = comparison.compare(runs)
    for name, summary in result["policies"].items():
        # The goal's cost model: unit costs of the trainer's own pieces timed in between
        # the epoch's own dispatches, so its gap to the measured epoch is the selection
        # machinery and not the machine's drift. For reference: the same
        # pieces timed between runs, and the bare model's forward and train step.
        summary["cost_model"] = epoch_cost_model(runs[name])
        summary["cost_model_between_runs"] = epoch_cost_model(runs[name], [
            {k: c[f"trainer_{k}"] for k in UNIT_KEYS} for c in run_costs[name]])
        summary["cost_model_bare_model"] = epoch_cost_model(runs[name], run_costs[name])
        for key in ("mislabeled_backward_fraction", "selected_mislabeled_fraction"):
            shares = [r[-1].get(key) for r in runs[name]]
            if all(s is not None for s in shares):
                summary[f"{key}_last_epoch"] = statistics.mean(shares)
        summary["selected_fraction_last_epoch"] = statistics.mean(
            r[-1]["selected_fraction"] for r in runs[name])
    result.update({
        "command": "python -m benchmarks.selective_backprop " + " ".join(
            f"--{f}={v}" for f, v in (("suite", _SUITE.value), ("label_noise", _NOISE.value),
                                      ("epochs", base.num_epochs),
                                      ("seeds", ",".join(map(str, seeds))))),
        "backend": jax.default_backend(),
        "config": json.loads(base.to_json_best_effort()),
        "variants": variants,
        "step_costs": step_costs,
        "curves": {name: [[{k: rec[k] for k in CURVE_KEYS if k in rec} for rec in records]
                           for records in rs]
                   for name, rs in runs.items()},
    })
    comparison.plot_runs(runs, _OUT.value, f"Fashion-MNIST, label noise {_NOISE.value:g}")
    # Policies with learned priorities (AdaptSB) plot them per run; keep them with the
    # results.
    for name in variants:
        for seed in seeds:
            plot = os.path.join(workdir, f"{name}_seed{seed}", "priorities.png")
            if os.path.exists(plot):
                shutil.copyfile(plot, os.path.join(_OUT.value,
                                                   f"priorities_{name}_seed{seed}.png"))
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [analysis.format_table(result["policies"], result["targets"]), "",
             "epoch seconds after priming, measured / cost model (scored x forward + "
             "backpropagated x train step):"]
    for name, summary in result["policies"].items():
        models = [(label, summary[key]) for label, key in (
            ("in-run pieces", "cost_model"), ("pieces between runs", "cost_model_between_runs"),
            ("bare model", "cost_model_bare_model")) if summary.get(key)]
        if models:
            measured = models[0][1]["measured_epoch_s"]
            lines.append(f"{name:<14} {measured:.2f}s measured; " + "; ".join(
                f"{label} {m['predicted_epoch_s']:.2f}s "
                f"({100 * (m['measured_over_predicted'] - 1):+.1f}%)" for label, m in models))
    table = "\n".join(lines)
    with open(os.path.join(_OUT.value, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)

if __name__ == "__main__":
    app.run(main)
