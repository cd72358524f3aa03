"""The GPU backends (tensorrt, torch-cuda): what runs anywhere, and what needs the GPU and TensorRT.

Without a GPU these tests check the parts that decide behaviour before any GPU
call: the availability messages, the mixed-precision ONNX conversion TensorRT
11 builds from (run in ONNX Runtime and the ONNX reference evaluator), sidecar
refusal, parser-error messages, and AOTInductor packaging on the CPU. The
`gpu` / `tensorrt` tests build, run and time real engines where a GPU is.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from dery.backends import Piece, availability, check_sidecar, sidecar_path, tensorrt, torch_cuda
from dery.errors import USAGE, DeryError
from dery.measure import FAST, Method, measure, measure_all
from dery.onnx_graph import export
from dery.targets import get_target

HAS_GPU = torch.cuda.is_available()


def local_target(backend: str, precision: str, batch: int = 1):
    """A GPU target that matches this machine's GPU."""
    return dataclasses.replace(get_target("a100"), backend=backend, precision=precision, batch=batch,
                               device_pattern=".*")


def needs(backend: str) -> pytest.MarkDecorator:
    """Skip unless the product's own availability test says `backend` can run on this machine's GPU (it names
    the first missing thing: the GPU, then TensorRT)."""
    _, reason = availability(local_target(backend, "fp16"))
    return pytest.mark.skipif(reason is not None, reason=f"the {backend} backend cannot run here: {reason}")


needs_gpu = needs("torch-cuda")
needs_trt = needs("tensorrt")
needs_torch_trt = (needs_trt if availability(local_target("tensorrt", "fp16"))[1] is not None
                   else pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None,
                                           reason="needs torch_tensorrt (pip install torch-tensorrt)"))
FP16_RTOL = 1e-2


