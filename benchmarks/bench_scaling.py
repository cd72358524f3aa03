"""Measurement on demand at DeRy's zoo size: pieces measured and wall time for zoos of 6, 12 and 24 timm networks.

    python benchmarks/bench_scaling.py [--sizes 6,12,24] [--k 4] [--val 64]

Each zoo is the first N of `ARCHS` with random weights at 224 px (`NAME:random`), compiled for the `cpu`
target on an empty cache of its own at one mid budget (the median member's measured latency), the way
dery-compile measures on demand: blocks, members and the members' own joints and triples, the
calibration's assemblies, then the joints and triples the program's best solutions rest on. The full
table would time every joint and triple of the partition (it grows with the cube of the members). Accuracy
is not what this measures, so the quality model is `stitch-r2` (the default's switch accuracies are a
forward pass per stitch: 1,656 of them at 224 px for 24 members), the embedded digits are upscaled to
224 px, the val and test splits are cut to `--val` images and the probe to 32. Writes
benchmarks/results/scaling.md and scaling.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as common

ARCHS = ("mobilenetv2_035", "mobilenetv3_small_050", "lcnet_050", "regnetx_002", "mnasnet_small", "efficientnet_lite0",
         "regnetx_004", "mobilenetv3_small_100", "lcnet_075", "regnety_002", "mnasnet_050", "mobilenetv2_050",
         "resnet18", "mobilenetv3_small_075", "lcnet_100", "mnasnet_100", "semnasnet_050", "mobilenetv2_100",
         "resnet18d", "mobilenetv3_large_075", "regnety_004", "spnasnet_100", "efficientnet_b0", "convnext_atto")


def trimmed(keep: int, probe_cut: int):
    """dery.data.load_data with the val and test splits cut to `keep` images and the probe to `probe_cut`."""
    from dery import data as dery_data

    real = dery_data.load_data

    def load(data_dir, resolution, *, probe: int = probe_cut, seed: int = 0):
        d = real(data_dir, resolution, probe=probe, seed=seed)
        cut = {"val": keep, "test": keep, "probe": probe_cut}
        splits = {name: dataclasses.replace(s, images=s.images[:cut.get(name, len(s))],
                                            labels=None if s.labels is None else s.labels[:cut.get(name, len(s))])
                  for name, s in d.splits.items()}
        from dery.cache import content_key

        return dataclasses.replace(d, fingerprint=content_key(d.fingerprint, "trimmed", keep, probe_cut),
                                   splits=splits)

    return load


def compile_zoo(n: int, k: int, root: Path) -> dict:
    from dery.driver import CompileConfig, Search, front

    os.environ["DERY_CACHE_DIR"] = str(root / f"cache{n}")
    zoo = ",".join(f"{a}:random" for a in ARCHS[:n])
    t0 = time.perf_counter()
    s = front(CompileConfig(target="cpu", latency_ms=1.0, zoo=zoo, k=k, probe=32, predictor="stitch-r2",
                            out=root / f"out{n}"))
    front_s = time.perf_counter() - t0
    member_ms = sorted(r.median_ms for r in s.costs.networks.values())
    budget = statistics.median(member_ms)
    asked_front = len(s.profiler.found)
    t = time.perf_counter()
    chosen = Search(s, root / f"out{n}").choose(budget, [])
    solve_s = time.perf_counter() - t
    return {"members": n, "k": k, "budget_ms": budget, "member_ms": [member_ms[0], member_ms[-1]],
            "full_table": len(s.profiler.items), "asked_before_solve": asked_front, "asked": len(s.profiler.found),
            "measured": len(s.profiler.fresh), "chosen": None if chosen is None else list(chosen[3]),
            "timings_s": {name: round(v, 1) for name, v in s.timings.items()},
            "wall_s": front_s + solve_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,12,24")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--val", type=int, default=64)
    args = parser.parse_args()
    from dery import driver

    driver.load_data = trimmed(args.val, 32)
    os.environ.setdefault("DERY_QUIET", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dery-scaling-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(compile_zoo(n, args.k, Path(tmp)))
            print(rows[-1], flush=True)
    doc = {"machine": common.machine("torch", "timm", "onnxruntime"), "archs": list(ARCHS), "rows": rows}
    lines = ["# Measurement on demand as the zoo grows (`benchmarks/bench_scaling.py`)", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores. Zoos of the first N "
             f"of {len(ARCHS)} timm networks (random weights, 224 px), K = {args.k}, target cpu, each on an empty "
             "cache, compiled at the median member's latency (quality model stitch-r2; val split "
             f"{args.val} images).", "",
             "| members | full table (pieces) | asked before the solve | asked in all | per member | measured | "
             "profile s | calibrate s | wall s (front + solve) | choice |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['members']} | {r['full_table']} | {r['asked_before_solve']} | {r['asked']} | "
                     f"{r['asked'] / r['members']:.1f} | {r['measured']} | {r['timings_s'].get('profile', 0):.0f} | "
                     f"{r['timings_s'].get('calibrate', 0):.0f} | {r['wall_s']:.0f} | "
                     f"{' > '.join(r['chosen'] or ['-'])} |")
    first, last = rows[0], rows[-1]
    growth = (last["asked"] / first["asked"]) / (last["members"] / first["members"])
    lines += ["", f"From {first['members']} to {last['members']} members the pieces asked grow "
              f"{last['asked'] / first['asked']:.2f}x for {last['members'] / first['members']:.0f}x the members "
              f"({growth:.2f} of linear); the full table grows {last['full_table'] / first['full_table']:.1f}x.", ""]
    common.write_results("scaling", doc, lines)


if __name__ == "__main__":
    common.run(main)
