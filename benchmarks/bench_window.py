"""Measurement windows: what shorter windows cost in repeatability, and what they save in time.

The first run spends most of its measuring time inside windows of fixed length (`Method.window_s`), whatever
the piece's latency: a 0.05 ms block fills a 0.06 s window with about a thousand calls, and the window's median
is already steady long before that. Between windows the machine's drift and its neighbours move a latency more
than the count of calls in one window does, so the window's length should matter little. This benchmark
checks that on the pieces the first run measures: a seeded sample of the default zoo's blocks, members, joints
and triples (K = 4), measured as the profile measures them (chunks of `Profiling.chunk` with the reference
graph, every latency at one anchor), with the reference method (0.06 s windows, the default before) and with candidates that differ only in the
window's length, in turns (A, B, C, A, B, C, ...) so that the machine's drift falls on every method alike.

Per method: seconds per pass, and the run-to-run spread of each piece's latency (its slowest pass over its
quickest, less 1; median and 90th percentile over the pieces), and each piece's median over the passes against
the reference's (median and 90th percentile of the absolute difference).

    python benchmarks/bench_window.py [--passes 3] [--sample 64]

Writes benchmarks/results/window.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import _common as common
import numpy as np
from dery.backends import availability, get_backend
from dery.cache import Cache
from dery.defaults import Profiling
from dery.driver import CompileConfig, front
from dery.measure import Method
from dery.passes.profile import measure_pieces, pieces
from dery.reference import Pace

NAME = "window"
WINDOWS_S = (0.06, 0.03, 0.015)  # the reference first (the default until this benchmark; now the last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--sample", type=int, default=64)
    args = parser.parse_args()
    s = front(CompileConfig(target="cpu", latency_ms=1.0, zoo="default"), until="stitch")
    items = pieces(s.lowered, s.partition, s.stitches, s.target.batch, Cache())
    keys = sorted(items, key=str)
    sample = sorted(random.Random(0).sample(keys, min(args.sample, len(keys))), key=str)
    device, _ = availability(s.target)
    backend = get_backend(s.target.backend)
    base = dataclasses.replace(Method(), window_s=WINDOWS_S[0])
    methods = {w: dataclasses.replace(base, window_s=w) for w in WINDOWS_S}
    chunk = Profiling.chunk
    pace = Pace()
    seen: dict[float, list[list[float]]] = {w: [] for w in methods}
    walls: dict[float, list[float]] = {w: [] for w in methods}
    for p in range(args.passes):
        for w, method in methods.items():
            t0 = time.perf_counter()
            ms = []
            for start in range(0, len(sample), chunk):
                records = measure_pieces([items[k] for k in sample[start:start + chunk]], s.target, device, backend,
                                         method, pace)
                ref = records[0].reference_ms
                pace = Pace(min(pace.quickest_ms or ref, ref), pace.anchor_ms or records[0].anchor_ms)
                ms += [r.median_ms for r in records]
            walls[w].append(time.perf_counter() - t0)
            seen[w].append(ms)
            print(f"pass {p} window {w:g}s: {walls[w][-1]:.1f} s", flush=True)
    default = np.median(np.array(seen[WINDOWS_S[0]]), 0)
    rows = []
    for w in methods:
        a = np.array(seen[w])
        spread = a.max(0) / a.min(0) - 1
        off = np.abs(np.median(a, 0) / default - 1)
        rows.append({"window_s": w, "wall_s_per_pass": float(np.median(walls[w])), "walls_s": walls[w],
                     "spread_median": float(np.median(spread)), "spread_p90": float(np.percentile(spread, 90)),
                     "vs_default_median": float(np.median(off)), "vs_default_p90": float(np.percentile(off, 90))})
    doc = {"machine": common.machine("onnxruntime"), "pieces": [str(k) for k in sample], "passes": args.passes,
           "method": base.describe(), "latency_ms": {"min": float(default.min()), "median": float(np.median(default)),
                                                     "max": float(default.max())}, "rows": rows}
    lines = ["# Measurement windows (`benchmarks/bench_window.py`)", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores, ONNX Runtime "
             f"{doc['machine']['onnxruntime']} (1 thread). {len(sample)} pieces of the default zoo (blocks, members, "
             f"joints, triples; {default.min():.3f}-{default.max():.3f} ms, median {np.median(default):.3f}), "
             f"measured as the profile measures them, {args.passes} passes per method in turns. Reference method: "
             f"{base.describe()}. The candidates differ in the window's length only.", "",
             "| window (s) | s per pass | time vs default | spread across passes: median | p90 | "
             "vs the default's latency: median | p90 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['window_s']:g} | {r['wall_s_per_pass']:.1f} | "
                     f"{r['wall_s_per_pass'] / rows[0]['wall_s_per_pass']:.2f}x | {100 * r['spread_median']:.2f}% | "
                     f"{100 * r['spread_p90']:.2f}% | {100 * r['vs_default_median']:.2f}% | "
                     f"{100 * r['vs_default_p90']:.2f}% |")
    common.write_results(NAME, doc, lines)


if __name__ == "__main__":
    common.run(main)
