"""estimate: latency records for a target whose device is not here (only with --allow-estimates).

A piece's latency on a GPU at small batch is modelled as kernel launches plus a
roofline:

    t = kernels * launch + max(flops / (efficiency * peak_flops), bytes / (efficiency * bandwidth))

with the target's peak figures from profiles/targets/<name>.toml. `launch`
and `efficiency` start from the target file's [estimate] priors and are
refitted (least squares) on pieces of this search space already measured on
other targets of the same device kind, each against its own peak figures, when
there are enough of them. Every estimated record says so (`estimated`, and
`how` names the model and where its constants came from); the report flags
every figure that rests on one.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from dery.backends import Piece
from dery.cache import Cache
from dery.errors import DeryError
from dery.ir import Group, LatencyRecord, utc_timestamp
from dery.profile_store import ProfileStore
from dery.targets import Target, registry
from torch.utils.flop_counter import FlopCounterMode

# ONNX ops that move or describe data without a kernel of their own after an engine builder is done with them.
FREE_OPS = frozenset({"Shape", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "Cast",
                      "Gather", "ConstantOfShape", "Range", "Size"})
MIN_FIT = 8
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def features(piece: Piece, target: Target) -> tuple[float, float, float]:
    """(kernels, FLOPs, bytes moved) of one inference of a piece at the target's batch and precision."""
    kernels = sum(1 for n in piece.onnx.graph.node if n.op_type not in FREE_OPS)
    x = torch.rand(target.batch, *piece.input_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        y = piece.module()(x)
    width = BYTES[target.precision]
    weights = sum(int(np.prod(i.dims)) for i in piece.onnx.graph.initializer)
    return float(kernels), float(fc.get_total_flops()), float(width * (weights + x.numel() + y.numel()))


def _roofline(flops: float, nbytes: float, target: Target) -> float:
    """Milliseconds at 100% of peak compute or bandwidth, whichever binds."""
    peak = target.peak_figure(f"tflops_{target.precision}") or target.peak_figure("tflops_fp32")
    bandwidth = target.peak_figure("bandwidth_gbs")
    if not peak or not bandwidth:
        raise DeryError(f"target {target.name} has no peak figures (tflops_{target.precision}, bandwidth_gbs) in "
                        f"{target.path}; cannot estimate its latencies")
    return max(flops / (peak * 1e12), nbytes / (bandwidth * 1e9)) * 1e3


def priors(target: Target) -> tuple[float, float]:
    """(launch ms per kernel, efficiency) from the target file."""
    prior = dict(target.estimate)
    return prior.get("launch_us", 5.0) / 1e3, prior.get("efficiency", 0.3)


def fit(samples: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """(launch ms, efficiency) from (kernels, roofline ms, measured ms) samples; None if not determined."""
    if len(samples) < MIN_FIT:
        return None
    a = np.array([[k, r] for k, r, _ in samples])
    y = np.array([m for _, _, m in samples])
    (launch, inv_eff), *_ = np.linalg.lstsq(a / y[:, None], np.ones(len(y)), rcond=None)
    if launch <= 0 or inv_eff < 1:
        return None
    return float(launch), float(1 / inv_eff)


def estimator(target: Target, cache: Cache) -> Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]]:
    """The `on_missing` hook of the profile pass for a target that cannot be measured here."""

    def estimate(items: dict[tuple, Piece]) -> dict[tuple, LatencyRecord]:
        feats = {k: features(p, target) for k, p in items.items()}
        samples = []
        for other in registry().values():
            if other.name == target.name or other.device != target.device or not other.peak:
                continue
            store = ProfileStore(cache, other.name)
            for piece in items.values():
                rec = store.find_any(piece.fingerprint, (other.batch, *piece.input_shape), other)
                if rec is not None and not rec.estimated:
                    k, f, b = features(piece, other)
                    samples.append((k, _roofline(f, b, other), rec.median_ms))
        fitted = fit(samples)
        launch, eff = fitted if fitted is not None else priors(target)
        source = f"fitted on {len(samples)} records of other {target.device} targets" if fitted else \
            f"priors of {target.path}"
        when = utc_timestamp()
        group = Group(target.name, f"estimated:{target.device_pattern}", "estimate", "1", target.precision,
                      target.batch)
        out = {}
        for key, piece in items.items():
            k, f, b = feats[key]
            ms = k * launch + _roofline(f, b, target) / eff
            out[key] = LatencyRecord.in_group(
                group, piece.fingerprint, (target.batch, *piece.input_shape), median_ms=ms, p90_ms=ms, min_ms=ms,
                cv=0.0, runs=0, when=when, estimated=True,
                how=f"estimated: {k:.0f} kernels x {launch * 1e3:.2f} us + roofline / {eff:.2f} ({source})")
        return out

    return estimate

