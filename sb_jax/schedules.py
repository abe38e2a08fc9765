"""Learning-rate schedules indexed by (fractional) epoch.

Selective-Backprop takes a varying number of optimizer steps per epoch, so a schedule
indexed by optimizer steps would decay at different points in training for different
selectors. Indexing by epochs (examples seen / N) keeps them comparable (SPEC.md 1.8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp

EpochSchedule = Callable[[jnp.ndarray], jnp.ndarray]

SCHEDULES = ("constant", "step", "cosine")


def make_epoch_schedule(
    kind: str,
    base_lr: float,
    *,
    num_epochs: int,
    boundaries: Sequence[int] = (),
    decay: float = 0.1,
    warmup_epochs: float = 0.0,
) -> EpochSchedule:
    """Returns lr(epoch) for a fractional epoch (a float scalar, jnp or Python).

    ``step``: base_lr * decay**(number of boundaries <= epoch), the paper's schedules
    (e.g. CIFAR-10: boundaries 60,120,160 and decay 0.2). ``cosine``: half-cosine from
    base_lr to 0 over num_epochs. A linear warmup over ``warmup_epochs`` applies to all.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if not base_lr > 0:
        raise ValueError(f"learning_rate must be > 0, got {base_lr}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if not 0 < decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {decay}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    bounds = sorted(int(b) for b in boundaries)
    if any(b <= 0 for b in bounds):
        raise ValueError(f"lr_boundaries must be positive epochs, got {list(boundaries)}")

    def schedule(epoch):
        epoch = jnp.asarray(epoch, jnp.float32)
        if kind == "constant":
            lr = jnp.full_like(epoch, base_lr)
        elif kind == "step":
            passed = sum((epoch >= b).astype(jnp.float32) for b in bounds) if bounds else 0.0
            lr = base_lr * jnp.power(decay, passed)
        else:
            progress = jnp.clip(epoch / num_epochs, 0.0, 1.0)
            lr = 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * progress))
        if warmup_epochs > 0:
            lr = lr * jnp.minimum(1.0, (epoch + 1e-12) / warmup_epochs)
        return lr

    return schedule


def parse_int_list(text: str | Sequence[int]) -> list[int]:
    """'60,120,160' -> [60, 120, 160]; '' -> []. Accepts a sequence as is."""
    if not isinstance(text, str):
        return [int(x) for x in text]
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from e
