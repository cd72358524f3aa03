"""The README's main command cold (three times, each on an empty cache), warm, and with every piece measured.

    python benchmarks/bench_rerun.py [--zoo default] [--latency-ms 0.1] [--cold 3] [--no-control]

Runs `dery-compile` as a user would (a subprocess, a fresh DERY_CACHE_DIR per
cold run): `--cold` runs that measure on demand (the default), a warm rerun on
the first one's cache, and, as the control, one cold run with `--measure all`
(every block, joint and triple before the solve). Records each wall time, the
per-pass timings report.json carries, the pieces measured, and whether the
reports agree: report.json less its `run` section (wall-clock timings and what
that run measured) byte for byte, and report.json itself byte for byte (the warm
run is answered from the run cache, `pipeline/runs.py`). Writes benchmarks/results/rerun.md and rerun.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common


def run(args: list[str], env: dict[str, str], out: Path) -> dict:
    """One dery-compile: its wall time and its report."""
    t0 = time.perf_counter()
    done = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    raw = (out / "report.json").read_bytes()
    return {"wall_s": wall, "report": json.loads(raw), "raw": raw, "stdout": done.stdout.strip()}


def stable(report: dict) -> str:
    """report.json less its `run` section, as the bytes json.dumps gives."""
    return json.dumps({k: v for k, v in report.items() if k != "run"}, indent=1, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--latency-ms", default="0.1")
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--no-control", action="store_true", help="skip the --measure all run")
    args = parser.parse_args()
    exe = shutil.which("dery-compile") or str(Path(sys.executable).with_name("dery-compile"))
    base = [exe, "--target", "cpu", "--latency-ms", args.latency_ms, "--zoo", args.zoo]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dery-rerun-") as tmp:
        root = Path(tmp)
        for i in range(args.cold):
            env = {**os.environ, "DERY_CACHE_DIR": str(root / f"cache{i}"), "DERY_QUIET": "1"}
            runs[f"cold {i + 1}"] = run(base, env, root / f"cold{i}")
            if i == 0:
                runs["warm"] = run(base, env, root / "warm")
        if not args.no_control:
            env = {**os.environ, "DERY_CACHE_DIR": str(root / "cache-all"), "DERY_QUIET": "1"}
            runs["cold, --measure all"] = run([*base, "--measure", "all"], env, root / "all")
    cold = [r["wall_s"] for name, r in runs.items() if name.startswith("cold ")]
    reference = stable(runs["cold 1"]["report"])
    same = {name: stable(r["report"]) == reference for name, r in runs.items()}
    identical = {name: r["raw"] == runs["cold 1"]["raw"] for name, r in runs.items()}
    pieces = runs["cold 1"]["report"]["latency_pieces"]
    doc = {"command": " ".join(["dery-compile", *base[1:]]), "machine": common.machine(),
           "cold_median_s": statistics.median(cold), "runs": {
               name: {"wall_s": r["wall_s"], "timings_s": r["report"]["run"]["timings_s"],
                      "pieces_measured": r["report"]["run"]["pieces_measured"],
                      "assembly": [a["model"] for a in r["report"]["assembly"]], "status": r["report"]["status"],
                      "same_report": same[name], "identical_report": identical[name]}
               for name, r in runs.items()},
           "latency_pieces": pieces}
    if "cold, --measure all" in runs:
        doc["control_ratio"] = runs["cold, --measure all"]["wall_s"] / doc["cold_median_s"]
    passes = list(dict.fromkeys(p for r in doc["runs"].values() for p in r["timings_s"]))
    lines = ["# The main command, cold and warm (`benchmarks/bench_rerun.py`)", "",
             f"`{doc['command']}`. Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores, "
             f"load average {doc['machine']['load_avg_start'][0]:.1f} at the start. Each cold run has an empty "
             "cache; the warm run reuses the first cold run's. The control measures every block, joint and triple "
             "before it solves (`--measure all`, the behaviour before measurement on demand). *same report*: "
             "report.json less its `run` section (wall-clock timings, pieces measured by that run) equals the "
             "first cold run's; *identical*: report.json itself is byte-identical to the first cold run's.", "",
             "| run | wall s | pieces measured | " + " | ".join(passes) + " | assembly | same report | identical |",
             "|---|---|---|" + "---|" * len(passes) + "---|---|---|"]
    for name, r in doc["runs"].items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['pieces_measured']} | "
                     + " | ".join(f"{r['timings_s'].get(p, 0.0):.1f}" for p in passes)
                     + f" | {' > '.join(r['assembly'])} | {r['same_report']} | {r['identical_report']} |")
    lines += ["", f"Median of the {len(cold)} cold runs: **{doc['cold_median_s']:.1f} s**"
              + (f"; the control took {doc['control_ratio']:.2f}x as long." if "control_ratio" in doc else "."),
              f"The answer rests on {pieces['asked']} of the search space's {pieces['search_space']} latency "
              "pieces (blocks, joints, triples, members).", ""]
    common.write_results("rerun", doc, lines)


if __name__ == "__main__":
    main()
