"""The result of planning: a :class:`Schedule`, and its JSON / table renderings."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from mainstream_jax import cost_model, event_model, profiles


@dataclasses.dataclass(frozen=True)
class AppAssignment:
    """What one app runs: k frozen layers at ``fps``, and what that buys."""

    name: str
    num_frozen: int
    fps: float
    recall: float
    precision: float
    f1: float
    branch_cost: float  # lambda[k:] * fps
    branch_bytes: float  # parameter bytes of layers [k, L)
    weight: float


@dataclasses.dataclass(frozen=True)
class StemSegment:
    """A run of shared base layers [start_layer, end_layer) executed once at ``fps``."""

    start_layer: int
    end_layer: int
    fps: float
    apps: tuple[str, ...]  # apps attached at the segment's start (k > start_layer)
    cost: float  # lambda[start:end] * fps


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A planner's answer for one :class:`~mainstream_jax.profiles.Problem`."""

    planner: str
    apps: tuple[AppAssignment, ...]
    stem: tuple[StemSegment, ...]
    total_cost: float
    budget: float
    memory_bytes: float | None  # None when the network has no layer bytes
    memory_budget_bytes: float | None
    objective: str
    objective_value: float  # natural units: mean F1, min F1, mean FNR or mean 1 - precision
    score: float  # what planners maximise (mean/min benefit); equals objective_value for f1
    mean_f1: float
    event_model: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_frozen(self) -> np.ndarray:
        return np.array([a.num_frozen for a in self.apps], np.int64)

    @property
    def fps(self) -> np.ndarray:
        return np.array([a.fps for a in self.apps], np.float64)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["apps"] = [dataclasses.asdict(a) for a in self.apps]
        out["stem"] = [dict(dataclasses.asdict(s), apps=list(s.apps)) for s in self.stem]
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def format_table(self) -> str:
        """A readable multi-line table of the schedule."""
        lines = [
            f"planner={self.planner}  objective={self.objective} "
            f"({self.event_model} event model)  value={self.objective_value:.4f}  "
            f"mean F1={self.mean_f1:.4f}",
            f"cost={self.total_cost:.3f} / budget {self.budget:g}"
            + (
                f"   memory={self.memory_bytes / profiles.MIB:.2f} MiB"
                if self.memory_bytes is not None
                else ""
            )
            + (
                f" / {self.memory_budget_bytes / profiles.MIB:.2f} MiB"
                if self.memory_budget_bytes is not None
                else ""
            ),
            "",
            f"{'app':<22}{'k':>4}{'fps':>6}{'recall':>9}{'precision':>11}{'F1':>8}"
            f"{'branch cost':>13}{'weight':>8}",
        ]
        for a in self.apps:
            lines.append(
                f"{a.name[:21]:<22}{a.num_frozen:>4}{a.fps:>6g}{a.recall:>9.4f}"
                f"{a.precision:>11.4f}{a.f1:>8.4f}{a.branch_cost:>13.3f}{a.weight:>8g}"
            )
        lines += ["", "shared stem (layers [start, end) run once at fps):"]
        if not self.stem:
            lines.append("  (none: no app shares a layer)")
        for s in self.stem:
            lines.append(
                f"  layers [{s.start_layer:>2}, {s.end_layer:>2}) at {s.fps:g} fps, cost "
                f"{s.cost:.3f}, apps: {', '.join(s.apps)}"
            )
        return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def build_schedule(
    problem: profiles.Problem,
    chokepoint_index: np.ndarray,
    fps: np.ndarray,
    *,
    planner: str,
    stats: dict[str, Any] | None = None,
) -> Schedule:
    """Evaluates a plan (chokepoint index and fps per app) into a :class:`Schedule`."""
    net = problem.network
    j = np.asarray(chokepoint_index, np.int64)
    phi = np.asarray(fps, np.float64)
    costs = cost_model.chokepoint_costs(net.layer_costs, net.chokepoints, net.layer_bytes)
    # Evaluate the event model on exactly these rates (one fps per app).
    uniq, inv = np.unique(phi, return_inverse=True)
    metrics = event_model.problem_metrics(problem, uniq)
    rows = np.arange(problem.num_apps)
    recall = metrics.recall[rows, j, inv]
    precision = metrics.precision[rows, j, inv]
    f1 = metrics.f1[rows, j, inv]
    benefit = event_model.benefit(metrics, problem.objective)[rows, j, inv]
    weights = np.array([a.weight for a in problem.apps])
    score = event_model.aggregate(benefit, weights, problem.objective)
    total_cost = float(cost_model.chokepoint_schedule_cost(j, phi, costs))
    memory = None
    if net.layer_bytes is not None:
        memory = float(cost_model.chokepoint_schedule_memory(j, costs))
    apps = tuple(
        AppAssignment(
            name=a.name,
            num_frozen=int(net.chokepoints[j[i]]),
            fps=float(phi[i]),
            recall=float(recall[i]),
            precision=float(precision[i]),
            f1=float(f1[i]),
            branch_cost=float(costs.branch_cost[j[i]] * phi[i]),
            branch_bytes=float(costs.branch_bytes[j[i]]),
            weight=float(a.weight),
        )
        for i, a in enumerate(problem.apps)
    )
    rates = cost_model.stem_rates(j, phi, costs.segment_cost.shape[0])
    stem = []
    t = 0
    num_segments = rates.shape[0]
    while t < num_segments:
        if rates[t] <= 0:
            t += 1
            continue
        end = t
        while end + 1 < num_segments and rates[end + 1] == rates[t]:
            end += 1
        start_layer = int(net.chokepoints[t])
        end_layer = int(net.chokepoints[end + 1])
        attached = tuple(a.name for i, a in enumerate(problem.apps) if j[i] >= t + 1)
        stem.append(
            StemSegment(
                start_layer=start_layer,
                end_layer=end_layer,
                fps=float(rates[t]),
                apps=attached,
                cost=float(costs.segment_cost[t : end + 1].sum() * rates[t]),
            )
        )
        t = end + 1
    return Schedule(
        planner=planner,
        apps=apps,
        stem=tuple(stem),
        total_cost=total_cost,
        budget=problem.budget,
        memory_bytes=memory,
        memory_budget_bytes=problem.memory_budget_bytes,
        objective=problem.objective,
        objective_value=event_model.objective_value(score, problem.objective),
        score=score,
        mean_f1=float(f1.mean()),
        event_model=problem.event_model,
        stats=dict(stats or {}),
    )
