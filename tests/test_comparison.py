"""comparison.run_variants: order of runs, config overrides and the before_each hook."""

import ml_collections

from sb_jax import comparison


def test_run_variants_calls_before_each_just_before_each_run(monkeypatch, tmp_path):
    events = []

    def fake_train(config, run_dir):
        events.append(("train", config.selector, config.beta, config.seed, run_dir))

    def fake_read(run_dir):
        return [{"run_dir": run_dir}]

    monkeypatch.setattr(comparison.train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(comparison.metrics_io, "read_metrics", fake_read)
    base = ml_collections.ConfigDict({"selector": "traditional", "beta": 1.0, "seed": 0})
    variants = {"traditional": {}, "sb_beta2": {"selector": "sb", "beta": 2.0}}
    runs = comparison.run_variants(
        base, variants, [3, 4], str(tmp_path),
        before_each=lambda name, seed: events.append(("before", name, seed)))

    def run_dir(name, seed):
        return str(tmp_path / f"{name}_seed{seed}")

    assert events == [
        ("before", "traditional", 3), ("train", "traditional", 1.0, 3, run_dir("traditional", 3)),
        ("before", "sb_beta2", 3), ("train", "sb", 2.0, 3, run_dir("sb_beta2", 3)),
        ("before", "traditional", 4), ("train", "traditional", 1.0, 4, run_dir("traditional", 4)),
        ("before", "sb_beta2", 4), ("train", "sb", 2.0, 4, run_dir("sb_beta2", 4)),
    ]
    assert runs == {name: [[{"run_dir": run_dir(name, s)}] for s in (3, 4)] for name in variants}
    assert base.selector == "traditional" and base.beta == 1.0  # the base is not modified
