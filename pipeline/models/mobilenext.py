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

The timm model contract is honoured the way timm's EfficientNet/MobileNetV3 do
it: `global_pool` is a `SelectAdaptivePool2d` (any timm pool type; `''` means no
pooling, so `forward_head` returns the unpooled map once the classifier is gone),
`forward_intermediates`/`prune_intermediate_layers` take their taps at the
`feature_info` stage ends, and `forward` is TorchScript-able directly and after fx
tracing (hence real, non-string annotations: no `from __future__ import annotations`).

`feature_info` has one entry per output stride, as timm's EfficientNet builder
records them: the stem (stride 2, the first block downsamples) and the last block
before each further downsampling plus the last block (strides 4, 8, 16, 32).
`features_only=True` returns the four block taps (`out_indices=(1, 2, 3, 4)`).
"""
import math
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, make_divisible
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

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
             act: bool = False, device: Any = None, dtype: Any = None) -> list[nn.Module]:
    """Bias-free conv + BatchNorm (+ ReLU6): the unit every layer of the network is made of."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False, device=device, dtype=dtype),
        nn.BatchNorm2d(out_chs, device=device, dtype=dtype),
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
                 keep_depthwise: bool = False, device: Any = None, dtype: Any = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
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
            layers += _conv_bn(in_chs, in_chs, 3, groups=in_chs, act=True, **dd)
        layers += _conv_bn(in_chs, hidden, 1, **dd)
        layers += _conv_bn(hidden, out_chs, 1, act=True, **dd)
        if depthwise_out:
            layers += _conv_bn(out_chs, out_chs, 3, stride, groups=out_chs, **dd)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.has_residual else out


class MobileNeXt(nn.Module):
    """MobileNeXt classifier with timm's model interface.

    forward_features / forward_head / reset_classifier / get_classifier, forward_intermediates /
    prune_intermediate_layers over `feature_info`, group_matcher and set_grad_checkpointing.
    """

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, global_pool: str = "avg", device: Any = None, dtype: Any = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        chs = make_divisible(STEM_CHS * width_mult, 8)
        self.stem = nn.Sequential(*_conv_bn(in_chans, chs, 3, stride=2, act=True, **dd))
        # `stage` indexes [stem, *blocks]: the tap after the stem is 0, the one after blocks[i] is i + 1.
        # `module` names the tapped layer as FeatureListNet (flatten_sequential=True) sees it.
        # (no `self.x: list[...]` annotations in __init__: TorchScript warns about those when scripting)
        self.feature_info = [dict(num_chs=chs, reduction=2, module=f"stem.{len(self.stem) - 1}", stage=0)]
        blocks: list[nn.Module] = []
        reduction = 2
        for row, (t, c, n, s) in enumerate(ARCH):
            out_chs = make_divisible(c * (max(1.0, width_mult) if c == ARCH[-1][1] else width_mult), 8)
            for i in range(n):
                stride = s if i == 0 else 1
                blocks.append(SandglassBlock(chs, out_chs, stride, t, keep_depthwise=n == 1, **dd))
                chs = out_chs
                reduction *= stride
            # a stage ends where the next row downsamples, and at the last row (EfficientNet builder's rule)
            if row == len(ARCH) - 1 or ARCH[row + 1][3] > 1:
                self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"blocks.{len(blocks) - 1}",
                                              stage=len(blocks)))
        self.blocks = nn.Sequential(*blocks)
        self.stage_ends = [f["stage"] for f in self.feature_info]
        self.num_features = chs  # channels of forward_features()

        self.head_drop = nn.Dropout(drop_rate)
        self._set_head(num_classes, global_pool, dd)
        self._init_weights()

    def _set_head(self, num_classes: int, global_pool: str, dd: dict[str, Any]) -> None:
        """Pool (+ flatten) and classifier; `global_pool=''` leaves the map unpooled, which needs `num_classes=0`."""
        if not global_pool and num_classes > 0:
            raise ValueError("MobileNeXt: global_pool='' (no pooling) needs num_classes=0, a linear classifier "
                             "needs pooled features")
        pool = SelectAdaptivePool2d(pool_type=global_pool)  # asserts on pool types timm doesn't know
        self.num_classes = num_classes
        self.global_pool = pool
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()  # nothing to flatten without pooling
        self.head_hidden_size = self.num_features * pool.feat_mult()  # pre_logits width (catavgmax doubles it)
        self.classifier = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay: the stem, then one group per block."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm interface)."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0: none, return the pre-logits features).

        `global_pool=None` keeps the current pooling, except that a classifier needs pooled features: with
        no pooling and `num_classes > 0` it falls back to the default 'avg' (timm's contract: any
        `reset_classifier(n)` yields a classifier). `''` removes pooling (then `forward` returns the unpooled
        feature map, and `num_classes` must be 0). The new layers get the model's device, dtype and mode.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type or ("avg" if num_classes > 0 else "")
        ref = self.stem[0].weight
        self._set_head(num_classes, global_pool, {"device": ref.device, "dtype": ref.dtype})
        for m in (self.global_pool, self.flatten, self.classifier):
            m.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """forward_features that also returns the `feature_info` taps selected by `indices`.

        Args:
            x: input images (NCHW).
            indices: last n taps if an int, all if None, else these tap indices (negative count from the end).
            norm: accepted for timm compatibility; the network has no final norm, so it changes nothing.
            stop_early: stop after the last selected tap (needs `intermediates_only`).
            output_fmt: only 'NCHW'.
            intermediates_only: return only the list of taps.
        Returns:
            The taps, or (forward_features output, taps).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"MobileNeXt intermediates are NCHW only, got output_fmt={output_fmt}")
        if stop_early and not intermediates_only:
            raise ValueError("stop_early=True needs intermediates_only=True (the final features are not computed)")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_indices = [self.stage_ends[i] for i in take_indices]
        max_index = self.stage_ends[max_index]

        intermediates: list[torch.Tensor] = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript can't slice a Sequential
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index]
        feat_idx = 0
        for blk in blocks:
            feat_idx += 1
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last tap in `indices` (and the classifier); returns the tap indices to take.

        After pruning, forward_features ends at that tap and `num_features`/`head_hidden_size` follow its width.
        `prune_norm` is accepted for timm compatibility (there is no final norm). The head is removed
        (`reset_classifier(0, '')`) when `prune_head` is set or when blocks were cut off, since it was sized
        for the final features.
        """
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_chs = self.feature_info[max_index]["num_chs"]
        end = self.stage_ends[max_index]
        prune_end = end < len(self.blocks)
        self.blocks = self.blocks[:end]
        if prune_end:
            self.num_features = num_chs
        if prune_end or prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all sandglass blocks: the unpooled last feature map."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and classifier; `pre_logits` stops before the classifier.

        With `global_pool=''` nothing is pooled or flattened: the result is the feature map itself.
        """
        x = self.head_drop(self.flatten(self.global_pool(x)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
        feature_cfg=dict(flatten_sequential=True, out_indices=(1, 2, 3, 4)),
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
