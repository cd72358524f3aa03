"""The measurement method every backend shares.

A measurement is made of `windows` separate windows. Each window warms up for
`warmup_s`, then times at least `min_iters` calls and at least `window_s`
seconds, one sample per call, and summarises them by their median. The result
is the fastest window: its median, p90 and coefficient of variation, with the
minimum over all calls. Interference (another process, a neighbour on the
host, a frequency dip) only ever slows a window down, and on a shared machine
it comes in bursts of a fraction of a second to tens of seconds; so pieces
measured together take their windows in turn (`measure_all`), which spreads
each piece's windows over the whole run, and the fastest window is the one the
least disturbed. When the two fastest windows still disagree by more than
`max_spread`, up to `extra_windows` more windows are taken, and a measurement
that stays unsettled says so (`noisy`). A slow spell can also last longer
than a group's windows and slow every one of them alike; a caller that can
tell (dery.reference times a fixed graph with every group) passes `settled`,
and while it says no, up to `slow_rounds` more rounds of windows are taken.
Inputs are prepared by the caller
before `measure` is called, so the timed region holds the call alone. A step
may return its own elapsed milliseconds (a device timer such as CUDA events);
otherwise the host's monotonic clock times it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Step = Callable[[], float | None]


@dataclass(frozen=True)
class Method:
    """How long and how often to time; the defaults suit CPU pieces of 0.01-100 ms."""

    windows: int = 5
    warmup_s: float = 0.02
    min_iters: int = 10
    # A quarter of the 0.06 s this was: pieces repeat as well across passes and read within 0.43% (median) of
    # the longer windows', in 0.47x the time (benchmarks/results/window.md).
    window_s: float = 0.015
    max_iters: int = 100_000
    max_spread: float = 0.05
    extra_windows: int = 5
    slow_rounds: int = 10

    def describe(self) -> str:
        return (f"{self.windows} windows taken in turn with the other pieces, each: warm-up {self.warmup_s:g}s, "
                f">= {self.min_iters} runs and >= {self.window_s:g}s, median; the fastest window; up to "
                f"{self.extra_windows} more windows when the two fastest differ by > {self.max_spread:g}; up to "
                f"{self.slow_rounds} more rounds while the reference graph runs slow")


FAST = Method(windows=2, warmup_s=0.01, min_iters=10, window_s=0.02, extra_windows=0, slow_rounds=0)


@dataclass(frozen=True)
class Timing:
    """Summary of one measurement, in milliseconds: the fastest window's median, p90, mean and cv, the minimum
    over every call, all calls made, the windows taken, the relative gap between the two fastest windows, and
    the median over the windows' medians (what a typical window saw); then every window's median and start
    (seconds on the host's monotonic clock), in the order taken, which dery.reference pairs with its own."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    cv: float
    runs: int
    windows: int
    spread: float
    noisy: bool
    windows_median_ms: float
    window_medians: tuple[float, ...] = ()
    window_starts: tuple[float, ...] = ()

    @property
    def timed_ms(self) -> float:
        """The fastest window's median as timed (dery.reference rescales `median_ms`, never this)."""
        return min(self.window_medians)


def summarize(windows: Sequence[np.ndarray], max_spread: float, starts: Sequence[float] = ()) -> Timing:
    """Statistics of the per-call times of each window (one array per window, started at `starts`)."""
    medians = np.array([np.median(w) for w in windows])
    order = np.argsort(medians, kind="stable")
    best = np.asarray(windows[order[0]], dtype=np.float64)
    mean = float(best.mean())
    spread = float(medians[order[1]] / medians[order[0]] - 1.0) if len(windows) > 1 and medians[order[0]] > 0 \
        else 0.0
    return Timing(float(medians[order[0]]), float(np.percentile(best, 90)), float(min(np.min(w) for w in windows)),
                  mean, float(best.std() / mean) if mean > 0 else 0.0, int(sum(len(w) for w in windows)),
                  len(windows), spread, spread > max_spread, float(np.median(medians)),
                  tuple(map(float, medians)), tuple(map(float, starts)))


def _window(step: Step, method: Method) -> np.ndarray:
    start = time.perf_counter()
    step()
    while time.perf_counter() - start < method.warmup_s:
        step()
    samples = []
    begin = time.perf_counter()
    while len(samples) < method.max_iters and (len(samples) < method.min_iters
                                               or time.perf_counter() - begin < method.window_s):
        t0 = time.perf_counter()
        own = step()
        t1 = time.perf_counter()
        samples.append(own if own is not None else (t1 - t0) * 1e3)
    return np.asarray(samples, dtype=np.float64)


def measure_all(steps: Sequence[Step], method: Method = Method(),
                settled: Callable[[list[Timing]], bool] = lambda timings: True, pacer: int | None = None
                ) -> list[Timing]:
    """Time several steps by the shared method, their windows taken in turn (round robin); then more rounds
    of windows for every step while `settled` says the machine ran slow. The step `pacer` (the reference
    graph) takes every round, so every other window has one of its windows next to it."""
    windows: list[list[np.ndarray]] = [[] for _ in steps]
    starts: list[list[float]] = [[] for _ in steps]

    def round_robin(indices: list[int], r: int) -> None:
        for i in indices if r % 2 == 0 else indices[::-1]:
            starts[i].append(time.perf_counter())
            windows[i].append(_window(steps[i], method))

    todo = list(range(len(steps)))
    for r in range(method.windows + method.extra_windows):
        if r >= method.windows:
            todo = [i for i in todo if summarize(windows[i], method.max_spread).noisy]
            if todo and pacer is not None and pacer not in todo:
                todo = [pacer, *todo]
        round_robin(todo, r)
    for r in range(method.slow_rounds):
        if settled([summarize(w, method.max_spread) for w in windows]):
            break
        round_robin(list(range(len(steps))), r)
    return [summarize(w, method.max_spread, s) for w, s in zip(windows, starts)]


def measure(step: Step, method: Method = Method()) -> Timing:
    """Time one step by the shared method (its windows follow each other)."""
    return measure_all([step], method)[0]
