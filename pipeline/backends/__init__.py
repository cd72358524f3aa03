"""Latency and compile backends: one module each, heavy dependencies imported lazily.

A backend prepares one timed call of a piece of network (a block, a joint of
two blocks, a whole engine) for the shared method of dery.measure, builds a
deployable engine file from the assembled network, loads and runs such a file,
and says whether it can run here and, if not, why.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch.nn as nn

from ..cache import damaged, read_json
from ..errors import USAGE, DeryError
from ..measure import Step
from ..targets import Target

MODULES = {
    "onnxruntime": "dery.backends.onnxruntime",
    "torch-cuda": "dery.backends.torch_cuda",
    "tensorrt": "dery.backends.tensorrt",
}


@dataclass(frozen=True, eq=False)
class Piece:
    """Something to measure: a way to get its ONNX graph and (for torch backends) its module. Both are built
    only when asked, so looking a piece up by fingerprint in the profile store costs nothing."""

    name: str
    fingerprint: str
    input_shape: tuple[int, ...]
    build_onnx: Callable[[], onnx.ModelProto]
    module: Callable[[], nn.Module]

    @cached_property
    def onnx(self) -> onnx.ModelProto:
        """The piece's ONNX graph (built once)."""
        return self.build_onnx()


class Runner(Protocol):
    """A loaded engine: call it on a batch of inputs."""

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    """What every backend module provides (as module-level functions)."""

    NAME: str
    ENGINE_SUFFIX: str

    def unavailable(self, target: Target) -> str | None: ...
    def version(self) -> str: ...
    def engine_info(self) -> dict[str, str]: ...
    def step(self, piece: Piece, target: Target) -> Step: ...
    def build_engine(self, model: onnx.ModelProto, module: nn.Module, input_shape: tuple[int, ...],
                     path: Path, target: Target) -> Path: ...
    def load_engine(self, path: Path, target: Target) -> Runner: ...
    def engine_step(self, path: Path, target: Target) -> Step: ...


def sidecar_path(engine: Path) -> Path:
    """Where the compile pass writes what an engine was built for: `<engine>.json`."""
    return engine.with_name(engine.name + ".json")


def check_sidecar(path: Path, expected: dict[str, Any], *, strict: bool, advice: str) -> list[str]:
    """Compare an engine's sidecar (if present) with this machine; refuse (strict) or warn on differences."""
    side = sidecar_path(path)
    if not side.exists():
        return []
    recorded = read_json(side, "engine sidecar")
    if not isinstance(recorded, dict):
        raise damaged(side, "engine sidecar", "not a JSON object")
    seen: set[tuple[str, str]] = set()
    differences = []
    for key, here in expected.items():
        if key in recorded and recorded[key] != here and (str(recorded[key]), str(here)) not in seen:
            seen.add((str(recorded[key]), str(here)))
            differences.append(f"{key} {recorded[key]!r} (this machine: {here!r})")
    if differences:
        message = f"engine {path} was built for another setup: {'; '.join(differences)}; {advice}"
        if strict:
            raise DeryError(message)
        warnings.warn(message, stacklevel=2)
    return differences


def get_backend(name: str) -> Backend:
    """The backend module by name; an unknown name lists the known ones."""
    if name not in MODULES:
        raise DeryError(f"unknown backend {name!r}; known backends: {', '.join(MODULES)}", exit_code=USAGE)
    return importlib.import_module(MODULES[name])  # type: ignore[return-value]


def availability(target: Target) -> tuple[str | None, str | None]:
    """(this machine's device name, None) when the target can be measured here, else (None, why not)."""
    from ..targets import local_device_name

    reason = get_backend(target.backend).unavailable(target)
    if reason is not None:
        return None, reason
    device = local_device_name(target)
    if device is None or not target.matches(device):
        return None, (f"this machine's {target.device} is {device!r}, not the target's device "
                      f"(pattern {target.device_pattern!r})")
    return device, None
