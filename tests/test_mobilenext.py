"""MobileNeXt: exact reference sizes, the sandglass layout, timm registration and fx tracing, timm's model contract."""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator

import pytest
import timm
import torch
from dery.errors import DeryError
from dery.models.mobilenext import MobileNeXt, SandglassBlock
from timm.layers import SelectAdaptivePool2d
from timm.models._features import FeatureGetterNet
from torch import nn

NAMES = ["mobilenext_035", "mobilenext_050", "mobilenext_075", "mobilenext_100", "mobilenext_140"]
# Blocks whose input and output widths match at stride 1: the 2nd..n-th block of each stage.
IDENTITY_BLOCKS = [3, 4, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These forwards are tiny; with other jobs on the cores, idle intra-op threads spinning costs more than they
    save (measured: 25 s of CPU with 2 threads under load, 6 s with 1), so pin one thread for this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every Conv2d and Linear in one forward pass, measured with forward hooks."""
    total = 0

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def block_inputs(model: MobileNeXt, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensor each block of `model.blocks` receives in a forward pass of `x`."""
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name,expected", [("mobilenext_100", 3_535_416), ("mobilenext_140", 6_126_168)])
def test_parameter_count_is_exact(name: str, expected: int) -> None:
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name,expected", [("mobilenext_035", 1280), ("mobilenext_075", 1280),
                                           ("mobilenext_140", 1792)])
def test_last_stage_never_narrower_than_1280(name: str, expected: int) -> None:
    """MobileNetV2's head rule: the 1280 channels scale up with the width but never down."""
    model = timm.create_model(name)
    assert model.num_features == model.blocks[-1].out_chs == expected


def test_macs_match_reference() -> None:
    # Shapes alone decide the count, so run on the meta device: no arithmetic, no kernel warm-up.
    model = timm.create_model("mobilenext_100").eval().to("meta")
    macs = count_macs(model, torch.zeros(1, 3, 224, 224, device="meta"))
    assert abs(macs - 311e6) / 311e6 < 0.01, macs


def test_exactly_twelve_of_twenty_blocks_add_their_input() -> None:
    """Zeroing the last BN of a block silences its conv path: only residual blocks then return their input."""
    model = timm.create_model("mobilenext_100").eval()
    assert len(model.blocks) == 20
    inputs = block_inputs(model, torch.randn(2, 3, 32, 32))
    behaves_as_identity = []
    for block, x in zip(model.blocks, inputs):  # inputs were recorded before any block was silenced
        last_bn = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        nn.init.zeros_(last_bn.weight)
        nn.init.zeros_(last_bn.bias)
        with torch.no_grad():
            y = block(x)
        behaves_as_identity.append(y.shape == x.shape and torch.equal(y, x))
    residual = [i for i, flag in enumerate(behaves_as_identity) if flag]
    assert residual == IDENTITY_BLOCKS
    assert [i for i, b in enumerate(model.blocks) if b.has_residual] == IDENTITY_BLOCKS


@pytest.mark.parametrize("size", [224, 32])
def test_output_shape(size: int) -> None:
    model = timm.create_model("mobilenext_100", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def _layout(block: SandglassBlock) -> list[tuple[str, int, int]]:
    """(type, out channels or 0, groups or 0) of every layer, in order."""
    rows = []
    for m in block.conv:
        if isinstance(m, nn.Conv2d):
            rows.append((f"conv{m.kernel_size[0]}s{m.stride[0]}", m.out_channels, m.groups))
        else:
            rows.append((type(m).__name__, 0, 0))
    return rows


def test_identity_block_has_depthwise_at_wide_ends() -> None:
    block = SandglassBlock(192, 192, stride=1, reduction=6)
    assert block.has_residual
    assert _layout(block) == [
        ("conv3s1", 192, 192), ("BatchNorm2d", 0, 0), ("ReLU6", 0, 0),   # dw on the wide input
        ("conv1s1", 32, 1), ("BatchNorm2d", 0, 0),                        # linear reduce, no activation
        ("conv1s1", 192, 1), ("BatchNorm2d", 0, 0), ("ReLU6", 0, 0),      # expand
        ("conv3s1", 192, 192), ("BatchNorm2d", 0, 0),                     # dw on the wide output, linear
    ]
    model = timm.create_model("mobilenext_140")
    for i in IDENTITY_BLOCKS:
        block = model.blocks[i]
        convs = [m for m in block.conv if isinstance(m, nn.Conv2d)]
        assert [c.groups for c in convs] == [block.in_chs, 1, 1, block.out_chs]
        assert convs[1].out_channels < block.in_chs


def test_channel_changing_variants() -> None:
    first = SandglassBlock(32, 96, stride=2, reduction=2, keep_depthwise=True)
    assert not first.has_residual
    assert [r for r in _layout(first) if r[0].startswith("conv")] == [
        ("conv3s1", 32, 32), ("conv1s1", 16, 1), ("conv1s1", 96, 1), ("conv3s2", 96, 96)]
    plain = SandglassBlock(288, 384, stride=1)
    assert _layout(plain) == [
        ("conv1s1", 64, 1), ("BatchNorm2d", 0, 0), ("conv1s1", 384, 1), ("BatchNorm2d", 0, 0), ("ReLU6", 0, 0)]
    strided = SandglassBlock(144, 192, stride=2)
    assert [r for r in _layout(strided) if r[0].startswith("conv")] == [
        ("conv1s1", 32, 1), ("conv1s1", 192, 1), ("conv3s2", 192, 192)]
    # 960 // 6 = 160 < 1280 / 6, so the bottleneck is raised to make_divisible(214, 16) = 208.
    assert SandglassBlock(960, 1280, keep_depthwise=True).hidden_chs == 208


def test_all_five_widths_are_registered() -> None:
    assert set(NAMES) <= set(timm.list_models("mobilenext*"))
    cfg = timm.create_model("mobilenext_035").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    assert cfg["first_conv"] == "stem.0" and cfg["classifier"] == "classifier"


def test_fx_trace_matches_eager() -> None:
    model = timm.create_model("mobilenext_100").eval()
    traced = torch.fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {f"blocks.{i}.conv.0" for i in range(20)} <= called
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-6)


