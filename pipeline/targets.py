"""The target registry: named deployment devices described by TOML files.

`--target a100` resolves to profiles/targets/a100.toml: which device it means
(a name pattern matched against the local CPU or GPU), the backend that
measures and compiles for it, precision, batch size, threads and the device's
peak figures (used only to estimate latencies for a device that is not here).
"""
from __future__ import annotations

import functools
import platform
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import USAGE, DeryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Target:
    """One deployment device and how dery measures and compiles for it."""

    name: str
    description: str
    backend: str
    precision: str
    batch: int
    device: str  # "cpu" or "cuda"
    device_pattern: str
    threads: int
    peak: tuple[tuple[str, float], ...]
    path: str
    estimate: tuple[tuple[str, float], ...] = ()

    def peak_figure(self, key: str) -> float | None:
        """A peak figure such as `tflops_fp16` or `bandwidth_gbs`, if the TOML gives it."""
        return dict(self.peak).get(key)

    def matches(self, device_name: str) -> bool:
        """Whether a device name (CPU model or GPU name) is the device this target means."""
        return re.search(self.device_pattern, device_name, re.IGNORECASE) is not None


def _targets_dir() -> Path:
    return Path(str(resources.files("dery.profiles") / "targets"))


def _parse(path: Path) -> Target:
    try:
        raw = tomllib.loads(path.read_text())
        target = Target(
            name=str(raw["name"]),
            description=str(raw.get("description", "")),
            backend=str(raw["backend"]),
            precision=str(raw["precision"]),
            batch=int(raw["batch"]),
            device=str(raw["device"]),
            device_pattern=str(raw.get("device_pattern", ".*")),
            threads=int(raw.get("threads", 1)),
            peak=tuple(sorted((str(k), float(v)) for k, v in raw.get("peak", {}).items())),
            path=str(path),
            estimate=tuple(sorted((str(k), float(v)) for k, v in raw.get("estimate", {}).items())),
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise DeryError(f"damaged target file {path}: {e!r}") from e
    if target.precision not in PRECISIONS:
        raise DeryError(f"target file {path}: precision {target.precision!r} is not one of {', '.join(PRECISIONS)}")
    if target.device not in ("cpu", "cuda"):
        raise DeryError(f"target file {path}: device {target.device!r} must be 'cpu' or 'cuda'")
    if target.batch < 1:
        raise DeryError(f"target file {path}: batch must be >= 1, got {target.batch}")
    return target


@functools.cache
def registry() -> dict[str, Target]:
    """Every shipped target by name."""
    found = {}
    for path in sorted(_targets_dir().glob("*.toml")):
        t = _parse(path)
        found[t.name] = t
    return found


def get_target(name: str) -> Target:
    """Resolve a target name; an unknown one lists the known names."""
    known = registry()
    if name not in known:
        raise DeryError(f"unknown target {name!r}; known targets: {', '.join(sorted(known))}", exit_code=USAGE)
    return known[name]


@functools.cache
def cpu_name() -> str:
    """The local CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cuda_device_name() -> str | None:
    """The first CUDA GPU's name, or None when torch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def local_device_name(target: Target) -> str | None:
    """The name of the local device of the target's kind, or None when there is none."""
    return cpu_name() if target.device == "cpu" else cuda_device_name()
