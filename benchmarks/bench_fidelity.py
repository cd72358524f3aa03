"""Latency fidelity: predicted vs measured end-to-end latency of compiled engines on the cpu target.

For each zoo (the default zoo, trained on the embedded glyphs, and a zoo of timm networks at 224 px with
random weights) the real pipeline runs up to the calibrated search space; then
50+ random assemblies that the calibration never saw are compiled into engines
and measured end to end twice (the quicker reading counts: noise only slows
an engine), 32 at a time with the reference graph (their
measurement windows in turn, more rounds while the reference runs slow: as
dery measures pieces). The prediction is what the program uses (calibrated
block and boundary sums); next to it are the in-context sum without the fit
(blocks plus boundaries as measured in joints and triples), the same without the
triples' context terms, and the plain block sum, to show what the joints, the
triples and the calibration buy.

    python benchmarks/bench_fidelity.py [--quick] [--zoos default,timm] [--name fidelity]

Writes benchmarks/results/<name>.md and <name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _common as common
import numpy as np

RESULTS = common.RESULTS
CALIBRATION_SIZES = (0, 3, 6, 12)  # random assemblies besides the members, refitted on the same points
READINGS = 2  # measurements of each held-out engine
TIMM_ZOO = "resnet18:random,mobilenetv3_large_100:random,efficientnet_b0:random,deit_tiny_patch16_224:random"


def errors_pct(pred: np.ndarray, meas: np.ndarray) -> dict:
    """Absolute percentage errors summarised the way nn-Meter reports them."""
    err = np.abs(pred / meas - 1.0) * 100
    return {"median_abs_pct": float(np.median(err)), "p95_abs_pct": float(np.percentile(err, 95)),
            "max_abs_pct": float(err.max()), "within_5pct": float(np.mean(err <= 5)),
            "within_10pct": float(np.mean(err <= 10)), "mean_signed_pct": float(np.mean((pred / meas - 1) * 100))}


def run_zoo(name: str, zoo: str, k: int, count: int, out: Path) -> dict:
    """The pipeline up to calibration, then `count` held-out random assemblies compiled and measured."""
    from dery.driver import CompileConfig, Search, front
    from dery import defaults
    from dery.passes.calibrate import calibrate, random_assemblies, switches
    from dery.passes.solve import assembly_ids
    from dery.passes.verify import identity
    from dery.profile_store import fit_calibration, group_of

    t0 = time.perf_counter()
    s = front(CompileConfig(target="cpu", latency_ms=1.0, zoo=zoo, k=k, out=out, probe=128, measure="all"))
    # The largest calibration of the ablation below (a seeded draw of n is the first n of a draw of more).
    calibrate(s.lowered, s.partition, s.stitches, s.profiler, s.target, s.store, assemblies=max(CALIBRATION_SIZES))
    setup_s = time.perf_counter() - t0
    seen = {p.assembly for p in s.store.calibration_points(group_of(s.target, s.device))}
    pool = random_assemblies(s.partition, s.stitches, count + 40, seed=12345)
    held_out = [m for m in pool if identity(m, s.partition, s.stitches, s.lowered) not in seen][:count]
    program = Search(s, out).problem(1e9)
    t0 = time.perf_counter()
    group = group_of(s.target, s.device)
    readings = common.engine_latencies(held_out, s.lowered, s.partition, s.stitches, s.target,
                                       s.store.pace(group), readings=READINGS)
    # Noise only ever slows an engine down: its latency is the quicker of its readings.
    measured = [min(r, key=lambda m: m[0].median_ms) for r in zip(*readings)]
    rows = []
    for models, (timing, reference, _), (first, _, _) in zip(held_out, measured, readings[0]):
        blocks, boundaries = s.costs.sums(models)
        predicted = program.evaluate(assembly_ids(models))[1]["latency_ms"]
        rows.append({"assembly": list(models), "stitches": switches(models), "blocks_ms": blocks,
                     "boundaries_ms": boundaries, "in_context_ms": blocks + boundaries,
                     "joints_only_ms": sum(s.costs.sums(models, contexts=False)), "predicted_ms": predicted,
                     "measured_ms": timing.median_ms, "first_reading_ms": first.median_ms, "timed_ms": timing.timed_ms,
                     "reference_ms": reference})
    contexts = np.array([s.costs.context_ms(*key) / rec.median_ms for key, rec in s.costs.triples.items()])
    meas = np.array([t.median_ms for t, _, _ in measured])
    # Calibration from the members and the first n random assemblies only, on the same held-out engines.
    points = {p.assembly: p for p in s.store.calibration_points(group)}
    drawn = random_assemblies(s.partition, s.stitches, max(CALIBRATION_SIZES), seed=defaults.SEED)
    fitted = [(m,) * s.partition.k for m in s.partition.models]
    by_size = {}
    for n in CALIBRATION_SIZES:
        cal_n = fit_calibration([points[identity(m, s.partition, s.stitches, s.lowered)]
                                 for m in [*fitted, *drawn[:n]]])
        by_size[n] = errors_pct(np.array([cal_n.predict(r["blocks_ms"], r["boundaries_ms"], r["stitches"])
                                          for r in rows]), meas)
    always = fit_calibration([points[identity(m, s.partition, s.stitches, s.lowered)] for m in [*fitted, *drawn]],
                             choose=False)
    profiled = sorted({r.reference_ms for r in s.store.records.values() if r.group == group and r.reference_ms})
    cal = s.calibration
    return {"zoo": name, "spec": zoo, "k": k, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "assemblies": len(rows), "setup_s": setup_s,
            "measure_s": time.perf_counter() - t0,
            "members_ms": {m: r.median_ms for m, r in s.costs.networks.items()},
            "reference_ms": {"profile_groups": profiled,
                             "engine_groups": sorted({ms for reading in readings for _, ms, _ in reading})},
            "anchor_ms": measured[0][2],
            "calibration": {"intercept_ms": cal.intercept_ms, "block_scale": cal.block_scale,
                            "boundary_scale": cal.boundary_scale, "per_stitch_ms": cal.per_stitch_ms,
                            "points": cal.points, "fit_max_error": cal.max_error, "fitted": cal.fitted,
                            "described": cal.describe(), "fit_always": always.describe()},
            "contexts": {"triples": len(contexts), "over_3pct": float(np.mean(np.abs(contexts) > 0.03)),
                         "median_abs_pct": float(np.median(np.abs(contexts)) * 100)},
            "calibrated": errors_pct(np.array([r["predicted_ms"] for r in rows]), meas),
            "calibrated_vs_one_reading": errors_pct(np.array([r["predicted_ms"] for r in rows]),
                                                    np.array([r["first_reading_ms"] for r in rows])),
            "calibrated_vs_timed": errors_pct(np.array([r["predicted_ms"] for r in rows]),
                                              np.array([r["timed_ms"] for r in rows])),
            "least_squares_fit": errors_pct(np.array([always.predict(r["blocks_ms"], r["boundaries_ms"], r["stitches"])
                                                      for r in rows]), meas),
            "in_context": errors_pct(np.array([r["in_context_ms"] for r in rows]), meas),
            "joints_only": errors_pct(np.array([r["joints_only_ms"] for r in rows]), meas),
            "block_sum": errors_pct(np.array([r["blocks_ms"] for r in rows]), meas),
            "calibration_sizes": by_size, "rows": rows}


def markdown(doc: dict) -> str:
    lines = ["# Latency fidelity on the cpu target (`benchmarks/bench_fidelity.py`)", "",
             f"Machine: {doc['machine']}. Command: `{doc['command']}`. Engines: ONNX Runtime "
             f"{doc['onnxruntime']}, 1 thread, offline-optimised ONNX. Method: {doc['method']}.", "",
             "Each assembly below was compiled into an engine and measured end to end; none of them was among "
             "the calibration points. *calibrated* is the latency the program constrains (the least-squares fit "
             "to the calibration engines where it predicts each of them, left out of it, better than the in-context "
             "sum does, else the in-context sum); *least squares fit* is the fit to the members and the 12 random "
             "assemblies, kept always; *in context* adds the "
             "block medians, each boundary's joint less its two blocks and each pair of adjacent boundaries' "
             "context term (their triple less their joints, plus the middle block), with no fit; *joints only* "
             "leaves the context terms out; *block sum* adds the blocks timed alone and nothing else. Every latency, "
             "predicted or measured, is at the speed of the device's anchor (dery.reference: each window relative to "
             "the reference graph's window next to it). Each engine is measured twice, in groups of different "
             "engines (the second time in reverse order), and its latency is the quicker reading, since noise only "
             "slows an engine; *calibrated vs one reading* compares the calibrated prediction with the first reading "
             "alone, and *calibrated vs timed* with the quicker reading's fastest window as timed, which keeps the "
             "machine's drift in.", "",
             "| zoo | assemblies | predictor | median abs err | p95 abs err | max | within +-5% | within +-10% | "
             "mean signed |", "|---|---|---|---|---|---|---|---|---|"]
    for z in doc["zoos"]:
        for key in ("calibrated", "least_squares_fit", "in_context", "joints_only", "block_sum",
                    "calibrated_vs_one_reading", "calibrated_vs_timed"):
            if key not in z:
                continue
            e = z[key]
            lines.append(f"| {z['zoo']} | {z['assemblies']} | {key.replace('_', ' ')} | {e['median_abs_pct']:.2f}% | "
                         f"{e['p95_abs_pct']:.2f}% | {e['max_abs_pct']:.1f}% | {100 * e['within_5pct']:.0f}% | "
                         f"{100 * e['within_10pct']:.0f}% | {e['mean_signed_pct']:+.2f}% |")
    lines += ["", "Calibration from the members and the first n of the random assemblies only (the same seeded "
                  "draw; 12 measured, fewer refitted), on the same held-out engines: what random calibration engines "
                  "buy (a compile draws `defaults.CALIBRATION_ASSEMBLIES` of them).", "",
              "| zoo | n | median abs err | p95 abs err | max | within +-5% | within +-10% | mean signed |",
              "|---|---|---|---|---|---|---|---|"]
    for z in doc["zoos"]:
        for n, e in z.get("calibration_sizes", {}).items():
            lines.append(f"| {z['zoo']} | {n} | {e['median_abs_pct']:.2f}% | {e['p95_abs_pct']:.2f}% | "
                         f"{e['max_abs_pct']:.1f}% | {100 * e['within_5pct']:.0f}% | {100 * e['within_10pct']:.0f}% | "
                         f"{e['mean_signed_pct']:+.2f}% |")
    lines += ["", f"Calibration the program used per zoo run (that zoo's members and "
                  f"{doc.get('calibration_assemblies', 12)} random assemblies, measured on this CPU):", ""]
    for z in doc["zoos"]:
        c = z["calibration"]
        lines.append(f"- {z['zoo']} (measured {z.get('when', 'in an earlier run')}): {c['described']} (the fit "
                     f"itself: {c['fit_always']}); members "
                     + ", ".join(f"{m} {v:.3f} ms" for m, v in z["members_ms"].items())
                     + f"; anchor {z['anchor_ms']:.3f} ms; reference graph "
                     + ", ".join(f"{k.replace('_', ' ')} {min(v):.3f}-{max(v):.3f} ms"
                                 for k, v in z["reference_ms"].items() if v))
    lines += ["", "Context terms (what two adjacent boundaries add beyond each alone), as a share of their triple:", ""]
    lines += [f"- {z['zoo']}: {z['contexts']['triples']} triples, median {z['contexts']['median_abs_pct']:.2f}%, "
              f"{100 * z['contexts']['over_3pct']:.0f}% of them over 3%" for z in doc["zoos"]]
    lines += ["", "nn-Meter's headline for comparison: 99.0% of models within +-10% on a mobile CPU "
              "(REFERENCES.md section 6).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 assemblies per zoo")
    parser.add_argument("--zoos", default="default,timm")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--name", default="fidelity", help="results file name (a repeat run keeps the first)")
    args = parser.parse_args()
    os.environ.setdefault("DERY_CACHE_DIR", "/tmp/dery-bench-cache")
    os.environ.setdefault("DERY_QUIET", "1")
    import onnxruntime
    import torch
    from dery import defaults
    from dery.measure import Method

    torch.set_num_threads(2)
    count = 10 if args.quick else args.count
    specs = {"default": ("default", 4), "timm": (TIMM_ZOO, 4)}
    name = args.name + ("-quick" if args.quick else "")
    path = RESULTS / f"{name}.json"
    kept = {z["zoo"]: z for z in json.loads(path.read_text())["zoos"]} if path.exists() else {}
    for z in args.zoos.split(","):  # a run of some zoos keeps the others' last results
        kept[z] = run_zoo(z, specs[z][0], specs[z][1], count, Path("/tmp/dery-bench-out"))
    zoos = [kept[z] for z in specs if z in kept]
    info = common.machine("torch")
    doc = {"machine": f"{info['cpu']}, {info['cores_usable']} usable cores, Python {info['python']}, torch "
                      f"{info['torch']}, load average {info['load_avg_start'][0]:.1f} at the end",
           "onnxruntime": onnxruntime.__version__, "method": Method().describe(),
           "command": " ".join(["python", *sys.argv]), "calibration_assemblies": defaults.CALIBRATION_ASSEMBLIES,
           "zoos": zoos}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
