"""calibrate: fit the correction from in-context sums to whole-engine latency on this target.

The profile times every block and every boundary in context (a joint of two
blocks and their stitch, and a triple for two adjacent boundaries), so block
sums plus boundary sums already hold one call overhead and what fusion saves
at each boundary. What is left - a whole
engine's cache pressure, what a stitch costs beyond its joint - is measured
here: every zoo member (no stitch), whose whole-network record the profile
holds, and, when asked for, seeded random assemblies (with stitches; none by
default: `defaults.CALIBRATION_ASSEMBLIES` says why) timed end to end
together with the reference graph (dery.reference); each point is recorded
next to the sums the program would predict it from, and
`Calibration` is fitted to this zoo's points for the target, device and
backend version. Points are stored with the profile, so they are never
measured twice; other zoos' points serve only a device that is not here.
An assembly is timed as one graph joined from its blocks' and stitches'
graphs, the way the profile joins a joint, not exported again: the exporter
took 3-4 s an engine, most of the first run's calibration, and the joined
graph times as the exported engine does (`benchmarks/results/joined.md`).
A point measured now that is more than `Profiling.calibration_off` off its own
in-context sum (most engines are within 3% of it) is measured again, and the
quicker reading is kept: noise only slows an engine, and one engine read a third
slow in a burst had pulled the whole fit (ARCHITECTURE.md, measurement).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from dery import defaults
from dery.backends import availability
from dery.defaults import Profiling
from dery.ir import LatencyRecord, Partition, utc_timestamp
from dery.passes.lower import Lowered
from dery.passes.profile import Profiler, measure_groups
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

    fresh = [point(m, costs.networks[m[0]].median_ms, costs.networks[m[0]].anchor_ms) for m in members
             if ids[m] not in known]
    store.add_points(fresh)
    todo = [m for m in mixed if ids[m] not in known]

    def measure(assemblies: list[tuple[str, ...]], title: str,
                keep: Callable[[CalibrationPoint], bool] = lambda p: True) -> list[CalibrationPoint]:
        def points(span: Sequence[int], records: list[LatencyRecord]) -> list[CalibrationPoint]:
            return [point(assemblies[i], r.median_ms, r.anchor_ms) for i, r in zip(span, records)]

        records = measure_groups([profiler.assembly(m) for m in assemblies], target, store, method=profiler.method,
                                 settings=settings, title=title,
                                 save=lambda span, records: store.add_points(filter(keep, points(span, records))))
        return points(range(len(assemblies)), records)

    fresh += measure(todo, "calibrating")
    # Noise only ever slows an engine down: of two readings the quicker is kept.
    odd = {p.assembly: p for p in fresh if abs(p.sum_ms / p.measured_ms - 1) > settings.calibration_off}
    measure([m for m in [*members, *mixed] if ids[m] in odd], "calibration engines off their sums, again",
            keep=lambda p: p.measured_ms < odd[p.assembly].measured_ms)
    return store.calibration(group, set(ids.values()))


def switches(models: Sequence[str]) -> int:
    """How many stitches an assembly has."""
    return sum(a != b for a, b in zip(models, models[1:]))
