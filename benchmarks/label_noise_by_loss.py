r"""Where a trained run's mislabeled examples sit in its loss distribution.

  python -m benchmarks.label_noise_by_loss --workdir=RUN_DIR \
      --out=benchmarks/results/adapt_fashion_mnist_noise20/noise_by_loss.json

Restores the newest checkpoint of a run of `experiments/train.py` that had label noise,
scores every training example in inference mode against its (noisy) training label and
writes, per loss-percentile range (`--edges`), the share of mislabeled examples, how well
the loss separates them inside the range (AUC) and the share per label rank (how many
classes the model puts above the training label). It is what chose AdaptSB's number of
loss bins (WORKSPACE.md, AdaptSB).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from experiments import cli
from sb_jax import analysis, checkpointing, config_lib, train
from sb_jax.data import device as data_device

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).",
                               required=True)
_OUT = flags.DEFINE_string("out", "", "JSON to write (default: <workdir>/noise_by_loss.json).")
_EDGES = flags.DEFINE_list("edges", ["0", "0.5", "0.75", "0.8125", "0.875", "1"],
                           "Loss-percentile range edges.")


def main(argv):
    del argv
    cli.setup_logging()
    workdir = os.path.abspath(_WORKDIR.value)
    config = config_lib.base_config()
    with open(os.path.join(workdir, config_lib.CONFIG_FILE)) as f:
        config.update(ml_collections.ConfigDict(json.load(f)))
    if not config.label_noise:
        raise app.UsageError(f"{workdir} was trained without label noise: nothing to locate")
    run = train.setup_run(config)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        restored = ckpt.restore_latest(run.abstract_state)
    finally:
        ckpt.close()
    if restored is None:
        raise app.UsageError(f"{workdir} has no checkpoint")
    state, epoch, _ = restored
    dataset = run.dataset

    @jax.jit
    def logits_of(images):
        x = data_device.normalize(images, dataset.mean, dataset.std)
        return run.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                               x, train=False)

    logits = np.concatenate([
        np.asarray(logits_of(jnp.asarray(dataset.train_images[i:i + 1000])), np.float64)
        for i in range(0, dataset.num_train, 1000)])
    labels = np.asarray(dataset.train_labels)
    rows = np.arange(len(labels))
    shifted = logits - logits.max(1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(1)) - shifted[rows, labels]
    label_rank = (logits > logits[rows, labels][:, None]).sum(1)
    table = analysis.noise_by_loss_percentile(losses, label_rank, dataset.noisy,
                                              [float(e) for e in _EDGES.value])
    result = {"workdir": workdir, "epoch": epoch, "selector": config.selector,
              "label_noise": config.label_noise,
              "mislabeled_share": float(np.mean(dataset.noisy)), "ranges": table}
    out = _OUT.value or os.path.join(workdir, "noise_by_loss.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    for row in table:
        lo, hi = row["percentiles"]
        auc = "-" if row["loss_auc"] is None else f"{row['loss_auc']:.3f}"
        print(f"loss percentile [{lo:.4g}, {hi:.4g}]: {row['count']:6d} examples, "
              f"mislabeled {row['mislabeled_share']:.3f}, loss AUC {auc}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