def test_classifier_interface_and_feature_info() -> None:
    model = timm.create_model("mobilenext_100", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 1280)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)
    shapes = {}
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(
            lambda m, a, o, key=info["module"]: shapes.__setitem__(key, o.shape))
    with torch.no_grad():
        model(x)
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    for info in model.feature_info:
        assert shapes[info["module"]][1] == info["num_chs"]
        assert shapes[info["module"]][2] == 32 // info["reduction"]
    assert timm.create_model("mobilenext_100", drop_rate=0.5).head_drop.p == 0.5


def test_features_only_gives_one_map_per_reduction() -> None:
    features = timm.create_model("mobilenext_100", features_only=True).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [144, 192, 384, 1280]
    assert [32 // m.shape[2] for m in maps] == features.feature_info.reduction() == [4, 8, 16, 32]


def test_pretrained_without_weights_raises_and_file_overlay_loads(tmp_path) -> None:
    with pytest.raises(DeryError, match="no pretrained weights"):
        timm.create_model("mobilenext_100", pretrained=True)
    source = timm.create_model("mobilenext_035")
    path = tmp_path / "mobilenext_035.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("mobilenext_035", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- timm's model contract (tests/test_models.py of timm runs the same checks on every timm model) ----

# State-dict layout observed before the timm-contract rework (SelectAdaptivePool2d, forward_intermediates):
# checkpoints saved then must keep loading. Per block, the Conv2d indices inside `blocks.N.conv` (each
# followed by its BatchNorm at index + 1): D = both depthwise convs, S = strided tail dw only, P = 1x1 only.
_CONVS = {"D": (0, 3, 5, 8), "S": (0, 2, 5), "P": (0, 2)}
_BLOCK_KINDS = "DDSDDSDDPDDDSDDDPDDD"
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# sha256 of the "\n"-joined key list every width had before the rework (446 keys), as recorded then
_KEYS_SHA256 = "976631b4a3ba631e69c034af2dba5c2d65148d7cf996010a3f1245a5f91eaed3"


def _keys_before_rework() -> list[str]:
    keys = ["stem.0.weight"] + [f"stem.1.{s}" for s in _BN]
    for b, kind in enumerate(_BLOCK_KINDS):
        for c in _CONVS[kind]:
            keys.append(f"blocks.{b}.conv.{c}.weight")
            keys += [f"blocks.{b}.conv.{c + 1}.{s}" for s in _BN]
    return [*keys, "classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_unchanged_so_old_checkpoints_load(name: str) -> None:
    expected = _keys_before_rework()
    assert len(expected) == 446
    assert hashlib.sha256("\n".join(expected).encode()).hexdigest() == _KEYS_SHA256
    assert list(timm.create_model(name).state_dict()) == expected


def test_old_style_state_dict_loads_strictly_and_reproduces_outputs() -> None:
    source = timm.create_model("mobilenext_035").eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert list(state) == _keys_before_rework()
    target = timm.create_model("mobilenext_035").eval()
    target.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_reset_classifier_without_pool_returns_the_unpooled_feature_map() -> None:
    model = timm.create_model("mobilenext_035").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1280, 2, 2)
        assert isinstance(model.global_pool, SelectAdaptivePool2d) and model.global_pool.pool_type == "avg"
        model.reset_classifier(0, "")
        assert model.num_classes == 0 and model.global_pool.is_identity()
        out = model(x)
        assert out.shape == feats.shape
        assert torch.equal(out, feats)
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats)
        headless = timm.create_model("mobilenext_035", num_classes=0, global_pool="").eval()
        assert headless(x).shape == feats.shape
        with pytest.raises(ValueError, match="num_classes=0"):
            model.reset_classifier(5, "")  # a linear layer can't take the 4-d map
        assert model.global_pool.is_identity() and torch.equal(model(x), feats)  # the failed reset changed nothing
        model.reset_classifier(5)  # no pooling to keep: a classifier brings back the default average pool
        assert model.global_pool.pool_type == "avg" and model(x).shape == (2, 5)
        model.reset_classifier(5, "max")
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)  # None keeps the average pool
        torch.testing.assert_close(model(x), feats.mean((2, 3)), rtol=0, atol=1e-6)
        model.reset_classifier(3, "catavgmax")
        assert model.head_hidden_size == 2560 and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model("mobilenext_035", global_pool="")


