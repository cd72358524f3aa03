"""calibrate: fit the correction from block sums to whole-engine latency on this target.

A compiled engine is not the sum of its blocks timed one by one: the engine is
one call instead of one per block, its optimiser fuses across boundaries, and a
stitch costs more (or less) inside the engine than alone. This pass measures a
few whole engines - every zoo member (no stitch) and a handful of seeded random
assemblies (with stitches) - records each next to the sums the program would
predict it from, and fits `Calibration` to this zoo's points for the target,
device and backend version. Points are stored with the profile, so they are
never measured twice; other zoos' points serve only a device that is not here.
"""
from __future__ import annotations

import datetime
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dery import progress
from dery.backends import availability, get_backend
from dery.cache import Cache
from dery.ir import Partition
from dery.measure import Method
from dery.passes.assemble import assemble
from dery.passes.compile import compile_engine
from dery.passes.lower import Lowered
from dery.passes.profile import Costs
from dery.passes.stitch import Stitches
from dery.passes.verify import identity, measure_engine
from dery.profile_store import Calibration, CalibrationPoint, ProfileStore
from dery.targets import Target

Group = tuple[str, str, str, str, str, int]


def group_of(target: Target, device: str) -> Group:
    """The calibration group of a target on a device: (target, device, backend, version, precision, batch)."""
    backend = get_backend(target.backend)
    return (target.name, device, backend.NAME, backend.version(), target.precision, target.batch)


def sums(models: Sequence[str], partition: Partition, costs: Costs) -> tuple[float, float, int]:
    """(sum of block medians, sum of stitch medians, number of stitches) of an assembly."""
    blocks = sum(costs.blocks[m, k].median_ms for k, m in enumerate(models))
    switches = [(a, b, j) for j, (a, b) in enumerate(zip(models, models[1:])) if a != b]
    return blocks, sum(costs.stitches[s].median_ms for s in switches), len(switches)


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


def engine_latency(models: tuple[str, ...], zoo: Sequence[Lowered], partition: Partition, stitches: Stitches,
                   target: Target, cache: Cache, method: Method = Method()) -> float:
    """Compile an assembly into an engine in a scratch directory and measure it end to end (cached)."""
    _, module = assemble(zoo, partition, stitches, models)
    with tempfile.TemporaryDirectory(prefix="dery-cal-") as tmp:
        engine = compile_engine(module, zoo[0].network.input_shape, target, Path(tmp))
        return measure_engine(engine.path, identity(models, partition, stitches, zoo), target, cache,
                              method).median_ms


def calibrate(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, costs: Costs, target: Target,
              store: ProfileStore, cache: Cache, *, assemblies: int = 12, seed: int = 0) -> Calibration:
    """The calibrate pass: add this zoo's points when the target is here, then fit them (a zoo of networks
    ten times larger or smaller caches and fuses differently; other zoos' points are not mixed in).

    Without the device, the stored points of the best-covered matching device are used (none: the plain sum).
    """
    device, _ = availability(target)
    if device is None:
        return store.calibration_for(target)
    group = group_of(target, device)
    known = {p.assembly for p in store.calibration_points(group)}
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    members = [(m,) * partition.k for m in partition.models]
    mixed = random_assemblies(partition, stitches, assemblies, seed)
    ids = {m: identity(m, partition, stitches, zoo) for m in [*members, *mixed]}

    def point(models: tuple[str, ...], measured: float) -> CalibrationPoint:
        b, s, n = sums(models, partition, costs)
        return CalibrationPoint(*group, ids[models], b, s, n, measured, when)

    for models in members:
        if ids[models] not in known:
            store.add_point(point(models, costs.networks[models[0]].median_ms))
    todo = [m for m in mixed if ids[m] not in known]
    with progress.task("calibrating", len(todo)) as advance:
        for models in todo:
            store.add_point(point(models, engine_latency(models, zoo, partition, stitches, target, cache)))
            advance()
    return store.calibration(group, set(ids.values()))
