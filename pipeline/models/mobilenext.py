"""MobileNeXt (sandglass blocks), registered as timm models `mobilenext_035` .. `mobilenext_140`.

MobileNeXt flips MobileNetV2's inverted residual: the residual joins the wide
tensors and the depthwise convolutions sit at the wide ends, with a narrow 1x1
bottleneck in the middle (Zhou et al., "Rethinking Bottleneck Structure for
Efficient Mobile Network Design", ECCV 2020). The family lives here so the
compiler has a donor whose blocks differ from the inverted-residual ones.

The layout reproduces the reference parameter counts exactly (3,535,416 at
width 1.0, 6,126,168 at width 1.4, both with BatchNorm and 1000 classes):

* every convolution is bias-free (a BatchNorm follows each one);
* the bottleneck width is `in // t`, raised to `make_divisible(ceil(out / 6), 16)`
  when that is smaller than `out / 6`;
* a stage made of a single block (the t=2 first stage, the 144- and the
  1280-channel stages) keeps both depthwise convolutions although it changes
  the channel count; the first block of a longer stage that changes channels
  drops them (a stride-2 one keeps only the trailing, strided depthwise conv);
* stage widths are `make_divisible(c * width, 8)`, except the last stage, which
  follows MobileNetV2's head rule `make_divisible(1280 * max(1, width), 8)`.

Every block is one element of `MobileNeXt.blocks` (an `nn.Sequential`) and the
model uses only standard layers, so `torch.fx.symbolic_trace` works and a
graph-based cutter finds a cut point after every block.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from ..errors import USAGE, DeryError

__all__ = ["MobileNeXt", "SandglassBlock"]

# (t, c, n, s): reduction ratio, output channels at width 1.0, blocks, first block's stride.
# The paper's table lists the 960-channel stage twice; three blocks give its parameter count.
ARCH: tuple[tuple[int, int, int, int], ...] = (
    (2, 96, 1, 2),
    (6, 144, 1, 1),
    (6, 192, 3, 2),
    (6, 288, 3, 2),
    (6, 384, 4, 1),
    (6, 576, 4, 2),
    (6, 960, 3, 1),
    (6, 1280, 1, 1),
)
STEM_CHS = 32


def _conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = False) -> list[nn.Module]:
    """Bias-free conv + BatchNorm (+ ReLU6): the unit every layer of the network is made of."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return layers


