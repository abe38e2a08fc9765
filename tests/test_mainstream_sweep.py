"""The paper's experiment end to end on a tiny grid, and the two command lines."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from mainstream_jax import sweep

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "experiments", "configs", "mainstream_example_problem.json")

CONFIG = sweep.SweepConfig(
    planners=("greedy", "max_sharing", "no_sharing", "mainstream", "exact"),
    num_apps=(3, 25), budgets=(50.0, 150.0, 300.0), setups=2, seed=1, exact_max_apps=3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    rows = sweep.run_sweep(CONFIG, out)
    summary = sweep.write_outputs(rows, CONFIG, out)
    return out, rows, summary


def test_sweep_writes_every_run_and_output(finished):
    out, rows, summary = finished
    # exact only up to exact_max_apps: 4 planners x 2 N + 1 x 1 N, x 3 budgets x 2 setups.
    assert len(rows) == (4 * 2 + 1) * 3 * 2
    with open(os.path.join(out, "setups.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with open(os.path.join(out, "summary.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == (4 * 2 + 1) * 3
    for name in ("f1_vs_budget_3apps.png", "f1_vs_apps_budget150.png",
                 "f1_vs_apps_budget300.png", "summary.json", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["config"]["setups"] == 2


def test_infeasible_no_sharing_is_recorded_as_zero(finished):
    _, rows, summary = finished
    # 25 apps cannot all run the full network even at 0.1 fps within budget 50.
    bad = [r for r in rows if r["planner"] == "no_sharing" and r["num_apps"] == 25
           and r["budget"] == 50.0]
    assert bad and all(r["feasible"] == 0 and r["mean_f1"] == 0.0 for r in bad)
    ratios = summary["ratios"]["mainstream/no_sharing"]
    assert (25, 50.0) in [tuple(c) for c in ratios["cells_where_baseline_f1_is_0"]]


def test_summary_means_ratios_and_gaps_are_consistent(finished):
    _, rows, summary = finished
    means = {(e["planner"], e["num_apps"], e["budget"]): e["mean_f1"] for e in summary["table"]}
    for (p, n, b), m in means.items():
        f1 = [r["mean_f1"] for r in rows
              if (r["planner"], r["num_apps"], r["budget"]) == (p, n, b)]
        assert m == pytest.approx(sum(f1) / len(f1))
    for cell in summary["ratios"]["mainstream/max_sharing"]["cells"]:
        n, b = cell["num_apps"], cell["budget"]
        assert cell["ratio"] == pytest.approx(
            means[("mainstream", n, b)] / means[("max_sharing", n, b)])
    best = summary["ratios"]["mainstream/max_sharing"]["max"]
    assert best["ratio"] == max(c["ratio"] for c in
                                summary["ratios"]["mainstream/max_sharing"]["cells"])
    gaps = summary["gap_to_exact"]
    assert gaps["mainstream"]["max_rel_gap"] >= -1e-12  # exact is never beaten
    assert gaps["greedy"]["mean_rel_gap"] >= gaps["mainstream"]["mean_rel_gap"] - 1e-12
    for n, b in [(3, 50.0), (25, 300.0)]:
        assert means[("mainstream", n, b)] >= means[("greedy", n, b)] - 1e-12


def test_sweep_resumes_and_refuses_another_config(finished):
    out, rows, _ = finished
    again = sweep.run_sweep(CONFIG, out)
    assert len(again) == len(rows)
    with open(os.path.join(out, "setups.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    other = sweep.SweepConfig(planners=("greedy",), num_apps=(3,), budgets=(50.0,), setups=1)
    with pytest.raises(ValueError, match="holds a sweep with another config"):
        sweep.run_sweep(other, out)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(planners=("greedy", "magic")), r"unknown planners \['magic'\]"),
        (dict(setups=0), r"setups must be >= 1"),
        (dict(budgets=(0.0,)), r"budgets must be > 0"),
        (dict(num_apps=()), r"num_apps must be >= 1"),
        (dict(objective="auc"), r"unknown objective 'auc'"),
    ],
)
def test_bad_sweep_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sweep.SweepConfig(**kwargs).validate()


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_cli_prints_json_and_tables():
    out = run_cli("experiments.mainstream_plan", f"--problem={EXAMPLE}", "--planner=exact")
    assert out.returncode == 0, out.stderr
    schedule = json.loads(out.stdout)
    assert schedule["planner"] == "exact" and len(schedule["apps"]) == 5
    assert schedule["total_cost"] <= 150 * (1 + 1e-9)
    table = run_cli("experiments.mainstream_plan", f"--problem={EXAMPLE}", "--format=table",
                    "--budget=300", "--memory_budget_mib=40")
    assert table.returncode == 0, table.stderr
    assert "budget 300" in table.stdout and "custom_cyclists" in table.stdout
    assert "/ 40.00 MiB" in table.stdout


def test_plan_cli_reports_bad_input_in_one_line(tmp_path):
    out = run_cli("experiments.mainstream_plan", f"--problem={EXAMPLE}", "--budget=5")
    assert out.returncode == 1
    assert out.stderr.startswith("error: budget 5 is too small for planner 'mainstream'")
    missing = run_cli("experiments.mainstream_plan", f"--problem={tmp_path / 'none.json'}")
    assert missing.returncode == 1 and "no such problem file" in missing.stderr


def test_sweep_cli_runs(tmp_path):
    out = run_cli("experiments.mainstream_sweep", "--planners=greedy,mainstream",
                  "--num_apps=3", "--budgets=100", "--setups=1", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["plots"] and os.path.exists(tmp_path / "summary.csv")
