"""TensorRT on NVIDIA GPUs: engine = a serialized plan built from the ONNX graph.

Build: ONNX parser (every parser error reported) -> builder config (workspace
limit, optimization level, detailed profiling verbosity, a timing cache kept in
dery's cache per GPU and TensorRT version) -> serialized plan. Precision follows
the installed TensorRT: 10.x takes the FP16/BF16 builder flags on a weakly
typed network; 11.x removed those flags and builds only strongly typed
networks, so the ONNX is first converted to mixed precision here
(`to_mixed_precision`: half-precision weights and arithmetic, float32 graph
inputs/outputs, normalisations, softmax, reductions and exp/log/pow).

Run: buffers are torch CUDA tensors bound once with `set_tensor_address`;
`execute_async_v3` runs on a torch stream, captured into a CUDA graph where
TensorRT allows it, and each timed sample is one replay between CUDA events.
A plan only runs with the TensorRT version and GPU model it was built for, so
loading checks the engine's sidecar (`<engine>.json`) against `engine_info()`.
`tensorrt` and `torch_tensorrt` are imported inside functions only.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import torch
import torch.nn as nn

from ..cache import atomic_write, atomic_write_bytes, cache_root, damaged
from ..errors import USAGE, DeryError
from ..targets import Target, cuda_device_name
from . import Piece, check_sidecar
from .torch_cuda import EventTimer, cuda_unavailable

NAME = "tensorrt"
ENGINE_SUFFIX = ".plan"
INSTALL_HINT = ("pip install 'dery[tensorrt]' (from NVIDIA's index: "
                "pip install tensorrt --extra-index-url https://pypi.nvidia.com)")
WORKSPACE_ENV = "DERY_TRT_WORKSPACE_GIB"
DEFAULT_WORKSPACE_GIB = 4.0
# TensorRT's own default (0-5), set explicitly so that a change of default cannot move latencies.
OPTIMIZATION_LEVEL = 3

# Operators numerically safe in half precision; everything else keeps float32 (normalisations, Softmax,
# reductions, Exp/Log/Pow/Sqrt...). Which of their tensors may change type comes from the ONNX schema.
LOW_PRECISION_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose",
    "DepthToSpace", "Div", "Einsum", "Elu", "Erf", "Expand", "Flatten", "Gather", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "MatMul", "Max",
    "MaxPool", "Min", "Mul", "Neg", "Pad", "PRelu", "Relu", "Reshape", "Resize", "Selu", "Sigmoid", "Slice",
    "SpaceToDepth", "Split", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})
# The first opset whose Conv, pooling and BatchNormalization schemas admit bfloat16.
BF16_OPSET = 22
# Operators that read only their input's shape: any float type will do, no cast needed.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def unavailable(target: Target) -> str | None:
    """None when TensorRT can run this target here; else the first missing thing and how to get it."""
    if target.device != "cuda" or cuda_device_name() is None:
        return cuda_unavailable(target, NAME)
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: the package is there but its libraries are not
        return f"TensorRT is not installed ({e}): {INSTALL_HINT}"
    return cuda_unavailable(target, NAME)


def version() -> str:
    """The installed TensorRT's version."""
    import tensorrt as trt

    return trt.__version__


def _major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def engine_info() -> dict[str, str]:
    """What a plan is tied to: TensorRT version, GPU name and compute capability (for the sidecar)."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def format_parser_errors(errors: Sequence[tuple[str, int | str, str]], source: str) -> str:
    """One message listing every ONNX parser error (description, node, error code) for `source`."""
    if not errors:
        return f"TensorRT's ONNX parser rejected {source} without reporting an error"
    listed = "; ".join(f"[{i}] node {node}: {code}: {' '.join(desc.split())}"
                       for i, (desc, node, code) in enumerate(errors, 1))
    return f"TensorRT's ONNX parser rejected {source} with {len(errors)} error(s): {listed}"


def workspace_bytes() -> int:
    """The builder's workspace limit: `DERY_TRT_WORKSPACE_GIB` GiB, default 4."""
    raw = os.environ.get(WORKSPACE_ENV, str(DEFAULT_WORKSPACE_GIB))
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise DeryError(f"{WORKSPACE_ENV}={raw!r} is not a positive number of GiB", exit_code=USAGE)
    return int(gib * (1 << 30))


