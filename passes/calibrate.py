"""calibrate: fit the correction from in-context sums to whole-engine latency on this target.

The profile times every block and every boundary in context (a joint of two
blocks and their stitch, and a triple for two adjacent boundaries), so block
sums plus boundary sums already hold one call overhead and what fusion saves
at each boundary. What is left - a whole
engine's cache pressure, what a stitch costs beyond its joint - is measured
here: every zoo member (no stitch) and a handful of seeded random assemblies
(with stitches) are timed end to end together with the reference graph
(dery.reference), each point is recorded next to the sums the program would
predict it from, and
`Calibration` is fitted to this zoo's points for the target, device and
backend version. Points are stored with the profile, so they are never
measured twice; other zoos' points serve only a device that is not here.
An assembly is timed as one graph joined from its blocks' and stitches'
graphs, the way the profile joins a joint, not exported again: the exporter
took 3-4 s an engine, most of the first run's calibration, and the joined
graph times as the exported engine does (`benchmarks/results/joined.md`).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from dery import defaults, progress
from dery.backends import availability, get_backend
from dery.defaults import Profiling
from dery.ir import Partition, utc_timestamp
from dery.passes.lower import Lowered
from dery.passes.profile import Profiler, measure_pieces
from dery.passes.stitch import Stitches
from dery.passes.verify import identity
from dery.profile_store import Calibration, CalibrationPoint, ProfileStore, group_of
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


def calibrate(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, profiler: Profiler, target: Target,
              store: ProfileStore, *, assemblies: int = defaults.CALIBRATION_ASSEMBLIES,
              seed: int = defaults.SEED, settings: Profiling = Profiling()) -> Calibration:
    """The calibrate pass: add this zoo's points when the target is here, then fit them (a zoo of networks
    ten times larger or smaller caches and fuses differently; other zoos' points are not mixed in). The joints
    and triples of the random assemblies are measured first where they are not yet.

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
    profiler.ensure([key for m in mixed for key in profiler.costs().missing(m)])
    costs = profiler.costs()

    def point(models: tuple[str, ...], measured: float, anchor_ms: float) -> CalibrationPoint:
        blocks, boundaries = costs.sums(models)
        return CalibrationPoint(**dataclasses.asdict(group), assembly=ids[models], blocks_ms=blocks,
                                boundaries_ms=boundaries, stitches=switches(models), measured_ms=measured, when=when,
                                anchor_ms=anchor_ms)

    store.add_points(point(m, costs.networks[m[0]].median_ms, costs.networks[m[0]].anchor_ms) for m in members
                     if ids[m] not in known)
    todo = [m for m in mixed if ids[m] not in known]
    backend = get_backend(target.backend)
    with progress.task("calibrating", len(todo)) as advance:
        for start in range(0, len(todo), settings.chunk):
            chunk = todo[start:start + settings.chunk]
            records = measure_pieces([profiler.assembly(m) for m in chunk], target, device, backend,
                                     profiler.method, store.pace(group))
            store.add_points(point(m, r.median_ms, r.anchor_ms) for m, r in zip(chunk, records))
            advance(len(chunk))
    return store.calibration(group, set(ids.values()))


def switches(models: Sequence[str]) -> int:
    """How many stitches an assembly has."""
    return sum(a != b for a, b in zip(models, models[1:]))
