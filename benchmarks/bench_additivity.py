"""Additivity: how far an assembly's latency is from the sum of its parts, per ONNX Runtime optimisation level.

dery predicts an assembly's latency from pieces timed alone: its blocks, and the
joints (two adjacent blocks with their stitch) whose excess over their blocks is
the boundary's cost. That is only as good as latencies add up on the machine.
On the default zoo, for random assemblies drawn with a fixed seed, this
measures in one group (with the reference graph, as dery measures): the whole
assembly as one graph, each of its blocks alone and each of its joints, at
ONNX Runtime's `all` level (what dery deploys: layout optimisations such as
NCHWc blocking on AVX-512 included) and at `extended` (no layout
optimisation), and the whole assembly a second time as the control for the
measurement's own noise. Each error is the prediction over the whole as timed,
minus one.

    DERY_CACHE_DIR=/tmp/bench-cache python benchmarks/bench_additivity.py [--count 20]

Writes benchmarks/results/additivity.md and additivity.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import numpy as np
from dery.backends import onnxruntime as ort_backend
from dery.driver import CompileConfig, front
from dery.measure import Method
from dery.passes.calibrate import random_assemblies
from dery.passes.profile import pieces, run_piece, stitch_bundle
from dery.reference import Pace, measure_referenced, reference_piece

LEVELS = ("all", "extended")
SEED = 777  # not the calibration's draw


def summary(errors: list[float]) -> dict:
    e = np.abs(np.asarray(errors))
    return {"median_abs_pct": float(np.median(e) * 100), "max_abs_pct": float(e.max() * 100),
            "within_5pct": float(np.mean(e <= 0.05)), "mean_signed_pct": float(np.mean(errors) * 100)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="random assemblies (default 20)")
    args = parser.parse_args()
    started = time.perf_counter()
    s = front(CompileConfig(target="cpu", latency_ms=1.0, finetune="none",
                            out=Path(tempfile.mkdtemp(prefix="bench-additivity-"))))
    items = pieces(s.lowered, s.partition, s.stitches, s.target.batch, s.cache)
    bundle = stitch_bundle(s.stitches, s.target.batch, s.cache)
    drawn = random_assemblies(s.partition, s.stitches, args.count, seed=SEED)
    references = {level: ort_backend.step(reference_piece(), s.target, level) for level in LEVELS}
    rows = []
    for models in drawn:
        whole = run_piece(models, 0, items, s.stitches, bundle)
        blocks = [items["block", m, k] for k, m in enumerate(models)]
        joints = [items["joint", a, b, j] for j, (a, b) in enumerate(zip(models, models[1:]))]
        graphs = [whole, *blocks, *joints, whole]
        row: dict = {"assembly": list(models)}
        for level in LEVELS:
            steps = [ort_backend.step(p, s.target, level) for p in graphs]
            timings, reference_ms, _, _ = measure_referenced(steps, references[level], Method(), Pace())
            t = [x.timed_ms for x in timings]
            w, bl, jo, again = t[0], t[1:1 + len(blocks)], t[1 + len(blocks):-1], t[-1]
            boundaries = sum(jo[j] - bl[j] - bl[j + 1] for j in range(len(jo)))
            row[level] = {"whole_ms": w, "again_ms": again, "blocks_ms": bl, "joints_ms": jo,
                          "block_sum_ms": sum(bl), "with_boundaries_ms": sum(bl) + boundaries,
                          "reference_ms": reference_ms}
        rows.append(row)
        print(f"{len(rows)}/{len(drawn)} {'-'.join(models)}: " + ", ".join(
            f"{lv} {row[lv]['whole_ms']:.4f} ms" for lv in LEVELS), file=sys.stderr)
    doc = {"machine": common.machine("onnxruntime", "torch"), "command": " ".join([sys.executable, *sys.argv]),
           "seed": SEED, "levels": {}, "rows": rows, "total_s": time.perf_counter() - started}
    for level in LEVELS:
        r = [row[level] for row in rows]
        doc["levels"][level] = {
            "blocks_plus_boundaries": summary([x["with_boundaries_ms"] / x["whole_ms"] - 1 for x in r]),
            "block_sum": summary([x["block_sum_ms"] / x["whole_ms"] - 1 for x in r]),
            "control_same_graph_again": summary([x["again_ms"] / x["whole_ms"] - 1 for x in r]),
            "median_whole_ms": float(np.median([x["whole_ms"] for x in r]))}
    common.write_results("additivity", doc, markdown(doc))
    return 0


def markdown(doc: dict) -> list[str]:
    m = doc["machine"]
    lines = ["# Additivity of latencies per ONNX Runtime optimisation level (`benchmarks/bench_additivity.py`)", "",
             f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, ONNX Runtime {m['onnxruntime']}. Command: "
             f"`{doc['command']}`; {len(doc['rows'])} random assemblies of the default zoo (seed {doc['seed']}), "
             f"K = 4, batch 1, 1 thread; {doc['total_s']:.0f} s.", "",
             "Each assembly, its blocks and its joints measured in one group with the reference graph, at each "
             "level. *blocks + boundaries*: the blocks alone plus each joint's excess over its two blocks (dery's "
             "in-context sum without the triples' context terms and without calibration); *block sum*: the blocks "
             "alone; *control*: the whole assembly measured a second time in the same group. Errors are against "
             "the whole assembly as timed.", "",
             "| level | median whole (ms) | prediction | median abs err | max abs err | within +-5% | mean signed |",
             "|---|---|---|---|---|---|---|"]
    for level, v in doc["levels"].items():
        for key in ("blocks_plus_boundaries", "block_sum", "control_same_graph_again"):
            e = v[key]
            lines.append(f"| {level} | {v['median_whole_ms']:.4f} | {key.replace('_', ' ')} | "
                         f"{e['median_abs_pct']:.1f}% | {e['max_abs_pct']:.1f}% | {100 * e['within_5pct']:.0f}% | "
                         f"{e['mean_signed_pct']:+.1f}% |")
    a, x = doc["levels"]["all"]["median_whole_ms"], doc["levels"]["extended"]["median_whole_ms"]
    lines += ["", f"`extended` runs the median assembly {x / a:.2f}x as long as `all`.", ""]
    return lines


if __name__ == "__main__":
    common.run(main)
