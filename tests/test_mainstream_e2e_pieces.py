"""Piece costs: the table's validation and size model, the profile round trip, the
runtime's prediction from it, and the profiler measuring every piece itself."""

import json

import numpy as np
import pytest

from mainstream_jax import profiles
from mainstream_jax.e2e import basenet, profiling, runtime
from tests.mainstream_tiny import SHAPE, tiny_network
from tests.mainstream_tiny import tiny_runtime as _runtime


def _table(num_layers=8, batches=(10,), pieces=((0, 2), (2, 5), (0, 8), (2, 8), (5, 8)),
           seed=0, overhead=0.05, sync=0.02):
    rng = np.random.default_rng(seed)
    ms = np.full((len(batches), num_layers + 1, num_layers + 1), np.nan)
    for a, b in pieces:
        ms[:, a, b] = rng.uniform(0.01, 0.1, len(batches))
    return profiles.make_piece_costs(num_layers, batches, ms, overhead, sync)


def test_piece_table_shape_and_validation():
    t = _table()
    assert t.ms_per_frame.shape == (1, 9, 9)
    assert t.pieces == [(0, 2), (0, 8), (2, 5), (2, 8), (5, 8)]
    assert t.has(2, 5) and not t.has(2, 6) and not t.has(5, 2) and not t.has(0, 9)
    good = t.ms_per_frame
    with pytest.raises(ValueError, match="shape"):
        profiles.make_piece_costs(8, [10], good[:, :8, :8], 0.1)
    with pytest.raises(ValueError, match="shape"):
        profiles.make_piece_costs(8, [10, 20], good, 0.1)
    lower = good.copy()
    lower[0, 3, 1] = 0.1
    with pytest.raises(ValueError, match=r"piece \(3, 1\).*start >= end"):
        profiles.make_piece_costs(8, [10], lower, 0.1)
    two = np.concatenate([good, good])
    two[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match=r"piece \(2, 5\) is measured at some batches"):
        profiles.make_piece_costs(8, [10, 20], two, 0.1)
    neg = good.copy()
    neg[0, 0, 2] = 0.0
    with pytest.raises(ValueError, match=r"piece \(0, 2\).*non-positive"):
        profiles.make_piece_costs(8, [10], neg, 0.1)
    inf = good.copy()
    inf[0, 0, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        profiles.make_piece_costs(8, [10], inf, 0.1)
    with pytest.raises(ValueError, match="no piece"):
        profiles.make_piece_costs(8, [10], np.full_like(good, np.nan), 0.1)
    with pytest.raises(ValueError, match="strictly increase"):
        profiles.make_piece_costs(8, [20, 10], np.concatenate([good, good]), 0.1)
    with pytest.raises(ValueError, match="whole frame counts"):
        profiles.make_piece_costs(8, [10.5], good, 0.1)
    with pytest.raises(ValueError, match="overhead_ms"):
        profiles.make_piece_costs(8, [10], good, -0.1)
    with pytest.raises(ValueError, match="sync_ms"):
        profiles.make_piece_costs(8, [10], good, 0.1, float("nan"))
    with pytest.raises(ValueError, match="are for 8 layers but the network has 7"):
        profiles.make_network(np.ones(7), range(7), piece_costs=t)


def test_call_ms_size_model():
    o = 0.1
    ms = np.full((2, 5, 5), np.nan)
    ms[:, 1, 3] = [2.0 / 10, 5.0 / 40]  # 2 ms on 10 frames, 5 ms on 40
    two = profiles.make_piece_costs(4, [10, 40], ms, o)
    assert two.call_ms(1, 3, 10) == pytest.approx(2.0)
    assert two.call_ms(1, 3, 40) == pytest.approx(5.0)
    assert two.call_ms(1, 3, 20) == pytest.approx(2.0 + 3.0 * 10 / 30)  # interpolated
    assert two.call_ms(1, 3, 70) == pytest.approx(5.0 + 3.0 * 30 / 30)  # extended
    assert two.call_ms(1, 3, 5) == pytest.approx(o + (2.0 - o) * 5 / 10)  # below: o + work
    one = profiles.make_piece_costs(4, [10], ms[:1], o)
    assert one.call_ms(1, 3, 10) == pytest.approx(2.0)
    assert one.call_ms(1, 3, 30) == pytest.approx(o + (2.0 - o) * 3)
    with pytest.raises(KeyError, match=r"\(0, 3\)"):
        one.call_ms(0, 3, 10)
    with pytest.raises(ValueError, match="frames"):
        one.call_ms(1, 3, 0)


def _network_and_apps(pieces):
    rng = np.random.default_rng(3)
    net = profiles.make_network(rng.uniform(0.001, 0.05, 8), range(8),
                                layer_names=[f"layer_{i}" for i in range(8)], name="tiny",
                                piece_costs=pieces)
    apps = [profiles.make_app(
        f"app{a}", net, num_frozen=range(8), accuracy=rng.uniform(0.3, 1, 8),
        false_positive_rate=rng.uniform(0, 0.3, 8), event_length_ms=500,
        event_frequency=0.1, correlation=0.3, clean=False) for a in range(2)]
    return net, apps


def test_piece_table_round_trips_through_the_profile(tmp_path):
    pieces = _table(batches=(10, 60), pieces=profiling.all_pieces(8), seed=4)
    net, apps = _network_and_apps(pieces)
    profiling.write_profile_dir(str(tmp_path), net, apps)
    got = profiles.load_profile_dir(str(tmp_path), clean=False).network.piece_costs
    assert got is not None and got.num_layers == 8
    np.testing.assert_array_equal(got.batches, [10, 60])
    np.testing.assert_array_equal(got.ms_per_frame, pieces.ms_per_frame)  # NaNs alike
    assert (got.overhead_ms, got.sync_ms) == (pieces.overhead_ms, pieces.sync_ms)
    # Without a table: none written, none read.
    plain, _ = _network_and_apps(None)
    profiling.write_profile_dir(str(tmp_path / "plain"), plain, apps)
    assert profiles.load_profile_dir(str(tmp_path / "plain")).network.piece_costs is None
    assert not (tmp_path / "plain" / "piece_costs.csv").exists()


def _corrupt(tmp_path, edit_csv=None, edit_meta=None):
    net, apps = _network_and_apps(_table())
    d = tmp_path / "bad"
    profiling.write_profile_dir(str(d), net, apps)
    if edit_csv:
        lines = (d / "piece_costs.csv").read_text().splitlines()
        (d / "piece_costs.csv").write_text("\n".join(edit_csv(lines)) + "\n")
    if edit_meta:
        meta = json.loads((d / "profile.json").read_text())
        edit_meta(meta)
        (d / "profile.json").write_text(json.dumps(meta))
    return str(d)


@pytest.mark.parametrize("edit_csv, edit_meta, match", [
    (lambda ls: ls + [ls[1]], None, "listed twice"),
    (lambda ls: ls + ["3,9,10,0.1"], None, r"piece \(3, 9\) needs 0 <= start < end <= 8"),
    (lambda ls: ls + ["4,4,10,0.1"], None, r"piece \(4, 4\)"),
    (lambda ls: ls + ["4,6,10,abc"], None, "must be a number"),
    (lambda ls: ls + ["4,6,20,0.1"], None, "measured at some batches"),
    (lambda ls: ls + ["4,6,10,-0.1"], None, "non-positive"),
    (lambda ls: [ls[0].replace("batch", "frames")] + ls[1:], None, "no column 'batch'"),
    (None, lambda m: m["piece_costs"].update(file="nope.csv"), "does not exist"),
    (None, lambda m: m["piece_costs"].pop("sync_ms"), "expected"),
])
def test_bad_piece_files_fail_clearly(tmp_path, edit_csv, edit_meta, match):
    d = _corrupt(tmp_path, edit_csv, edit_meta)
    with pytest.raises(ValueError, match=match):
        profiles.load_profile_dir(d)


@pytest.fixture(scope="module")
def tiny():
    return tiny_network()


def test_predicted_call_ms_sums_the_measured_pieces(tiny):
    spec = tiny[0]
    L = spec.num_layers
    assert L == 8
    rt = _runtime(tiny, (2, 5, 5, 0), (3, 7, 4, 9))
    # Segments [0, 2) and [2, 5) at rate 7 (the apps at k >= 2 / >= 5), 2 windows each;
    # branches at their own rates.
    assert rt.pieces == [(0, 2, 14, 1), (2, 5, 14, 1), (2, 8, 6, 1), (5, 8, 14, 1),
                         (5, 8, 8, 1), (0, 8, 18, 1)]
    o, s, B = 0.05, 0.02, 10
    t = _table(pieces=[(0, 2), (2, 5), (2, 8), (5, 8), (0, 8)], overhead=o, sync=s)
    T = {p: t.ms_per_frame[0][p] * B for p in t.pieces}  # ms per call on 10 frames

    def call(p, n):
        return o + (T[p] - o) * n / B

    want = s + (call((0, 2), 14) + call((2, 5), 14) + call((2, 8), 6) + call((5, 8), 14)
                + call((5, 8), 8) + call((0, 8), 18))
    lam = np.linspace(0.01, 0.08, L)
    assert rt.predicted_call_ms(lam, 0.3, t) == pytest.approx(want, rel=1e-12)
    # A piece the table lacks: its layers' sum plus the given per-call overhead.
    partial = _table(pieces=[(0, 2), (2, 5), (2, 8), (0, 8)], overhead=o, sync=s)
    T = {p: partial.ms_per_frame[0][p] * B for p in partial.pieces}
    want = s + (call((0, 2), 14) + call((2, 5), 14) + call((2, 8), 6) + call((0, 8), 18)
                + 2 * 0.3 + (14 + 8) * lam[5:].sum())
    assert rt.predicted_call_ms(lam, 0.3, partial) == pytest.approx(want, rel=1e-12)
    # Without a table, and fused (one program: the pieces do not apply): per layer.
    per_layer = rt.predicted_call_ms(lam, 0.3)
    assert per_layer == pytest.approx(
        14 * lam[:5].sum() + 6 * lam[2:].sum() + 22 * lam[5:].sum() + 18 * lam.sum()
        + 6 * 0.3)
    fused = _runtime(tiny, (2, 5, 5, 0), (3, 7, 4, 9), fused=True)
    assert fused.predicted_call_ms(lam, 0.3, t) == pytest.approx(fused.predicted_call_ms(
        lam, 0.3))
    with pytest.raises(ValueError, match="piece costs for 6 layers"):
        rt.predicted_call_ms(lam, 0.3, _table(num_layers=6, pieces=[(0, 2)]))


def test_vmapped_group_is_one_call_with_each_apps_work(tiny):
    rt = _runtime(tiny, (5, 5, 5), (4, 4, 4), batch_apps=True)
    assert rt.pieces == [(0, 5, 8, 1), (5, 8, 8, 3)]
    o, s = 0.05, 0.02
    t = _table(pieces=[(0, 5), (5, 8)], overhead=o, sync=s)
    T = {p: t.ms_per_frame[0][p] * 10 for p in t.pieces}
    want = s + (o + (T[(0, 5)] - o) * 0.8) + (o + 3 * (T[(5, 8)] - o) * 0.8)
    assert rt.predicted_call_ms(np.ones(8), 0.0, t) == pytest.approx(want, rel=1e-12)


def test_piece_probes_are_the_runtimes_own_functions(tiny):
    spec, model, base = tiny
    probes = profiling.piece_probes(model, base, SHAPE, batch=6, mean=0.3, std=0.3,
                                    pieces=[(0, 3), (3, 5), (3, 8), (0, 8)])
    fns = {p: fn for p, fn, _ in probes}
    assert fns[(0, 3)] is runtime._segment_fn(model, 0, 3, 0.3, 0.3, True, True)
    assert fns[(3, 5)] is runtime._segment_fn(model, 3, 5, 0.3, 0.3, False, True)
    assert fns[(3, 8)] is runtime._group_fn(model, 3, 0.3, 0.3, False, True)
    assert fns[(0, 8)] is runtime._group_fn(model, 0, 0.3, 0.3, True, True)
    args = {p: a for p, _, a in probes}
    assert args[(0, 3)][1].dtype == np.uint8 and args[(0, 3)][1].shape == (6, *SHAPE)
    assert set(args[(3, 5)][0]["params"]) == {basenet.layer_key(i, spec.layers[i])
                                             for i in (3, 4)}
    assert len(profiling.all_pieces(8)) == 8 * 9 // 2
    with pytest.raises(ValueError, match="start < end"):
        profiling.piece_probes(model, base, SHAPE, batch=6, mean=0.3, std=0.3,
                               pieces=[(3, 3)])


def test_every_piece_is_timed_itself(tiny, monkeypatch):
    # A fake clock that gives each jitted function its own time: segment [0, 5) must get
    # its own time, not the sum of [0, 2) and [2, 5).
    _, model, base = tiny
    pieces = [(0, 2), (2, 5), (0, 5), (5, 8)]
    fake = {runtime._segment_fn(model, 0, 2, 0.3, 0.3, True, True): 1e-3,
            runtime._segment_fn(model, 2, 5, 0.3, 0.3, False, True): 2e-3,
            runtime._segment_fn(model, 0, 5, 0.3, 0.3, True, True): 7e-3,
            runtime._group_fn(model, 5, 0.3, 0.3, False, True): 0.5e-3}
    monkeypatch.setattr(profiling, "time_burst", lambda fn, args, calls: fake.get(fn, 1e-5))
    monkeypatch.setattr(profiling, "time_call", lambda fn, *args: 3e-5)
    t = profiling.measure_piece_costs(model, base, SHAPE, batches=[4], mean=0.3, std=0.3,
                                      pieces=pieces, repeats=2, warmup=0)
    assert t.pieces == sorted(pieces) and t.first_ms_per_frame is None  # the default
    np.testing.assert_allclose([t.ms_per_frame[0, 0, 5] * 4, t.ms_per_frame[0, 0, 2] * 4,
                                t.ms_per_frame[0, 2, 5] * 4, t.ms_per_frame[0, 5, 8] * 4],
                               [7.0, 1.0, 2.0, 0.5])
    assert (t.overhead_ms, t.sync_ms) == pytest.approx((0.01, 0.02))


def test_measured_piece_costs_are_positive(tiny):
    _, model, base = tiny
    t = profiling.measure_piece_costs(model, base, SHAPE, batches=[4, 32], mean=0.3,
                                      std=0.3, pieces=[(0, 3), (3, 6), (0, 6), (6, 8)],
                                      burst=2, repeats=2, warmup=0)
    assert t.ms_per_frame.shape == (2, 9, 9)
    assert t.pieces == [(0, 3), (0, 6), (3, 6), (6, 8)]
    vals = t.ms_per_frame[np.isfinite(t.ms_per_frame)]
    assert vals.size == 8 and np.all(vals > 0)
    assert t.overhead_ms > 0 and t.sync_ms >= 0


def _two_tables(o=0.05, s=0.02):
    """A table whose first calls cost 2 ms more than repeated ones (10 frames)."""
    t = _table(pieces=[(0, 5), (5, 8), (0, 8)], overhead=o, sync=s)
    first = t.ms_per_frame + 0.2
    return profiles.make_piece_costs(8, [10], t.ms_per_frame, o, s,
                                     first_ms_per_frame=first)


def test_first_call_table_validation_and_size_model():
    t = _two_tables()
    rep, first = t.call_ms(0, 5, 10), t.call_ms(0, 5, 10, first=True)
    assert first == pytest.approx(rep + 2.0)
    # The size model applies to each table: below the batch, overhead + work.
    assert t.call_ms(0, 5, 5, first=True) == pytest.approx(0.05 + (first - 0.05) / 2)
    plain = _table()
    assert plain.first_ms_per_frame is None
    assert plain.call_ms(0, 2, 10, first=True) == plain.call_ms(0, 2, 10)
    good = t.ms_per_frame
    with pytest.raises(ValueError, match="first_ms_per_frame.*shape"):
        profiles.make_piece_costs(8, [10], good, 0.1, first_ms_per_frame=good[:, :8, :8])
    other = good.copy()
    other[0, 0, 5] = np.nan
    with pytest.raises(ValueError, match=r"piece \(0, 5\).*one table but not in the other"):
        profiles.make_piece_costs(8, [10], good, 0.1, first_ms_per_frame=other)
    other = good.copy()
    other[0, 1, 3] = 0.1
    with pytest.raises(ValueError, match=r"piece \(1, 3\).*one table but not in the other"):
        profiles.make_piece_costs(8, [10], good, 0.1, first_ms_per_frame=other)
    other = good.copy()
    other[0, 5, 8] = 0.0
    with pytest.raises(ValueError, match=r"first_ms_per_frame.*\(5, 8\).*non-positive"):
        profiles.make_piece_costs(8, [10], good, 0.1, first_ms_per_frame=other)
    other[0, 5, 8] = np.inf
    with pytest.raises(ValueError, match="first_ms_per_frame.*infinite"):
        profiles.make_piece_costs(8, [10], good, 0.1, first_ms_per_frame=other)


def test_first_call_table_round_trips_and_bad_column_fails(tmp_path):
    pieces = _table(batches=(10, 60), pieces=profiling.all_pieces(8), seed=5)
    pieces = profiles.make_piece_costs(8, [10, 60], pieces.ms_per_frame, 0.05, 0.02,
                                       first_ms_per_frame=pieces.ms_per_frame * 1.5)
    net, apps = _network_and_apps(pieces)
    profiling.write_profile_dir(str(tmp_path), net, apps)
    assert (tmp_path / "piece_costs.csv").read_text().splitlines()[0].endswith(
        ",first_ms_per_frame")
    got = profiles.load_profile_dir(str(tmp_path), clean=False).network.piece_costs
    np.testing.assert_array_equal(got.ms_per_frame, pieces.ms_per_frame)
    np.testing.assert_array_equal(got.first_ms_per_frame, pieces.first_ms_per_frame)
    lines = (tmp_path / "piece_costs.csv").read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:4] + ["nan"])
    (tmp_path / "piece_costs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="one table but not in the other"):
        profiles.load_profile_dir(str(tmp_path))


def test_repeated_calls_of_one_program_are_priced_as_repeats(tiny):
    o, s = 0.05, 0.02
    t = _two_tables(o, s)
    # Three apps at k = 5, same rate, not vmapped: one stem call, then the same branch
    # program three times: the first at its first-call cost, the others repeated.
    rt = _runtime(tiny, (5, 5, 5), (5, 5, 5))
    assert rt.pieces == [(0, 5, 10, 1)] + [(5, 8, 10, 1)] * 3
    want = (s + t.call_ms(0, 5, 10, first=True) + t.call_ms(5, 8, 10, first=True)
            + 2 * t.call_ms(5, 8, 10))
    assert rt.predicted_call_ms(np.ones(8), 0.0, t) == pytest.approx(want, rel=1e-12)
    # The same branch on another frame count is another program: a first call too.
    rt = _runtime(tiny, (5, 5), (5, 4))
    assert rt.pieces == [(0, 5, 10, 1), (5, 8, 10, 1), (5, 8, 8, 1)]
    want = (s + t.call_ms(0, 5, 10, first=True) + t.call_ms(5, 8, 10, first=True)
            + t.call_ms(5, 8, 8, first=True))
    assert rt.predicted_call_ms(np.ones(8), 0.0, t) == pytest.approx(want, rel=1e-12)
    # vmapped: one call, first-call cost plus the two further apps' repeated work.
    rt = _runtime(tiny, (5, 5, 5), (5, 5, 5), batch_apps=True)
    want = (s + t.call_ms(0, 5, 10, first=True) + t.call_ms(5, 8, 10, first=True)
            + 2 * (t.call_ms(5, 8, 10) - o))
    assert rt.predicted_call_ms(np.ones(8), 0.0, t) == pytest.approx(want, rel=1e-12)


def test_first_and_repeated_calls_from_bursts_and_single_calls(tiny, monkeypatch):
    # A fake clock: each piece has a cold first call (A) and warm repeats (R); a burst of
    # m calls takes (A + (m - 1) R) / m per call. The profiler must recover R and A - sync.
    _, model, base = tiny
    pieces = [(0, 2), (2, 5), (5, 8)]
    m = 4
    cold = {runtime._segment_fn(model, 0, 2, 0.3, 0.3, True, True): (3e-3, 1e-3),
            runtime._segment_fn(model, 2, 5, 0.3, 0.3, False, True): (2.5e-3, 2e-3),
            runtime._group_fn(model, 5, 0.3, 0.3, False, True): (0.2e-3, 0.001e-3)}
    trivial = (0.04e-3, 0.01e-3)  # the trivial op alone / in a burst
    calls = []

    def fake_burst(fn, args, n):
        calls.append(("burst", fn))
        if fn not in cold:
            return trivial[1]
        a, r = cold[fn]
        return (a + (n - 1) * r) / n

    def fake_call(fn, *args):
        calls.append(("alone", fn))
        return cold.get(fn, trivial)[0]

    monkeypatch.setattr(profiling, "time_burst", fake_burst)
    monkeypatch.setattr(profiling, "time_call", fake_call)
    t = profiling.measure_piece_costs(model, base, SHAPE, batches=[4], mean=0.3, std=0.3,
                                      pieces=pieces, burst=m, repeats=3, warmup=0,
                                      first_calls=True)
    assert (t.overhead_ms, t.sync_ms) == pytest.approx((0.01, 0.03))
    per_call = lambda tab, a, b: tab[0, a, b] * 4  # noqa: E731
    # Repeated calls: R (the branch's 0.001 ms is below the trivial op: floored at it).
    assert [per_call(t.ms_per_frame, *p) for p in pieces] == pytest.approx([1.0, 2.0, 0.01])
    # First calls: A less the one wait per runtime call.
    assert [per_call(t.first_ms_per_frame, *p) for p in pieces] == pytest.approx(
        [3.0 - 0.03, 2.5 - 0.03, 0.2 - 0.03])
    # No piece's single call directly follows a burst of the same piece.
    assert not any(x == ("burst", fn) and y == ("alone", fn)
                   for x, y in zip(calls[:-1], calls[1:], strict=True) for fn in cold)
    with pytest.raises(ValueError, match="burst >= 2"):
        profiling.measure_piece_costs(model, base, SHAPE, batches=[4], mean=0.3, std=0.3,
                                      pieces=pieces, burst=1, first_calls=True)
    with pytest.raises(ValueError, match="burst length"):
        profiling.piece_costs_from_times(np.ones((2, 5)), pieces, [4], 8,
                                         alone_times=np.ones((2, 3)))
    with pytest.raises(ValueError, match="alone_times"):
        profiling.piece_costs_from_times(np.ones((2, 5)), pieces, [4], 8,
                                         alone_times=np.ones((2, 2)), burst=4)