def timing_cache_path(gpu: str, trt_version: str) -> Path:
    """Where the timing cache for this GPU model and TensorRT version lives in dery's cache."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-")
    return cache_root() / "tensorrt" / f"timing-{slug}-{trt_version}.cache"


def _is_float32(tensor: Any) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32
    except TypeError:  # a dtype numpy cannot name (bfloat16, float8 ...)
        return False


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _allowed_types(node: Any, opset: int) -> tuple[list[set[str]], list[set[str]]] | None:
    """The types each input and output of `node` may take at `opset`, from its ONNX schema (None: no schema)."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def per_slot(formals: Sequence[Any], count: int) -> list[set[str]]:
        if not formals:
            return [set() for _ in range(count)]
        return [constraints.get(f.type_str, {f.type_str}) for f in (formals[min(i, len(formals) - 1)]
                                                                  for i in range(count))]

    return per_slot(schema.inputs, len(node.inputs)), per_slot(schema.outputs, len(node.outputs))


def _subgraph_names(graph: Any) -> set[str]:
    """Names of every tensor that nodes inside subgraphs (If/Loop/Scan bodies) refer to."""
    import onnx_graphsurgeon as gs

    names: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                names |= {t.name for n in attr.nodes for t in n.inputs} | _subgraph_names(attr)
    return names


