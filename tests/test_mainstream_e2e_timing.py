"""The e2e's predicted-vs-measured protocol: a schedule's stream passes and the pieces
its calls run are timed in the same rounds (profiling.measure_pieces_interleaved,
pipeline._time_schedule), so that a drift of the machine's speed hits both alike."""

import ml_collections
import numpy as np
import pytest

from mainstream_jax.e2e import pipeline, profiling
from tests.mainstream_tiny import SHAPE, F, tiny_network
from tests.mainstream_tiny import tiny_runtime as _runtime


@pytest.fixture(scope="module")
def tiny():
    return tiny_network()


class DriftingMachine:
    """A fake clock for the timing functions: every call of a piece costs its base time
    times a speed factor that grows with each timed thing (the machine slows down)."""

    def __init__(self, base_ms, drift=0.02):
        self.base_ms = base_ms  # piece name -> ms per call at factor 1
        self.drift = drift
        self.count = 0

    def factor(self):
        self.count += 1
        return 1.0 + self.drift * self.count

    def burst(self, fn, args, calls):
        return self.base_ms.get(fn, 0.0) * 1e-3 * self.factor()  # trivial op: 0

    def call(self, fn, *args):
        return 0.0  # the trivial op: no overhead, no wait

    def stream_pass(self, pieces):
        # A pass runs these pieces once each at the current speed.
        f = self.factor()
        return sum(self.base_ms[p] for p in pieces) * 1e-3 * f


def _fake_probes(pieces, batches):
    return [(p, p, ()) for _ in batches for p in pieces]


def test_interleaved_rounds_give_pieces_and_passes_the_same_drift(monkeypatch):
    base = {(0, 3): 2.0, (3, 8): 1.0, (0, 8): 3.0}
    pieces = sorted(base)
    m = DriftingMachine(base)
    monkeypatch.setattr(profiling, "time_burst", m.burst)
    monkeypatch.setattr(profiling, "time_call", m.call)
    # The old protocol: the pieces timed first, the passes after (the machine slowed).
    (before,), _ = profiling.measure_pieces_interleaved(
        _fake_probes(pieces, [10]), [10], 8, [], repeats=9, warmup=0)
    passes = [m.stream_pass(pieces) for _ in range(60)]
    old_pred = sum(before.call_ms(a, b, 10) for a, b in pieces)
    old_err = np.median(passes) * 1e3 / old_pred - 1
    assert old_err > 0.3  # the drift between them shows as error
    # Interleaved: the same pieces, the passes in the same rounds.
    m2 = DriftingMachine(base)
    monkeypatch.setattr(profiling, "time_burst", m2.burst)
    (table,), t = profiling.measure_pieces_interleaved(
        _fake_probes(pieces, [10]), [10], 8, [lambda: m2.stream_pass(pieces)],
        repeats=9, warmup=1)
    assert t.shape == (9, 1)
    pred = sum(table.call_ms(a, b, 10) for a, b in pieces)
    assert abs(np.median(t[:, 0]) * 1e3 / pred - 1) < 0.08


def test_the_prediction_never_reads_the_targets_times(monkeypatch):
    base = {(0, 3): 2.0, (3, 8): 1.0}
    pieces = sorted(base)
    monkeypatch.setattr(profiling, "time_burst",
                        lambda fn, args, calls: base.get(fn, 1e-2) * 1e-3)
    monkeypatch.setattr(profiling, "time_call", lambda fn, *args: 1e-5)
    tables = []
    for target_s in (1e-3, 10.0):
        (table,), t = profiling.measure_pieces_interleaved(
            _fake_probes(pieces, [10, 40]), [10, 40], 8, [lambda s=target_s: s],
            repeats=3, warmup=0)
        np.testing.assert_allclose(t, target_s)
        tables.append(table)
    np.testing.assert_array_equal(tables[0].ms_per_frame, tables[1].ms_per_frame)
    assert tables[0].pieces == pieces
    np.testing.assert_allclose(tables[0].ms_per_frame[0, 0, 3] * 10, 2.0)
    np.testing.assert_allclose(tables[0].ms_per_frame[1, 3, 8] * 40, 1.0)


def test_every_target_and_piece_runs_once_per_round_in_varying_order(monkeypatch):
    order = []
    monkeypatch.setattr(profiling, "time_burst",
                        lambda fn, args, calls: order.append(fn) or 1e-3)
    monkeypatch.setattr(profiling, "time_call", lambda fn, *args: 1e-5)
    pieces = [(0, 3), (3, 8), (0, 8)]
    probes = _fake_probes(pieces, [10])
    rounds = 6
    profiling.measure_pieces_interleaved(
        probes, [10], 8, [lambda: order.append("pass") or 1e-3], repeats=rounds - 1,
        warmup=1)
    per_round = len(pieces) + 2  # + the pass + the trivial op's burst
    assert len(order) == rounds * per_round
    chunks = [order[i * per_round:(i + 1) * per_round] for i in range(rounds)]
    assert all(c.count("pass") == 1 for c in chunks)
    assert len({c.index("pass") for c in chunks}) > 1  # not always in the same place


def test_one_table_per_burst_length(monkeypatch):
    # A fake clock where a burst's one wait (0.4 ms) is shared by its calls.
    base = {(0, 3): 2.0, (3, 8): 1.0}
    monkeypatch.setattr(profiling, "time_burst",
                        lambda fn, args, calls: (base.get(fn, 0.01) + 0.4 / calls) * 1e-3)
    monkeypatch.setattr(profiling, "time_call", lambda fn, *args: 0.41e-3)
    (t4, t10), _ = profiling.measure_pieces_interleaved(
        _fake_probes(sorted(base), [10]), [10], 8, [], bursts=(4, 10), repeats=2, warmup=0)
    assert t4.call_ms(0, 3, 10) == pytest.approx(2.1)
    assert t10.call_ms(0, 3, 10) == pytest.approx(2.04)
    assert t4.overhead_ms == pytest.approx(0.11) and t10.overhead_ms == pytest.approx(0.05)
    assert t10.sync_ms == pytest.approx(0.36)


