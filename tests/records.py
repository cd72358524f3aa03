"""Latency records with the fields a test chooses and fixed timings."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dery.ir import Group, LatencyRecord


def record(fp: str, when: str = "2026-01-01T00:00:00+00:00", ms: float = 1.0, device: str = "cpu-a",
           reference: float = 0.0, anchor: float = 0.0) -> LatencyRecord:
    """A record of piece `fp` taking `ms` on a cpu target with onnxruntime 1.0."""
    return LatencyRecord.in_group(Group("cpu", device, "onnxruntime", "1.0", "fp32", 1), fp, (1, 3, 8, 8),
                                  median_ms=ms, p90_ms=ms, min_ms=ms, cv=0.0, runs=10, when=when, how="test",
                                  reference_ms=reference, anchor_ms=anchor)


def readings_over(monkeypatch, ms: Callable[[], float]) -> None:
    """Every closed-loop result reads `ms()` (a member's record as much as a mix's engine), so that no round
    fits whatever the answer is."""
    from dery.driver import Search

    real = Search.realise

    def over(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        return replace(result, timing=replace(result.timing, median_ms=ms()))

    monkeypatch.setattr(Search, "realise", over)
