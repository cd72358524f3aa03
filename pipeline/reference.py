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
are quick again. A group still slow after them is flagged in its records.

The graph is four 3x3 convolutions with ReLU over a 64-channel 56x56 map (about
4 ms on one core: long enough to be preempted, a working set that a thrashed
cache slows), weights
from a fixed seed, built with onnx.helper; changing it changes every stored
reference time, so it is tied to the profile schema.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

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


def measure_referenced(steps: Sequence[Step], reference: Step, method: Method,
                       quickest_ms: float | None) -> tuple[list[Timing], float, bool]:
    """Time steps together with the reference (by dery.measure's round robin, with more rounds while the
    reference's windows run more than `SLOW` above `quickest_ms`): their timings, the reference's time (median
    over its windows), and whether the group stayed slow."""
    def settled(timings: list[Timing]) -> bool:
        return quickest_ms is None or timings[0].windows_median_ms <= quickest_ms * (1 + SLOW)

    timings = measure_all([reference, *steps], method, settled)
    return timings[1:], timings[0].windows_median_ms, not settled(timings)
