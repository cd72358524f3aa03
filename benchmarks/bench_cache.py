"""Cache: why two blocks of one network can run slower together than apart on a CPU.

A block timed alone, call after call, keeps its weights in the core's L2 cache
when they fit; inside a network, the blocks around it evict them. For every two
consecutive blocks of each default-zoo member, the pair is timed three ways in
one group with the reference graph (dery's method, at the anchor's speed):

* *apart*: each block alone, the two figures added (what a block sum predicts);
* *alternating*: both blocks' own sessions called one after the other, as one
  step: the same two graphs as apart, with the other block's weights passing
  through the cache between calls;
* *joined*: the two blocks as one graph (dery's joint piece).

If the extra time of the joined pair over its parts comes from the cache, the
alternating pair shows it too, and it grows with the pair's weights against
the L2 size; if it came from ONNX Runtime optimising the joined graph
differently, alternating would stay at apart.

    python benchmarks/bench_cache.py

Writes benchmarks/results/cache.md and cache.json.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _common as common
import numpy as np


def l2_bytes() -> int | None:
    """The first CPU's L2 cache size from Linux sysfs (None where it is not there)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
        except (OSError, ValueError, KeyError):
            return None
    return None


def main() -> None:
    import onnxruntime
    from dery.backends import get_backend
    from dery.defaults import Profiling
    from dery.driver import CompileConfig, front
    from dery.measure import Method
    from dery.passes.profile import pieces
    from dery.profile_store import group_of
    from dery.reference import measure_referenced, reference_piece

    with tempfile.TemporaryDirectory(prefix="dery-cache-") as tmp:
        s = front(CompileConfig(target="cpu", latency_ms=1.0, out=Path(tmp)))
    backend = get_backend(s.target.backend)
    every = pieces(s.lowered, s.partition, s.stitches, s.target.batch, s.cache)
    pairs = [(m, j) for m in s.partition.models for j in range(s.partition.k - 1)]

    def alternating(m: str, j: int):
        first, second = backend.step(every["block", m, j], s.target), backend.step(every["block", m, j + 1], s.target)

        def both() -> None:
            first()
            second()

        return both

    steps = []
    for m, j in pairs:
        steps += [backend.step(every["block", m, j], s.target), backend.step(every["block", m, j + 1], s.target),
                  alternating(m, j), backend.step(every["joint", m, m, j], s.target)]
    pace = s.store.pace(group_of(s.target, s.device))
    timings = []
    chunk = Profiling.chunk // 4 * 4  # about the profile's group size, a pair's four steps together
    for start in range(0, len(steps), chunk):
        group, _, _, _ = measure_referenced(steps[start:start + chunk], backend.step(reference_piece(), s.target),
                                            Method(), pace)
        timings += [t.median_ms for t in group]

    def weights(piece) -> int:
        return sum(int(np.prod(i.dims)) * 4 for i in piece.onnx.graph.initializer)

    l2 = l2_bytes()
    rows = []
    for i, (m, j) in enumerate(pairs):
        a, b, alt, joined = timings[4 * i:4 * i + 4]
        rows.append({"member": m, "boundary": j, "weights_bytes": weights(every["block", m, j])
                     + weights(every["block", m, j + 1]), "apart_ms": a + b, "alternating_ms": alt,
                     "joined_ms": joined})
    info = common.machine("torch", "onnxruntime", l2_bytes=l2)
    doc = {"machine": info, "command": " ".join(["python", *sys.argv]), "rows": rows}
    md = ["# Two blocks together and apart (`benchmarks/bench_cache.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores, L2 "
          f"{'unknown' if l2 is None else f'{l2 / 2 ** 20:g} MiB'} per core (sysfs), ONNX Runtime "
          f"{onnxruntime.__version__} (1 thread). Command: `{doc['command']}`.", "",
          "Every two consecutive blocks of each default-zoo member, in one run: *apart* adds the two blocks timed "
          "alone; *alternating* calls the two blocks' own sessions one after the other as one step; *joined* is "
          "the two blocks as one graph. Extra: over apart.", "",
          "| member | blocks | weights (MiB) | apart (ms) | alternating (ms) | joined (ms) | alternating extra | "
          "joined extra |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["weights_bytes"]):
        md.append(f"| {r['member']} | {r['boundary']}, {r['boundary'] + 1} | {r['weights_bytes'] / 2 ** 20:.2f} | "
                  f"{r['apart_ms']:.4f} | {r['alternating_ms']:.4f} | {r['joined_ms']:.4f} | "
                  f"{100 * (r['alternating_ms'] / r['apart_ms'] - 1):+.1f}% | "
                  f"{100 * (r['joined_ms'] / r['apart_ms'] - 1):+.1f}% |")
    if l2 is not None:
        md.append("")
        for label, keep in (("fit in L2", lambda r: r["weights_bytes"] <= l2),
                            ("exceed L2", lambda r: r["weights_bytes"] > l2)):
            part = [r for r in rows if keep(r)]
            if part:
                alt = np.median([r["alternating_ms"] / r["apart_ms"] - 1 for r in part])
                joined = np.median([r["joined_ms"] / r["apart_ms"] - 1 for r in part])
                md.append(f"- {len(part)} pairs whose weights {label}: median extra {100 * alt:+.1f}% alternating, "
                          f"{100 * joined:+.1f}% joined.")
    extra_alt = np.array([r["alternating_ms"] - r["apart_ms"] for r in rows])
    extra_joined = np.array([r["joined_ms"] - r["apart_ms"] for r in rows])
    md += [f"- Correlation of the extra milliseconds, alternating against joined: "
           f"{np.corrcoef(extra_alt, extra_joined)[0, 1]:.2f}.", ""]
    common.write_results("cache", doc, md)


if __name__ == "__main__":
    common.run(main)
