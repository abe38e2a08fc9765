"""Config schema, validation and the mapping from flat config fields to components.

Configs are flat ``ml_collections.ConfigDict`` s (see experiments/configs). Every field a
run reads is declared in :func:`base_config` with its type, so `--config.<field>=value`
overrides are type-checked by ml_collections and a misspelt field is rejected by name.
"""

from __future__ import annotations

import json
import os

import ml_collections

from sb_jax import schedules

CONFIG_FILE = "config.json"

# Fields that may change between a run and its resumption (they do not change what
# the saved state means): extending training, evaluating or logging more often.
RESUMABLE_FIELDS = frozenset(
    {"num_epochs", "eval_every", "log_every_s", "checkpoint_every", "keep_checkpoints",
     "tensorboard", "steps_per_dispatch", "data_dir", "unit_cost_every",
     # Same function, another program: parameters and checkpoints are identical.
     "model_ops"}
)


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; experiment configs override some of them."""
    c = ml_collections.ConfigDict()
    # Data.
    c.dataset = "fashion_mnist"  # see sb_jax.data.available_datasets()
    c.data_dir = ""  # where the dataset lives; '' = the dataset's default locations
    c.train_subset = 0  # >0: train on the first N examples only (quick experiments)
    c.validation_size = 0  # examples carved from the training set for validation
    c.label_noise = 0.0  # fraction of training labels corrupted (0..1)
    c.noise_kind = "shuffle"  # shuffle (the original's) | symmetric
    # Augmentation, on device inside jit.
    c.crop_padding = 0  # random crop after zero padding by this many pixels
    c.flip = False  # random horizontal flip
    c.cutout = 0  # side of the cutout square (0 = off)
    # Model.
    c.model = "small_cnn"  # small_cnn | resnet18 | wrn | mobilenet_v2
    c.wrn_depth = 28  # WideResNet depth (6n + 4)
    c.wrn_width = 10  # WideResNet widening factor
    c.dropout = 0.0  # dropout rate (small_cnn, wrn)
    c.width_multiplier = 1.0  # channel multiplier (resnet18, mobilenet_v2)
    c.small_cnn_downsample = "conv_stride"  # small_cnn: conv_stride | max_pool
    # Conv/pool formulation (sb_jax/models/fast_ops.py): the same function either way.
    # auto: CPU-fast gradients on the CPU backend, XLA's native operations elsewhere.
    c.model_ops = "auto"  # auto | xla | cpu
    # Optimisation (the paper's: SGD, Nesterov 0.9, wd 5e-4, batch 128, lr 0.1).
    c.num_epochs = 10
    c.batch_size = 128  # backward batch B: examples per optimizer step
    c.learning_rate = 0.1
    c.lr_schedule = "constant"  # constant | step | cosine, indexed by epoch
    c.lr_boundaries = ""  # step schedule: comma-separated epochs, e.g. '60,120,160'
    c.lr_decay = 0.1  # step schedule: lr multiplier at each boundary
    c.warmup_epochs = 0.0  # linear warmup (fractional epochs)
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    # Selection (Selective-Backprop and baselines; see sb_jax/selection).
    # traditional | sb | stale_sb | random | topk | kath18 | adapt_sb | rho_loss
    c.selector = "traditional"
    c.beta = 2.0  # selectivity: expected selected fraction 1/(beta+1)
    c.scoring_batch_size = 128  # b: examples scored per selection step
    c.history_size = 1024  # R: recent losses the percentile is taken against
    c.prime_epochs = 1  # epochs that backpropagate everything first
    c.p_min = 0.0  # floor of the selection probability
    c.staleness = 3  # stale_sb: re-score an example every n epochs
    c.kath18_score = "loss"  # loss | grad_norm_bound
    c.kath18_reweight = False  # unbiased 1/(N p) weights (the SB paper ran False)
    c.flush_partial_batch = False  # end of epoch: train on a partial batch vs carry over
    # AdaptSB (sb_jax/selection/adapt_sb.py): learned priority per loss-percentile bin.
    c.adapt_num_bins = 16  # K: classes of examples (loss-percentile bins; WORKSPACE.md)
    c.adapt_step_size = 0.3  # EG step on the log-priorities (WORKSPACE.md: Tuning)
    c.adapt_update_every = 16  # scored chunks per priority update (WORKSPACE.md)
    c.adapt_floor = 0.01  # exploration floor of each bin's selection probability
    c.adapt_prior_pull = 0.02  # per update, pull of the log-priorities back to SB's curve
    c.adapt_signal = "dot"  # cosine | dot: how a bin's held-out alignment is measured
    c.adapt_split_by_alignment = False  # also split each bin by the sign of <g_i, G>
    # Held-out batch of AdaptSB's signal, a sliding window over the validation split
    # (needs validation_size > 0).
    c.heldout_size = 256  # examples per held-out batch
    c.heldout_every = 10  # optimizer steps between held-out gradient refreshes
    # RHO-LOSS (sb_jax/selection/rho_loss.py): the irreducible-loss model, trained on the
    # validation split before training (its time counts in wall_s).
    c.rho_model = "small_cnn"  # model of sb_jax.models, default hyper-parameters
    c.rho_epochs = 10  # epochs over the validation split
    c.rho_learning_rate = 0.05  # peak SGD learning rate (momentum as the main run)
    c.rho_lr_schedule = "cosine"  # constant | cosine (to 0 over rho_epochs)
    c.rho_weight_decay = 5e-3  # the irreducible-loss model's (5,000 examples overfit)
    # Run.
    c.seed = 0
    c.eval_every = 1  # epochs between test-set evaluations
    c.eval_batch_size = 1000
    # Optimizer steps per jitted dispatch (a lax.scan over them when > 1). Keep 1 on the
    # CPU: XLA's CPU backend runs convolution gradients ~20x slower nested in a loop.
    c.steps_per_dispatch = 1
    c.checkpoint_every = 1  # epochs between checkpoints
    c.keep_checkpoints = 2
    c.log_every_s = 10.0  # seconds between progress lines
    c.tensorboard = True  # also write TensorBoard event files
    # >0: every this many dispatches, pause the epoch's clock and time the trainer's
    # scoring and train-step pieces (costs.TrainerCostSampler) on the run's own state and
    # data; each record gets their mean per-example seconds (the cost model of
    # benchmarks/selective_backprop.py). One device only.
    c.unit_cost_every = 0
    # Data parallelism (sb_jax/parallel.py). 1 = one device, the single-device program;
    # 0 = every device of every process; D > 1 = a mesh over the first D devices. The
    # batch_size (and scoring_batch_size, kath18's pool) must be multiples of D.
    c.num_devices = 1
    # global: select from the whole scored chunk, the same choices as on one device;
    # per_shard: each device selects from its own examples with its own policy state
    # (chunk and batch divided by D; no images and no scores cross devices).
    c.selection_scope = "global"
    return c


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field and what would be valid."""
    from sb_jax.data import available_datasets
    from sb_jax.models import available_models

    known = set(base_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
    if config.dataset not in available_datasets():
        raise ValueError(
            f"unknown dataset {config.dataset!r}; choose one of {available_datasets()}"
        )
    if config.model not in available_models():
        raise ValueError(f"unknown model {config.model!r}; choose one of {available_models()}")
    from sb_jax.models import fast_ops, small_cnn

    if config.model_ops not in fast_ops.IMPLS:
        raise ValueError(
            f"model_ops must be one of {list(fast_ops.IMPLS)}, got {config.model_ops!r}"
        )
    if config.small_cnn_downsample not in small_cnn.DOWNSAMPLING:
        raise ValueError(
            f"small_cnn_downsample must be one of {list(small_cnn.DOWNSAMPLING)}, "
            f"got {config.small_cnn_downsample!r}"
        )
    if not 0.0 <= config.label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {config.label_noise}")
    positive = ("num_epochs", "batch_size", "eval_every", "eval_batch_size",
                "steps_per_dispatch", "checkpoint_every", "keep_checkpoints",
                "scoring_batch_size", "history_size")
    for name in positive:
        if config[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}")
    for name in ("train_subset", "validation_size", "crop_padding", "cutout", "prime_epochs"):
        if config[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {config[name]}")
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    # Building the schedule and the policy validates their fields with their own messages.
    schedules.make_epoch_schedule(
        config.lr_schedule, config.learning_rate, num_epochs=config.num_epochs,
        boundaries=schedules.parse_int_list(config.lr_boundaries), decay=config.lr_decay,
        warmup_epochs=config.warmup_epochs,
    )
    if config.num_devices < 0:
        raise ValueError(f"num_devices must be >= 0 (0 = all devices), got {config.num_devices}")
    if config.selection_scope not in ("global", "per_shard"):
        raise ValueError(
            f"selection_scope must be 'global' or 'per_shard', got {config.selection_scope!r}"
        )
    if config.unit_cost_every < 0:
        raise ValueError(f"unit_cost_every must be >= 0, got {config.unit_cost_every}")
    if config.unit_cost_every and config.num_devices != 1:
        raise ValueError(
            "unit_cost_every > 0 times the one-device pieces of the train step; set "
            f"num_devices=1 or unit_cost_every=0 (got num_devices={config.num_devices})"
        )
    policy = make_policy_from_config(config)
    _validate_heldout(config, policy)
    if config.num_devices > 1:
        validate_parallel(config, config.num_devices)


def validate_parallel(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ValueError if the batch shapes cannot be split over ``num_devices``."""
    if num_devices < 2:
        return
    policy = make_policy_from_config(config)
    sizes = {"batch_size": config.batch_size, "the policy's chunk size": policy.chunk_size}
    if config.selection_scope == "per_shard":
        sizes["scoring_batch_size"] = config.scoring_batch_size
    for name, size in sizes.items():
        if size % num_devices:
            raise ValueError(
                f"{name}={size} is not a multiple of the {num_devices} devices; every "
                "device takes an equal share (change batch_size/scoring_batch_size/beta or "
                "num_devices)"
            )
    if config.selection_scope == "per_shard":
        make_policy_from_config(config, num_shards=num_devices)


def shard_config(config: ml_collections.ConfigDict, num_shards: int) -> ml_collections.ConfigDict:
    """The config one device's policy sees under per-shard selection.

    Chunks and batches are divided by D, and so is the loss history: a device appends
    C / D losses per round, so R / D of them span the same stretch of training as the R
    of one device. (A history D times longer in time lags behind a falling loss, ranks
    new losses low and selects too little: on digits, 11 % instead of 24 % at beta 2.)
    """
    local = ml_collections.ConfigDict(config.to_dict())
    local.batch_size = config.batch_size // num_shards
    local.scoring_batch_size = config.scoring_batch_size // num_shards
    local.history_size = max(1, config.history_size // num_shards)
    return local


def _validate_heldout(config: ml_collections.ConfigDict, policy) -> None:
    """Held-out data for the policies that learn from it (AdaptSB, RHO-LOSS)."""
    if not (policy.needs_heldout_grad or policy.set_irreducible_loss is not None):
        return
    if config.validation_size < 1:
        raise ValueError(
            f"selector {config.selector!r} learns from held-out data: set validation_size > 0 "
            "(e.g. --config.validation_size=5000)"
        )
    if policy.needs_heldout_grad:
        for name in ("heldout_size", "heldout_every"):
            if config[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {config[name]}")
        if config.heldout_size > config.validation_size:
            raise ValueError(
                f"heldout_size={config.heldout_size} exceeds validation_size="
                f"{config.validation_size}; lower heldout_size or raise validation_size"
            )
    if policy.set_irreducible_loss is not None:
        from sb_jax.models import available_models

        if config.rho_model not in available_models():
            raise ValueError(
                f"unknown rho_model {config.rho_model!r}; choose one of {available_models()}"
            )
        if config.rho_epochs < 1:
            raise ValueError(f"rho_epochs must be >= 1, got {config.rho_epochs}")
        if not config.rho_learning_rate > 0:
            raise ValueError(f"rho_learning_rate must be > 0, got {config.rho_learning_rate}")
        from sb_jax.irreducible_loss import LR_SCHEDULES

        if config.rho_lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"rho_lr_schedule must be one of {list(LR_SCHEDULES)}, "
                f"got {config.rho_lr_schedule!r}"
            )
        if not config.rho_weight_decay >= 0:
            raise ValueError(f"rho_weight_decay must be >= 0, got {config.rho_weight_decay}")


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The model factory's keyword arguments for ``config.model``."""
    ops = {"ops": config.model_ops}
    if config.model == "small_cnn":
        return {"dropout": config.dropout, "downsample": config.small_cnn_downsample, **ops}
    if config.model == "wrn":
        return {
            "depth": config.wrn_depth, "width": config.wrn_width, "dropout": config.dropout, **ops
        }
    if config.model in ("resnet18", "mobilenet_v2"):
        return {"width": config.width_multiplier, **ops}
    return ops


def policy_hyperparams(config: ml_collections.ConfigDict) -> dict:
    """The selection policy's keyword arguments for ``config.selector``."""
    name = config.selector
    scoring = {"batch_size": config.scoring_batch_size, "prime_epochs": config.prime_epochs}
    percentile = {"beta": config.beta, "history_size": config.history_size,
                  "p_min": config.p_min, **scoring}
    if name == "traditional":
        return {"batch_size": config.batch_size}
    if name == "sb":
        return percentile
    if name == "stale_sb":
        return {**percentile, "staleness": config.staleness}
    if name in ("random", "topk"):
        return {"beta": config.beta, **scoring}
    if name == "kath18":
        return {"beta": config.beta, "score": config.kath18_score,
                "reweight": config.kath18_reweight, "batch_size": config.batch_size}
    if name == "adapt_sb":
        return {"beta": config.beta, "history_size": config.history_size,
                "num_bins": config.adapt_num_bins, "step_size": config.adapt_step_size,
                "update_every": config.adapt_update_every, "floor": config.adapt_floor,
                "prior_pull": config.adapt_prior_pull, "signal": config.adapt_signal,
                "split_by_alignment": config.adapt_split_by_alignment,
                **scoring}
    if name == "rho_loss":
        return {"beta": config.beta, **scoring}
    return {}


def make_policy_from_config(config: ml_collections.ConfigDict, num_shards: int = 1):
    """Builds the selection policy named by ``config.selector`` from its fields.

    ``num_shards > 1``: one device's policy under per-shard selection (batches / D).
    """
    from sb_jax import selection

    if num_shards > 1:
        config = shard_config(config, num_shards)
    policy = selection.make_policy(config.selector, **policy_hyperparams(config))
    if policy.max_selected > config.batch_size:
        raise ValueError(
            f"selector {config.selector!r} can select {policy.max_selected} examples per "
            f"chunk, more than batch_size={config.batch_size}; use scoring_batch_size <= "
            "batch_size"
        )
    return policy


# Hyperparameters only one selector reads: another selector's run resumes whatever they
# are (a benchmark that changes an AdaptSB field keeps its finished traditional runs).
SELECTOR_FIELD_PREFIXES = {"adapt_": "adapt_sb", "rho_": "rho_loss", "kath18_": "kath18"}


def _unread_by_selector(name: str, selector: str) -> bool:
    return any(name.startswith(prefix) and selector != owner
               for prefix, owner in SELECTOR_FIELD_PREFIXES.items())


def _comparable(config: ml_collections.ConfigDict) -> dict:
    return {k: v for k, v in json.loads(config.to_json_best_effort()).items()
            if k not in RESUMABLE_FIELDS}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    # Written whole, then renamed: on many hosts the other processes read this file
    # (check_resumable) while process 0 may be writing it, and must never see half of it.
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir with a run in it only resumes the same configuration."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); use a new --workdir") from e
    saved = {k: v for k, v in saved.items() if k not in RESUMABLE_FIELDS}
    current = _comparable(config)
    if saved.get("selector") == current["selector"]:
        saved = {k: v for k, v in saved.items()
                 if not _unread_by_selector(k, current["selector"])}
        current = {k: v for k, v in current.items()
                   if not _unread_by_selector(k, current["selector"])}
    # Runs saved before these fields existed.
    for name in ("num_devices", "selection_scope", "small_cnn_downsample"):
        saved.setdefault(name, base_config()[name])
    # Global selection's state does not depend on the device count (checkpoints reshard);
    # per-shard selection keeps a policy state and a queue per device.
    if saved["selection_scope"] == "global" == current["selection_scope"]:
        saved.pop("num_devices")
        current.pop("num_devices")
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ValueError(
            f"--workdir {workdir} holds a run with a different config ({details}); "
            "resume it with its own config, or use a new --workdir"
        )
