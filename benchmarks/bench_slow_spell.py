"""Slow spells: what the reference graph buys when a neighbour slows the machine for longer than a group's windows.

Four timm networks (224 px, random weights) are measured as one group, the way
the profile measures a chunk of pieces. First on the quiet machine (the
baseline, which also gives the quickest reference time); then, in several
trials, while neighbour processes stream through a large array on every core
for 1.5x the time the group's regular windows take. Each trial measures the
group twice under the same spell: without the reference check (the windows end
inside the spell) and as dery does (more rounds while the reference graph runs
more than 4% above its quickest time, each piece keeping its fastest window).
A final quiet measurement checks that the machine itself did not change.

    python benchmarks/bench_slow_spell.py [--trials 3]

Writes benchmarks/results/slow_spell.md and slow_spell.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import _common as common
import numpy as np

NETWORKS = ("resnet18", "mobilenetv3_large_100", "efficientnet_b0", "deit_tiny_patch16_224")
NEIGHBOUR = ("import numpy as np, sys, time\n"
             "a = np.ones(64 * 2**20 // 8); end = time.perf_counter() + float(sys.argv[1])\n"
             "while time.perf_counter() < end:\n    a += 1.0\n")


@contextlib.contextmanager
def neighbours(seconds: float) -> Iterator[None]:
    """One array-streaming process per core for `seconds` (the spell); waits for them to end on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(seconds)])
             for _ in range(len(os.sched_getaffinity(0)))]
    time.sleep(0.3)
    try:
        yield
    finally:
        for p in procs:
            p.wait()


def pieces(size: int = 224, names: tuple[str, ...] = NETWORKS) -> list:
    """The networks at `size` px as pieces (exported once)."""
    import timm
    import torch
    from dery.backends import Piece
    from dery.onnx_graph import export

    out = []
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        graph = export(model, [torch.rand(1, 3, size, size)], ["x"], ["y"])
        out.append(Piece(f"{name}@{size}", f"{name}@{size}", (3, size, size), lambda g=graph: g, lambda m=model: m))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime
    import torch
    from dery.backends import get_backend
    from dery.measure import Method
    from dery.reference import SLOW, Pace, measure_referenced, reference_piece
    from dery.targets import get_target

    torch.set_num_threads(2)
    target = get_target("cpu")
    backend = get_backend(target.backend)
    nets = pieces()
    steps = [backend.step(p, target) for p in nets]
    reference = backend.step(reference_piece(), target)

    def group(method: Method, quickest: float | None) -> dict:
        t0 = time.perf_counter()
        timings, ref, _, slow = measure_referenced(steps, reference, method, Pace(quickest))
        return {"ms": [t.timed_ms for t in timings], "reference_ms": ref, "flagged_slow": slow,
                "windows": timings[0].windows, "seconds": time.perf_counter() - t0}

    without = Method(slow_rounds=0)
    quiet = group(without, None)
    spell_s = 1.5 * quiet["seconds"]
    trials = []
    for _ in range(args.trials):
        trial = {}
        for name, method in (("without the check", without), ("dery", Method())):
            with neighbours(spell_s):
                trial[name] = group(method, quiet["reference_ms"])
        trials.append(trial)
    after = group(without, None)

    def ratios(g: dict) -> np.ndarray:
        return np.array(g["ms"]) / np.array(quiet["ms"])

    rows = []
    for name in ("without the check", "dery"):
        r = np.array([ratios(t[name]) for t in trials])
        rows.append({"variant": name, "median_ratio": float(np.median(r)), "max_ratio": float(r.max()),
                     "within_5pct": float(np.mean(np.abs(r - 1) <= 0.05)),
                     "reference_ratio": [t[name]["reference_ms"] / quiet["reference_ms"] for t in trials],
                     "windows": [t[name]["windows"] for t in trials],
                     "flagged_slow": [t[name]["flagged_slow"] for t in trials],
                     "seconds": [t[name]["seconds"] for t in trials]})
    info = common.machine("torch", "onnxruntime")
    doc = {"machine": info, "networks": NETWORKS, "spell_s": spell_s, "slow_threshold": SLOW, "quiet": quiet,
           "after": after, "trials": trials, "rows": rows, "command": " ".join(["python", *sys.argv])}
    md = ["# Slow spells (`benchmarks/bench_slow_spell.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores, torch {info['torch']}, ONNX Runtime "
          f"{onnxruntime.__version__} (1 thread). Command: `{doc['command']}`.", "",
          f"{len(NETWORKS)} timm networks at 224 px ({', '.join(NETWORKS)}) measured as one group with the "
          f"reference graph, quiet (baseline), then in {args.trials} trials while one array-streaming neighbour "
          f"per core runs for {spell_s:.1f} s (1.5x the group's regular windows). Ratios are each network's "
          "time over its quiet baseline (1.00 = what the quiet machine measures).", "",
          "| variant | median ratio | worst ratio | within +-5% of quiet | reference / quickest | windows per piece "
          "| flagged slow | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['median_ratio']:.3f} | {r['max_ratio']:.3f} | "
                  f"{100 * r['within_5pct']:.0f}% | {', '.join(f'{x:.2f}' for x in r['reference_ratio'])} | "
                  f"{', '.join(map(str, r['windows']))} | {sum(r['flagged_slow'])}/{len(trials)} | "
                  f"{', '.join(f'{x:.1f}' for x in r['seconds'])} |")
    drift = np.array(after["ms"]) / np.array(quiet["ms"])
    md += ["", f"Quiet again at the end: networks {drift.min():.3f}-{drift.max():.3f} of the baseline, reference "
           f"{after['reference_ms'] / quiet['reference_ms']:.3f}.", ""]
    common.write_results("slow_spell", doc, md)


if __name__ == "__main__":
    common.run(main)
