"""The paper's random setups (docs/SPEC.md section 3, "Scenarios").

Apps are drawn uniformly from the profiled app types; per app the event frequency f,
event length L and correlation c are drawn uniformly from the generator's grids
(``profile.json``: f in 0.1..1.0 step 0.1, L in 200..1000 ms step 200, c in 0.1..0.9 step
0.1). Setup ``s`` of ``num_apps`` apps under ``seed`` is a pure function of those three
numbers (a ``numpy`` SeedSequence), so every planner and budget sees the same setups and
any one setup can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mainstream_jax import profiles


def grid(spec: Mapping[str, Any], field: str) -> np.ndarray:
    """The values of one generator range {min, max, step}, inclusive."""
    if field not in spec:
        raise ValueError(f"scenario_generator: missing range {field!r}")
    r = spec[field]
    try:
        lo, hi, step = float(r["min"]), float(r["max"]), float(r["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"scenario_generator.{field}: needs numeric min, max and step") from e
    if step <= 0 or hi < lo:
        raise ValueError(f"scenario_generator.{field}: needs step > 0 and max >= min")
    count = int(round((hi - lo) / step)) + 1
    # Rounded so that 0.1 * 3 is 0.3, as written in the paper's grids.
    return np.round(lo + step * np.arange(count), 10)


def random_setup(
    library: profiles.ProfileLibrary, num_apps: int, setup_index: int, seed: int = 0
) -> list[profiles.AppProfile]:
    """The apps of one random setup (names ``<type>_<i>``)."""
    if num_apps < 1:
        raise ValueError(f"num_apps must be >= 1, got {num_apps}")
    gen = library.scenario_generator
    freqs = grid(gen, "event_frequency")
    lengths = grid(gen, "event_length_ms")
    corrs = grid(gen, "correlation_coefficient")
    types = sorted(library.app_types)
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_apps, setup_index]))
    apps = []
    for i in range(num_apps):
        kind = types[rng.integers(len(types))]
        apps.append(
            profiles.with_params(
                library.app_types[kind],
                name=f"{kind}_{i}",
                event_frequency=float(rng.choice(freqs)),
                event_length_ms=float(rng.choice(lengths)),
                correlation=float(rng.choice(corrs)),
            )
        )
    return apps


def random_problem(
    library: profiles.ProfileLibrary,
    num_apps: int,
    setup_index: int,
    budget: float,
    *,
    seed: int = 0,
    stream_fps: int | None = None,
    **problem_kwargs: Any,
) -> profiles.Problem:
    """A :class:`~mainstream_jax.profiles.Problem` for one random setup and budget."""
    if stream_fps is None:
        stream_fps = int(library.scenario_generator.get("stream_fps", 10))
    return profiles.make_problem(
        random_setup(library, num_apps, setup_index, seed),
        library.network,
        budget,
        stream_fps=stream_fps,
        **problem_kwargs,
    )