def _constants_to_initializers(graph: Any) -> None:
    """Turn float32 Constant nodes into initializers so their values are converted like weights."""
    import onnx_graphsurgeon as gs

    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        if not isinstance(value, gs.Constant) or value.dtype != np.float32 or node.outputs[0].name in outputs:
            continue
        var = node.outputs[0]
        const = gs.Constant(var.name, np.asarray(value.values))
        for consumer in list(var.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is var:
                    consumer.inputs[i] = const
        node.outputs.clear()


def to_mixed_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The graph computing in `precision` ("fp16"/"bf16") where safe, float32 at its inputs and outputs.

    Nodes in LOW_PRECISION_OPS whose tensor types are known and whose ONNX
    schema (at the model's opset) admits the low type run in it, with their
    float32 weights stored converted; every other node, and every graph input
    and output, stays float32, with Cast nodes at each boundary. This is what a
    strongly typed TensorRT build (11.x, which parses up to opset 25) needs to
    run in half precision. Conv and pooling admit bfloat16 only from opset 22,
    so for bf16 an older graph is first raised to opset 22 (if the ONNX version
    converter cannot, those operators stay float32). "fp32" returns an
    unchanged copy.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if precision == "fp32":
        return result
    if precision not in ("fp16", "bf16"):
        raise DeryError(f"unknown precision {precision!r}; expected fp32, fp16 or bf16", exit_code=USAGE)
    import ml_dtypes
    import onnx_graphsurgeon as gs

    low = np.dtype(np.float16) if precision == "fp16" else np.dtype(ml_dtypes.bfloat16)
    onnx_type = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
    low_type = f"tensor({'float16' if precision == 'fp16' else 'bfloat16'})"
    opset = _opset(result)
    if precision == "bf16" and opset < BF16_OPSET:
        try:
            result = onnx.version_converter.convert_version(result, BF16_OPSET)
            opset = BF16_OPSET
        except Exception:  # the converter raises bare RuntimeErrors and more; the original opset still works
            pass
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(result))
    _constants_to_initializers(graph)
    pinned = _subgraph_names(graph)
    float32 = {name for name, t in graph.tensors().items() if _is_float32(t)}
    nodes = list(graph.nodes)
    # Per lowered node: the input slots that take the low type; the other float32 inputs stay float32.
    lowered: dict[int, set[int]] = {}
    for node in nodes:
        allowed = _allowed_types(node, opset) if node.op in LOW_PRECISION_OPS else None
        if allowed is None or any(t.name and t.dtype is None for t in [*node.inputs, *node.outputs]):
            continue
        slots = {i for i, t in enumerate(node.inputs) if t.name in float32 and low_type in allowed[0][i]}
        outputs_ok = all(low_type in allowed[1][i] and t.name not in pinned
                         for i, t in enumerate(node.outputs) if t.name in float32)
        if slots and outputs_ok:
            lowered[id(node)] = slots
    low_tensors = set()
    for node in nodes:
        if id(node) in lowered:
            for out in node.outputs:
                if out.name in float32:
                    out.dtype = low
                    low_tensors.add(out.name)

    casts: dict[tuple[str, str], Any] = {}
    low_constants: dict[str, Any] = {}

    def cast(tensor: Any, to: str) -> Any:
        if (tensor.name, to) not in casts:
            dtype = np.dtype(np.float32) if to == "fp32" else low
            out = gs.Variable(f"{tensor.name}__to_{to}", dtype=dtype, shape=tensor.shape)
            to_type = onnx.TensorProto.FLOAT if to == "fp32" else onnx_type[precision]
            graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}__cast_{to}", attrs={"to": to_type},
                                       inputs=[tensor], outputs=[out]))
            casts[tensor.name, to] = out
        return casts[tensor.name, to]

    def low_constant(const: Any) -> Any:
        if const.name not in low_constants:
            low_constants[const.name] = gs.Constant(f"{const.name}__{precision}",
                                                    np.asarray(const.values).astype(low))
        return low_constants[const.name]

    for node in nodes:
        if node.op in SHAPE_ONLY_OPS:
            continue
        for i, tensor in enumerate(node.inputs):
            if tensor.name not in float32:
                continue
            want_low = i in lowered.get(id(node), ())
            if isinstance(tensor, gs.Constant):
                if want_low:
                    node.inputs[i] = low_constant(tensor)
            elif want_low and tensor.name not in low_tensors:
                node.inputs[i] = cast(tensor, precision)
            elif not want_low and tensor.name in low_tensors:
                node.inputs[i] = cast(tensor, "fp32")

    for i, out in enumerate(graph.outputs):
        if out.name in low_tensors:
            name = out.name
            out.name = f"{name}__{precision}"
            restored = gs.Variable(name, dtype=np.float32, shape=out.shape)
            graph.nodes.append(gs.Node("Cast", name=f"{name}__cast_fp32", attrs={"to": onnx.TensorProto.FLOAT},
                                       inputs=[out], outputs=[restored]))
            graph.outputs[i] = restored

    graph.cleanup().toposort()
    converted = gs.export_onnx(graph)
    converted.ir_version = result.ir_version
    del converted.opset_import[:]
    converted.opset_import.extend(result.opset_import)
    return converted


