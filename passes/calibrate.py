"""calibrate: fit the correction from in-context sums to whole-engine latency on this target.

The profile times every block and every boundary in context (a joint of two
blocks and their stitch, and a triple for two adjacent boundaries), so block
sums plus boundary sums already hold one call overhead and what fusion saves
at each boundary. What is left - a whole
engine's cache pressure, what a stitch costs beyond its joint - is measured
here: every zoo member (no stitch) and a handful of seeded random assemblies
(with stitches) are compiled into engines and timed end to end together with
the reference graph (dery.reference), each point is recorded next to the sums
the program would predict it from, and
`Calibration` is fitted to this zoo's points for the target, device and
backend version. Points are stored with the profile, so they are never
measured twice; other zoos' points serve only a device that is not here.
"""
from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from dery import defaults, progress
from dery.backends import availability, get_backend
from dery.defaults import Profiling
from dery.ir import Partition, utc_timestamp
from dery.measure import Method, Timing
from dery.passes.assemble import assemble
from dery.passes.compile import compile_engine
from dery.passes.lower import Lowered
from dery.passes.profile import Costs, Profiler
from dery.passes.stitch import Stitches
from dery.passes.verify import identity
from dery.profile_store import Calibration, CalibrationPoint, ProfileStore, group_of
from dery.reference import Pace, measure_referenced, reference_piece
from dery.targets import Target


def random_assemblies(partition: Partition, stitches: Stitches, n: int, seed: int,
                      exclude: Sequence[tuple[str, ...]] = ()) -> list[tuple[str, ...]]:
    """`n` distinct assemblies with at least one stitch, drawn with a fixed seed."""
    rng = random.Random(seed)
    seen = set(map(tuple, exclude))
    out: list[tuple[str, ...]] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        models = [rng.choice(partition.models)]
        for j in range(1, partition.k):
            options = [b for b in partition.models if b == models[-1] or stitches.get(models[-1], b, j - 1)]
            models.append(rng.choice(options))
        key = tuple(models)
        if len(set(key)) > 1 and key not in seen:
            seen.add(key)
            out.append(key)
    return out


def engine_latencies(assemblies: Sequence[tuple[str, ...]], zoo: Sequence[Lowered], partition: Partition,
                     stitches: Stitches, target: Target, method: Method = Method(), chunk: int = Profiling.chunk,
                     advance: Callable[..., None] = lambda n=1, note=None: None,
                     pace: Pace = Pace()) -> list[tuple[Timing, float, float]]:
    """Compile assemblies into engines in a scratch directory and measure them end to end, `chunk` at a time
    together with the reference graph, as pieces are measured: (timing with its median at the anchor's speed,
    the group's reference ms, the anchor) each."""
    backend = get_backend(target.backend)
    out: list[tuple[Timing, float, float]] = []
    for start in range(0, len(assemblies), chunk):
        with tempfile.TemporaryDirectory(prefix="dery-cal-") as tmp:
            steps = []
            for i, models in enumerate(assemblies[start:start + chunk]):
                _, module = assemble(zoo, partition, stitches, models)
                engine = compile_engine(module, zoo[0].network.input_shape, target, Path(tmp), name=f"assembly{i}")
                steps.append(backend.engine_step(engine.path, target))
                advance()
            timings, reference_ms, anchor_ms, _ = measure_referenced(
                steps, backend.step(reference_piece(), target), method, pace)
            out += [(t, reference_ms, anchor_ms) for t in timings]
    return out


def calibrate(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, costs: Costs, target: Target,
              store: ProfileStore, *, assemblies: int = defaults.CALIBRATION_ASSEMBLIES,
              seed: int = defaults.SEED, settings: Profiling = Profiling(), profiler: Profiler | None = None
              ) -> Calibration:
    """The calibrate pass: add this zoo's points when the target is here, then fit them (a zoo of networks
    ten times larger or smaller caches and fuses differently; other zoos' points are not mixed in). With a
    `profiler`, the joints and triples of the random assemblies are measured first where they are not yet.

    Without the device, the stored points of the best-covered matching device are used (none: the plain sum).
    """
    device, _ = availability(target)
    if device is None:
        return store.calibration_for(target)
    group = group_of(target, device)
    known = {p.assembly for p in store.calibration_points(group)}
    when = utc_timestamp()
    members = [(m,) * partition.k for m in partition.models]
    mixed = random_assemblies(partition, stitches, assemblies, seed)
    ids = {m: identity(m, partition, stitches, zoo) for m in [*members, *mixed]}
    if profiler is not None:
        profiler.ensure([key for m in mixed for key in costs.missing(m)])
        costs = profiler.costs()

    def point(models: tuple[str, ...], measured: float, anchor_ms: float) -> CalibrationPoint:
        blocks, boundaries = costs.sums(models)
        return CalibrationPoint(**dataclasses.asdict(group), assembly=ids[models], blocks_ms=blocks,
                                boundaries_ms=boundaries, stitches=switches(models), measured_ms=measured, when=when,
                                anchor_ms=anchor_ms)

    store.add_points(point(m, costs.networks[m[0]].median_ms, costs.networks[m[0]].anchor_ms) for m in members
                     if ids[m] not in known)
    todo = [m for m in mixed if ids[m] not in known]
    with progress.task("calibrating", len(todo)) as advance:
        measured = engine_latencies(todo, zoo, partition, stitches, target, chunk=settings.chunk, advance=advance,
                                    pace=store.pace(group))
        store.add_points(point(m, t.median_ms, anchor) for m, (t, _, anchor) in zip(todo, measured))
    return store.calibration(group, set(ids.values()))


def switches(models: Sequence[str]) -> int:
    """How many stitches an assembly has."""
    return sum(a != b for a, b in zip(models, models[1:]))
