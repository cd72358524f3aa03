"""lower: single-tensor cut points on torch.fx, block-by-block execution, layouts, fallback."""
from __future__ import annotations

import torch
import torch.nn as nn
from dery.passes.lower import lower, run_blockwise
from dery.zoo import MemberSpec, Network, Normalized, _state_key


def network(net: nn.Module, shape=(3, 16, 16), name="toy") -> Network:
    module = Normalized(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    return Network(name, MemberSpec(name, "toy", "random", (), None, shape[-1]), module, shape, 10, _state_key(module))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn(self.conv(x)))


class Toy(nn.Module):
    """stem -> Sequential(2 residual blocks) -> pool -> head; a skip inside each block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_cut_points_are_exactly_the_single_tensor_crossings() -> None:
    torch.manual_seed(0)
    lw = lower(network(Toy()))
    names = [c.name for c in lw.cuts]
    # after each root child and each residual block, never inside a block (its input is still needed there);
    # the cut after bn merges into the one after the ReLU: nothing with cost lies between them
    assert names == ["net_stem", "net_act", "net_blocks_0_act", "net_blocks_1_act"]
    assert "net_bn" in lw.fine_cuts
    assert [c.layout for c in lw.cuts] == ["nchw"] * 4
    assert lw.cuts[0].shape == (1, 8, 8, 8)
    assert not any("conv" in f for f in lw.fine_cuts)  # the block's conv output never crosses alone


def test_blockwise_execution_reproduces_the_network_at_any_batch() -> None:
    torch.manual_seed(0)
    net = network(Toy())
    lw = lower(net)
    for batch in (1, 3):
        x = torch.rand(batch, 3, 16, 16)
        with torch.no_grad():
            ref = net.module(x)
        assert torch.equal(run_blockwise(lw, x), ref)


def test_inplace_activation_does_not_overwrite_an_earlier_cut() -> None:
    torch.manual_seed(0)
    net = network(Toy())
    lw = lower(net)
    x = torch.rand(2, 3, 16, 16)
    bn_value = lw.segment(None, "net_bn")(x)
    assert (bn_value < 0).any()  # the BN output keeps its negatives even though an in-place ReLU follows
    with torch.no_grad():
        inner = net.module.net
        expect = inner.bn(inner.stem((x - 0.5) / 0.5))
    assert torch.allclose(bn_value, expect, atol=1e-6)


def test_costs_add_up_over_segments() -> None:
    lw = lower(network(Toy()))
    names = [None, *[c.name for c in lw.cuts], None]
    parts = [lw.cost(a, b) for a, b in zip(names, names[1:])]
    total = lw.cost(None, None)
    assert sum(p for p, _ in parts) == total[0] == sum(p.numel() for p in lw.network.module.parameters())
    assert sum(f for _, f in parts) == total[1] > 0


def test_fingerprint_depends_on_structure_not_weights() -> None:
    torch.manual_seed(0)
    a = lower(network(Toy(), name="a"))
    torch.manual_seed(1)
    b = lower(network(Toy(), name="b"))
    assert a.network.weights_key != b.network.weights_key
    assert a.fingerprint(None, "net_act") == b.fingerprint(None, "net_act")
    assert a.fingerprint(None, "net_act") != a.fingerprint(None, "net_bn")


def test_vit_class_token_travels_with_its_block() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                            num_classes=10)
    lw = lower(network(vit, (3, 32, 32)))
    layouts = {c.name: (c.layout, c.prefix_tokens, c.shape) for c in lw.cuts}
    before = next(c for c in lw.cuts if c.shape[1] == 16)  # patch tokens only
    after = next(c for c in lw.cuts if c.shape[1] == 17 and c.prefix_tokens == 1)
    assert layouts[before.name][0] == "nlc" and before.prefix_tokens == 0
    seg = lw.segment(before.name, after.name)
    assert any(n.endswith("cls_token") for n, _ in seg.named_parameters())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run_blockwise(lw, x), lw.network.module(x), atol=1e-5)


class Stage(nn.Module):
    """A stage whose forward branches on the data: torch.fx cannot trace through it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 100:
            y = y * 2
        return torch.relu(y)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.Sequential(Stage(8), Stage(8))
        self.head = nn.Linear(8, 10)
        self.feature_info = [{"module": "stages.0", "num_chs": 8, "reduction": 2},
                             {"module": "stages.1", "num_chs": 8, "reduction": 2}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_untraceable_stages_fall_back_to_feature_info_with_a_reason() -> None:
    import pytest

    torch.manual_seed(0)
    net = network(Untraceable())
    with pytest.warns(UserWarning, match="could not trace"):
        lw = lower(net)
    assert lw.method == "feature_info"
    assert lw.warning.startswith("toy: torch.fx could not trace") and "Error" in lw.warning
    assert {"net_stages_0", "net_stages_1"} <= {c.name for c in lw.cuts}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(run_blockwise(lw, x), net.module(x))


def test_peak_activation_counts_what_is_alive_at_once() -> None:
    lw = lower(network(Toy()))
    fmap = 8 * 8 * 8 * 4  # one (1, 8, 8, 8) float32 tensor
    # stem -> bn -> relu: input and one output alive at once
    assert lw.peak_activation("net_stem", "net_act") == 2 * fmap
    # a residual block keeps its input alive next to conv and bn outputs
    assert lw.peak_activation("net_act", "net_blocks_0_act") == 3 * fmap