def _logger() -> Any:
    """A TensorRT logger that keeps error messages for DeryErrors and prints nothing."""
    import tensorrt as trt

    class Collecting(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

    return Collecting()


def _errors(logger: Any) -> str:
    return "; ".join(logger.errors[-3:]) or "TensorRT logged no error"


def _add_profile(builder: Any, network: Any, config: Any, input_shape: tuple[int, ...]) -> None:
    """Pin dynamic input dimensions to `input_shape` with a one-shape optimization profile."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if not any(d < 0 for t in inputs for d in t.shape):
        return
    if len(inputs) != 1 or len(inputs[0].shape) != len(input_shape):
        raise DeryError(f"the ONNX graph has dynamic inputs {[(t.name, tuple(t.shape)) for t in inputs]} "
                        f"that the single input shape {input_shape} cannot fix; export it with static shapes")
    profile = builder.create_optimization_profile()
    profile.set_shape(inputs[0].name, input_shape, input_shape, input_shape)
    config.add_optimization_profile(profile)


def build_plan(model: onnx.ModelProto, input_shape: tuple[int, ...], target: Target, *, what: str = "the network",
               optimization_level: int = OPTIMIZATION_LEVEL) -> bytes:
    """Build a serialized TensorRT plan of `model` for `target`'s precision (input shape with batch)."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    strongly_typed = _major(trt) >= 11
    if strongly_typed:
        model = to_mixed_precision(model, target.precision)
        # Ignored by 11.x (always strongly typed) but still accepted; stated for clarity.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        # 10.x: always explicit batch (EXPLICIT_BATCH is ignored); weakly typed so the precision flags apply.
        network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = f"{e.node()} {e.node_name()!r} ({e.node_operator()})" if e.node() >= 0 else "-"
            errors.append((e.desc(), node, str(e.code())))
        raise DeryError(format_parser_errors(errors, f"the ONNX graph of {what}"))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes())
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not strongly_typed and target.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not strongly_typed and target.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    _add_profile(builder, network, config, input_shape)

    cache_path = timing_cache_path(torch.cuda.get_device_name(), trt.__version__)
    try:
        cache_bytes = cache_path.read_bytes() if cache_path.exists() else b""
    except OSError as e:
        raise damaged(cache_path, "TensorRT timing cache", e) from e
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise damaged(cache_path, "TensorRT timing cache", f"TensorRT {trt.__version__} cannot use it")

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DeryError(f"TensorRT {trt.__version__} could not build an engine for {what} "
                        f"({target.precision}, input {input_shape}): {_errors(logger)}")
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    if trt_dtype.name not in table:
        raise DeryError(f"engine I/O tensor type {trt_dtype.name} is not supported by dery's TensorRT runner")
    return table[trt_dtype.name]


