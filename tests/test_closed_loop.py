"""The verify pass and the closed loop when readings are disturbed or the engine overshoots.

Timings are steered through `dery.passes.verify.measure_referenced` (the one call that times an engine), so
the real engine file, backend, cache and driver run while the test decides what each reading says.
"""
from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
from dery.cache import Cache
from dery.cli import compile_main
from dery.defaults import Profiling
from dery.reference import reference_onnx
from dery.targets import get_target
from records import readings_over


@pytest.fixture()
def engine(tmp_path):
    path = tmp_path / "engine.onnx"
    onnx.save(reference_onnx(), path)
    return path


def steered(monkeypatch, disturb, flagged: bool = True):
    """Patch the engine timer (the real engine still runs): reading i (from 0) reads 1.5 ms when disturb(i) (and
    is flagged noisy with `flagged`), 1 ms otherwise."""
    import dery.passes.verify as verify

    real, calls = verify.measure_referenced, []

    def timer(*args, **kwargs):
        (t,), ref, anchor, _ = real(*args, **kwargs)
        bad = disturb(len(calls))
        t = replace(t, noisy=bad and flagged, median_ms=1.5 if bad else 1.0)
        calls.append(t)
        return (t,), ref, anchor, False

    monkeypatch.setattr(verify, "measure_referenced", timer)
    return calls


def test_a_disturbed_reading_is_measured_again_and_the_clean_one_cached(engine, isolated_cache, monkeypatch):
    from dery.passes.verify import measure_engine

    calls = steered(monkeypatch, lambda i: i == 0)
    t = measure_engine(engine, "disturbed-once", get_target("cpu"), Cache())
    assert len(calls) == 2 and not t.noisy and t.median_ms == calls[1].median_ms
    again = measure_engine(engine, "disturbed-once", get_target("cpu"), Cache())
    assert len(calls) == 2 and (again.median_ms, again.noisy) == (t.median_ms, False)  # the cached clean reading


def test_a_reading_disturbed_every_time_is_flagged_and_never_cached(engine, isolated_cache, monkeypatch):
    import dery.passes.verify as verify

    calls = steered(monkeypatch, lambda i: True)
    t = verify.measure_engine(engine, "always-disturbed", get_target("cpu"), Cache())
    assert len(calls) == Profiling().verify_attempts and t.noisy
    assert t.median_ms == min(c.median_ms for c in calls)
    verify.measure_engine(engine, "always-disturbed", get_target("cpu"), Cache(), attempts=2)
    assert len(calls) == Profiling().verify_attempts + 2  # measured again: the noisy figure was not kept


def test_an_unflagged_reading_off_its_prediction_is_measured_again(engine, isolated_cache, monkeypatch):
    """The closed loop's failure seen on an Intel machine: a reading 1.5x too slow that its own windows do not
    flag. Off the prediction, it is measured again, and the clean reading is the one kept and cached."""
    from dery.passes.verify import measure_engine

    calls = steered(monkeypatch, lambda i: i == 0, flagged=False)
    t = measure_engine(engine, "off-once", get_target("cpu"), Cache(), predicted_ms=1.0)
    assert [c.median_ms for c in calls] == [1.5, 1.0] and (t.median_ms, t.noisy) == (1.0, False)
    again = measure_engine(engine, "off-once", get_target("cpu"), Cache(), predicted_ms=1.0)
    assert len(calls) == 2 and again.median_ms == 1.0  # the clean reading was cached


def test_a_reading_off_its_prediction_that_repeats_is_trusted(engine, isolated_cache, monkeypatch):
    """A prediction that is wrong, not a disturbed reading: two clean readings agree, the second is trusted."""
    from dery.passes.verify import measure_engine

    calls = steered(monkeypatch, lambda i: False)
    t = measure_engine(engine, "off-always", get_target("cpu"), Cache(), predicted_ms=0.5)
    assert len(calls) == 2 and (t.median_ms, t.noisy) == (1.0, False)


@pytest.mark.slow  # four closed-loop rounds of compile and measure (measured: 71 s on 2 cores)
def test_an_engine_over_budget_in_every_round_exits_1_with_its_status(tiny, tmp_path, monkeypatch, capsys):
    lat = sorted(r.median_ms for r in tiny.costs.networks.values())
    budget = (lat[0] + lat[-1]) / 2
    readings_over(monkeypatch, lambda: 2 * budget)
    code = compile_main(["--target", "cpu", "--latency-ms", repr(budget), "--zoo", "tiny", "--k", "3",
                         "--max-rounds", "2", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith(f"over budget: {tmp_path / 'model.onnx'} measures {2 * budget:.4g} ms")
    assert err.strip().startswith("dery: over budget:") and len(err.strip().splitlines()) == 1
