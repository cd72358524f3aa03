"""stitch: closed-form ridge fits, layout conversions, and the identity between identical networks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from dery.evaluate import accuracy
from dery.ir import CutPoint, Partition
from dery.passes.assemble import assemble
from dery.passes.lower import lower
from dery.passes.stitch import StitchModule, _Normal, build, fit_stitches, resample, stitch_kind


def test_ridge_statistics_recover_a_planted_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    b = torch.randn(5, generator=g)
    stats = _Normal(7, 5, positions=4)
    for _ in range(5):
        x = torch.randn(16, 4, 7, generator=g)
        stats.add(x, x @ w + b)
    w_hat, off = stats.solve(per_position=False)[0]
    assert torch.allclose(w_hat.float(), w, atol=1e-3)
    assert torch.allclose(off[0].float(), b, atol=1e-3)


def test_per_position_offsets_capture_a_position_embedding() -> None:
    g = torch.Generator().manual_seed(1)
    w, pos = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    stats = _Normal(3, 4, positions=6)
    for _ in range(4):
        x = torch.randn(32, 6, 3, generator=g)
        stats.add(x, x @ w + pos)
    w_hat, off = stats.solve(per_position=True)[0]
    assert torch.allclose(off.float(), pos, atol=1e-3) and torch.allclose(w_hat.float(), w, atol=1e-3)
    _, off_global = stats.solve(per_position=False)[0]
    assert not torch.allclose(off_global.float(), pos, atol=1e-2)


def cut(layout: str, shape: tuple[int, ...], prefix: int = 0) -> CutPoint:
    return CutPoint("m", "n", 0, shape, layout, prefix)


def test_cnn_to_transformer_stitch_builds_tokens_position_terms_and_class_token() -> None:
    src, dst = cut("nchw", (1, 4, 8, 8)), cut("nlc", (1, 17, 6), prefix=1)
    g = torch.Generator().manual_seed(0)
    weights = {"weight": torch.randn(6, 4, generator=g).numpy(), "offset": torch.randn(16, 6, generator=g).numpy(),
               "prefix_weight": torch.randn(6, 4, generator=g).numpy(),
               "prefix_bias": torch.randn(6, generator=g).numpy()}
    m = build(src, dst, weights)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = m(x)
    assert y.shape == (2, 17, 6)
    grid = F.avg_pool2d(x, 2)  # 8x8 -> the target's 4x4 grid, an exact factor: average pooling
    w, b = torch.from_numpy(weights["weight"]), torch.from_numpy(weights["offset"])
    tokens = grid.flatten(2).transpose(1, 2) @ w.T + b
    cls = x.mean((2, 3)) @ torch.from_numpy(weights["prefix_weight"]).T + torch.from_numpy(weights["prefix_bias"])
    assert torch.allclose(y[:, 1:], tokens, atol=1e-5) and torch.allclose(y[:, 0], cls, atol=1e-5)
    assert stitch_kind(src, dst) == "nchw>nlc:pool2"


def test_transformer_to_cnn_drops_prefix_tokens_and_upsamples_bilinearly() -> None:
    src, dst = cut("nlc", (1, 1 + 9, 5), prefix=1), cut("nchw", (1, 3, 6, 6))
    m = StitchModule(src, dst)
    with torch.no_grad():
        m.weight.copy_(torch.eye(3, 5)[:, :, None, None])
    x = torch.randn(2, 10, 5)
    y = m(x)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 5, 3, 3)[:, :3]
    assert y.shape == (2, 3, 6, 6)
    assert torch.allclose(y, F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False), atol=1e-6)
    assert stitch_kind(src, dst) == "nlc>nchw:bilinear"


def test_nhwc_round_trip_and_resampling_rules() -> None:
    src, dst = cut("nhwc", (1, 4, 4, 3)), cut("nhwc", (1, 4, 4, 3))
    m = StitchModule(src, dst)
    with torch.no_grad():
        m.weight.copy_(torch.eye(3)[:, :, None, None])
    x = torch.randn(2, 4, 4, 3)
    assert torch.equal(m(x), x)
    g = torch.randn(1, 2, 6, 6)
    assert torch.equal(resample(g, (6, 6), (3, 3)), torch.nn.functional.avg_pool2d(g, 2))
    assert resample(g, (6, 6), (4, 4)).shape == (1, 2, 4, 4)
    assert resample(g, (6, 6), (6, 6)) is g
    # The sizes are the cut points' own, so a stitch traces with torch.fx (an assembly lowers like a member).
    traced = torch.fx.symbolic_trace(m)
    assert torch.equal(traced(x), m(x))


def test_stitch_between_identical_networks_is_the_identity(tiny) -> None:
    resnet = next(lw for lw in tiny.lowered if lw.name == "resnet")
    twin = lower(dataclasses.replace(resnet.network, name="twin"))
    b = tiny.partition.boundaries[tiny.partition.models.index("resnet")]
    blocks = tiny.partition.blocks[tiny.partition.models.index("resnet")]
    part = Partition(3, ("resnet", "twin"), (b, b), (blocks, tuple(dataclasses.replace(x, model="twin")
                                                                       for x in blocks)), 0.0, "flops", "test")
    fitted = fit_stitches([resnet, twin], part, tiny.data)
    assert set(fitted) == {("resnet", "twin", 0), ("resnet", "twin", 1), ("twin", "resnet", 0), ("twin", "resnet", 1)}
    for weights, r2 in fitted.values():
        assert r2 > 0.999
        eye = weights["weight"]
        assert abs(eye - torch.eye(eye.shape[0]).numpy()).max() < 0.05
    from dery.ir import Stitch
    from dery.passes.stitch import Stitches, stitch_cost, stitch_fingerprint

    items, modules = [], {}
    for (a, bb, j), (w, r2) in fitted.items():
        src = resnet.cut(b[j])
        items.append(Stitch(a, bb, j, "same", "", r2, stitch_fingerprint(src, src), *stitch_cost(src, src)))
        modules[a, bb, j] = build(src, src, w)
    _, mixed = assemble([resnet, twin], part, Stitches(tuple(items), modules), ("resnet", "twin", "resnet"))
    x, y = tiny.data.images("test"), tiny.data.split("test").labels
    assert accuracy(mixed, x, y) == pytest.approx(accuracy(resnet.network.module, x, y), abs=0.01)
