"""What every benchmark shares: a description of the machine it ran on, and its entry point."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dery.targets import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def machine(*packages: str, **extra: Any) -> dict:
    """CPU, cores, Python, platform, load, and the installed version of each named distribution."""
    return {"cpu": cpu_name(), "cores_usable": len(os.sched_getaffinity(0)), "cores_total": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_start": os.getloadavg(), **{p: importlib.metadata.version(p) for p in packages}, **extra}


def run(main: Callable[[], int | None]) -> None:
    """Run a benchmark's main; a dery user error ends it with one line and dery's exit code."""
    from dery.errors import DeryError

    try:
        sys.exit(main())
    except DeryError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def write_results(name: str, doc: dict, markdown: list[str]) -> None:
    """benchmarks/results/<name>.json and <name>.md, and the markdown on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals ('-' for none)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def mcnemar(a: Any, b: Any) -> float:
    """Exact two-sided McNemar p-value that a and b (paired per-image correctness, bool tensors) are equally
    accurate."""
    import scipy.stats

    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def engine_latencies(assemblies: list[tuple[str, ...]], zoo: list, partition: Any, stitches: Any, target: Any,
                     pace: Any, chunk: int | None = None, readings: int = 1) -> list[list[tuple[Any, float, float]]]:
    """Compile assemblies into engines as `dery-compile` does (torch.onnx export, then the backend) in a scratch
    directory and measure them end to end, `chunk` at a time together with the reference graph, as the profile
    measures pieces, `readings` times (every other time in reverse order, so each engine shares its group with
    others): per reading, (timing with its median at the anchor's speed, the group's reference ms, the anchor)
    each, in the order given."""
    import tempfile

    from dery.backends import get_backend
    from dery.defaults import Profiling
    from dery.measure import Method
    from dery.passes.assemble import assemble
    from dery.passes.compile import compile_engine
    from dery.reference import measure_referenced, reference_piece

    backend = get_backend(target.backend)
    chunk = chunk or Profiling.chunk
    out = []
    with tempfile.TemporaryDirectory(prefix="dery-engines-") as tmp:
        steps = []
        for i, models in enumerate(assemblies):
            _, module = assemble(zoo, partition, stitches, models)
            engine = compile_engine(module, zoo[0].network.input_shape, target, Path(tmp), name=f"assembly{i}")
            steps.append(backend.engine_step(engine.path, target))
        for reading in range(readings):
            order = list(range(len(steps)))[::-1 if reading % 2 else 1]
            found: dict[int, tuple[Any, float, float]] = {}
            for start in range(0, len(order), chunk):
                group = order[start:start + chunk]
                timings, reference_ms, anchor_ms, _ = measure_referenced(
                    [steps[i] for i in group], backend.step(reference_piece(), target), Method(), pace)
                found.update((i, (t, reference_ms, anchor_ms)) for i, t in zip(group, timings))
            out.append([found[i] for i in range(len(steps))])
    return out