def test_forward_intermediates_match_forward_features_and_feature_info() -> None:
    model = timm.create_model("mobilenext_035").eval()
    x = torch.randn(2, 3, 64, 64)
    hooked = {}
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(
            lambda m, a, o, key=info["module"]: hooked.__setitem__(key, o))
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(taps) == len(model.feature_info) == 5
        assert [t.shape[1] for t in taps] == [i["num_chs"] for i in model.feature_info] == [16, 48, 64, 136, 1280]
        assert [64 // t.shape[-1] for t in taps] == [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
        assert [t.shape[-2] for t in taps] == [t.shape[-1] for t in taps]
        for info, tap in zip(model.feature_info, taps):  # each tap is the output of the module feature_info names
            assert torch.equal(tap, hooked[info["module"]]), info
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, taps[-2:]))
        for i in range(5):
            early = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            assert len(early) == 1 and torch.equal(early[0], taps[i])
        getter = FeatureGetterNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3, 4)).eval()
        assert all(torch.equal(a, b) for a, b in zip(getter(x), taps))
        with pytest.raises(ValueError, match="intermediates_only"):
            model.forward_intermediates(x, indices=[0], stop_early=True)
        with pytest.raises(ValueError, match="NCHW"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_ends_features_at_the_tap() -> None:
    model = timm.create_model("mobilenext_035").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        assert kept.prune_intermediate_layers([4], prune_head=False) == [4]
        assert torch.equal(kept(x), expected) and len(kept.blocks) == 20
        for i, info in enumerate(model.feature_info):
            pruned = copy.deepcopy(model)
            assert pruned.prune_intermediate_layers([i]) == [i]
            assert len(pruned.blocks) == info["stage"]
            assert pruned.num_features == pruned.head_hidden_size == info["num_chs"]
            assert isinstance(pruned.get_classifier(), nn.Identity) and pruned.global_pool.is_identity()
            assert torch.equal(pruned.forward_features(x), taps[i])
            assert torch.equal(pruned(x), taps[i])  # head pruned: no pooling either
            assert torch.equal(pruned.forward_intermediates(x, indices=[i], intermediates_only=True)[0], taps[i])
            pruned.reset_classifier(7, "avg")
            assert pruned(x).shape == (2, 7)
    features = timm.create_model("mobilenext_035", features_only=True, feature_cls="getter").eval()
    assert features.feature_info.channels() == [48, 64, 136, 1280]
    assert len(features.model.blocks) == 20


def test_fx_traced_then_scripted_matches_eager() -> None:
    model = timm.create_model("mobilenext_035").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(x), expected, rtol=0, atol=0)


@pytest.mark.slow  # two TorchScript compilations: ~3 s
def test_scripted_model_and_feature_getter_match_eager() -> None:
    model = timm.create_model("mobilenext_035").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=0)
        getter = FeatureGetterNet(copy.deepcopy(model), out_indices=(0, 2, 4)).eval()
        taps = model.forward_intermediates(x, indices=[0, 2, 4], intermediates_only=True)
        for a, b in zip(torch.jit.script(getter)(x), taps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_meta_device_dtype_and_mode_follow_the_model() -> None:
    model = timm.create_model("mobilenext_035", device="meta", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in model.parameters()} == {torch.float64}
    model.eval()
    model.reset_classifier(3)
    assert model.classifier.weight.device.type == "meta" and model.classifier.weight.dtype == torch.float64
    assert not any(m.training for m in model.modules())
    with pytest.raises(TypeError):
        timm.create_model("mobilenext_035", device="meta", not_a_model_arg=1)
    assert model.in_chans == 3
    assert set(model.group_matcher()) == {"stem", "blocks"}


def test_grad_checkpointing_keeps_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobilenext_035", drop_rate=0.0, num_classes=4).train()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g)
    final, taps = model.forward_intermediates(x)
    assert len(taps) == 5 and final.shape == (2, 1280, 1, 1)
