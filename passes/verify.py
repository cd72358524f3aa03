"""verify: measure the engine file end to end, and decide the next budget if it overshoots.

The measurement uses the shared method through the target's backend, on the
engine file exactly as it will be deployed, with the reference graph beside it
(more rounds while the machine runs slow, as the profile measures). A disturbed
reading (its fastest windows disagree, or the reference stayed slow) is measured
again, up to `Profiling.verify_attempts` times in all. A clean one is cached by the assembly's
identity (blocks, weights, stitches), the device and the backend version, so
rerunning the same compile reports the same numbers; a disturbed one never is,
and the fastest of its attempts is reported, flagged `noisy`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from dery.backends import get_backend, sidecar_path
from dery.cache import Cache, content_key, damaged, read_json
from dery.defaults import Profiling
from dery.errors import USAGE, DeryError
from dery.ir import Partition
from dery.measure import Method, Timing, measure
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches
from dery.reference import Pace, measure_referenced, reference_piece
from dery.targets import Target, get_target, local_device_name


def identity(models: Sequence[str], partition: Partition, stitches: Stitches, zoo: Sequence[Lowered],
             trained: tuple = ()) -> str:
    """What makes two engines the same: blocks, their weights, the stitch weights, and the repair that trained
    them (`trained`: kind, epochs, seed; empty for none)."""
    weights = {lw.name: lw.network.weights_key for lw in zoo}
    parts = [(m, partition.block(m, k).fingerprint, weights[m]) for k, m in enumerate(models)]
    joins = [stitches.get(a, b, j).weights for j, (a, b) in enumerate(zip(models, models[1:])) if a != b]
    return content_key("assembly", parts, joins, *((trained,) if trained else ()))


def measure_engine(path: Path, identity: str, target: Target, cache: Cache, method: Method = Method(),
                   pace: Pace = Pace(), attempts: int = Profiling.verify_attempts, predicted_ms: float | None = None,
                   off: float = Profiling.verify_off) -> Timing:
    """End-to-end latency of an engine file (the verify pass) at the speed of the device's anchor, cached by
    assembly identity and anchor when clean; `pace` is what the profile says about the device's speed
    (dery.reference). A reading that is noisy, taken in a slow spell, or more than `off` away from
    `predicted_ms` is measured again; one off the prediction is trusted once a second clean reading agrees with
    it within the method's spread. After `attempts` the fastest is kept, flagged noisy and not cached."""
    backend = get_backend(target.backend)
    key = content_key("verify", identity, target.name, local_device_name(target), backend.NAME, backend.version(),
                      target.precision, target.batch, target.threads, method, pace.anchor_ms)

    def make() -> dict:
        tries, clean = [], []
        for _ in range(attempts):
            (timing,), _, _, slow = measure_referenced([backend.engine_step(path, target)],
                                                       backend.step(reference_piece(), target), method, pace)
            if not (timing.noisy or slow):
                if predicted_ms is None or abs(timing.median_ms / predicted_ms - 1) <= off:
                    return timing.__dict__
                agreeing = [t for t in clean if abs(t.median_ms / timing.median_ms - 1) <= method.max_spread]
                if agreeing:
                    return min([timing, *agreeing], key=lambda t: t.median_ms).__dict__
                clean.append(timing)
            tries.append(replace(timing, noisy=True))
        return min(tries, key=lambda t: t.median_ms).__dict__

    return Timing(**cache.json("verify", key, make, what="engine measurement", keep=lambda t: not t["noisy"]))


def next_limit(limit_ms: float, budget_ms: float, measured_ms: float) -> float:
    """Tighten the program's latency limit by the observed relative error (always strictly down)."""
    return min(limit_ms * budget_ms / measured_ms, limit_ms * (1 - 1e-6))


TOLERANCE = {"fp32": (1e-4, "absolute"), "fp16": (1e-2, "relative"), "bf16": (2e-2, "relative")}


def output_error(got: np.ndarray, ref: np.ndarray, precision: str) -> tuple[float, float, bool]:
    """(error, tolerance, ok): max abs difference for fp32; relative to the largest output for fp16/bf16."""
    tol, kind = TOLERANCE[precision]
    diff = float(np.abs(got - ref).max())
    err = diff if kind == "absolute" else diff / max(float(np.abs(ref).max()), 1e-12)
    return err, tol, err <= tol


def bench(path: Path, method: Method = Method()) -> dict:
    """`dery bench`: load any engine dery made, check its outputs against the compiled network, time it."""
    from dery.passes.compile import check_inputs

    if not path.is_file():
        raise DeryError(f"engine {path} does not exist", exit_code=USAGE)
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise DeryError(f"{path} has no sidecar {side_path.name}: not an engine dery made (or the sidecar was "
                        f"not copied with it)", exit_code=USAGE)
    side = read_json(side_path, "engine sidecar")
    try:
        target = get_target(side["target"])
        backend = get_backend(side["backend"])
        shape = tuple(side["input"]["shape"])
        reference = np.asarray(side["check"]["outputs"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(side_path, "engine sidecar", repr(e)) from e
    reason = backend.unavailable(target)
    if reason is not None:
        raise DeryError(f"cannot run {path} here: {reason}")
    runner = backend.load_engine(path, target)
    got = np.stack([runner(x.numpy()) for x in check_inputs(shape, len(reference))])
    err, tol, ok = output_error(got, reference, side["precision"])
    timing = measure(backend.engine_step(path, target), method)
    return {"engine": str(path), "backend": backend.NAME, "backend_version": backend.version(),
            "target": target.name, "precision": side["precision"], "input_shape": list(shape),
            "median_ms": timing.median_ms, "p90_ms": timing.p90_ms, "min_ms": timing.min_ms, "cv": timing.cv,
            "runs": timing.runs, "recorded_ms": side.get("measured_latency_ms"),
            "output_check": {"error": err, "tolerance": tol, "kind": TOLERANCE[side["precision"]][1], "ok": ok}}
