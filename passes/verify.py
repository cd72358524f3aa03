"""verify: measure the engine file end to end, and decide the next budget if it overshoots.

The measurement uses the shared method through the target's backend, on the
engine file exactly as it will be deployed. It is cached by the assembly's
identity (blocks, weights, stitches), the device and the backend version, so
rerunning the same compile reports the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dery.backends import get_backend
from dery.cache import Cache, content_key
from dery.measure import Method, Timing
from dery.targets import Target, local_device_name


@dataclass(frozen=True)
class Round:
    """One closed-loop round: what was solved, predicted and measured."""

    round: int
    limit_ms: float
    chosen: tuple[str, ...]
    predicted_ms: float
    measured_ms: float | None
    p90_ms: float | None
    cv: float | None
    within_budget: bool
    score: float


def measure_engine(path: Path, identity: str, target: Target, cache: Cache, method: Method = Method()) -> Timing:
    """End-to-end latency of an engine file (the verify pass), cached by assembly identity."""
    backend = get_backend(target.backend)
    key = content_key("verify", identity, target.name, local_device_name(target), backend.NAME, backend.version(),
                      target.precision, target.batch, target.threads, method)
    raw = cache.json("verify", key, lambda: backend.time_engine(path, target, method).__dict__,
                     what="engine measurement")
    return Timing(**raw)


def next_limit(limit_ms: float, budget_ms: float, measured_ms: float) -> float:
    """Tighten the program's latency limit by the observed relative error (always strictly down)."""
    return min(limit_ms * budget_ms / measured_ms, limit_ms * (1 - 1e-6))