def test_interleaved_timing_validation():
    probes = _fake_probes([(0, 3), (3, 8)], [10, 40])
    with pytest.raises(ValueError, match="repeats"):
        profiling.measure_pieces_interleaved(probes, [10, 40], 8, [], repeats=0)
    with pytest.raises(ValueError, match="bursts"):
        profiling.measure_pieces_interleaved(probes, [10, 40], 8, [], bursts=(4, 0))
    with pytest.raises(ValueError, match="3 probes for 2 batches"):
        profiling.measure_pieces_interleaved(probes[:3], [10, 40], 8, [])
    with pytest.raises(ValueError, match="same pieces"):
        profiling.measure_pieces_interleaved(probes[:2] + probes[:1] + probes[:1],
                                             [10, 40], 8, [])


def test_time_schedule_times_the_schedules_own_pieces_and_passes(tiny):
    spec, model, base = tiny
    L = spec.num_layers
    rt = _runtime(tiny, (3, 6, 0), (4, 7, 2))
    everything = [(0, 3), (0, 6), (3, 6), (0, L), (3, L), (6, L), (6, 7)]
    probe_table = {b: {p: (fn, args) for p, fn, args in profiling.piece_probes(
        model, base, SHAPE, batch=b, mean=0.3, std=0.3, pieces=everything)}
        for b in (4, 32)}
    frames = np.random.default_rng(0).integers(0, 256, (3 * 2 * F, *SHAPE), np.uint8)
    config = ml_collections.ConfigDict({"piece_burst": 2, "seed": 0})
    out = pipeline._time_schedule(rt, frames, probe_table, L, config, rounds=2)
    used = sorted({(a, b) for a, b, _, _ in rt.pieces})
    assert used == [(0, 3), (0, L), (3, 6), (3, L), (6, L)]
    assert out["pieces"].pieces == used  # only the schedule's pieces, (0, 6) not among them
    assert out["pieces_profile_burst"].pieces == used
    assert (out["pass_burst"], out["profile_burst"]) == (3, 2)  # 3 runtime calls a pass
    assert len(out["pass_s"]) == 2 and min(out["pass_s"]) > 0
    assert np.isfinite(rt.predicted_call_ms(np.ones(L), 0.0, out["pieces"]))
    # No probes, no rounds, or a fused runtime: nothing to time.
    assert pipeline._time_schedule(rt, frames, {}, L, config, rounds=2) is None
    assert pipeline._time_schedule(rt, frames, probe_table, L, config, rounds=0) is None
    with pytest.raises(ValueError, match="positive multiple"):
        rt.stream_chunks(frames[:-1])


def test_prediction_summary_and_report_columns():
    runs = [{"measured_cost_ms_per_s": m, "piece_predicted_cost_ms_per_s": p,
             "profile_piece_predicted_cost_ms_per_s": q}
            for m, p, q in [(1.0, 1.1, 1.4), (2.0, 1.6, 2.0), (3.0, 3.0, 2.0)]]
    s = pipeline.prediction_summary(runs, "piece_predicted_cost_ms_per_s")
    assert s["schedules"] == 3 and s["within"] == 2
    assert s["min_error"] == pytest.approx(1 / 1.1 - 1)
    assert s["max_error"] == pytest.approx(0.25)
    q = pipeline.prediction_summary(runs, "profile_piece_predicted_cost_ms_per_s")
    assert q["within"] == 1 and q["max_error"] == pytest.approx(0.5)
    assert pipeline.prediction_summary([{"budget_fraction": 0.1}], "x") == {"schedules": 0}
    run = {"budget_fraction": 0.03, "planner": "mainstream", "predicted_mean_f1": 0.5,
           "observed_mean_f1": 0.4, "predicted_cost_ms_per_s": 1.0,
           "call_overhead_ms_per_s": 0.1, "piece_predicted_cost_ms_per_s": 1.6,
           "profile_piece_predicted_cost_ms_per_s": 2.0, "piece_timing": "interleaved",
           "measured_cost_ms_per_s": 2.0, "frames_per_s": 100.0, "apps": []}
    report = {"device": "cpu", "base_test_accuracy": 0.9, "wall_s": 10.0, "runs": [run],
              "measured_vs_pieces": {
                  "piece_predicted_cost_ms_per_s": pipeline.prediction_summary(
                      [run], "piece_predicted_cost_ms_per_s"),
                  "profile_piece_predicted_cost_ms_per_s": pipeline.prediction_summary(
                      [run], "profile_piece_predicted_cost_ms_per_s")}}
    md = pipeline.format_report(report)
    row = next(line for line in md.splitlines() if line.startswith("| 0.03 | mainstream"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in md.splitlines() if line.startswith("| budget (x"))
    names = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == len(names)
    got = dict(zip(names, cells, strict=True))
    assert got["pieces (profile)"] == "2.000" and got["pieces (rounds)"] == "1.600"
    assert got["measured / pieces (profile)"] == "+0.0%"
    assert got["measured / pieces (rounds)"] == "+25.0%"
    assert "measured / pieces (rounds): +25.0% to +25.0%; 0 of 1 schedules within 15%" in md