def small_net() -> nn.Module:
    """Convolutions, pooling, LayerNorm, GELU and Softmax: lowered and float32-kept operators."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10), nn.Softmax(-1)).eval()


@pytest.fixture(scope="module")
def small_onnx() -> onnx.ModelProto:
    return export(small_net(), (torch.rand(2, 3, 16, 16),), ["x"], ["logits"])


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


def node_inputs(model: onnx.ModelProto, op: str) -> list[list[str]]:
    return [list(n.input) for n in model.graph.node if n.op_type == op]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: name is not None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


# ---- availability: the first missing thing is named -------------------------------------------------------

@pytest.mark.parametrize("backend, target", [(tensorrt, "a100"), (torch_cuda, "h200")])
def test_without_gpu_the_gpu_is_named_first(monkeypatch, backend, target) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT missing too: the GPU still comes first
    fake_gpu(monkeypatch, None)
    t = get_target(target)
    reason = backend.unavailable(t)
    assert reason.startswith("no NVIDIA GPU is visible (torch.cuda.is_available() is False)")
    assert repr(t.device_pattern) in reason and "TensorRT" not in reason


@pytest.mark.skipif(HAS_GPU, reason="checks this machine's real answer when it has no GPU")
def test_this_machine_without_gpu_names_the_gpu() -> None:
    for backend, target in [(tensorrt, "a100"), (torch_cuda, "h200")]:
        assert backend.unavailable(get_target(target)).startswith("no NVIDIA GPU is visible")


def test_gpu_without_tensorrt_names_tensorrt_and_where_to_get_it(monkeypatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    reason = tensorrt.unavailable(get_target("a100"))
    assert reason.startswith("TensorRT is not installed")
    assert "pip install 'dery[tensorrt]'" in reason and "https://pypi.nvidia.com" in reason


def test_another_gpu_is_named_with_the_wanted_one(monkeypatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA H200")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    reason = tensorrt.unavailable(get_target("a100"))
    assert "'NVIDIA H200'" in reason and "'A100'" in reason and "target a100" in reason
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB")
    assert tensorrt.unavailable(get_target("a100")) is None
    reason = torch_cuda.unavailable(get_target("h200"))
    assert "'NVIDIA A100-SXM4-80GB'" in reason and "'H200'" in reason


def test_gpu_backends_refuse_cpu_targets() -> None:
    for backend in (tensorrt, torch_cuda):
        assert "target cpu is a cpu device" in backend.unavailable(get_target("cpu"))


# ---- mixed precision for strongly typed TensorRT builds ----------------------------------------------------

def test_resnet18_in_fp16_matches_fp32_in_onnxruntime() -> None:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    model = export(net, (torch.rand(1, 3, 64, 64),), ["x"], ["logits"])
    half = tensorrt.to_mixed_precision(model, "fp16")
    onnx.checker.check_model(half, full_check=True)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    got, want = ort_run(half, x), ort_run(model, x)
    assert got.dtype == np.float32 and relative_error(got, want) < FP16_RTOL
    types_ = initializer_types(half)
    conv_weights = [inputs[1] for inputs in node_inputs(half, "Conv")]
    assert len(conv_weights) == 20 and all(types_[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)
    boundary = [*half.graph.input, *half.graph.output]
    assert [(t.name, t.type.tensor_type.elem_type) for t in boundary] == [("x", onnx.TensorProto.FLOAT),
                                                                          ("logits", onnx.TensorProto.FLOAT)]


def test_sensitive_operators_stay_fp32(small_onnx) -> None:
    half = tensorrt.to_mixed_precision(small_onnx, "fp16")
    onnx.checker.check_model(half, full_check=True)
    types_ = initializer_types(half)
    produced_by = {o: n for n in half.graph.node for o in n.output}
    for op in ("LayerNormalization", "Softmax"):
        (inputs,) = node_inputs(half, op)
        cast = produced_by[inputs[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
        assert all(types_[name] == onnx.TensorProto.FLOAT for name in inputs[1:])
    for op in ("Conv", "Gemm"):
        assert all(types_[inputs[1]] == onnx.TensorProto.FLOAT16 for inputs in node_inputs(half, op))
    x = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    assert relative_error(ort_run(half, x), ort_run(small_onnx, x)) < FP16_RTOL


def test_bf16_raises_the_opset_so_convolutions_take_bfloat16(small_onnx) -> None:
    from onnx.reference import ReferenceEvaluator

    bf16 = tensorrt.to_mixed_precision(small_onnx, "bf16")
    onnx.checker.check_model(bf16, full_check=True)
    assert [(o.domain, o.version) for o in bf16.opset_import if o.domain == ""] == [("", tensorrt.BF16_OPSET)]
    types_ = initializer_types(bf16)
    for op in ("Conv", "Gemm"):
        assert all(types_[inputs[1]] == onnx.TensorProto.BFLOAT16 for inputs in node_inputs(bf16, op))
    (ln,) = node_inputs(bf16, "LayerNormalization")
    assert types_[ln[1]] == onnx.TensorProto.FLOAT
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    want = ReferenceEvaluator(small_onnx).run(None, {"x": x})[0]
    assert relative_error(ReferenceEvaluator(bf16).run(None, {"x": x})[0], want) < 5e-2


def test_bf16_without_the_opset_raise_keeps_convolutions_fp32(small_onnx, monkeypatch) -> None:
    def refuse(model, version):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    bf16 = tensorrt.to_mixed_precision(small_onnx, "bf16")
    onnx.checker.check_model(bf16, full_check=True)
    types_ = initializer_types(bf16)
    # At the export's opset 18, Conv admits float16 but not bfloat16; Gemm admits both.
    assert all(types_[inputs[1]] == onnx.TensorProto.FLOAT for inputs in node_inputs(bf16, "Conv"))
    assert all(types_[inputs[1]] == onnx.TensorProto.BFLOAT16 for inputs in node_inputs(bf16, "Gemm"))


def test_fp32_is_an_unchanged_copy_and_unknown_precision_is_refused(small_onnx) -> None:
    same = tensorrt.to_mixed_precision(small_onnx, "fp32")
    assert same == small_onnx and same is not small_onnx
    with pytest.raises(DeryError, match="int8"):
        tensorrt.to_mixed_precision(small_onnx, "int8")


# ---- sidecars, parser errors, settings ---------------------------------------------------------------------

def test_engine_from_another_setup_is_refused(tmp_path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"plan")
    here = {"backend": "tensorrt", "backend_version": "11.1.0", "device": "NVIDIA H200",
            "tensorrt_version": "11.1.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    check = functools.partial(check_sidecar, strict=True, advice="rebuild it")
    assert check(engine, here) == []  # no sidecar: nothing to check
    sidecar = sidecar_path(engine)
    sidecar.write_text(json.dumps({**here, "precision": "fp16"}))
    assert check(engine, here) == []
    sidecar.write_text(json.dumps({**here, "backend_version": "10.3.0", "tensorrt_version": "10.3.0",
                                   "device": "NVIDIA A100-SXM4-80GB", "gpu": "NVIDIA A100-SXM4-80GB"}))
    with pytest.raises(DeryError) as err:
        check(engine, here)
    message = str(err.value)
    assert str(engine) in message and "'10.3.0'" in message and "'11.1.0'" in message
    assert "'NVIDIA A100-SXM4-80GB'" in message and "'NVIDIA H200'" in message and "rebuild" in message
    assert message.count("'10.3.0'") == 1  # the same difference under two keys is said once
    sidecar.write_text("{not json")
    with pytest.raises(DeryError, match="damaged engine sidecar"):
        check(engine, here)
    sidecar.write_text(json.dumps({**here, "backend_version": "10.3.0"}))
    with pytest.warns(UserWarning, match="'10.3.0'"):
        assert len(check_sidecar(engine, here, strict=False, advice="portable")) == 1


def test_parser_errors_are_all_listed() -> None:
    errors = [("Unsupported operator Foo", "3 'node_foo' (Foo)", "UNSUPPORTED_NODE"),
              ("Invalid weights", "-", "INVALID_GRAPH")]
    message = tensorrt.format_parser_errors(errors, "the ONNX graph of block[2]")
    assert "block[2]" in message and "2 error(s)" in message and "\n" not in message
    assert "[1] node 3 'node_foo' (Foo): UNSUPPORTED_NODE: Unsupported operator Foo" in message
    assert "[2] node -: INVALID_GRAPH: Invalid weights" in message
    assert "without reporting" in tensorrt.format_parser_errors([], "x")
    assert "\n" not in tensorrt.format_parser_errors([("line one\n  line two", 0, "INTERNAL_ERROR")], "x")


def test_workspace_limit_is_configurable(monkeypatch) -> None:
    monkeypatch.delenv(tensorrt.WORKSPACE_ENV, raising=False)
    assert tensorrt.workspace_bytes() == 4 << 30
    monkeypatch.setenv(tensorrt.WORKSPACE_ENV, "0.5")
    assert tensorrt.workspace_bytes() == 1 << 29
    for bad in ("lots", "0", "-2", "nan", "inf"):
        monkeypatch.setenv(tensorrt.WORKSPACE_ENV, bad)
        with pytest.raises(DeryError) as err:
            tensorrt.workspace_bytes()
        assert err.value.exit_code == USAGE and tensorrt.WORKSPACE_ENV in str(err.value)


def test_timing_cache_lives_in_the_dery_cache(isolated_cache) -> None:
    path = tensorrt.timing_cache_path("NVIDIA A100-SXM4-80GB", "10.3.0")
    assert path == isolated_cache / "tensorrt" / "timing-NVIDIA-A100-SXM4-80GB-10.3.0.cache"


def test_torch_tensorrt_precision_follows_its_api() -> None:
    with_autocast = {"exported_program", "arg_inputs", "enable_autocast", "autocast_low_precision_type"}
    assert tensorrt.torch_tensorrt_precision(with_autocast, "fp16") == {
        "enable_autocast": True, "autocast_low_precision_type": torch.float16}
    assert tensorrt.torch_tensorrt_precision({"enabled_precisions"}, "bf16") == {"enabled_precisions": {torch.bfloat16}}
    assert tensorrt.torch_tensorrt_precision(with_autocast, "fp32") == {}


def test_half_precision_wrapper_keeps_float32_io() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.rand(3, 16)
    want = net(x)
    wrapped = torch_cuda.in_precision(net, "bf16")
    with torch.no_grad():
        got = wrapped(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=5e-2, atol=5e-2)
    assert next(net.parameters()).dtype == torch.float32  # the caller's module is not converted
    same = torch_cuda.in_precision(net, "fp32")
    assert same is not net and torch.equal(same(x), want)


# ---- AOTInductor packages (CPU here, CUDA on a GPU) ---------------------------------------------------------

LOAD_WITHOUT_DERY = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    compiled = torch._inductor.aoti_load_package(sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2]))
    np.save(sys.argv[3], compiled(x).detach().numpy())
    assert not any(m == "dery" or m.startswith("dery.") for m in sys.modules), "dery was imported"
""")


