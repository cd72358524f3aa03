"""ONNX Runtime on the CPU: measures ONNX graphs, engine = an offline-optimised ONNX file.

Sessions run with a fixed thread count (the target's `threads`), sequential
execution and all graph optimisations; inputs and outputs are bound once with
IOBinding, so the timed call is the graph execution alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch.nn as nn

from ..cache import atomic_write
from ..errors import DeryError
from ..measure import Step
from ..targets import Target
from . import Piece, check_sidecar

NAME = "onnxruntime"
ENGINE_SUFFIX = ".onnx"


def unavailable(target: Target) -> str | None:
    """None when ONNX Runtime can measure this target here, else why not."""
    if target.device != "cpu":
        return f"the onnxruntime backend measures CPUs, and target {target.name} is a {target.device} device"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"onnxruntime is not installed ({e}); pip install onnxruntime"
    return None


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def engine_info() -> dict[str, str]:
    """What an ONNX Runtime engine's latency is tied to (the file itself is portable)."""
    from ..targets import cpu_name

    return {"cpu": cpu_name()}


def session(model: bytes | str, target: Target, *, optimized_path: Path | None = None, level: str = "all"):
    """An InferenceSession with dery's fixed threading, at graph optimisation `level` (ONNX Runtime's `basic`,
    `extended`, `layout` or `all`); with `optimized_path`, at the portable `extended`, writing the result."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = target.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_path)
    else:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        where = model if isinstance(model, str) else "an in-memory graph"
        raise DeryError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0][:300]}") from e


def _step(sess, target: Target) -> Step:
    inp = sess.get_inputs()[0]
    shape = [target.batch if not isinstance(d, int) else d for d in inp.shape]
    shape[0] = target.batch
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    binding = sess.io_binding()
    binding.bind_cpu_input(inp.name, x)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")

    def step() -> None:
        sess.run_with_iobinding(binding)

    return step


def step(piece: Piece, target: Target, level: str = "all") -> Step:
    """One call of the piece's ONNX graph on this CPU at optimisation `level` (see `session`), inputs bound once."""
    return _step(session(piece.onnx.SerializeToString(), target, level=level), target)


def build_engine(model: onnx.ModelProto, module: nn.Module, input_shape: tuple[int, ...], path: Path,
                 target: Target) -> Path:
    """Write the offline-optimised ONNX model (portable optimisation level) to `path`."""
    del module, input_shape
    return atomic_write(path, lambda tmp: session(model.SerializeToString(), target, optimized_path=tmp))


class _Runner:
    def __init__(self, sess):
        self.sess = sess
        self.input = sess.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _check(path: Path) -> None:
    from ..targets import cpu_name

    check_sidecar(path, {"backend": NAME}, strict=True, advice=f"this file is not an {NAME} engine")
    check_sidecar(path, {"backend_version": version(), "cpu": cpu_name()}, strict=False,
                  advice="the ONNX file runs anywhere, but its recorded latency was measured elsewhere")


def load_engine(path: Path, target: Target) -> _Runner:
    """An ONNX Runtime session over an engine file (warns when it was built on another setup)."""
    _check(path)
    return _Runner(session(str(path), target))


def engine_step(path: Path, target: Target) -> Step:
    """One end-to-end call of an engine file, inputs bound once."""
    _check(path)
    return _step(session(str(path), target), target)
