"""The measurement method every backend shares.

Warm up for `warmup_s`, then time at least `min_iters` calls and at least
`min_time_s` seconds, one sample per call; report median, p90, min, mean and
the coefficient of variation. When the variation is above `max_cv` the whole
measurement is repeated (up to `retries` times) and the steadiest attempt is
kept; if even that one is noisy the result says so (`noisy`). Inputs are
prepared by the caller before `measure` is called, so the timed region holds
the call alone. A step may return its own elapsed milliseconds (a device timer
such as CUDA events); otherwise the host's monotonic clock times it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Method:
    """How long and how often to time; the defaults suit CPU blocks of 0.01-100 ms."""

    warmup_s: float = 0.1
    min_iters: int = 20
    min_time_s: float = 0.25
    max_iters: int = 100_000
    max_cv: float = 0.10
    retries: int = 2

    def describe(self) -> str:
        return (f"warm-up {self.warmup_s:g}s; >= {self.min_iters} runs and >= {self.min_time_s:g}s; median; "
                f"re-measured up to {self.retries}x when cv > {self.max_cv:g}")


FAST = Method(warmup_s=0.02, min_iters=10, min_time_s=0.05, retries=1)


@dataclass(frozen=True)
class Timing:
    """Summary of one measurement, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    cv: float
    runs: int
    attempts: int
    noisy: bool


def summarize(samples_ms: np.ndarray, attempts: int, max_cv: float) -> Timing:
    """Statistics of a sample of per-call times."""
    s = np.asarray(samples_ms, dtype=np.float64)
    mean = float(s.mean())
    cv = float(s.std() / mean) if mean > 0 else 0.0
    return Timing(float(np.median(s)), float(np.percentile(s, 90)), float(s.min()), mean, cv, int(s.size),
                  attempts, cv > max_cv)


def _sample(step: Callable[[], float | None], method: Method) -> np.ndarray:
    start = time.perf_counter()
    step()
    while time.perf_counter() - start < method.warmup_s:
        step()
    samples = []
    begin = time.perf_counter()
    while len(samples) < method.max_iters and (len(samples) < method.min_iters
                                               or time.perf_counter() - begin < method.min_time_s):
        t0 = time.perf_counter()
        own = step()
        t1 = time.perf_counter()
        samples.append(own if own is not None else (t1 - t0) * 1e3)
    return np.asarray(samples)


def measure(step: Callable[[], float | None], method: Method = Method()) -> Timing:
    """Time `step` by the shared method; re-measure while the variation is high."""
    best: Timing | None = None
    for attempt in range(1, method.retries + 2):
        t = summarize(_sample(step, method), attempt, method.max_cv)
        if best is None or t.cv < best.cv:
            best = Timing(**{**t.__dict__, "attempts": attempt})
        if not t.noisy:
            break
    return Timing(**{**best.__dict__, "attempts": attempt})
