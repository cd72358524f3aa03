"""The run cache: a finished `dery-compile` answers the same command again without redoing any stage.

A run is keyed by everything its outputs depend on: the command's options (less `--out`), the contents of
dery's own code, profiles and shipped weights, the files the command names (a target file, zoo checkpoints,
an ImageFolder's listing), the versions of the packages that compute or measure, the environment variables
that steer them, and the machine. A run that ends `ok` leaves its outputs under `<cache>/runs/<key>/` with a
manifest of their hashes; the same command then copies them into `--out` (byte for byte: report.json,
report.md, the plot, the engine and its sidecar, assembly.pt) in well under a second, without importing torch.
`--rerun` runs every stage again (each still served from its own cache) and replaces the entry.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from .cache import atomic_write_bytes, atomic_write_json, cache_root, content_key, damaged, ensure_dir, read_json
from .errors import USAGE, DeryError
from .targets import cpu_name

FORMAT = "dery.run/1"
MANIFEST = "manifest.json"
PACKAGES = ("dery.passes", "dery.profiles")  # with dery itself: code, target files, shipped weights
VERSIONED = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "highspy", "numpy",
             "scikit-learn", "torch-pruning", "tensorrt")
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
NOT_KEYED = ("out", "debug", "handler", "command", "rerun")  # options that do not change what a run writes


def _tree_hash(root: Path, h: Any) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _named_files(args: argparse.Namespace) -> dict[str, Any]:
    """The contents of the files the options name (a directory by its listing: names, sizes, mtimes)."""
    named: dict[str, Any] = {}
    candidates = [args.target, *(str(args.zoo or "").replace("=", ",").split(",")), args.data]
    for item in candidates:
        if not item:
            continue
        path = Path(str(item).strip()).expanduser()
        if path.is_file():
            named[str(item)] = _file_hash(path)
        elif path.is_dir():
            named[str(item)] = content_key([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                            for p in sorted(path.rglob("*")) if p.is_file()])
    return named


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_key(args: argparse.Namespace) -> str:
    """The key of a `dery-compile` run: what its outputs depend on, hashed."""
    code = hashlib.sha256()
    _tree_hash(Path(__file__).parent, code)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            _tree_hash(Path(location), code)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in NOT_KEYED}
    return content_key(FORMAT, options, code.hexdigest(), _named_files(args),
                       {n: _version(n) for n in VERSIONED},
                       {k: v for k, v in sorted(os.environ.items()) if k.startswith("DERY_") or k in ENVIRONMENT
                        if k not in ("DERY_CACHE_DIR", "DERY_QUIET")},
                       [platform.node(), platform.machine(), cpu_name(), os.cpu_count(), len(os.sched_getaffinity(0))])


def cacheable(args: argparse.Namespace) -> bool:
    """Whether this run's outputs are all in `--out` (`--save-problem` writes elsewhere)."""
    return getattr(args, "save_problem", None) is None


def entry(key: str) -> Path:
    """Where a run's outputs are kept."""
    return cache_root() / "runs" / key


def outputs(report: dict[str, Any]) -> list[str]:
    """The files a finished run wrote into `--out`."""
    from .report import PLOT

    names = ["report.json", "report.md", PLOT, report["engine"], report["engine"] + ".json"]
    return names + ([report["checkpoint"]] if report.get("checkpoint") else [])


def recall(key: str, out: Path) -> dict[str, Any] | None:
    """Copy a finished run's outputs into `out` and return its report; None when there is none."""
    where = entry(key)
    manifest_path = where / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path, "run cache manifest")
    if out.exists() and not out.is_dir():
        raise DeryError(f"--out {out} exists and is not a directory", exit_code=USAGE)
    ensure_dir(out, "--out directory")
    blobs = {}
    for name, digest in manifest["files"].items():
        path = where / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise damaged(path, "run cache", e.strerror or e) from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise damaged(path, "run cache", "its contents differ from the manifest's hash")
        blobs[name] = data
    for name, data in blobs.items():
        atomic_write_bytes(out / name, data)
    return read_json(out / "report.json", "report")


def remember(key: str, out: Path, report: dict[str, Any], *, replace: bool = False) -> None:
    """Keep a finished run's outputs under its key (the first of two runs that finish together wins;
    `replace`: this run's outputs replace the kept ones)."""
    where = entry(key)
    if replace and where.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=where.parent))
        os.rename(where, old / "entry")
        shutil.rmtree(old, ignore_errors=True)
    if (where / MANIFEST).is_file():
        return
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=where.parent))
    try:
        files = {}
        for name in outputs(report):
            shutil.copyfile(out / name, tmp / name)
            files[name] = _file_hash(tmp / name)
        atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
        try:
            os.rename(tmp, where)
        except OSError:  # another run with the same key kept its outputs first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
