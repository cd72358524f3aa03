"""compile: the assembled network as a deployable engine file plus a JSON sidecar.

The assembly is exported to ONNX once and handed to the target's backend:
ONNX Runtime writes an offline-optimised ONNX file, TensorRT a serialized plan,
torch-cuda an AOTInductor package. Next to every engine, `<engine>.json`
records what it was built for (backend and version, device, precision, input
shape), so loading it elsewhere fails with a clear message.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dery
import onnx
import torch
import torch.nn as nn
from dery.backends import availability, get_backend, sidecar_path
from dery.cache import (Cache, atomic_write, atomic_write_bytes, atomic_write_json, content_key, ensure_dir,
                        read_json)
from dery.ir import utc_timestamp
from dery.onnx_graph import INPUT, OUTPUT, export
from dery.targets import Target

SIDECAR_SCHEMA = "dery.engine/1"


@dataclass(frozen=True)
class Engine:
    """An engine file and what it was built for."""

    path: Path
    sidecar: Path
    backend: str
    backend_version: str
    device: str
    precision: str
    input_shape: tuple[int, ...]


def check_inputs(shape: tuple[int, ...], samples: int = 4) -> torch.Tensor:
    """The seeded inputs an engine's outputs are checked on: `samples` batches of `shape`."""
    return torch.rand(samples, *shape, generator=torch.Generator().manual_seed(0))


def compile_engine(module: nn.Module, input_shape: tuple[int, ...], target: Target, out_dir: Path,
                   name: str = "model") -> Engine:
    """Export, build and describe an engine for `target` in `out_dir` (the compile pass).

    The sidecar also keeps the float32 torch outputs on seeded inputs, so `dery bench`
    can check any engine against the network it was compiled from.
    """
    backend = get_backend(target.backend)
    shape = (target.batch, *input_shape)
    model = export(module, (torch.rand(*shape),), [INPUT], [OUTPUT])
    device, reason = availability(target)
    if device is None:
        # Nothing can be built for a device that is not here: hand over the graph its builder parses.
        path = atomic_write_bytes(out_dir / f"{name}.onnx", model.SerializeToString())
        built = {"built": False, "build_on": f"{target.device} matching {target.device_pattern!r}",
                 "why_not_built": reason}
        engine = Engine(path, sidecar_path(path), "onnx", onnx.__version__, "none", target.precision, shape)
    else:
        path = out_dir / f"{name}{backend.ENGINE_SUFFIX}"
        backend.build_engine(model, module, shape, path, target)
        built = {**backend.engine_info(),
                 "built": utc_timestamp()}
        engine = Engine(path, sidecar_path(path), backend.NAME, backend.version(), device, target.precision, shape)
    with torch.no_grad():
        reference = [module(x).tolist() for x in check_inputs(shape)]
    atomic_write_json(engine.sidecar, {
        "schema": SIDECAR_SCHEMA, "dery_version": dery.__version__, "target": target.name,
        "backend": engine.backend, "backend_version": engine.backend_version, "device": engine.device,
        "precision": target.precision, "input": {"name": INPUT, "shape": list(shape), "dtype": "float32"},
        "output": {"name": OUTPUT}, "threads": target.threads, **built,
        "check": {"seed": 0, "samples": len(reference), "outputs": reference}})
    return engine


def cached_engine(module: nn.Module, input_shape: tuple[int, ...], target: Target, out_dir: Path, name: str,
                  cache: Cache, identity: str) -> Engine:
    """`compile_engine`, served from the cache: an engine built before for the same assembly (`identity`, its
    repair included), target, device, backend and dery version is copied into `out_dir` with its sidecar."""
    backend = get_backend(target.backend)
    device, _ = availability(target)
    version = backend.version() if device is not None else onnx.__version__
    suffix = backend.ENGINE_SUFFIX if device is not None else ".onnx"
    stored = cache.path("engine", content_key("engine", identity, target, device, version, dery.__version__), suffix)
    path = out_dir / f"{name}{suffix}"
    if not sidecar_path(stored).is_file():  # the sidecar is stored last: its presence means both are whole
        engine = compile_engine(module, input_shape, target, out_dir, name)
        atomic_write(stored, lambda p: shutil.copyfile(engine.path, p))
        atomic_write(sidecar_path(stored), lambda p: shutil.copyfile(engine.sidecar, p))
        return engine
    side = read_json(sidecar_path(stored), "cached engine sidecar")
    ensure_dir(out_dir, "engine directory")
    shutil.copyfile(stored, path)
    shutil.copyfile(sidecar_path(stored), sidecar_path(path))
    return Engine(path, sidecar_path(path), side["backend"], side["backend_version"], side["device"],
                  side["precision"], tuple(side["input"]["shape"]))
