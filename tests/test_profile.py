"""Measurement method, block extraction, the profile store (atomic, resumable, mergeable, loud on damage)."""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dery.errors import DeryError
from dery.ir import LatencyRecord, to_json
from dery.measure import Method, measure, summarize
from dery.passes.profile import ensure_records, pieces
from dery.profile_store import SCHEMA, ProfileStore, merge_tables
from dery.targets import get_target

QUICK = Method(warmup_s=0.01, min_iters=15, min_time_s=0.05, retries=1)


def test_twice_the_work_measures_twice_the_time() -> None:
    one = measure(lambda: time.sleep(0.002), QUICK)
    two = measure(lambda: time.sleep(0.004), QUICK)
    assert one.runs >= 15 and one.median_ms >= 2.0
    assert 1.6 < two.median_ms / one.median_ms < 2.4


def test_a_device_timer_is_used_verbatim_and_noise_triggers_a_remeasure() -> None:
    values = iter([5.0] * 1000)
    t = measure(lambda: next(values), Method(warmup_s=0, min_iters=10, min_time_s=0, retries=2))
    assert t.median_ms == 5.0 and t.cv == 0.0 and t.attempts == 1 and not t.noisy
    rng = np.random.default_rng(0)
    calls = {"n": 0}

    def flaky() -> float:
        calls["n"] += 1
        return float(rng.exponential(5.0)) if calls["n"] <= 12 else 5.0

    t = measure(flaky, Method(warmup_s=0, min_iters=10, min_time_s=0, max_cv=0.1, retries=2))
    assert t.attempts == 2 and t.cv == 0.0 and t.median_ms == 5.0


def test_summary_statistics() -> None:
    t = summarize(np.array([1.0, 2.0, 3.0, 4.0, 10.0]), 1, 0.5)
    assert t.median_ms == 3.0 and t.min_ms == 1.0 and t.mean_ms == 4.0 and t.p90_ms == pytest.approx(7.6)
    assert t.cv == pytest.approx(np.std([1, 2, 3, 4, 10]) / 4.0) and t.noisy


def test_every_extracted_block_and_stitch_equals_its_torch_module(tiny) -> None:
    items = pieces(tiny.lowered, tiny.partition, tiny.stitches, 1, tiny.cache)
    kinds = {k[0] for k in items}
    assert kinds == {"block", "stitch", "network"}
    assert sum(k[0] == "block" for k in items) == 3 * len(tiny.lowered)
    for key, piece in items.items():
        sess = ort.InferenceSession(piece.onnx.SerializeToString(), providers=["CPUExecutionProvider"])
        x = torch.rand(1, *piece.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = piece.module()(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == ref.shape, key
        assert np.abs(got - ref).max() <= 1e-4, key


def record(fp: str, when: str = "2026-01-01T00:00:00+00:00", ms: float = 1.0, device: str = "cpu-a") -> LatencyRecord:
    return LatencyRecord(fp, "cpu", device, "onnxruntime", "1.0", "fp32", 1, (1, 3, 8, 8), ms, ms, ms, 0.0, 10,
                         when, "test")


def test_store_writes_each_record_at_once_and_reads_it_back(tmp_path) -> None:
    from dery.cache import Cache

    store = ProfileStore(Cache(tmp_path), "cpu")
    store.add(record("a"))
    on_disk = json.loads(store.path.read_text())
    assert on_disk["schema"] == SCHEMA and len(on_disk["records"]) == 1
    store.add(record("b", ms=2.0))
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
    real = ob.measure
    calls: list[str] = []

    def failing(piece, tgt, method):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(piece.name)
        return real(piece, tgt, QUICK)

    monkeypatch.setattr(ob, "measure", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_records(items, target, store, method=QUICK)
    assert len(json.loads(store.path.read_text())["records"]) == 3
    calls.clear()
    monkeypatch.setattr(ob, "measure", lambda p, t, m: (calls.append(p.name), real(p, t, QUICK))[1])
    found, measured = ensure_records(items, target, ProfileStore(Cache(tmp_path), "cpu"), method=QUICK)
    assert measured == 3 and len(calls) == 3 and len(found) == 6
    calls.clear()
    _, measured = ensure_records(items, target, ProfileStore(Cache(tmp_path), "cpu"), method=QUICK)
    assert measured == 0 and calls == []


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
        b, s, n = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.3), int(rng.integers(0, 4))
        y = -0.05 + 0.9 * b + 1.5 * s + 0.02 * n
        pts.append(CalibrationPoint("cpu", "d", "onnxruntime", "1", "fp32", 1, f"a{i}", b, s, n, y, "t"))
    cal = fit_calibration(pts)
    assert cal.points == 30 and cal.max_error < 0.01
    assert cal.block_scale == pytest.approx(0.9, abs=0.02) and cal.stitch_scale == pytest.approx(1.5, abs=0.1)
    assert cal.predict(1.0, 0.1, 2) == pytest.approx(-0.05 + 0.9 + 0.15 + 0.04, rel=0.02)
    assert cal.stitch_ms(0.05) == pytest.approx(1.5 * 0.05 + 0.02, rel=0.05)
    saving = dataclasses.replace(cal, per_stitch_ms=-0.1)
    assert saving.stitch_ms(0.05) == 0.0 and saving.stitch_ms(1.0) == pytest.approx(1.5 - 0.1, rel=0.05)
    single = fit_calibration(pts[:1])
    assert (single.block_scale, single.intercept_ms, single.points) == (1.0, 0.0, 1)


def test_calibration_points_of_the_zoo_are_stored_once(tiny) -> None:
    from dery.passes.calibrate import calibrate, group_of

    group = group_of(tiny.target, tiny.device)
    before = tiny.store.calibration_points(group)
    assert len(before) >= len(tiny.lowered) + 1 and any(p.stitches > 0 for p in before)
    cal = calibrate(tiny.lowered, tiny.partition, tiny.stitches, tiny.costs, tiny.target, tiny.store, tiny.cache)
    assert tiny.store.calibration_points(group) == before and cal == tiny.calibration
