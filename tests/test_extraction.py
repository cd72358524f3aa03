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