class _Engine:
    """A deserialized plan with its execution context, a stream and bound device buffers."""

    def __init__(self, plan: bytes, what: str):
        import tensorrt as trt

        self.logger = _logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise DeryError(f"TensorRT {trt.__version__} cannot load {what}: {_errors(self.logger)}; rebuild it "
                            "with this TensorRT version on this GPU model")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        for name in self.inputs:
            if any(d < 0 for d in self.engine.get_tensor_shape(name)):
                # The optimization profile's `opt` shape: the one shape dery builds dynamic engines for.
                self.context.set_input_shape(name, tuple(self.engine.get_tensor_profile_shape(name, 0)[1]))
        self.buffers: dict[str, torch.Tensor] = {}
        for name in names:
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            buffer = torch.zeros(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            if name in self.inputs and dtype.is_floating_point:
                buffer.uniform_()
            self.buffers[name] = buffer
            self.context.set_tensor_address(name, buffer.data_ptr())
        torch.cuda.synchronize()

    def launch(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DeryError(f"TensorRT execute_async_v3 failed: {_errors(self.logger)}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        inp = self.buffers[self.inputs[0]]
        if tuple(x.shape) != tuple(inp.shape):
            raise DeryError(f"the engine takes input shape {tuple(inp.shape)}, got {tuple(x.shape)}")
        with torch.cuda.stream(self.stream):
            inp.copy_(torch.from_numpy(np.ascontiguousarray(x)).to(inp.dtype))
            self.launch()
            out = self.buffers[self.outputs[0]].float().cpu()
        return out.numpy()


def _expected_setup() -> dict[str, Any]:
    info = engine_info()
    return {"backend": NAME, "backend_version": info["tensorrt_version"], "device": info["gpu"], **info}


def _load(path: Path) -> _Engine:
    check_sidecar(path, _expected_setup(), strict=True,
                  advice="a TensorRT plan only runs with the TensorRT version and GPU model it was built with; "
                         "rebuild it on this machine (dery-compile with the same target)")
    try:
        plan = path.read_bytes()
    except OSError as e:
        raise DeryError(f"cannot read engine {path}: {e.strerror or e}") from e
    return _Engine(plan, f"engine {path}")


def build_engine(model: onnx.ModelProto, module: nn.Module, input_shape: tuple[int, ...], path: Path,
                 target: Target) -> Path:
    """Build the plan of `model` for `target` and write it to `path` atomically."""
    del module
    return atomic_write_bytes(path, build_plan(model, input_shape, target, what=path.name))


def load_engine(path: Path, target: Target) -> _Engine:
    """A runner over a plan, refused when its sidecar names another TensorRT version or GPU."""
    del target
    return _load(path)


def engine_step(path: Path, target: Target) -> EventTimer:
    """One inference of a plan (a CUDA-graph replay where capture works), timed by CUDA events."""
    del target
    engine = _load(path)
    return EventTimer(engine.launch, engine.stream)


def step(piece: Piece, target: Target) -> EventTimer:
    """Build the piece's ONNX graph into an engine in memory; one inference of it, like `engine_step`."""
    plan = build_plan(piece.onnx, (target.batch, *piece.input_shape), target, what=piece.name)
    engine = _Engine(plan, f"the engine of {piece.name}")
    return EventTimer(engine.launch, engine.stream)


def layer_profile(path: Path, target: Target, runs: int = 20) -> list[tuple[str, float]]:
    """Mean milliseconds per engine layer over `runs` profiled inferences, in execution order.

    Per-layer times include profiling overhead between layers; their sum
    exceeds the whole-engine time.
    """
    import tensorrt as trt

    del target
    engine = _load(path)
    engine.launch()
    engine.stream.synchronize()

    class Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.total: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.total[layer_name] = self.total.get(layer_name, 0.0) + ms

    profiler = Profiler()
    engine.context.profiler = profiler
    for _ in range(runs):
        engine.launch()
        engine.stream.synchronize()
    return [(name, total / runs) for name, total in profiler.total.items()]


def engine_layers(path: Path, target: Target) -> list[dict[str, Any]]:
    """The engine's layers as the engine inspector describes them (JSON, detailed verbosity)."""
    import tensorrt as trt

    del target
    engine = _load(path)
    inspector = engine.engine.create_engine_inspector()
    inspector.execution_context = engine.context
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return [layer if isinstance(layer, dict) else {"Name": layer} for layer in info.get("Layers", [])]


def torch_tensorrt_precision(compile_params: Collection[str], precision: str) -> dict[str, Any]:
    """Keyword arguments asking torch_tensorrt's dynamo compile for `precision`, as its version takes them.

    Releases with autocast (`enable_autocast`, `autocast_low_precision_type`)
    deprecated and then removed `enabled_precisions`; older ones only have it.
    """
    if precision == "fp32":
        return {}
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    if "enable_autocast" in compile_params:
        return {"enable_autocast": True, "autocast_low_precision_type": dtype}
    return {"enabled_precisions": {dtype}}


def build_engine_torch(module: nn.Module, input_shape: tuple[int, ...], path: Path, target: Target) -> Path:
    """The PyTorch route: torch_tensorrt (dynamo IR) compile, saved as an ExportedProgram at `path`."""
    import inspect

    if importlib.util.find_spec("torch_tensorrt") is None:
        raise DeryError(f"torch_tensorrt is not installed: {INSTALL_HINT}")
    import torch_tensorrt

    example = torch.rand(*input_shape, device="cuda")
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    with torch.no_grad():
        compiled = torch_tensorrt.compile(copy.deepcopy(module).eval().cuda(), ir="dynamo", arg_inputs=[example],
                                          **torch_tensorrt_precision(params, target.precision))

    def write(tmp: Path) -> None:
        # torch.export's writer expects a name ending in .pt2: save there, then move onto the temporary file.
        with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
            saved = Path(scratch) / "model.pt2"
            torch_tensorrt.save(compiled, str(saved), output_format="exported_program", arg_inputs=[example])
            os.replace(saved, tmp)

    return atomic_write(path, write)

