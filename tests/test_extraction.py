"""Block extraction with onnx-graphsurgeon, verified segment by segment against torch.

Every segment between consecutive boundary cuts (the finest blocks any partition can make) of every
default-zoo architecture and of three 224 px timm networks is cut out of the network's single ONNX
export and run in ONNX Runtime; its output must equal the torch segment's. Random weights: extraction
does not depend on training. Slow: the timm networks are large.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dery.cache import Cache
from dery.passes.lower import lower
from dery.passes.profile import segment_pieces
from dery.zoo import PRESETS, load_member, parse_zoo

DEFAULT = tuple(dataclasses.replace(s, weights="random") for s in PRESETS["default"])
TIMM = ("resnet50", "vit_small_patch16_224", "swin_tiny_patch4_window7_224")


def check_every_segment(spec, cache: Cache) -> int:
    lw = lower(load_member(spec, None, cache))
    pieces = segment_pieces([lw], 1, cache)
    assert len(pieces) == len(lw.boundary_cuts()) + 1
    for key, piece in pieces.items():
        sess = ort.InferenceSession(piece.onnx.SerializeToString(), providers=["CPUExecutionProvider"])
        x = torch.randn(1, *piece.input_shape, generator=torch.Generator().manual_seed(0))
        if key[2] is None:
            x = x.abs().clamp(max=1)  # the network's own input: an image in [0, 1]
        with torch.no_grad():
            ref = piece.module()(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == ref.shape, key
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), key
    return len(pieces)


@pytest.mark.slow
@pytest.mark.parametrize("spec", DEFAULT, ids=[s.name for s in DEFAULT])
def test_every_segment_of_the_default_zoo_extracts_exactly(spec, tmp_path) -> None:
    assert check_every_segment(spec, Cache(tmp_path)) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("model", TIMM)
def test_every_segment_of_large_timm_networks_extracts_exactly(model, tmp_path) -> None:
    assert check_every_segment(parse_zoo(f"{model}:random")[0], Cache(tmp_path)) >= 9


class _ChannelsLastHead(torch.nn.Module):
    """A LayerNorm over channels between two permutes (as ConvNeXt's LayerNorm2d) leaves channels-last strides,
    which the next conv keeps, so the flatten after the pool exports as as_strided (a Gather of every element
    in order); `pick` also reorders the channels, a real gather."""

    def __init__(self, pick: bool):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(8)
        self.mix, self.fc = torch.nn.Conv2d(8, 8, 1), torch.nn.Linear(8, 4)
        self.pick = pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.nn.functional.adaptive_avg_pool2d(self.mix(x), 1).flatten(1)
        return self.fc(x[:, [2, 0, 1, 3, 4, 5, 6, 7]] if self.pick else x)


@pytest.mark.parametrize("pick", [False, True])
def test_an_in_order_gather_is_written_as_a_reshape_and_a_real_one_stays(pick: bool, monkeypatch) -> None:
    import dery.onnx_graph as graph

    torch.manual_seed(0)
    module = _ChannelsLastHead(pick).eval()
    x = torch.rand(1, 3, 9, 9)
    rewrite = graph.gathers_as_reshapes
    monkeypatch.setattr(graph, "gathers_as_reshapes", lambda m: m)
    exported = graph.export(module, (x,), ["x"], ["y"])
    model = rewrite(exported)
    ops = [n.op_type for n in model.graph.node]
    assert [n.op_type for n in exported.graph.node].count("Gather") == 1 and "Gather" not in ops, ops
    assert ops.count("GatherND") == (1 if pick else 0), ops
    for m in (exported, model):
        got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got[0], module(x).detach().numpy(), rtol=1e-5, atol=1e-6)
