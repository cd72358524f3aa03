"""The README's main command twice on an empty cache: the second run reuses everything.

    python benchmarks/bench_rerun.py [--zoo default] [--latency-ms 0.1]

Runs `dery-compile` as a user would (a subprocess, a fresh DERY_CACHE_DIR),
then again with the same arguments, and records both wall times, their ratio,
and whether the two report.json files are byte-identical. Writes
benchmarks/results/rerun.md and rerun.json.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common

RESULTS = common.RESULTS


def run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--latency-ms", default="0.1")
    args = parser.parse_args()
    exe = shutil.which("dery-compile") or str(Path(sys.executable).with_name("dery-compile"))
    with tempfile.TemporaryDirectory(prefix="dery-rerun-") as tmp:
        env = {**os.environ, "DERY_CACHE_DIR": str(Path(tmp) / "cache"), "DERY_QUIET": "1"}
        base = [exe, "--target", "cpu", "--latency-ms", args.latency_ms, "--zoo", args.zoo]
        first_s, first_out = run([*base, "--out", str(Path(tmp) / "a")], env)
        second_s, second_out = run([*base, "--out", str(Path(tmp) / "b")], env)
        same = filecmp.cmp(Path(tmp) / "a" / "report.json", Path(tmp) / "b" / "report.json", shallow=False)
        report = json.loads((Path(tmp) / "b" / "report.json").read_text())
    doc = {"command": " ".join(["dery-compile", *base[1:]]), "first_s": first_s, "second_s": second_s,
           "speedup": first_s / second_s, "same_report_bytes": same,
           "assembly": [a["model"] for a in report["assembly"]], "status": report["status"],
           "machine": f"{common.cpu_name()}, {len(os.sched_getaffinity(0))} usable cores",
           "first_stdout": first_out, "second_stdout": second_out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rerun.json").write_text(json.dumps(doc, indent=1))
    text = "\n".join([
        "# The main command twice (`benchmarks/bench_rerun.py`)", "",
        f"`{doc['command']}` on an empty cache, then again. Machine: {doc['machine']}.", "",
        "| run | wall time |", "|---|---|",
        f"| first (trains the zoo, measures every block, joint and triple) | {first_s:.1f} s |",
        f"| second (everything from the cache) | {second_s:.1f} s |",
        f"| ratio | **{doc['speedup']:.1f}x** |", "",
        f"Same assembly ({' > '.join(doc['assembly'])}); report.json byte-identical: {same}.", ""])
    (RESULTS / "rerun.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
