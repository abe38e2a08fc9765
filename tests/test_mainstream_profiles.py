"""Profile loading, the monotone clean-up, problem files, and every bad input."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from mainstream_jax import profiles, scenarios

CHOKEPOINTS = [0, 2, 4]


def net(**overrides):
    kwargs = dict(layer_costs=[1.0, 1.0, 0.5, 0.5, 0.2, 0.1], chokepoints=CHOKEPOINTS,
                  layer_bytes=[0, 10, 20, 30, 40, 50], name="tiny")
    kwargs.update(overrides)
    return profiles.make_network(kwargs.pop("layer_costs"), kwargs.pop("chokepoints"), **kwargs)


def app_kwargs(**overrides):
    kwargs = dict(num_frozen=CHOKEPOINTS, accuracy=[0.9, 0.8, 0.6],
                  false_positive_rate=[0.1, 0.2, 0.3], event_length_ms=500,
                  event_frequency=0.2, correlation=0.1)
    kwargs.update(overrides)
    return kwargs


def test_shipped_profiles_load_and_are_cleaned():
    lib = profiles.load_mobilenet()
    assert sorted(lib.app_types) == sorted(
        ["pedestrian", "train", "cars", "cats", "flowers", "bus", "schoolbus", "redcar",
         "scramble"])
    assert lib.network.num_layers == 85
    assert lib.network.total_cost == pytest.approx(20.8138)
    np.testing.assert_array_equal(lib.network.chokepoints[[0, -1]], [0, 84])
    for app in lib.app_types.values():
        assert np.all(np.diff(app.accuracy) <= 0), app.name
    raw = profiles.load_mobilenet(clean=False).app_types["cats"]
    assert np.any(np.diff(raw.accuracy) > 0)  # the raw cats curve is not monotone
    assert lib.app_types["train"].event_frequency == pytest.approx(0.0138)


def test_shipped_data_matches_the_hashes_in_its_provenance():
    here = profiles.mobilenet_dir()
    with open(os.path.join(here, "PROVENANCE.md")) as f:
        rows = re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", f.read(), flags=re.M)
    assert len(rows) == 12  # README, layer costs, profile.json and nine curves
    for rel, digest in rows:
        with open(os.path.join(here, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, rel


def test_layer_params_file_matches_the_architecture():
    counts = profiles.mobilenet_v1_param_counts()
    # Keras MobileNet 1.0 without top has 3,228,864 parameters.
    assert sum(c for name, c in counts[:82]) == 3_228_864
    with open(os.path.join(profiles.mobilenet_dir(), "layer_params.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer_name"], int(r["param_count"])) for r in rows] == counts
    assert [int(r["param_bytes"]) for r in rows] == [4 * c for _, c in counts]
    np.testing.assert_array_equal(profiles.load_mobilenet().network.layer_bytes,
                                  [4.0 * c for _, c in counts])


def test_monotone_accuracy_walks_down_from_the_top():
    acc, fpr = profiles.monotone_accuracy(np.array([0.7, 0.9, 0.8, 0.85, 0.5]),
                                          np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    np.testing.assert_allclose(acc, [0.9, 0.9, 0.85, 0.85, 0.5])
    np.testing.assert_allclose(fpr, [0.2, 0.2, 0.4, 0.4, 0.5])


def test_make_app_sorts_curves_by_chokepoint():
    app = profiles.make_app("a", net(), **app_kwargs(num_frozen=[4, 0, 2],
                                                     accuracy=[0.6, 0.9, 0.8]))
    np.testing.assert_allclose(app.accuracy, [0.9, 0.8, 0.6])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_frozen=[0, 2], accuracy=[0.9, 0.8], false_positive_rate=[0.1, 0.2]),
         r"app 'a': missing chokepoints \[4\]"),
        (dict(num_frozen=[0, 2, 3, 4], accuracy=[0.9, 0.8, 0.7, 0.6],
              false_positive_rate=[0.1, 0.2, 0.3, 0.4]),
         r"app 'a': num_frozen \[3\] are not chokepoints"),
        (dict(num_frozen=[0, 2, 2]), r"app 'a': num_frozen: has duplicates"),
        (dict(accuracy=[0.9, 1.2, 0.6]),
         r"app 'a': accuracy: 1.2 at num_frozen=2 is outside \[0, 1\]"),
        (dict(false_positive_rate=[-0.1, 0.2, 0.3]),
         r"app 'a': false_positive_rate: -0.1 at num_frozen=0 is outside \[0, 1\]"),
        (dict(accuracy=[0.9, float("nan"), 0.6]), r"app 'a': accuracy: entry 1 is nan"),
        (dict(accuracy=[0.9, 0.8]), r"app 'a': num_frozen, accuracy and false_positive_rate"),
        (dict(event_length_ms=0), r"app 'a': event_length_ms: 0.0 is outside \(0.0, inf\]"),
        (dict(event_frequency=1.5), r"app 'a': event_frequency: 1.5 is outside"),
        (dict(correlation=-0.2), r"app 'a': correlation: -0.2 is outside \[0.0, 1.0\]"),
        (dict(weight=0), r"app 'a': weight: 0.0 is outside"),
        (dict(x_vote=0), r"app 'a': x_vote: must be an integer >= 1"),
        (dict(x_vote=1.5), r"app 'a': x_vote: must be an integer >= 1"),
        (dict(event_frequency="often"), r"app 'a': event_frequency: expected a number"),
    ],
)
def test_bad_app_inputs_name_the_app_and_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        profiles.make_app("a", net(), **app_kwargs(**overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_costs=[1.0, -1.0, 1, 1, 1, 1]), r"layer_costs: layer 1 has negative cost"),
        (dict(layer_costs=[1.0, float("inf"), 1, 1, 1, 1]), r"layer_costs: entry 1 is inf"),
        (dict(layer_costs=[]), r"layer_costs: needs at least one layer"),
        (dict(chokepoints=[0, 4, 2]), r"chokepoints: must strictly increase"),
        (dict(chokepoints=[0, 6]), r"chokepoints: must lie in \[0, 5\]"),
        (dict(layer_bytes=[1, 2, 3]), r"layer_bytes: has 3 entries but the network has 6"),
        (dict(layer_bytes=[0, -1, 0, 0, 0, 0]), r"layer_bytes: layer 1 is negative"),
    ],
)
def test_bad_network_inputs(overrides, message):
    with pytest.raises(ValueError, match=message):
        net(**overrides)


def test_bad_problem_inputs():
    network = net()
    a = profiles.make_app("a", network, **app_kwargs())
    with pytest.raises(ValueError, match=r"objective: unknown objective 'auc'; choose one of"):
        profiles.make_problem([a], network, 10, objective="auc")
    with pytest.raises(ValueError, match=r"event_model: unknown event model 'exact'"):
        profiles.make_problem([a], network, 10, event_model="exact")
    with pytest.raises(ValueError, match=r"budget: -5.0 is outside \(0.0, inf\]"):
        profiles.make_problem([a], network, -5)
    with pytest.raises(ValueError, match=r"budget: nan is not finite"):
        profiles.make_problem([a], network, float("nan"))
    with pytest.raises(ValueError, match=r"apps: app names must be unique; repeated: \['a'\]"):
        profiles.make_problem([a, a], network, 10)
    with pytest.raises(ValueError, match=r"apps: a problem needs at least one app"):
        profiles.make_problem([], network, 10)
    with pytest.raises(ValueError, match=r"stream_fps: must be an integer >= 1"):
        profiles.make_problem([a], network, 10, stream_fps=0)
    no_bytes = net(layer_bytes=None)
    with pytest.raises(ValueError, match=r"network 'tiny' has no layer_bytes"):
        profiles.make_problem([profiles.make_app("a", no_bytes, **app_kwargs())], no_bytes, 10,
                              memory_budget_bytes=100)
    heavy = profiles.with_params(a, name="b", weight=2.0)
    with pytest.raises(ValueError, match=r"weights are not defined for 'maxmin_f1'"):
        profiles.make_problem([a, heavy], network, 10, objective="maxmin_f1")
    with pytest.raises(ValueError, match=r"app 'a': unknown fields \['colour'\]"):
        profiles.with_params(a, colour="red")
    with pytest.raises(ValueError, match=r"budget: expected a number"):
        profiles.make_problem([a], network, 10).with_budget("lots")


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                       "mainstream_example_problem.json")


def load_example() -> dict:
    with open(EXAMPLE) as f:
        return json.load(f)


def test_example_problem_file_loads():
    problem = profiles.load_problem(EXAMPLE)
    assert problem.num_apps == 5 and problem.budget == 150
    names = [a.name for a in problem.apps]
    assert names[0] == "trains_at_crossing" and names[-1] == "custom_cyclists"
    trains = problem.apps[0]
    assert trains.app_type == "train" and trains.event_length_ms == 800
    np.testing.assert_array_equal(trains.accuracy,
                                  profiles.load_mobilenet().app_types["train"].accuracy)
    assert problem.apps[2].event_frequency == pytest.approx(0.2)  # shipped default
    assert problem.apps[1].weight == 2.0
    assert profiles.load_problem(EXAMPLE, budget=77).budget == 77
    spec = load_example()
    spec["memory_budget_mib"] = 20
    assert profiles.problem_from_dict(spec).memory_budget_bytes == 20 * 2**20


def test_custom_network_problem_file(tmp_path):
    spec = {
        "budget": 5,
        "network": {"name": "tiny", "layer_costs": [1, 1, 0.5, 0.5, 0.2, 0.1],
                    "chokepoints": CHOKEPOINTS},
        "apps": [{"name": "a", "curves": {"num_frozen": CHOKEPOINTS,
                                          "accuracy": [0.9, 0.8, 0.6],
                                          "false_positive_rate": [0.1, 0.2, 0.3]},
                  "event_length_ms": 500, "event_frequency": 0.2, "correlation": 0.1}],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    problem = profiles.load_problem(str(path))
    assert problem.network.num_layers == 6 and problem.network.layer_bytes is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("budget"), r"budget: the problem file has no 'budget'"),
        (lambda s: s.update(colour=1), r"problem: unknown fields \['colour'\]"),
        (lambda s: s.update(apps=[]), r"apps: give a non-empty list of apps"),
        (lambda s: s["apps"][0].update(profile="tram"),
         r"app 'trains_at_crossing': profile: unknown app type 'tram'"),
        (lambda s: s["apps"][0].update(curves={}),
         r"app 'trains_at_crossing': give exactly one of 'profile'"),
        (lambda s: s["apps"][4]["curves"].pop("accuracy"),
         r"app 'custom_cyclists': curves: missing field 'accuracy'"),
        (lambda s: s["apps"][4]["curves"]["num_frozen"].pop(),
         r"app 'custom_cyclists': num_frozen, accuracy and false_positive_rate"),
        (lambda s: s["apps"][4].pop("correlation"),
         r"app 'custom_cyclists': missing field 'correlation'"),
        (lambda s: s["apps"][1].update(event_frequency=2),
         r"app 'pedestrians': event_frequency: 2.0 is outside"),
        (lambda s: s.update(objective="speed"), r"objective: unknown objective 'speed'"),
        (lambda s: s.update(network="resnet"), r"network: expected 'mobilenet' or an object"),
        (lambda s: s.update(memory_budget_mib=-1), r"memory_budget_mib: -1.0 is outside"),
        (lambda s: s["apps"][0].update(speed=3),
         r"app 'trains_at_crossing': unknown fields \['speed'\]"),
    ],
)
def test_bad_problem_files(edit, message):
    spec = copy.deepcopy(load_example())
    edit(spec)
    with pytest.raises(ValueError, match=message):
        profiles.problem_from_dict(spec)


def test_unreadable_problem_files(tmp_path):
    with pytest.raises(ValueError, match=r"no such problem file"):
        profiles.load_problem(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        profiles.load_problem(str(bad))


def test_profile_dir_errors_name_the_file(tmp_path):
    copy_dir = tmp_path / "profiles"
    shutil.copytree(profiles.mobilenet_dir(), copy_dir)
    cats = copy_dir / "accuracy" / "cats.csv"
    lines = cats.read_text().splitlines()
    cats.write_text("\n".join(lines[:-1]) + "\n")  # drop num_frozen 84
    with pytest.raises(ValueError, match=r"app 'cats': missing chokepoints \[84\]"):
        profiles.load_profile_dir(str(copy_dir))
    with pytest.raises(ValueError, match=r"no profile.json here"):
        profiles.load_profile_dir(str(tmp_path))


def test_scenarios_are_deterministic_and_on_the_grid():
    lib = profiles.load_mobilenet()
    a = scenarios.random_setup(lib, 6, setup_index=3, seed=7)
    b = scenarios.random_setup(lib, 6, setup_index=3, seed=7)
    c = scenarios.random_setup(lib, 6, setup_index=4, seed=7)
    key = lambda apps: [(x.app_type, x.event_frequency, x.event_length_ms, x.correlation)
                        for x in apps]
    assert key(a) == key(b)
    assert key(a) != key(c)
    for app in a:
        assert app.event_frequency in np.round(np.arange(1, 11) / 10, 10)
        assert app.event_length_ms in (200, 400, 600, 800, 1000)
        assert app.correlation in np.round(np.arange(1, 10) / 10, 10)
    with pytest.raises(ValueError, match="num_apps must be >= 1"):
        scenarios.random_setup(lib, 0, 0)