@pytest.mark.slow  # AOTInductor compiles C++: about 30 s on 2 cores with a cold compiler cache
def test_aoti_cpu_package_runs_without_dery(tmp_path) -> None:
    net = small_net()
    x = torch.rand(2, 3, 16, 16)
    path = torch_cuda.package(net, x, tmp_path / "model.pt2", "cpu")
    np.save(tmp_path / "x.npy", x.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DERY, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-5)
    assert torch_cuda.load_package(path)[1] == (2, 3, 16, 16)


# ---- on an NVIDIA GPU --------------------------------------------------------------------------------------

@pytest.fixture
def plan(tmp_path, small_onnx) -> Path:
    path = tmp_path / "small.plan"
    tensorrt.build_engine(small_onnx, small_net(), (2, 3, 16, 16), path, local_target("tensorrt", "fp16"))
    return path


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_engine_matches_onnxruntime(plan, small_onnx) -> None:
    x = np.random.default_rng(3).random((2, 3, 16, 16), dtype=np.float32)
    got = tensorrt.load_engine(plan, local_target("tensorrt", "fp16"))(x)
    assert relative_error(got, ort_run(small_onnx, x)) < FP16_RTOL


def host_timed_ms(call, synchronize, calls: int = 50) -> float:
    """The control: median host-clock milliseconds of plain (not graph-replayed) synchronised calls."""
    for _ in range(5):
        call()
    synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_timing_replays_a_cuda_graph(plan) -> None:
    """engine_step's measurement agrees with the same graph's replays read one by one, and is no slower than
    plain launches timed on the host (which add launch overhead and a host round trip to the same work)."""
    engine = tensorrt.load_engine(plan, local_target("tensorrt", "fp16"))
    timer = torch_cuda.EventTimer(engine.launch, engine.stream)
    assert timer.graphed
    replays = float(np.median([timer() for _ in range(50)]))
    t = measure(tensorrt.engine_step(plan, local_target("tensorrt", "fp16")), FAST)
    assert 0 < t.min_ms <= t.median_ms and t.runs >= FAST.windows * FAST.min_iters
    assert 0.5 < t.median_ms / replays < 2.0, (t.median_ms, replays)
    host = host_timed_ms(engine.launch, engine.stream.synchronize)
    assert t.median_ms <= 1.1 * host, (t.median_ms, host)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_layer_profile_and_structure(plan) -> None:
    target = local_target("tensorrt", "fp16")
    layers = tensorrt.layer_profile(plan, target, runs=5)
    assert layers and all(isinstance(name, str) and ms >= 0 for name, ms in layers)
    structure = tensorrt.engine_layers(plan, target)
    assert structure and all("Name" in layer for layer in structure)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_refuses_an_engine_built_elsewhere(plan) -> None:
    sidecar_path(plan).write_text(json.dumps({"backend_version": "0.0.1", "device": "Some Other GPU"}))
    with pytest.raises(DeryError, match=r"'0\.0\.1'"):
        tensorrt.load_engine(plan, local_target("tensorrt", "fp16"))
    sidecar_path(plan).write_text(json.dumps(tensorrt.engine_info()))
    tensorrt.load_engine(plan, local_target("tensorrt", "fp16"))


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_measures_twice_the_work_as_about_twice_the_time() -> None:
    """Pieces built from ONNX into TensorRT engines: a chain of 8 square matmuls against the control of 4."""
    width = 2048

    def chain(n: int) -> Piece:
        net = MatmulChain(n, width).eval()
        return Piece(f"chain{n}", f"{n:024d}", (width,),
                     lambda: export(net, (torch.rand(width, width),), ["x"], ["y"]), lambda: net)

    target = local_target("tensorrt", "fp16", batch=width)
    method = Method(warmup_s=0.2, min_iters=20, window_s=0.1)
    single, double = (t.median_ms for t in measure_all([tensorrt.step(chain(n), target) for n in (4, 8)], method))
    assert 1.5 < double / single < 2.5, (single, double)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_torch_trt
