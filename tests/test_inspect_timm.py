"""`dery inspect` on the timm families the dissection issue names: enough cut points, exact blockwise replay.

Seeded random weights (no download); slow: each network is built, traced and run twice on 224 px input.
"""
from __future__ import annotations

import pytest
from dery.driver import inspect_json

REQUIRED = ("resnet50", "resnext50_32x4d", "regnety_016", "mobilenetv2_100", "mobilenetv3_large_100",
            "efficientnet_b0", "convnext_tiny", "deit_tiny_patch16_224", "vit_small_patch16_224",
            "swin_tiny_patch4_window7_224", "mobilenext_100")


@pytest.mark.slow
@pytest.mark.parametrize("model", REQUIRED)
def test_required_network_has_eight_cuts_and_replays_exactly(model: str) -> None:
    doc = inspect_json(f"{model}:random")
    assert doc["method"] == "fx", doc["warning"]
    assert len(doc["cut_points"]) >= 8
    assert sum(c["boundary"] for c in doc["cut_points"]) >= 8
    assert doc["max_abs_diff"] <= 1e-5
