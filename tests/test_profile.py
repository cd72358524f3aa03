"""Measurement method, block extraction, the profile store (atomic, resumable, mergeable, loud on damage)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dery.defaults import Profiling
from dery.errors import DeryError
from dery.ir import LatencyRecord, to_json
from dery.measure import Method, measure, measure_all, summarize
from dery.passes import profile as profile_pass
from dery.passes.profile import ensure_records, pieces
from dery.passes.solve import assembly_ids, chosen_models
from dery.problem import Solution
from dery.profile_store import SCHEMA, ProfileStore, merge_tables
from dery.targets import get_target
from records import record

QUICK = Method(windows=2, warmup_s=0.01, min_iters=15, window_s=0.03, extra_windows=0)


def test_twice_the_work_measures_twice_the_time() -> None:
    one = measure(lambda: time.sleep(0.002), QUICK)
    two = measure(lambda: time.sleep(0.004), QUICK)
    assert one.runs >= 30 and one.windows == 2 and one.median_ms >= 2.0
    assert 1.6 < two.median_ms / one.median_ms < 2.4


def scripted(values_per_window: list[float], calls_per_window: int) -> Callable[[], float]:
    """A device-timed step whose every call in window w returns values_per_window[w]."""
    count = itertools.count()
    return lambda: values_per_window[next(count) // calls_per_window]


def test_the_fastest_window_is_kept_and_disagreeing_windows_trigger_more() -> None:
    steady = measure(scripted([5.0] * 5, 11), Method(warmup_s=0, min_iters=10, window_s=0))
    assert (steady.median_ms, steady.cv, steady.windows, steady.runs, steady.noisy) == (5.0, 0.0, 5, 50, False)
    # 1 warm-up call + 10 timed calls per window; the first window is disturbed (9 ms instead of 5 ms)
    t = measure(scripted([9.0, 5.0, 5.0, 7.0], 11), Method(windows=2, warmup_s=0, min_iters=10, window_s=0,
                                                           max_spread=0.05, extra_windows=2))
    assert (t.median_ms, t.min_ms, t.windows, t.runs, t.spread, t.noisy) == (5.0, 5.0, 3, 30, 0.0, False)
    unsettled = measure(scripted([9.0, 5.0, 7.0, 8.0], 11), Method(windows=2, warmup_s=0, min_iters=10, window_s=0,
                                                                  max_spread=0.05, extra_windows=2))
    assert unsettled.windows == 4 and unsettled.median_ms == 5.0 and unsettled.noisy
    assert unsettled.spread == pytest.approx(0.4)


def test_measuring_together_spreads_windows_past_a_burst_of_interference() -> None:
    """A burst that slows the machine 2x for three windows' worth of calls: one piece after the other, one
    piece sits wholly inside it; measured together (windows in turn), every piece keeps clean windows."""
    method = Method(windows=3, warmup_s=0, min_iters=10, window_s=0, extra_windows=0)

    def machine() -> list[Callable[[], float]]:
        clock = itertools.count()

        def piece(ms: float) -> Callable[[], float]:
            return lambda: ms * (2.0 if 33 <= next(clock) < 66 else 1.0)

        return [piece(1.0), piece(2.0), piece(3.0)]

    alone = [measure(step, method).median_ms for step in machine()]
    together = [t.median_ms for t in measure_all(machine(), method)]
    assert alone == [1.0, 4.0, 3.0]
    assert together == [1.0, 2.0, 3.0]


def test_summary_statistics() -> None:
    t = summarize([np.array([1.0, 2.0, 3.0, 4.0, 10.0]), np.array([6.0, 7.0, 8.0])], 0.5)
    assert t.median_ms == 3.0 and t.min_ms == 1.0 and t.mean_ms == 4.0 and t.p90_ms == pytest.approx(7.6)
    assert t.cv == pytest.approx(np.std([1, 2, 3, 4, 10]) / 4.0) and t.runs == 8 and t.windows == 2
    assert t.spread == pytest.approx(7.0 / 3.0 - 1.0) and t.noisy and t.windows_median_ms == 5.0


def test_every_extracted_piece_equals_its_torch_module(tiny) -> None:
    items = pieces(tiny.lowered, tiny.partition, tiny.stitches, 1, tiny.cache)
    kinds = {k[0] for k in items}
    assert kinds == {"block", "joint", "triple", "network"}
    assert sum(k[0] == "block" for k in items) == 3 * len(tiny.lowered)
    joints = {k[1:] for k in items if k[0] == "joint"}
    assert joints == {(a, a, j) for a in tiny.partition.models for j in (0, 1)} | set(tiny.stitches.modules)
    assert {k[1:] for k in items if k[0] == "triple"} == {
        (a, b, c, 0) for a, b, j in joints for c in tiny.partition.models if j == 0 and (b, c, 1) in joints}
    for key, piece in items.items():
        sess = ort.InferenceSession(piece.onnx.SerializeToString(), providers=["CPUExecutionProvider"])
        x = torch.rand(1, *piece.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = piece.module()(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == ref.shape, key
        assert np.abs(got - ref).max() <= 1e-4, key


def test_the_reference_graph_is_fixed_and_its_module_computes_the_same() -> None:
    from dery.reference import reference_module, reference_onnx, reference_piece

    assert reference_onnx().SerializeToString() == reference_onnx().SerializeToString()
    x = np.random.default_rng(1).random((2, *reference_piece().input_shape), dtype=np.float32)
    got = ort.InferenceSession(reference_onnx().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    with torch.no_grad():
        want = reference_module()(torch.from_numpy(x)).numpy()
    assert got.shape == x.shape and np.abs(got - want).max() <= 1e-4 and (got > 0).mean() > 0.2


def test_a_slow_spell_seen_by_the_reference_gets_more_rounds() -> None:
    """Every call runs 1.3x slower for the first two rounds of windows. Without a quickest reference time the
    spell is what gets recorded; with one, the group takes more rounds until most of the reference's windows
    are back within `SLOW` of it, and every piece keeps its quiet window; a spell that outlasts the extra
    rounds is flagged."""
    from dery.reference import Pace, measure_referenced

    method = Method(windows=2, warmup_s=0, min_iters=10, window_s=0, extra_windows=0, slow_rounds=4)

    def group(spell_calls: int, quickest: float | None) -> tuple[list[float], float, bool, int]:
        clock = itertools.count()

        def step(ms: float) -> Callable[[], float]:
            return lambda: ms * (1.3 if next(clock) < spell_calls else 1.0)

        timings, reference, anchor, slow = measure_referenced([step(2.0), step(5.0)], step(1.0), method,
                                                              Pace(quickest))
        assert anchor == reference  # no anchor yet: this group's reference time becomes it
        return [t.timed_ms for t in timings], reference, slow, timings[0].windows

    spell = 2 * 3 * 11  # two rounds of one window (a warm-up call and ten timed calls) for three steps
    assert group(spell, None) == ([2.6, 6.5], 1.3, False, 2)
    assert group(spell, 1.0) == ([2.0, 5.0], 1.0, False, 5)
    assert group(10**6, 1.0) == ([2.6, 6.5], 1.3, True, 6)


def test_a_drift_the_reference_shares_cancels_out_of_every_latency(monkeypatch) -> None:
    """The machine's speed drifts from round to round of windows (every step alike). Each latency is the
    piece's speed relative to the reference's window next to it, times the anchor: exact in every group,
    whatever the drift; the fastest window as timed, the control, is off by the drift of its group."""
    from dery import measure as measure_module
    from dery.reference import Pace, measure_referenced

    method = Method(windows=3, warmup_s=0, min_iters=10, window_s=0, extra_windows=0, slow_rounds=0)
    real_window = measure_module._window
    taken = [itertools.count()]
    now = [0]

    def window(step, m):
        now[0] = next(taken[0]) // 3  # three steps: one round of windows
        time.sleep(0.002)  # so that the reference window next to a piece's is the nearest one in time
        return real_window(step, m)

    monkeypatch.setattr(measure_module, "_window", window)

    def group(drift: Callable[[int], float]) -> tuple[list[float], list[float]]:
        def step(ms: float) -> Callable[[], float]:
            return lambda: ms * drift(now[0])

        taken[0] = itertools.count()
        timings, _, anchor, _ = measure_referenced([step(2.0), step(0.5)], step(4.0), method, Pace(4.0, 5.0))
        assert anchor == 5.0
        return [t.median_ms for t in timings], [t.timed_ms for t in timings]

    quick, quick_timed = group(lambda r: 1.0)
    assert quick == pytest.approx([2.5, 0.625], rel=1e-12) and quick_timed == [2.0, 0.5]
    for drift in (lambda r: 1.1, lambda r: 1.08 + 0.07 * r, lambda r: 1.3 - 0.1 * r):
        anchored, timed = group(drift)
        assert anchored == pytest.approx(quick, rel=1e-12)
        assert all(t / q - 1 > 0.05 for t, q in zip(timed, quick_timed))


def test_entries_merged_from_another_anchor_are_rescaled_to_the_earliest(tmp_path) -> None:
    """Two machines of one device name anchor their latencies at their own reference times; a store that reads
    both rescales the later anchor's records and points to the earlier one's, and leaves other groups be."""
    from dery.cache import Cache
    from dery.profile_store import CalibrationPoint, write_table
    from dery.reference import Pace

    def point(anchor: float, ms: float, device: str = "cpu-a") -> CalibrationPoint:
        return CalibrationPoint("cpu", device, "onnxruntime", "1.0", "fp32", 1, f"as{anchor}", ms, ms / 2, 1, ms,
                                "2026-02-01T00:00:00+00:00", anchor)

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_table(a, [record("x", ms=1.0, reference=4.2, anchor=4.0)], [point(4.0, 1.0)])
    write_table(b, [record("y", when="2026-06-01T00:00:00+00:00", ms=2.5, reference=5.1, anchor=5.0),
                    record("z", ms=3.0, reference=6.0, anchor=6.0, device="cpu-b")], [point(5.0, 2.5)])
    merge_tables([b, a], tmp_path / "c.json")
    store = ProfileStore(Cache(tmp_path / "cache"), "cpu", extra=[tmp_path / "c.json"])
    assert store.get(record("x")).median_ms == 1.0 and store.get(record("y")).median_ms == pytest.approx(2.0)
    assert store.get(record("y")).anchor_ms == 4.0 and store.get(record("y")).reference_ms == 5.1
    assert store.get(record("z", device="cpu-b")).median_ms == 3.0
    assert store.pace(record("y").group) == Pace(4.2, 4.0)
    assert store.pace(record("z", device="cpu-b").group) == Pace(6.0, 6.0)
    rescaled = {p.assembly: p for p in store.points.values()}["as5.0"]
    assert (rescaled.blocks_ms, rescaled.boundaries_ms, rescaled.measured_ms) == pytest.approx((2.0, 1.0, 2.0))


def test_store_writes_each_record_at_once_and_reads_it_back(tmp_path) -> None:
    from dery.cache import Cache

    store = ProfileStore(Cache(tmp_path), "cpu")
    store.add_all([record("a")])
    on_disk = json.loads(store.path.read_text())
    assert on_disk["schema"] == SCHEMA and len(on_disk["records"]) == 1
    store.add_all([record("b", ms=2.0)])
    again = ProfileStore(Cache(tmp_path), "cpu")
    assert again.get(record("b")).median_ms == 2.0 and again.get(record("a")).median_ms == 1.0
    assert again.get(record("b", device="cpu-other")) is None


@pytest.mark.parametrize("content", ["{ broken", json.dumps({"schema": "other/9"}),
                                     json.dumps({"schema": SCHEMA, "records": [{"fingerprint": "x"}]})])
def test_damaged_store_is_reported_by_path_and_left_alone(tmp_path, content) -> None:
    from dery.cache import Cache

    path = tmp_path / "profiles" / "cpu.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DeryError) as info:
        ProfileStore(Cache(tmp_path), "cpu")
    assert str(path) in str(info.value) and "damaged" in str(info.value)
    assert path.read_text() == content


@pytest.mark.parametrize("schema", [f"dery.profile/{n}" for n in range(1, 6)])
def test_a_table_from_an_older_dery_is_refused_by_name_and_left_alone(tmp_path, schema) -> None:
    from dery.cache import Cache

    path = tmp_path / "profiles" / "cpu.json"
    path.parent.mkdir(parents=True)
    content = json.dumps({"schema": schema, "records": [], "calibration": []})
    path.write_text(content)
    with pytest.raises(DeryError, match=rf"older dery \({schema}") as info:
        ProfileStore(Cache(tmp_path), "cpu")
    assert str(path) in str(info.value) and path.read_text() == content


def test_merge_keeps_the_union_and_the_newer_record(tmp_path) -> None:
    from dery.profile_store import write_table

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_table(a, [record("x", ms=1.0), record("y")], [])
    write_table(b, [record("x", when="2026-06-01T00:00:00+00:00", ms=3.0), record("z")], [])
    summary = merge_tables([a, b], tmp_path / "c.json")
    assert summary["records"] == 3
    merged = {r["fingerprint"]: r for r in json.loads((tmp_path / "c.json").read_text())["records"]}
    assert set(merged) == {"x", "y", "z"} and merged["x"]["median_ms"] == 3.0


def test_interrupted_profiling_resumes_without_remeasuring(tiny, tmp_path, monkeypatch) -> None:
    from dery.backends import onnxruntime as ob
    from dery.cache import Cache

    items = dict(list(pieces(tiny.lowered, tiny.partition, tiny.stitches, 1, tiny.cache).items())[:6])
    store = ProfileStore(Cache(tmp_path), "cpu")
    target = get_target("cpu")
    real = ob.step
    calls: list[str] = []

    def counted(piece, tgt):
        if piece.name != "reference":
            calls.append(piece.name)
        return real(piece, tgt)

    def failing(piece, tgt):
        if len(calls) == 5:  # in the third chunk of two
            raise KeyboardInterrupt
        return counted(piece, tgt)

    monkeypatch.setattr(ob, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_records(items, target, store, method=QUICK, settings=Profiling(chunk=2))
    assert len(json.loads(store.path.read_text())["records"]) == 4
    calls.clear()
    monkeypatch.setattr(ob, "step", counted)
    steady = Profiling(slow_retries=0)  # measuring a slow group again is tested on its own below
    found, measured = ensure_records(items, target, ProfileStore(Cache(tmp_path), "cpu"), method=QUICK,
                                     settings=steady)
    assert len(measured) == 2 and len(calls) == 2 and len(found) == 6
    stored = json.loads(store.path.read_text())["records"]
    assert len({(r["when"], r["reference_ms"]) for r in stored}) >= 2 and all(r["reference_ms"] > 0 for r in stored)
    calls.clear()
    _, measured = ensure_records(items, target, ProfileStore(Cache(tmp_path), "cpu"), method=QUICK, settings=steady)
    assert measured == [] and calls == []


def test_records_serialise_exactly() -> None:
    r = record("q")
    from dery.ir import from_json

    assert from_json(LatencyRecord, json.loads(json.dumps(to_json(r)))) == r
    assert dataclasses.replace(r, median_ms=9.0).key == r.key


def test_calibration_recovers_a_planted_correction() -> None:
    from dery.profile_store import CalibrationPoint, fit_calibration

    rng = np.random.default_rng(0)
    pts = []
    for i in range(30):
        b, s, n = rng.uniform(0.5, 2.0), rng.uniform(-0.1, 0.3), int(rng.integers(0, 4))
        y = -0.05 + 0.9 * b + 1.5 * s + 0.02 * n
        pts.append(CalibrationPoint("cpu", "d", "onnxruntime", "1", "fp32", 1, f"a{i}", b, s, n, y, "t"))
    cal = fit_calibration(pts)
    assert cal.points == 30 and cal.max_error < 0.01
    assert cal.block_scale == pytest.approx(0.9, abs=0.02) and cal.boundary_scale == pytest.approx(1.5, abs=0.1)
    assert cal.predict(1.0, 0.1, 2) == pytest.approx(-0.05 + 0.9 + 0.15 + 0.04, rel=0.02)
    assert cal.boundary_ms(0.05, True) == pytest.approx(1.5 * 0.05 + 0.02, rel=0.05)
    assert cal.boundary_ms(-0.01, False) == pytest.approx(1.5 * -0.01, rel=0.05)
    single = fit_calibration(pts[:1])
    assert (single.block_scale, single.intercept_ms, single.points) == (1.0, 0.0, 1)
    assert cal.fitted and not single.fitted


def test_the_fit_is_kept_only_where_it_predicts_left_out_points_better_than_the_plain_sum() -> None:
    """Engines at their in-context sum within +-2%, with small boundaries, and one read a third slow: the
    least-squares fit leans on the slow one (its boundary scale moves far from 1) and predicts fewer left-out
    points within 5% than the plain sum does, so the plain sum is kept."""
    from dery.profile_store import CalibrationPoint, fit_calibration

    rng = np.random.default_rng(1)
    pts = []
    for i in range(18):
        b, s, n = rng.uniform(0.05, 0.2), rng.uniform(-0.004, 0.004), int(rng.integers(0, 4))
        y = (b + s) * (1.33 if i == 0 else rng.uniform(0.98, 1.02))
        pts.append(CalibrationPoint("cpu", "d", "onnxruntime", "1", "fp32", 1, f"a{i}", b, s, n, y, "t"))
    fit = fit_calibration(pts, choose=False)
    chosen = fit_calibration(pts)
    assert fit.fitted and abs(fit.boundary_scale - 1) > 0.5
    assert not chosen.fitted and (chosen.block_scale, chosen.boundary_scale, chosen.intercept_ms) == (1.0, 1.0, 0.0)
    assert chosen.max_error == pytest.approx(1 - 1 / 1.33, rel=1e-9)


def test_calibration_points_of_the_zoo_are_stored_once(tiny) -> None:
    from dery.passes.calibrate import calibrate
    from dery.profile_store import group_of

    group = group_of(tiny.target, tiny.device)
    first = calibrate(tiny.lowered, tiny.partition, tiny.stitches, tiny.profiler, tiny.target, tiny.store,
                      assemblies=2)
    before = tiny.store.calibration_points(group)
    assert len(before) >= len(tiny.lowered) + 2 and any(p.stitches > 0 for p in before)
    again = calibrate(tiny.lowered, tiny.partition, tiny.stitches, tiny.profiler, tiny.target, tiny.store,
                      assemblies=2)
    assert tiny.store.calibration_points(group) == before and again == first


def test_a_calibration_engine_read_far_off_its_sum_is_measured_again(tiny, tmp_path, monkeypatch) -> None:
    """On a fresh store, the first reading of one calibration engine comes out 3x slow: it is measured again
    and its point keeps the quicker reading; the rest are read once. With the check off (the control) the slow
    reading is the point, and the fit moves."""
    from dery import defaults
    from dery.cache import Cache
    from dery.passes.calibrate import calibrate, random_assemblies
    from dery.passes.verify import identity
    from dery.profile_store import group_of

    drawn = 3  # random assemblies besides the members (the default draws none)
    odd = random_assemblies(tiny.partition, tiny.stitches, drawn, defaults.SEED)[0]
    fingerprint = tiny.profiler.assembly(odd).fingerprint
    readings: list[float] = []
    real = profile_pass.measure_pieces

    def disturbed(chunk, *args):
        records = real(chunk, *args)
        for i, piece in enumerate(chunk):
            if piece.fingerprint == fingerprint:
                slow = not readings
                records[i] = dataclasses.replace(records[i], median_ms=records[i].median_ms * (3 if slow else 1))
                readings.append(records[i].median_ms)
        return records

    monkeypatch.setattr(profile_pass, "measure_pieces", disturbed)
    fits = {}
    for off in (Profiling().calibration_off, float("inf")):
        readings.clear()
        store = ProfileStore(Cache(tmp_path / str(off)), "cpu")
        fits[off] = calibrate(tiny.lowered, tiny.partition, tiny.stitches, tiny.profiler, tiny.target, store,
                              assemblies=drawn, settings=Profiling(calibration_off=off))
        points = {p.assembly: p for p in store.calibration_points(group_of(tiny.target, tiny.device))}
        kept = points[identity(odd, tiny.partition, tiny.stitches, tiny.lowered)].measured_ms
        assert len(points) == len(tiny.partition.models) + drawn
        if off == float("inf"):
            assert len(readings) == 1 and kept == readings[0]
        else:
            assert len(readings) == 2 and readings[1] < readings[0] and kept == readings[1]
    assert fits[Profiling().calibration_off].max_error < fits[float("inf")].max_error


def test_the_program_prices_every_assembly_at_its_calibrated_in_context_sum(tiny, tmp_path) -> None:
    """With K = 3 an assembly's in-context latency (blocks, each boundary's joint less its blocks, the
    adjacent pair's triple less its joints plus its middle block) telescopes to its triple's record: the
    program prices every assembly with a stitch at each switch at that record through the calibration's
    coefficients, and lists no other assembly."""
    from dery.driver import Search

    assert tiny.partition.k == 3
    space = Search(tiny, tmp_path).space(1e9)
    problem = space.problem
    assert all(t.resources["latency_ms"] >= 0 for t in problem.transitions)
    joins = {(t.source, t.target) for t in problem.transitions}
    cal = tiny.calibration
    priced = 0
    for models in itertools.product(tiny.partition.models, repeat=3):
        chosen = assembly_ids(models)
        stitched = all(a == b or tiny.stitches.get(a, b, j) is not None
                       for j, (a, b) in enumerate(zip(models, models[1:])))
        assert all(pair in joins for pair in zip(chosen, chosen[1:])) == stitched, models
        if not stitched:
            continue
        assert chosen_models(space, Solution("optimal", tuple(chosen))) == models
        blocks = sum(tiny.costs.blocks[m, k].median_ms for k, m in enumerate(models))
        triple = tiny.costs.triples[(*models, 0)].median_ms
        want = (cal.intercept_ms + cal.block_scale * blocks + cal.boundary_scale * (triple - blocks)
                + cal.per_stitch_ms * sum(a != b for a, b in zip(models, models[1:])))
        assert problem.evaluate(chosen)[1]["latency_ms"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        priced += 1
    assert priced > len(tiny.partition.models)


def test_measuring_on_demand_gives_the_full_tables_answers(tiny, tmp_path) -> None:
    """On demand, a compile asks for the blocks, the members' own pieces, the calibration's and what the
    solutions rest on; every floor lies below every real term of the full table, the calibration is the same,
    and at budgets across the members' range the best five solutions are the full table's."""
    from dery.driver import Search
    from dery.passes.calibrate import calibrate
    from dery.solver import best_solutions

    full = tiny.costs
    lazy = profile_pass.profile(tiny.lowered, tiny.partition, tiny.stitches, tiny.target, tiny.store, tiny.cache,
                                on_demand=True)
    cal = calibrate(tiny.lowered, tiny.partition, tiny.stitches, lazy, tiny.target, tiny.store)
    lazy.settle_floors()
    assert cal == tiny.calibration and not lazy.fresh  # the store the full run filled answers every piece
    first = len(lazy.found)
    boundary_floor, context_floor = lazy.floors
    assert boundary_floor < min(full.boundary_ms(*k) for k in full.joints)
    assert context_floor < min(full.context_ms(*k) for k in full.triples)
    # Each term not measured yet takes its own floor (below its members' own terms), and no real term is lower.
    costs = lazy.costs()
    floored = [k for k in full.joints if k not in costs.joints]
    assert floored and all(costs.boundary_ms(*k) <= full.boundary_ms(*k) for k in floored)
    assert any(costs.boundary_ms(*k) > boundary_floor for k in floored)
    assert all(costs.context_ms(*k) <= full.context_ms(*k) for k in full.triples if not costs.context_measured(*k))
    session = dataclasses.replace(tiny, profiler=lazy, costs=costs, calibration=cal)
    assert session.costs.missing(tiny.partition.models[:1] * 3) == []
    lat = sorted(r.median_ms for r in full.networks.values())
    top5 = lambda p: best_solutions(p, 5)  # noqa: E731
    for i in range(9):
        budget = 0.9 * lat[0] + (1.1 * lat[-1] - 0.9 * lat[0]) * i / 8
        _, want = Search(tiny, tmp_path).settled(budget, top5)
        _, got = Search(session, tmp_path).settled(budget, top5)
        assert [s.chosen for s in got] == [s.chosen for s in want], budget
        assert all(g.totals == pytest.approx(w.totals, rel=1e-12) for g, w in zip(got, want)), budget
    pieces_asked = len(lazy.found)
    assert first < pieces_asked < len(profile_pass.pieces(tiny.lowered, tiny.partition, tiny.stitches, 1,
                                                          tiny.cache))


def test_an_assembly_adds_its_blocks_boundaries_and_context_terms(tiny) -> None:
    assert tiny.partition.k == 3 and tiny.costs.triples
    for (a, b, c, _), rec in tiny.costs.triples.items():
        context = rec.median_ms + tiny.costs.blocks[b, 1].median_ms - tiny.costs.joints[a, b, 0].median_ms \
            - tiny.costs.joints[b, c, 1].median_ms
        assert tiny.costs.context_ms(a, b, c, 0) == context
        blocks, boundaries = tiny.costs.sums((a, b, c))
        assert blocks == sum(tiny.costs.blocks[m, k].median_ms for k, m in enumerate((a, b, c)))
        assert boundaries == pytest.approx(tiny.costs.boundary_ms(a, b, 0) + tiny.costs.boundary_ms(b, c, 1)
                                           + context, rel=1e-12, abs=1e-15)
        assert tiny.costs.sums((a, b, c), contexts=False)[1] == pytest.approx(boundaries - context, abs=1e-15)
        assert tiny.costs.used((a, b, c)) == [tiny.costs.blocks[a, 0], tiny.costs.blocks[b, 1],
                                              tiny.costs.blocks[c, 2], tiny.costs.joints[a, b, 0],
                                              tiny.costs.joints[b, c, 1], rec]


def scripted_machine(tiny, monkeypatch, speeds: Callable[[int], float], odd: Callable[[int, str], float],
                     seen: float = 0.5):
    """The tiny zoo's pieces on a scripted machine: every piece has a fixed time (a triple about its joints
    less its middle block: small context terms), measurement group g runs `speeds(g)` times slower, of which
    the reference sees the share `seen` (in log terms; anchoring removes that share), and piece p `odd(g, p)`
    slower on top. Returns (items, base times by fingerprint, each group's anchored factor)."""
    from dery.backends import onnxruntime as ob

    items = pieces(tiny.lowered, tiny.partition, tiny.stitches, 1, tiny.cache)
    rng = np.random.default_rng(0)
    ms = {k: float(rng.uniform(1, 2) if k[0] == "block" else rng.uniform(4, 5)) for k in items
          if k[0] in ("block", "network")}
    ms.update({k: ms["block", k[1], k[3]] + ms["block", k[2], k[3] + 1] + float(rng.uniform(0, 0.2))
               for k in items if k[0] == "joint"})
    ms.update({k: ms["joint", k[1], k[2], k[4]] + ms["joint", k[2], k[3], k[4] + 1] - ms["block", k[2], k[4] + 1]
               + float(rng.uniform(-0.1, 0.1)) for k in items if k[0] == "triple"})
    base = {p.fingerprint: ms[k] for k, p in items.items()}
    factors: list[float] = []

    def scripted(piece, tgt):
        g = len(factors)  # a group's pieces are made before its reference
        speed = speeds(g)
        if piece.name == "reference":
            factors.append(float(speed ** (1 - seen) * speeds(0) ** seen))  # the first group's reference: anchor
            return lambda: 4.0 * speed ** seen
        return lambda: base[piece.fingerprint] * speed * odd(g, piece.name)

    monkeypatch.setattr(ob, "step", scripted)
    return items, base, factors


def true_context(items, base, triple: tuple) -> float:
    """A triple's context term from the scripted machine's fixed times."""
    triple_ms, middle, first, second = (base[items[k].fingerprint] for k in profile_pass.parts(triple))
    return triple_ms + middle - first - second


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_context_terms_combine_records_of_groups_measured_at_different_speeds(tiny, tmp_path, monkeypatch) -> None:
    """Each chunk runs 1.0-1.3x slow and the reference graph sees it: every record is anchored to the first
    group's speed, so a context term taken from four records of different groups is exact; each piece is
    timed once (no odd term, nothing measured again), and a second run measures nothing. The control - the
    same terms from the latencies as timed, each at its own chunk's speed - is wrong for most triples."""
    from dery import measure as measure_module
    from dery.cache import Cache
    from dery.reference import SLOW

    real_window = measure_module._window
    windows: list[int] = []
    monkeypatch.setattr(measure_module, "_window", lambda step, method: windows.append(1) or real_window(step, method))
    speeds = (1.0, 1.1, 1.2, 1.3)
    settings = Profiling(chunk=8, slow_retries=0)  # the groups' speeds are scripted: measuring again would not help
    items, base, groups = scripted_machine(tiny, monkeypatch, lambda g: speeds[g % 4], lambda g, p: 1.0, seen=1.0)
    store = ProfileStore(Cache(tmp_path), "cpu")
    costs = profile_pass.profile(tiny.lowered, tiny.partition, tiny.stitches, get_target("cpu"), store, tiny.cache,
                                 method=QUICK, settings=settings).costs()
    chunks = -(-len(items) // settings.chunk)
    assert chunks > 2 and groups == [1.0] * chunks
    sizes = [min(settings.chunk, len(items) - g * settings.chunk) for g in range(chunks)]
    rounds = [QUICK.windows + (QUICK.slow_rounds if speeds[g % 4] > 1 + SLOW else 0) for g in range(chunks)]
    assert costs.measured == len(items) and len(windows) == sum(r * (n + 1) for r, n in zip(rounds, sizes))
    order = {k: i for i, k in enumerate(items)}
    wrong = 0
    for key in [k for k in items if k[0] == "triple"]:
        truth = true_context(items, base, key)
        assert costs.context_ms(*key[1:]) == pytest.approx(truth, rel=1e-9, abs=1e-12)
        triple, middle, first, second = (base[items[k].fingerprint] * speeds[order[k] // settings.chunk % 4]
                                         for k in profile_pass.parts(key))
        wrong += abs(triple + middle - first - second - truth) > 0.05
    assert wrong > len(costs.triples) / 2
    again = profile_pass.profile(tiny.lowered, tiny.partition, tiny.stitches, get_target("cpu"),
                                 ProfileStore(Cache(tmp_path), "cpu"), tiny.cache, method=QUICK,
                                 settings=settings).costs()
    assert again.measured == 0 and again.triples == costs.triples


def test_a_first_group_measured_in_a_slow_spell_is_measured_again_at_the_end(tiny, tmp_path, monkeypatch) -> None:
    """On a fresh store the first group runs 1.3x slow, half of which the reference sees: with nothing
    quicker before it, it takes no extra rounds and its records come out 14% slower than every later group's.
    Once the later groups have shown a quicker reference, it is measured again (quiet now) and every record
    is at one speed; without the retry (the control) the first group's records stay off."""
    from dery.cache import Cache

    instant = Method(windows=2, warmup_s=0.0, min_iters=3, window_s=0.0, extra_windows=0)
    timed: list = []
    real = profile_pass.measure_pieces
    monkeypatch.setattr(profile_pass, "measure_pieces", lambda chunk, *args: timed.extend(chunk) or real(chunk, *args))
    for retries in (1, 0):
        timed.clear()
        items, base, _ = scripted_machine(tiny, monkeypatch, lambda g: 1.3 if g == 0 else 1.0, lambda g, p: 1.0)
        settings = Profiling(chunk=16, slow_retries=retries)
        profiler = profile_pass.profile(tiny.lowered, tiny.partition, tiny.stitches, get_target("cpu"),
                                        ProfileStore(Cache(tmp_path / str(retries)), "cpu"), tiny.cache,
                                        method=instant, settings=settings)
        speed = {k: r.median_ms / base[items[k].fingerprint] for k, r in profiler.found.items()}
        first = list(items)[:settings.chunk]
        assert len(speed) == len(items) > 2 * settings.chunk
        assert all(v == pytest.approx(1.3 ** 0.5, rel=1e-9) for k, v in speed.items() if k not in first)
        assert all(speed[k] == pytest.approx(1.3 ** 0.5 if retries else 1.3, rel=1e-9) for k in first)
        assert len(timed) == len(items) + (settings.chunk if retries else 0)


def test_a_piece_caught_alone_in_a_slow_spell_is_measured_again(tiny, tmp_path, monkeypatch) -> None:
    """One joint runs 1.5x slow in every window of its group (the rest of the machine is quiet), which puts
    the context terms resting on it far beyond real ones: their four pieces are measured again together and
    every context term comes out exact. With no retries (the control) those terms stay wrong."""
    from dery.cache import Cache

    listed = pieces(tiny.lowered, tiny.partition, tiny.stitches, 1, tiny.cache)
    joint = next(k for k in listed if k[0] == "joint")
    timed: list = []
    real = profile_pass.measure_pieces
    monkeypatch.setattr(profile_pass, "measure_pieces", lambda chunk, *args: timed.extend(chunk) or real(chunk, *args))
    for retries, exact in ((Profiling().context_retries, True), (0, False)):
        caught: list[int] = []
        timed.clear()

        def odd(g: int, name: str, caught: list[int] = caught) -> float:
            if name != listed[joint].name:
                return 1.0
            caught[:] = caught or [g]
            return 1.5 if g == caught[0] else 1.0

        items, base, _ = scripted_machine(tiny, monkeypatch, lambda g: 1.0, odd)
        costs = profile_pass.profile(tiny.lowered, tiny.partition, tiny.stitches, get_target("cpu"),
                                     ProfileStore(Cache(tmp_path / str(retries)), "cpu"), tiny.cache, method=QUICK,
                                     settings=Profiling(context_retries=retries)).costs()
        resting = [k for k in items if k[0] == "triple" and joint in profile_pass.parts(k)]
        assert resting and caught
        for key in resting:
            right = costs.context_ms(*key[1:]) == pytest.approx(true_context(items, base, key), rel=1e-9, abs=1e-12)
            assert right == exact, (retries, key)
        again = {p for k in resting for p in profile_pass.parts(k)}
        assert costs.measured == len(items) and len(timed) == len(items) + (len(again) if exact else 0)


@pytest.mark.slow  # real timings of the tiny zoo's members: a load-sensitive measured effect (failed 1 run in 3 here)
def test_boundaries_in_context_bring_block_sums_to_the_whole_network(tiny) -> None:
    """Blocks timed alone pay a call each and lose fusion across boundaries: over the members, the in-context
    sums (blocks plus their boundaries' joints less their blocks) miss the members timed whole by less than
    the block sums do."""
    in_context, block_sum = [], []
    for m in tiny.partition.models:
        blocks, boundaries = tiny.costs.sums((m,) * tiny.partition.k)
        whole = tiny.costs.networks[m].median_ms
        in_context.append(abs(blocks + boundaries - whole) / whole)
        block_sum.append(abs(blocks - whole) / whole)
    assert np.mean(in_context) < np.mean(block_sum), (in_context, block_sum)
