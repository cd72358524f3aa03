"""The profile store: latency records and additivity calibration points, by target.

Records are keyed by what decides a latency: block fingerprint, target, device
name, backend and its version, precision, batch and input shape. Calibration
points are whole-engine measurements of assemblies next to the sums of their
block and stitch records; the correction model is fitted from them when asked
(never stored twice). Latencies are at the speed of their device's anchor
(dery.reference); a table merged from another machine of the same device name
brings its own anchor, and its entries are rescaled to the store's on reading.
Two sources are read: tables shipped with dery
(profiles/<target>/*.json) and the user's own measurements
(<cache>/profiles/<target>.json). Every new record or point is written at once,
atomically, so an interrupted `dery profile` resumes where it stopped. Runs may
share the file: a write re-reads it under its lock (`dery.cache.file_lock`) and
merges, so what another run wrote meanwhile is kept. A file that cannot be read
is reported by path and never overwritten.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .backends import get_backend
from .cache import Cache, atomic_write_json, file_lock, read_json
from .errors import USAGE, DeryError
from .ir import Group, LatencyRecord, from_json, to_json
from .reference import Pace
from .targets import Target

SCHEMA = "dery.profile/6"
OLDER = {"dery.profile/1": "pieces timed in one window each, stitches alone",
         "dery.profile/2": "records without the reference graph's time, so slow spells went unnoticed",
         "dery.profile/3": "calibration points fitted to sums without the triples' context terms",
         "dery.profile/4": "latencies as timed, so the machine's drift between measurement groups stayed in them",
         "dery.profile/5": "context terms taken from each triple's own group, which added that group's noise"}


@dataclasses.dataclass(frozen=True)
class CalibrationPoint(Group):
    """One measured engine: its latency and the sums the program would have predicted it from."""

    assembly: str
    blocks_ms: float
    boundaries_ms: float
    stitches: int
    measured_ms: float
    when: str
    anchor_ms: float = 0.0

    @property
    def key(self) -> str:
        return "|".join((self.target, self.device, self.backend, self.backend_version, self.precision,
                         str(self.batch), self.assembly))

    @property
    def sum_ms(self) -> float:
        """The in-context sum: blocks plus boundaries, with no fit."""
        return self.blocks_ms + self.boundaries_ms



@dataclasses.dataclass(frozen=True)
class Calibration:
    """engine ~= intercept + block_scale * sum(blocks) + boundary_scale * sum(boundaries) + per_stitch * #stitches.

    A boundary is what it adds in context (`Costs.boundary_ms`: its joint less
    its two blocks, and `Costs.context_ms`: with its neighbour, their triple less
    their joints), so the plain sum already holds one call overhead and the
    fusion at every boundary; the four terms take up what is left (a whole
    engine's cache pressure, what a stitch costs beyond its joint), fitted to
    relative error and shrunk towards the plain sum (0, 1, 1, 0) so that a
    handful of points cannot run away. The fit is kept only where it predicts
    points left out of it better than the plain sum does (`fitted`).
    """

    intercept_ms: float = 0.0
    block_scale: float = 1.0
    boundary_scale: float = 1.0
    per_stitch_ms: float = 0.0
    points: int = 0
    max_error: float = 0.0  # the worst relative error over the points, of the model kept
    fitted: bool = False

    def boundary_ms(self, measured_ms: float, stitched: bool) -> float:
        """What one boundary adds to an engine under the fit (it can be negative: fusion saves time)."""
        return self.boundary_scale * measured_ms + (self.per_stitch_ms if stitched else 0.0)

    def predict(self, blocks_ms: float, boundaries_ms: float, stitches: int) -> float:
        """The fitted linear model itself (the program sums `boundary_ms` per boundary instead)."""
        return (self.intercept_ms + self.block_scale * blocks_ms + self.boundary_scale * boundaries_ms
                + self.per_stitch_ms * stitches)

    def describe(self) -> str:
        """The model in one line."""
        model = (f"engine = {self.intercept_ms:+.4f} ms + {self.block_scale:.3f} x blocks + {self.boundary_scale:.3f} "
                 f"x boundaries {self.per_stitch_ms:+.4f} ms per stitch" if self.fitted
                 else "engine = blocks + boundaries (the fit predicted left-out points no better)")
        return f"{model}, from {self.points} engines, worst error on them {100 * self.max_error:.1f}%"


WITHIN = 0.05  # the error that counts as a good prediction when the fit is chosen


def _least_squares(f: np.ndarray, y: np.ndarray, shrink: float) -> np.ndarray:
    scale = float(np.median(y))
    prior = np.array([0.0, 1.0, 1.0, 0.0])
    unit = np.array([1 / scale, 1.0, 1.0, 1 / scale])  # intercept and per-stitch terms in relative units
    a = np.vstack([f / y[:, None], np.sqrt(shrink) * np.diag(unit)])
    b = np.concatenate([np.ones(len(y)), np.sqrt(shrink) * unit * prior])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def fit_calibration(points: Sequence[CalibrationPoint], shrink: float = 1e-3, choose: bool = True) -> Calibration:
    """The correction model of a set of points: the least-squares fit where, each point left out of it in
    turn, more points come within `WITHIN` of it than of the plain in-context sum (on a tie, the smaller median
    error), else the plain sum; the plain sum with fewer than three points. `choose=False` keeps the fit."""
    if len(points) < 3:
        return Calibration(points=len(points))
    y = np.array([p.measured_ms for p in points])
    f = np.array([[1.0, p.blocks_ms, p.boundaries_ms, float(p.stitches)] for p in points])
    theta = _least_squares(f, y, shrink)
    fit = Calibration(*map(float, theta), points=len(points), max_error=float(np.abs(f @ theta / y - 1.0).max()),
                      fitted=True)
    plain = np.abs(f[:, 1:3].sum(axis=1) / y - 1.0)
    left_out = np.array([abs(f[i] @ _least_squares(np.delete(f, i, 0), np.delete(y, i), shrink) / y[i] - 1.0)
                         for i in range(len(y))])
    if not choose or (np.mean(left_out <= WITHIN), -np.median(left_out)) > (np.mean(plain <= WITHIN),
                                                                             -np.median(plain)):
        return fit
    return Calibration(points=len(points), max_error=float(plain.max()))


def group_of(target: Target, device: str) -> Group:
    """The measurement group of a target on a device: (target, device, backend, version, precision, batch);
    records and calibration points of one group are comparable."""
    backend = get_backend(target.backend)
    return Group(target.name, device, backend.NAME, backend.version(), target.precision, target.batch)


def _parse(path: Path) -> tuple[list[LatencyRecord], list[CalibrationPoint]]:
    raw = read_json(path, "profile")
    if isinstance(raw, dict) and raw.get("schema") in OLDER:
        raise DeryError(f"profile file {path} is from an older dery ({raw['schema']}: {OLDER[raw['schema']]}); its "
                        f"latencies do not mix with {SCHEMA}'s; move it away to re-measure")
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise DeryError(f"damaged profile file {path}: schema is {found!r}, expected {SCHEMA!r}; move it away or "
                        f"delete it to re-measure")
    try:
        records = [from_json(LatencyRecord, r) for r in raw.get("records", [])]
        points = [from_json(CalibrationPoint, c) for c in raw.get("calibration", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise DeryError(f"damaged profile file {path}: bad record ({e!r}); move it away or delete it to "
                        f"re-measure") from e
    return records, points


def write_table(path: Path, records: Iterable[LatencyRecord], points: Iterable[CalibrationPoint]) -> None:
    """Write a profile file atomically, entries sorted by key (deterministic bytes)."""
    atomic_write_json(path, {"schema": SCHEMA,
                             "records": [to_json(r) for r in sorted(records, key=lambda r: r.key)],
                             "calibration": [to_json(c) for c in sorted(points, key=lambda c: c.key)]})


def shipped_tables(target: str) -> list[Path]:
    """Profile tables that ship with dery for a target."""
    folder = Path(str(resources.files("dery.profiles"))) / target
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


class ProfileStore:
    """Records for one target: shipped tables plus the user's file under the cache."""

    def __init__(self, cache: Cache, target: str, extra: Iterable[Path] = ()):
        self.target = target
        self.path = cache.root / "profiles" / f"{target}.json"
        self.records: dict[str, LatencyRecord] = {}
        self.points: dict[str, CalibrationPoint] = {}
        self._own: dict[str, LatencyRecord] = {}
        self._own_points: dict[str, CalibrationPoint] = {}
        for p in [*shipped_tables(target), *extra]:
            self._absorb(*_parse(p), own=False)
        if self.path.exists():
            self._absorb(*_parse(self.path), own=True)
        self._one_anchor()

    def _one_anchor(self) -> None:
        """Rescale every entry of a group to the anchor of its earliest record, so all are at one speed."""
        anchors: dict[Group, float] = {}
        for r in sorted(self.records.values(), key=lambda r: (r.when, r.key)):
            if r.anchor_ms > 0:
                anchors.setdefault(r.group, r.anchor_ms)
        for table, own, fields in ((self.records, self._own, ("median_ms",)),
                                   (self.points, self._own_points, ("blocks_ms", "boundaries_ms", "measured_ms"))):
            for key, item in list(table.items()):
                anchor = anchors.get(item.group, item.anchor_ms)
                if item.anchor_ms > 0 and item.anchor_ms != anchor:
                    f = anchor / item.anchor_ms
                    table[key] = dataclasses.replace(item, anchor_ms=anchor,
                                                     **{n: getattr(item, n) * f for n in fields})
                    if key in own:
                        own[key] = table[key]

    def _absorb(self, records: list[LatencyRecord], points: list[CalibrationPoint], own: bool) -> None:
        for r in records:
            if r.target == self.target:
                self.records[r.key] = r
                if own:
                    self._own[r.key] = r
        for c in points:
            if c.target == self.target:
                self.points[c.key] = c
                if own:
                    self._own_points[c.key] = c

    def get(self, probe: LatencyRecord) -> LatencyRecord | None:
        """The stored record with the same key as `probe` (whose timing fields are ignored)."""
        return self.records.get(probe.key)

    def find_any(self, fingerprint: str, shape: tuple[int, ...], target: Target) -> LatencyRecord | None:
        """The newest record of a piece measured on any device that matches the target."""
        hits = [r for r in self.records.values()
                if r.fingerprint == fingerprint and tuple(r.shape) == tuple(shape) and r.backend == target.backend
                and r.precision == target.precision and r.batch == target.batch and target.matches(r.device)]
        return max(hits, key=lambda r: (r.when, r.key)) if hits else None

    def pace(self, group: Group) -> Pace:
        """The quickest the reference graph has run in a measurement group on this device, and the group's anchor
        (dery.reference)."""
        timed = [r for r in self.records.values() if r.group == group and r.reference_ms > 0]
        return Pace(min(r.reference_ms for r in timed) if timed else None,
                    next((r.anchor_ms for r in timed if r.anchor_ms > 0), None))

    def add_all(self, records: Iterable[LatencyRecord]) -> None:
        """Store records and write the user's file at once."""
        self._add(self.records, self._own, records)

    def add_points(self, points: Iterable[CalibrationPoint]) -> None:
        """Store calibration points and write the user's file at once."""
        self._add(self.points, self._own_points, points)

    def _add(self, table: dict[str, Any], own: dict[str, Any], items: Iterable[Any]) -> None:
        added = False
        for item in items:
            table[item.key] = own[item.key] = item
            added = True
        if added:
            self._save()

    def calibration_points(self, group: Group) -> list[CalibrationPoint]:
        """Points measured with one (target, device, backend, version, precision, batch), in key order."""
        return sorted((p for p in self.points.values() if p.group == group), key=lambda p: p.key)

    def calibration(self, group: Group, assemblies: set[str] | None = None) -> Calibration:
        """The correction model fitted to a group's points, only those of `assemblies` when given (the plain
        sum without points)."""
        return fit_calibration([p for p in self.calibration_points(group)
                                if assemblies is None or p.assembly in assemblies])

    def calibration_for(self, target: Target) -> Calibration:
        """For a device that is not here: the fit of the matching group with the most points."""
        groups: dict[tuple, list[CalibrationPoint]] = {}
        for p in self.points.values():
            if p.precision == target.precision and p.batch == target.batch and target.matches(p.device):
                groups.setdefault(p.group, []).append(p)
        if not groups:
            return Calibration()
        best = max(groups, key=lambda g: (len(groups[g]), max(p.when for p in groups[g]), g))
        return fit_calibration(sorted(groups[best], key=lambda p: p.key))

    def _save(self) -> None:
        """Write this store's entries into the user's file, merged under its lock with what other runs wrote
        there since it was read: of two entries with one key the newer is kept, this store's on a tie."""
        try:
            with file_lock(self.path):
                records, points = _parse(self.path) if self.path.exists() else ([], [])
                write_table(self.path, _newest(records, self._own).values(), _newest(points, self._own_points).values())
        except OSError as e:
            raise DeryError(f"cannot write profile file {self.path}: {e.strerror or e}") from e


def _newest(found: Iterable[Any], own: dict[str, Any]) -> dict[str, Any]:
    """`own` entries by key, with the `found` ones it lacks or holds an older version of."""
    merged = dict(own)
    for item in found:
        if item.key not in merged or item.when > merged[item.key].when:
            merged[item.key] = item
    return merged


def merge_tables(inputs: list[Path], output: Path) -> dict[str, Any]:
    """Merge profile files measured on different machines; on a key clash the newer entry wins."""
    records: dict[str, LatencyRecord] = {}
    points: dict[str, CalibrationPoint] = {}
    for p in inputs:
        if not p.is_file():
            raise DeryError(f"profile file {p} does not exist", exit_code=USAGE)
        recs, pts = _parse(p)
        for r in recs:
            if r.key not in records or r.when > records[r.key].when:
                records[r.key] = r
        for c in pts:
            if c.key not in points or c.when > points[c.key].when:
                points[c.key] = c
    try:
        write_table(output, records.values(), points.values())
    except OSError as e:
        raise DeryError(f"cannot write {output}: {e.strerror or e}", exit_code=USAGE) from e
    return {"records": len(records), "calibration_points": len(points), "inputs": len(inputs)}
