"""The reference graph: one fixed workload timed in every group of measurements.

A shared machine has slow spells that last longer than one group's windows
(a neighbour on the host thrashing the cache, a lower clock), and they slow
bigger working sets more than small ones, so no single factor corrects them.
dery measures in groups minutes apart - the profile's pieces in chunks, the
calibration engines, the held-out engines of the fidelity benchmark - and a
group measured in a slow spell would disagree with the others. So every group
also times this graph, and each record keeps the reference's time from its
group: the median over its windows, so that it is slow when most windows fell
in a spell (a piece's fastest window can be clean by luck, not all of them).
While that time is more than `SLOW` above the quickest the device has had (the
store's records), the group takes more rounds of windows (`Method.slow_rounds`),
every piece keeping its fastest window, until most of the reference's windows
are quick again. A group still slow after them is flagged in its records, and
a pass measures again, at its end, every group slower than the quickest it saw
(`dery.passes.profile.measure_groups`): the first group of a fresh store has
nothing before it to compare with.

The machine's speed also drifts by a few percent over tens of seconds (a
neighbour's load, the host's clock), on every core alike, and pieces measured
minutes apart would carry it. So a latency is not the fastest window as timed
but the piece's speed relative to the reference: the median, over the piece's
windows, of its window's median over the median of the reference's window next
to it, times the device's anchor - the reference's time in the first group the
device measured (`Pace.anchor_ms`, kept with every record). Every latency of a
device is then at one speed, the anchor's: benchmarks/results/drift.md measures
what this removes.

The graph is four 3x3 convolutions with ReLU over a 64-channel 56x56 map (about
4 ms on one core: long enough to be preempted, a working set that a thrashed
cache slows), weights
from a fixed seed, built with onnx.helper; changing it changes every stored
reference time, so it is tied to the profile schema.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from .backends import Piece
from .cache import content_key
from .measure import Method, Step, Timing, measure_all

CHANNELS, SIZE, LAYERS = 64, 56, 4
SLOW = 0.04


def _weights() -> list[np.ndarray]:
    rng = np.random.default_rng(20261122)
    return [(rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) * 0.1).astype(np.float32) for _ in range(LAYERS)]


def reference_onnx() -> onnx.ModelProto:
    """The reference graph as ONNX (input `x`, output `y`)."""
    nodes, inits, name = [], [], "x"
    for i, w in enumerate(_weights()):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], ["y" if i == LAYERS - 1 else f"r{i}"])]
        name = f"r{i}"
    shape = ["batch", CHANNELS, SIZE, SIZE]
    graph = helper.make_graph(nodes, "dery_reference", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def reference_module() -> nn.Module:
    """The same graph as a torch module (for the CUDA backends)."""
    layers: list[nn.Module] = []
    for w in _weights():
        conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers).eval()


@functools.cache
def reference_piece() -> Piece:
    """The reference graph as a piece any backend can time."""
    model = reference_onnx()
    return Piece("reference", content_key("reference", model.SerializeToString()), (CHANNELS, SIZE, SIZE),
                 lambda: model, reference_module)


@dataclass(frozen=True)
class Pace:
    """What a device's earlier groups say about its speed: the quickest the reference has run (None: no group
    yet) and the anchor its latencies are expressed at (None: this group's reference time becomes it)."""

    quickest_ms: float | None = None
    anchor_ms: float | None = None


def relative(timing: Timing, reference: Timing) -> float:
    """A step's speed relative to the reference: the median over its windows of the window's median over the
    median of the reference's window that started nearest to it."""
    starts = np.asarray(reference.window_starts)
    return float(np.median([m / reference.window_medians[int(np.argmin(np.abs(starts - t)))]
                            for m, t in zip(timing.window_medians, timing.window_starts)]))


def measure_referenced(steps: Sequence[Step], reference: Step, method: Method,
                       pace: Pace) -> tuple[list[Timing], float, float, bool]:
    """Time steps together with the reference (by dery.measure's round robin, with more rounds while the
    reference's windows run more than `SLOW` above the quickest): their timings at the anchor's speed (the
    median is `relative` times the anchor, p90, mean and minimum are scaled alike, `window_medians` stay as
    timed), the reference's time (median over its windows), the anchor, and whether the group stayed slow."""
    def settled(timings: list[Timing]) -> bool:
        return pace.quickest_ms is None or timings[0].windows_median_ms <= pace.quickest_ms * (1 + SLOW)

    def anchored(t: Timing) -> Timing:
        ms = relative(t, timings[0]) * anchor
        f = ms / t.median_ms if t.median_ms > 0 else 0.0
        return replace(t, median_ms=ms, p90_ms=t.p90_ms * f, min_ms=t.min_ms * f, mean_ms=t.mean_ms * f)

    timings = measure_all([reference, *steps], method, settled, pacer=0)
    reference_ms = timings[0].windows_median_ms
    anchor = pace.anchor_ms or reference_ms
    return [anchored(t) for t in timings[1:]], reference_ms, anchor, not settled(timings)