class SandglassBlock(nn.Module):
    """One sandglass block: [dw3x3] -> 1x1 reduce (linear) -> 1x1 expand -> ReLU6 -> [dw3x3].

    Variants, chosen from the shapes:

    * identity (`in_chs == out_chs`, stride 1): dw3x3-BN-ReLU6, 1x1 reduce-BN,
      1x1 expand-BN-ReLU6, dw3x3-BN (linear), plus the input;
    * channel-changing with `keep_depthwise` (single-block stages, e.g. the t=2
      first block): the same four convs, the last depthwise one carrying the
      stride, no residual;
    * channel-changing otherwise: 1x1 reduce-BN, 1x1 expand-BN-ReLU6, then at
      stride 2 a dw3x3 stride 2-BN; no residual.

    The bottleneck is `in_chs // reduction`, but never narrower than
    `make_divisible(ceil(out_chs / 6), 16)` so wide outputs keep enough capacity.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, reduction: int = 6,
                 keep_depthwise: bool = False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"SandglassBlock stride must be 1 or 2, got {stride}")
        hidden = in_chs // reduction
        if hidden < out_chs / 6:
            hidden = make_divisible(math.ceil(out_chs / 6), 16)
        self.in_chs, self.out_chs, self.stride, self.hidden_chs = in_chs, out_chs, stride, hidden
        self.has_residual = in_chs == out_chs and stride == 1
        depthwise_in = self.has_residual or keep_depthwise
        depthwise_out = depthwise_in or stride == 2

        layers: list[nn.Module] = []
        if depthwise_in:
            layers += _conv_bn(in_chs, in_chs, 3, groups=in_chs, act=True)
        layers += _conv_bn(in_chs, hidden, 1)
        layers += _conv_bn(hidden, out_chs, 1, act=True)
        if depthwise_out:
            layers += _conv_bn(out_chs, out_chs, 3, stride, groups=out_chs)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.has_residual else out


class MobileNeXt(nn.Module):
    """MobileNeXt classifier with timm's interface (forward_features/forward_head/reset_classifier)."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, global_pool: str = "avg"):
        super().__init__()
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool

        chs = make_divisible(STEM_CHS * width_mult, 8)
        self.stem = nn.Sequential(*_conv_bn(in_chans, chs, 3, stride=2, act=True))
        blocks: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        reduction = 2
        for t, c, n, s in ARCH:
            out_chs = make_divisible(c * (max(1.0, width_mult) if c == ARCH[-1][1] else width_mult), 8)
            for i in range(n):
                stride = s if i == 0 else 1
                blocks.append(SandglassBlock(chs, out_chs, stride, t, keep_depthwise=n == 1))
                chs = out_chs
                reduction *= stride
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"blocks.{len(blocks) - 1}"))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = chs

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """MobileNetV2's initialisation: He (fan-out) convs, unit BN, small-normal classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm interface)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0: none, return pooled features)."""
        if global_pool is not None:
            _check_pool(global_pool)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all sandglass blocks: the unpooled last feature map."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pool, dropout and classifier; `pre_logits` stops before the classifier."""
        x = self.head_drop(self.flatten(self.pool(x)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> None:
    """Only average pooling exists in this head; reject other timm pool names instead of ignoring them."""
    if global_pool != "avg":
        raise ValueError(f"MobileNeXt supports only global_pool='avg', got {global_pool!r}")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained_cfg without a weight source: the family has no published timm weights."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "classifier", **kwargs,
    }


WIDTHS: dict[str, float] = {
    "mobilenext_035": 0.35,
    "mobilenext_050": 0.5,
    "mobilenext_075": 0.75,
    "mobilenext_100": 1.0,
    "mobilenext_140": 1.4,
}
default_cfgs = generate_default_cfgs({name: _cfg() for name in WIDTHS})


def _create_mobilenext(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """Build through timm's `build_model_with_cfg`, so a `pretrained_cfg_overlay=dict(file=...)` loads.

    Plain `pretrained=True` would only make timm warn and keep random weights;
    raise instead, since nobody publishes weights for this family.
    """
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict):
            raise DeryError(
                f"no pretrained weights exist for {variant}; create it with pretrained=False, or pass "
                "pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth') to load your own",
                exit_code=USAGE,
            )
    return build_model_with_cfg(
        MobileNeXt, variant, pretrained,
        width_mult=WIDTHS[variant],
        feature_cfg=dict(flatten_sequential=True, out_indices=(1, 2, 4, 7)),
        **kwargs,
    )


@register_model
def mobilenext_035(pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """MobileNeXt, width 0.35."""
    return _create_mobilenext("mobilenext_035", pretrained, **kwargs)


@register_model
def mobilenext_050(pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """MobileNeXt, width 0.5."""
    return _create_mobilenext("mobilenext_050", pretrained, **kwargs)


@register_model
def mobilenext_075(pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """MobileNeXt, width 0.75."""
    return _create_mobilenext("mobilenext_075", pretrained, **kwargs)


@register_model
def mobilenext_100(pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """MobileNeXt, width 1.0."""
    return _create_mobilenext("mobilenext_100", pretrained, **kwargs)


@register_model
def mobilenext_140(pretrained: bool = False, **kwargs: Any) -> MobileNeXt:
    """MobileNeXt, width 1.4."""
    return _create_mobilenext("mobilenext_140", pretrained, **kwargs)
