"""Drift: what expressing latencies relative to the reference graph removes from groups measured minutes apart.

The same pieces (four timm networks at 224 px and the three CNNs among them at
96 px, random weights) are
measured as one group (new sessions each time), the way the profile measures a
chunk, again and again
with pauses in between, over several minutes of the machine's own drift. For
each piece and each group two latencies come out of the same windows: the
fastest window as timed (the control), and dery's - the median over its
windows of the window's median over the reference's window next to it, times
the anchor (the first group's reference time). The spread of a piece across
groups is what a prediction made of records from different groups inherits.

    python benchmarks/bench_drift.py [--groups 10] [--pause 15]

Writes benchmarks/results/drift.md and drift.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import _common as common
import numpy as np
from bench_slow_spell import NETWORKS, pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--pause", type=float, default=15.0, help="seconds between groups")
    args = parser.parse_args()
    import onnxruntime
    import torch
    from dery.backends import get_backend
    from dery.measure import Method
    from dery.reference import Pace, measure_referenced, reference_piece
    from dery.targets import get_target

    torch.set_num_threads(2)
    target = get_target("cpu")
    backend = get_backend(target.backend)
    nets = pieces(224) + pieces(96, NETWORKS[:3])
    pace, groups, t0 = Pace(), [], time.perf_counter()
    for g in range(args.groups):
        if g:
            time.sleep(args.pause)
        timings, reference_ms, anchor, _ = measure_referenced(  # new sessions per group, as the profile makes
            [backend.step(p, target) for p in nets], backend.step(reference_piece(), target), Method(), pace)
        pace = Pace(min(reference_ms, pace.quickest_ms or reference_ms), anchor)
        groups.append({"at_s": time.perf_counter() - t0, "reference_ms": reference_ms,
                       "timed_ms": [t.timed_ms for t in timings],
                       "anchored_ms": [t.median_ms for t in timings]})

    def spread(key: str) -> tuple[np.ndarray, np.ndarray]:
        ms = np.array([g[key] for g in groups])  # groups x pieces
        return ms.max(0) / ms.min(0) - 1, np.log(ms).std(0)

    (timed_range, timed_sd), (anchored_range, anchored_sd) = spread("timed_ms"), spread("anchored_ms")
    info = common.machine("torch", "onnxruntime")
    rows = [{"piece": p.name, "timed_ms": float(np.median([g["timed_ms"][i] for g in groups])),
             "timed_range": float(timed_range[i]), "anchored_range": float(anchored_range[i]),
             "timed_sd": float(timed_sd[i]), "anchored_sd": float(anchored_sd[i])} for i, p in enumerate(nets)]
    refs = [g["reference_ms"] for g in groups]
    doc = {"machine": info, "groups": groups, "rows": rows, "pause_s": args.pause,
           "command": " ".join(["python", *sys.argv])}
    md = ["# Drift between measurement groups (`benchmarks/bench_drift.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores, torch {info['torch']}, ONNX Runtime "
          f"{onnxruntime.__version__} (1 thread). Command: `{doc['command']}`.", "",
          f"{len(nets)} pieces measured as one group {len(groups)} times over {groups[-1]['at_s']:.0f} s; the "
          f"reference graph ranged {min(refs):.3f}-{max(refs):.3f} ms ({100 * (max(refs) / min(refs) - 1):.1f}%). "
          "*timed*: the fastest window as timed; *anchored*: relative to the reference's window next to each "
          "window, times the first group's reference time (what dery records). Range: slowest group over "
          "quickest; sd: of the log across groups, in percent.", "",
          "| piece | ms | timed range | anchored range | timed sd | anchored sd |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['piece']} | {r['timed_ms']:.3f} | {100 * r['timed_range']:.2f}% | "
                  f"{100 * r['anchored_range']:.2f}% | {100 * r['timed_sd']:.2f}% | {100 * r['anchored_sd']:.2f}% |")
    md += ["", f"Median over the pieces: range {100 * np.median(timed_range):.2f}% timed vs "
           f"{100 * np.median(anchored_range):.2f}% anchored; sd {100 * np.median(timed_sd):.2f}% vs "
           f"{100 * np.median(anchored_sd):.2f}% (ratio {np.median(timed_sd) / np.median(anchored_sd):.2f}x).", ""]
    common.write_results("drift", doc, md)


if __name__ == "__main__":
    common.run(main)
