"""The profile store: latency records and additivity calibrations, by target.

Records are keyed by what decides a latency: block fingerprint, target, device
name, backend and its version, precision, batch and input shape. Two sources
are read: tables shipped with dery (profiles/<target>/*.json) and the user's
own measurements (<cache>/profiles/<target>.json). Every new record is written
at once, atomically, so an interrupted `dery profile` resumes where it stopped.
A file that cannot be read is reported by path and never overwritten.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from .cache import Cache, atomic_write_json, read_json
from .errors import USAGE, DeryError
from .ir import LatencyRecord, from_json, to_json
from .targets import Target

SCHEMA = "dery.profile/1"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Engine latency ~= intercept + block_scale * sum(blocks) + stitch_scale * sum(stitches) + per_stitch * #stitches."""

    target: str
    device: str
    backend: str
    backend_version: str
    intercept_ms: float
    block_scale: float
    stitch_scale: float
    per_stitch_ms: float
    points: int
    max_error: float

    @property
    def key(self) -> str:
        return "|".join((self.target, self.device, self.backend, self.backend_version))

    def predict(self, blocks_ms: float, stitches_ms: float, stitches: int) -> float:
        return self.intercept_ms + self.block_scale * blocks_ms + self.stitch_scale * stitches_ms \
            + self.per_stitch_ms * stitches


IDENTITY = dict(intercept_ms=0.0, block_scale=1.0, stitch_scale=1.0, per_stitch_ms=0.0, points=0, max_error=0.0)


def _parse(path: Path) -> tuple[list[LatencyRecord], list[Calibration]]:
    raw = read_json(path, "profile")
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise DeryError(f"damaged profile file {path}: schema is {found!r}, expected {SCHEMA!r}; move it away or "
                        f"delete it to re-measure")
    try:
        records = [from_json(LatencyRecord, r) for r in raw.get("records", [])]
        calibrations = [from_json(Calibration, c) for c in raw.get("calibrations", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise DeryError(f"damaged profile file {path}: bad record ({e!r}); move it away or delete it to "
                        f"re-measure") from e
    return records, calibrations


def write_table(path: Path, records: Iterable[LatencyRecord], calibrations: Iterable[Calibration]) -> None:
    """Write a profile file atomically, records sorted by key (deterministic bytes)."""
    atomic_write_json(path, {"schema": SCHEMA,
                             "records": [to_json(r) for r in sorted(records, key=lambda r: r.key)],
                             "calibrations": [to_json(c) for c in sorted(calibrations, key=lambda c: c.key)]})


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
        self.calibrations: dict[str, Calibration] = {}
        self._own: dict[str, LatencyRecord] = {}
        self._own_cal: dict[str, Calibration] = {}
        for p in [*shipped_tables(target), *extra]:
            recs, cals = _parse(p)
            self._absorb(recs, cals, own=False)
        if self.path.exists():
            recs, cals = _parse(self.path)
            self._absorb(recs, cals, own=True)

    def _absorb(self, records: list[LatencyRecord], calibrations: list[Calibration], own: bool) -> None:
        for r in records:
            if r.target == self.target:
                self.records[r.key] = r
                if own:
                    self._own[r.key] = r
        for c in calibrations:
            if c.target == self.target:
                self.calibrations[c.key] = c
                if own:
                    self._own_cal[c.key] = c

    def get(self, probe: LatencyRecord) -> LatencyRecord | None:
        """The stored record with the same key as `probe` (whose timing fields are ignored)."""
        return self.records.get(probe.key)

    def find_any(self, fingerprint: str, shape: tuple[int, ...], target: Target) -> LatencyRecord | None:
        """The newest record of a piece measured on any device that matches the target."""
        hits = [r for r in self.records.values()
                if r.fingerprint == fingerprint and tuple(r.shape) == tuple(shape) and r.backend == target.backend
                and r.precision == target.precision and r.batch == target.batch and target.matches(r.device)]
        return max(hits, key=lambda r: (r.when, r.key)) if hits else None

    def add(self, record: LatencyRecord) -> None:
        """Store a record and write the user's file at once."""
        self.records[record.key] = record
        self._own[record.key] = record
        self._save()

    def calibration(self, device: str, backend: str, backend_version: str) -> Calibration | None:
        return self.calibrations.get("|".join((self.target, device, backend, backend_version)))

    def set_calibration(self, cal: Calibration) -> None:
        self.calibrations[cal.key] = cal
        self._own_cal[cal.key] = cal
        self._save()

    def _save(self) -> None:
        try:
            write_table(self.path, self._own.values(), self._own_cal.values())
        except OSError as e:
            raise DeryError(f"cannot write profile file {self.path}: {e.strerror or e}") from e


def merge_tables(inputs: list[Path], output: Path) -> dict[str, Any]:
    """Merge profile files measured on different machines; on a key clash the newer record wins."""
    records: dict[str, LatencyRecord] = {}
    calibrations: dict[str, Calibration] = {}
    for p in inputs:
        if not p.is_file():
            raise DeryError(f"profile file {p} does not exist", exit_code=USAGE)
        recs, cals = _parse(p)
        for r in recs:
            if r.key not in records or r.when > records[r.key].when:
                records[r.key] = r
        for c in cals:
            calibrations[c.key] = c
    try:
        write_table(output, records.values(), calibrations.values())
    except OSError as e:
        raise DeryError(f"cannot write {output}: {e.strerror or e}", exit_code=USAGE) from e
    return {"records": len(records), "calibrations": len(calibrations), "inputs": len(inputs)}
