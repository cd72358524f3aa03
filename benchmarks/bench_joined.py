"""Calibration graphs: an assembly joined from its profiled pieces' graphs against the engine dery-compile exports.

The calibrate pass times whole assemblies. It used to export each one with torch.onnx (as `dery-compile` builds
its engine), which took most of the first run's calibration; it now joins the blocks' and stitches' graphs the
profile already holds, as a joint is joined. This benchmark checks that the two time alike. For seeded random
assemblies of the default zoo (the calibration's draw first) it builds: the engine as `dery-compile` exports it;
the same export without the rewrite of in-order Gathers as Reshapes (`dery.onnx_graph.gathers_as_reshapes`,
which every export now gets); and the joined graph. Per pass, each assembly's exported engine, its joined graph,
its unrewritten export and the exported engine again (a second session: the control, what two readings of one
engine differ by) are measured in one group with the reference graph, their windows in turn. Ratios are per
assembly, over the exported engine, median over the passes.

    python benchmarks/bench_joined.py [--count 24] [--passes 3]

Writes benchmarks/results/joined.{md,json}.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as common
import dery.onnx_graph as onnx_graph
import numpy as np
from dery import defaults
from dery.backends import get_backend
from dery.driver import CompileConfig, front
from dery.measure import Method
from dery.passes.assemble import assemble
from dery.passes.calibrate import random_assemblies
from dery.passes.compile import compile_engine
from dery.passes.profile import profile
from dery.profile_store import group_of
from dery.reference import measure_referenced, reference_piece

NAME = "joined"
VARIANTS = ("joined", "unrewritten", "control")  # each over the exported engine


def _stats(r: np.ndarray) -> dict:
    off = np.abs(r - 1)
    return {"median_ratio": float(np.median(r)), "mean_ratio": float(np.mean(r)),
            "median_abs_pct": float(np.median(off) * 100), "p90_abs_pct": float(np.percentile(off, 90) * 100),
            "max_abs_pct": float(off.max() * 100), "within_2pct": float(np.mean(off <= 0.02)),
            "within_5pct": float(np.mean(off <= 0.05))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    s = front(CompileConfig(target="cpu", latency_ms=1.0, zoo="default"), until="stitch")
    profiler = profile(s.lowered, s.partition, s.stitches, s.target, s.store, s.cache, on_demand=True)
    drawn = random_assemblies(s.partition, s.stitches, args.count, defaults.SEED)
    backend = get_backend(s.target.backend)
    shape = s.lowered[0].network.input_shape
    rewrite = onnx_graph.gathers_as_reshapes
    ratios: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    build_s: dict[str, list[float]] = {"export": [], "join": []}
    rewritten = 0
    with tempfile.TemporaryDirectory() as tmp:
        exported, raw, joined = [], [], []
        for i, models in enumerate(drawn):
            _, module = assemble(s.lowered, s.partition, s.stitches, models)
            t0 = time.perf_counter()
            exported.append(compile_engine(module, shape, s.target, Path(tmp), name=f"a{i}").path)
            build_s["export"].append(time.perf_counter() - t0)
            onnx_graph.gathers_as_reshapes = lambda m: m
            try:
                raw.append(compile_engine(module, shape, s.target, Path(tmp), name=f"raw{i}").path)
            finally:
                onnx_graph.gathers_as_reshapes = rewrite
            rewritten += raw[-1].read_bytes() != exported[-1].read_bytes()
            t0 = time.perf_counter()
            piece = profiler.assembly(models)
            piece.onnx  # noqa: B018 - built here, to be timed
            build_s["join"].append(time.perf_counter() - t0)
            joined.append(piece)
        pace = s.store.pace(group_of(s.target, s.device))
        per = 4
        for p in range(args.passes):
            seen: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for start in range(0, len(drawn), defaults.Profiling.chunk // per):
                idx = range(start, min(len(drawn), start + defaults.Profiling.chunk // per))
                steps = []
                for i in idx:
                    steps += [backend.engine_step(exported[i], s.target), backend.step(joined[i], s.target),
                              backend.engine_step(raw[i], s.target), backend.engine_step(exported[i], s.target)]
                timings, _, _, _ = measure_referenced(steps, backend.step(reference_piece(), s.target), Method(), pace)
                for j in range(len(idx)):
                    base = timings[per * j].median_ms
                    for n, v in enumerate(VARIANTS, start=1):
                        seen[v].append(timings[per * j + n].median_ms / base)
            for v in VARIANTS:
                ratios[v].append(seen[v])
            print(f"pass {p}: " + ", ".join(f"{v} {np.median(seen[v]):.4f}" for v in VARIANTS), flush=True)
    per_assembly = {v: np.median(np.array(ratios[v]), 0) for v in VARIANTS}
    doc = {"machine": common.machine("onnxruntime", "torch"), "count": len(drawn), "passes": args.passes,
           "assemblies": [list(m) for m in drawn], "ratios": ratios, "rewritten_engines": rewritten,
           "stats": {v: _stats(per_assembly[v]) for v in VARIANTS},
           "build_s": {**build_s, "export_median": float(np.median(build_s["export"])),
                       "join_median": float(np.median(build_s["join"]))}}
    labels = {"joined": "joined graph (what calibrate times) / engine",
              "unrewritten": "engine without the Gather rewrite / engine",
              "control": "control: the engine again / engine"}
    lines = ["# Calibration graphs: joined pieces against exported engines (`benchmarks/bench_joined.py`)", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores, ONNX Runtime "
             f"{doc['machine']['onnxruntime']} (1 thread), torch {doc['machine']['torch']}. {len(drawn)} seeded random "
             f"assemblies of the default zoo (K = {s.partition.k}). *engine*: exported by torch.onnx as `dery-compile` builds it; *joined graph*: "
             f"joined from the profile's block and stitch graphs as the calibrate pass builds and times it; "
             f"*without the Gather rewrite*: the export before `gathers_as_reshapes` (it changed "
             f"{rewritten} of the {len(drawn)} engines). Per pass, all four of an assembly are measured in one group "
             f"with the reference graph, their windows in turn; {args.passes} passes; per-assembly ratio = median over "
             f"the passes.", "",
             "| comparison | median ratio | mean ratio | median abs diff | p90 abs diff | max | within 2% | "
             "within 5% |", "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = doc["stats"][v]
        lines.append(f"| {labels[v]} | {r['median_ratio']:.4f} | {r['mean_ratio']:.4f} | {r['median_abs_pct']:.2f}% | "
                     f"{r['p90_abs_pct']:.2f}% | {r['max_abs_pct']:.2f}% | {100 * r['within_2pct']:.0f}% | "
                     f"{100 * r['within_5pct']:.0f}% |")
    b = doc["build_s"]
    lines += ["", f"Building one calibration graph: exported {b['export_median']:.2f} s (median), joined "
              f"{b['join_median']:.2f} s: {b['export_median'] / b['join_median']:.0f}x faster.", "",
              "Per assembly (median ratio over the passes):", "", "| assembly | joined | unrewritten | control |",
              "|---|---|---|---|"]
    for i, m in enumerate(drawn):
        lines.append(f"| {' > '.join(m)} | " + " | ".join(f"{per_assembly[v][i]:.3f}" for v in VARIANTS) + " |")
    common.write_results(NAME, doc, lines)


if __name__ == "__main__":
    common.run(main)