def test_torch_tensorrt_route_saves_a_loadable_program(tmp_path) -> None:
    net = small_net()
    path = tensorrt.build_engine_torch(net, (2, 3, 16, 16), tmp_path / "small.ep",
                                       local_target("tensorrt", "fp16"))
    x = torch.rand(2, 3, 16, 16, device="cuda")
    import torch_tensorrt

    with torch.no_grad():
        got = torch_tensorrt.load(str(path)).module()(x)
        want = net.cuda()(x)
    assert relative_error(got.float().cpu().numpy(), want.cpu().numpy()) < FP16_RTOL


class MatmulChain(nn.Module):
    """`n` square matmuls: the work grows linearly with `n`."""

    def __init__(self, n: int, width: int = 4096):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.gpu
@needs_gpu
def test_torch_cuda_measures_twice_the_work_as_about_twice_the_time() -> None:
    target = local_target("torch-cuda", "fp16", batch=4096)
    method = Method(warmup_s=0.2, min_iters=20, window_s=0.1)
    single, double = (t.median_ms for t in measure_all(
        [torch_cuda.step(Piece(f"chain{n}", "c" * 24, (4096,), onnx.ModelProto, lambda n=n: MatmulChain(n)),
                         target) for n in (8, 16)], method))
    assert 1.5 < double / single < 2.5, (single, double)


@pytest.mark.gpu
@needs_gpu
def test_torch_cuda_package_round_trip(tmp_path) -> None:
    target = local_target("torch-cuda", "fp16", batch=2)
    net = small_net()
    path = torch_cuda.build_engine(onnx.ModelProto(), net, (2, 3, 16, 16), tmp_path / "small.pt2", target)
    x = np.random.default_rng(4).random((2, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert relative_error(torch_cuda.load_engine(path, target)(x), want) < FP16_RTOL
    t = measure(torch_cuda.engine_step(path, target), FAST)
    compiled, shape = torch_cuda.load_package(path)
    xs = torch.rand(*shape, device="cuda")
    with torch.no_grad():
        host = host_timed_ms(lambda: compiled(xs), torch.cuda.synchronize)
    # the control: the same package called plainly and timed on the host does the same work and more
    assert 0 < t.median_ms <= 1.1 * host, (t.median_ms, host)
