"""PyTorch on a CUDA GPU: CUDA-graph replays timed by CUDA events; engine = an AOTInductor package.

Precision: the module is converted whole to the target's dtype (`.to(float16)`
or `.to(bfloat16)`) behind float32 inputs and outputs (`CastIO`), rather than
run under autocast. That is what a deployed half-precision engine does (weights
stored in half, no per-call weight casts), and it exports and compiles cleanly.

Timing: the input is prepared on the GPU before timing; each sample is one
replay of a CUDA graph of the forward pass, bracketed by CUDA events on the
replay stream, so the sample is GPU time with no launch overhead and no
host<->device copies. When capture fails the sample is one plain call between
the same events.

Engine: `torch.export` of the cast-wrapped module, compiled ahead of time by
AOTInductor into a `.pt2` package that loads with torch alone
(`torch._inductor.aoti_load_package`), without dery's source. AOTInductor also
targets the CPU, which is how the packaging is tested on machines without GPU.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..cache import atomic_write
from ..errors import DeryError
from ..targets import Target, cuda_device_name
from . import Piece, check_sidecar

NAME = "torch-cuda"
ENGINE_SUFFIX = ".pt2"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INPUT_SHAPE_KEY = "dery.input_shape"
WARMUP_CALLS = 3


def cuda_unavailable(target: Target, backend: str) -> str | None:
    """Why a CUDA backend cannot measure `target` here: not a GPU target, no GPU, or another GPU."""
    if target.device != "cuda":
        return f"the {backend} backend runs on NVIDIA GPUs, and target {target.name} is a {target.device} device"
    gpu = cuda_device_name()
    if gpu is None:
        return ("no NVIDIA GPU is visible (torch.cuda.is_available() is False); run on a machine with "
                f"a GPU matching {target.device_pattern!r} (target {target.name})")
    if not target.matches(gpu):
        return (f"this machine's GPU is {gpu!r}, but target {target.name} wants a GPU matching "
                f"{target.device_pattern!r}; run on such a machine or choose the target for {gpu!r}")
    return None


def unavailable(target: Target) -> str | None:
    """None when this machine's GPU is the target's GPU, else why not."""
    return cuda_unavailable(target, NAME)


def version() -> str:
    """torch's version with the CUDA runtime it was built against."""
    return f"{torch.__version__} (CUDA {torch.version.cuda})"


def engine_info() -> dict[str, str]:
    """What an AOTInductor package is tied to: torch version, GPU model and compute capability."""
    if not torch.cuda.is_available():
        return {"torch_version": torch.__version__}
    major, minor = torch.cuda.get_device_capability()
    return {"torch_version": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


class CastIO(nn.Module):
    """Runs `inner` converted to `dtype` behind float32 inputs and outputs."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def in_precision(module: nn.Module, precision: str) -> nn.Module:
    """A copy of the module in evaluation mode and the target's precision, float32 at its boundary.

    A copy, because `.to()` converts in place and the caller's module may be
    shared (a zoo network used again on the CPU).
    """
    module = copy.deepcopy(module).eval()
    return module if precision == "fp32" else CastIO(module, DTYPES[precision]).eval()


class EventTimer:
    """One GPU launch per call, returning its milliseconds between CUDA events (a dery.measure step).

    The launch is warmed up on a side stream, then captured into a CUDA graph on
    that stream; calls replay the graph (`graphed` is True). If capture fails
    the calls run the plain launch instead (`graphed` is False). `launch` must
    read and write only memory allocated before the timer is made.
    """

    def __init__(self, launch: Callable[[], object], stream: torch.cuda.Stream | None = None):
        self.stream = stream if stream is not None else torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(self.stream):
            for _ in range(WARMUP_CALLS):
                launch()
        self.stream.synchronize()
        self.run: Callable[[], object] = launch
        self.graphed = False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph, stream=self.stream):
                launch()
        except (RuntimeError, DeryError):  # capture not permitted for some operation: time plain launches
            torch.cuda.synchronize()
        else:
            self.run, self.graphed = graph.replay, True
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self) -> float:
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.start.record(self.stream)
            self.run()
            self.end.record(self.stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def step(piece: Piece, target: Target) -> EventTimer:
    """One GPU call of the piece's module in the target's precision (a CUDA-graph replay), timed by events."""
    module = in_precision(piece.module(), target.precision).to("cuda")
    x = torch.rand(target.batch, *piece.input_shape, device="cuda")
    return EventTimer(lambda: module(x))


def package(module: nn.Module, example: torch.Tensor, path: Path, device: str) -> Path:
    """Export `module` on `example` and write its AOTInductor package for `device` to `path`, atomically.

    The example's shape is recorded in the package metadata so the package
    alone says what input it takes. The caller's module is not moved.
    """
    module = copy.deepcopy(module).eval().to(device)
    example = example.to(device)
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (example,))
    except Exception as e:  # the exporter raises many types; each means "cannot deploy this module"
        raise DeryError(f"torch.export failed for the module: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    configs = {"aot_inductor.metadata": {INPUT_SHAPE_KEY: ",".join(map(str, example.shape))}}

    def write(tmp: Path) -> None:
        # The API takes a name ending in .pt2 or a seekable buffer; the temporary file is the latter.
        with open(tmp, "w+b") as f:
            torch._inductor.aoti_compile_and_package(exported, package_path=f, inductor_configs=configs)

    return atomic_write(path, write)


def build_engine(model: onnx.ModelProto, module: nn.Module, input_shape: tuple[int, ...], path: Path,
                 target: Target) -> Path:
    """Write the AOTInductor package of the module in the target's precision (float32 I/O) to `path`."""
    del model
    return package(in_precision(module, target.precision), torch.rand(*input_shape), path, target.device)


def load_package(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]:
    """The compiled model in a package and the input shape it was built for."""
    try:
        # dery calls a model from one thread at a time; the lock-free runner is the one CUDA graphs can capture.
        compiled = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
        shape = tuple(int(d) for d in compiled.get_metadata()[INPUT_SHAPE_KEY].split(","))
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise DeryError(f"cannot load the AOTInductor package {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); rebuild it with this torch ({torch.__version__})") from e
    return compiled, shape


class _Runner:
    def __init__(self, compiled: Callable[[torch.Tensor], torch.Tensor], device: str):
        self.compiled = compiled
        self.device = device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = self.compiled(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return y.float().cpu().numpy()


def _check(path: Path) -> None:
    check_sidecar(path, {"backend": NAME, "backend_version": version(), **engine_info()}, strict=True,
                  advice="an AOTInductor package is compiled for one torch version and GPU architecture; "
                         "rebuild it on this machine (dery-compile with the same target)")


def load_engine(path: Path, target: Target) -> _Runner:
    """A runner over an AOTInductor package on the target's device (refused if built for another setup)."""
    _check(path)
    compiled, _ = load_package(path)
    return _Runner(compiled, target.device)


def engine_step(path: Path, target: Target) -> EventTimer:
    """One GPU call of the package (a CUDA-graph replay where capture works), timed by events."""
    _check(path)
    compiled, shape = load_package(path)
    x = torch.rand(*shape, device=target.device)
    return EventTimer(lambda: compiled(x))
