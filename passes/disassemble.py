"""Model disassembly (Model LEGO, MDA): the component of a trained CNN that serves chosen classes.

For every requested class the pass takes that class's most confidently correct
training samples and measures, layer by layer, how much each input unit
contributes to each output unit: ReLU(W[o, i] * a[i]) for a linear layer, the
per-input-channel partial convolution summed over space, then ReLU, for a
convolution (both summed over the samples). Contributions are min-max
normalised over the inputs of each output. Locating walks from the class's logit
towards the input: an input is relevant to a needed output when its relative
contribution exceeds alpha; inputs whose (min-max normalised) count of relevant
needed outputs exceeds beta are needed in turn. The walk runs on autograd's
backward graph (a module hook turns the needed outputs into needed inputs), so
residual adds, concats, squeeze-excite gates and depthwise convolutions route
the needs exactly as the data flows; BatchNorm and LayerNorm pass them through
channel by channel.

The union over the requested classes is removed physically with torch-pruning's
DependencyGraph: channels tied by an add, a concat or a depthwise convolution
form one group, and a channel of a group stays when any member layer needs it.
The classifier keeps only the requested classes' rows, in the data's class order.
Beyond MDA, a conv or linear layer that loses input channels can keep their mean
contribution over the classes' training images in its bias (compensation): a
removed channel that inhibited a kept one no longer shifts it. It rescues plain
CNNs (a 3-class component of one went from 65.5% to 99.3%) but hurts some
depthwise ones, so by default (`auto`) both are built and the one more accurate
on the classes' training images is kept.
"""
from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from dery import defaults, progress
from dery.errors import USAGE, DeryError

PART = "@part"  # suffix of a component's name in `dery-compile --classes`


def component_of(name: str) -> str | None:
    """The member whose component a `dery-compile --classes` zoo member is (None for a whole member)."""
    return name[:-len(PART)] if name.endswith(PART) else None

SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape")


@dataclass(frozen=True)
class Thresholds:
    """Alpha (relevance of an input to an output) and beta (share of needed outputs) per layer kind."""

    conv_alpha: float = defaults.CONV_ALPHA
    conv_beta: float = defaults.CONV_BETA
    linear_alpha: float = defaults.LINEAR_ALPHA
    linear_beta: float = defaults.LINEAR_BETA

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise DeryError(f"threshold {name.replace('_', '-')} = {value} is outside [0, 1]; give a value "
                                f"between 0 and 1 (defaults: conv 0.3/0.2, linear 0.4/0.3)", exit_code=USAGE)

    def of(self, layer: nn.Module) -> tuple[float, float]:
        """(alpha, beta) for a layer."""
        return (self.linear_alpha, self.linear_beta) if isinstance(layer, nn.Linear) else (self.conv_alpha,
                                                                                            self.conv_beta)


@dataclass(frozen=True, eq=False)
class Component:
    """A disassembled network: `module` takes [0, 1] images and returns the logits of `classes` in that order."""

    module: nn.Module = field(repr=False)
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    classifier: str  # name of the logit layer inside module.net
    kept_params: int
    whole_params: int
    kept_units: dict[str, int]
    compensated: bool = False  # removed channels' mean contributions kept in biases

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.whole_params


def parse_classes(text: str | Sequence[str], names: Sequence[str] | None, *,
                  what: str = "--classes") -> tuple[int, ...]:
    """Class indices (sorted, in the data's order) from indices or names; bad lists raise one DeryError."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if names is None:
        raise DeryError(f"{what}: the model records no class names; write it with dery (its checkpoint keeps them) "
                        f"or disassemble a member dery trains on the data", exit_code=USAGE)
    if not items:
        raise DeryError(f"{what} is empty; give class indices or names, e.g. {what} 0,3,7", exit_code=USAGE)
    by_name = {n: i for i, n in enumerate(names)}
    out: list[int] = []
    for s in items:
        if s in by_name:
            idx = by_name[s]
        elif s.lstrip("-").isdigit():
            idx = int(s)
            if not 0 <= idx < len(names):
                raise DeryError(f"{what}: class index {idx} is out of range; the model has {len(names)} classes "
                                f"(0..{len(names) - 1})", exit_code=USAGE)
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise DeryError(f"{what}: unknown class {s!r}; classes are {shown} (or their indices)", exit_code=USAGE)
        if idx in out:
            raise DeryError(f"{what}: class {s!r} is given twice; list each class once", exit_code=USAGE)
        out.append(idx)
    if len(out) == len(names):
        raise DeryError(f"{what}: every class ({len(names)}) is requested; the component would be the whole "
                        f"network, so leave at least one class out", exit_code=USAGE)
    return tuple(sorted(out))


def class_samples(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, cls: int, *, share: float = 0.01,
                  minimum: int = 32) -> torch.Tensor:
    """The class's most confidently correct images: the top `share` of the class, at least `minimum`."""
    idx = (labels == cls).nonzero().flatten()
    with torch.no_grad():
        probs = torch.cat([module(images[idx[i:i + 256]]) for i in range(0, len(idx), 256)]).softmax(-1)
    correct = (probs.argmax(-1) == cls).nonzero().flatten()
    if len(correct) == 0:
        raise DeryError(f"class {cls}: the network classifies none of its {len(idx)} training samples correctly; "
                        f"no component can be located for it", exit_code=USAGE)
    count = min(len(correct), max(minimum, math.ceil(share * len(idx))))
    conf = probs[correct, cls]
    order = torch.sort(conf, descending=True, stable=True).indices[:count]
    return images[idx[correct[order]]]


def _conv_contributions(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Sum over samples of ReLU(partial conv of each input channel, summed over space): groups x O/g x I/g."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            ph = pw = (0, 0)
        else:
            th, tw = dh * (kh - 1), dw * (kw - 1)
            ph, pw = (th // 2, th - th // 2), (tw // 2, tw - tw // 2)
    else:
        ph, pw = (conv.padding[0],) * 2, (conv.padding[1],) * 2
    if conv.padding_mode != "zeros":
        raise DeryError(f"convolution with padding_mode {conv.padding_mode!r} cannot be disassembled "
                        f"(only zero padding)", exit_code=USAGE)
    x = F.pad(a, (pw[0], pw[1], ph[0], ph[1]))
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    # s[n, i, u, v]: the sum of input channel i over the positions kernel tap (u, v) touches
    s = torch.stack([torch.stack([x[:, :, u * dh: u * dh + sh * (ho - 1) + 1: sh,
                                   v * dw: v * dw + sw * (wo - 1) + 1: sw].sum((2, 3))
                                  for v in range(kw)], -1) for u in range(kh)], -2)
    g = conv.groups
    n = a.shape[0]
    w = conv.weight.reshape(g, conv.out_channels // g, conv.in_channels // g, kh * kw)
    s = s.reshape(n, g, conv.in_channels // g, kh * kw)
    return torch.einsum("goik,ngik->ngoi", w, s).relu_().sum(0)


def _linear_contributions(lin: nn.Linear, a: torch.Tensor) -> torch.Tensor:
    """Sum over samples of ReLU(W[o, i] * a[i]) (a summed over positions first): 1 x O x I."""
    s = a.reshape(a.shape[0], -1, a.shape[-1]).sum(1)
    return torch.einsum("oi,ni->noi", lin.weight, s).relu_().sum(0)[None]


def _relative(c: torch.Tensor) -> torch.Tensor:
    """Min-max normalise contributions over the inputs of each output (a single input counts as relevant)."""
    if c.shape[-1] == 1:
        return torch.ones_like(c)
    lo, hi = c.amin(-1, keepdim=True), c.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (c - lo) / span.clamp_min(1e-30), torch.zeros_like(c))


def _needed_inputs(rel: torch.Tensor, out_needed: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Inputs (flat, I) relevant to enough needed outputs: count, min-max normalise, keep above beta."""
    g, og, ig = rel.shape
    need = out_needed.reshape(g, og, 1).to(rel.dtype)
    counts = ((rel > alpha).to(rel.dtype) * need).sum(1).reshape(g * ig)
    lo, hi = counts.min(), counts.max()
    if hi <= lo:
        return counts > 0
    return (counts - lo) / (hi - lo) > beta


def _channel_dim(module: nn.Module, t: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return t.dim() - 1
    if isinstance(module, nn.LayerNorm) and type(module).__name__ != "LayerNorm2d":
        return t.dim() - 1
    return 1


def _mask_like(t: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[dim] = -1
    return mask.to(t.dtype).reshape(shape).expand_as(t).contiguous()


def _nonzero_channels(t: torch.Tensor, dim: int) -> torch.Tensor:
    dims = [d for d in range(t.dim()) if d != dim]
    return t.abs().sum(dims) > 0 if dims else t.abs() > 0


class _Tap(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass, hands the gradient to `relay` and returns its result."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, relay) -> torch.Tensor:
        ctx.relay = relay
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.relay(g), None


class _Locator:
    """Hooks that record contributions in the forward pass and route needed channels in the backward pass.

    A layer's output passes through a tap whose backward records which output channels are needed; its input
    passes through a tap whose backward replaces the gradient by the channels the layer needs from it.
    """

    def __init__(self, root: nn.Module, thresholds: Thresholds):
        self.thresholds = thresholds
        self.rel: dict[nn.Module, torch.Tensor] = {}
        self.pending: dict[nn.Module, torch.Tensor] = {}
        self.out_need: dict[str, torch.Tensor] = {}
        self.in_need: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in root.named_modules():
            if hasattr(m, "inplace"):
                m.inplace = False
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                self.handles.append(m.register_forward_pre_hook(self._tap_input(name)))
                self.handles.append(m.register_forward_hook(self._tap_output(name)))

    def _tap_input(self, name: str):
        def hook(m: nn.Module, inputs: tuple) -> tuple:
            return (_Tap.apply(inputs[0], lambda g: self._route(name, m, g)), *tuple(inputs[1:]))
        return hook

    def _tap_output(self, name: str):
        def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                a = inputs[0].detach()
                c = _conv_contributions(m, a) if isinstance(m, nn.Conv2d) else _linear_contributions(m, a)
                self.rel[m] = _relative(c)

            def record(g: torch.Tensor) -> torch.Tensor:
                self.pending[m] = _nonzero_channels(g, _channel_dim(m, g))
                return g
            return _Tap.apply(out, record)
        return hook

    def _route(self, name: str, m: nn.Module, g_in: torch.Tensor) -> torch.Tensor:
        out_needed = self.pending.pop(m)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rel = self.rel[m]
            in_needed = _needed_inputs(rel, out_needed, *self.thresholds.of(m))
            if not bool(in_needed.any()):  # keep the strongest input so that the needed outputs stay fed
                in_needed[int(rel.sum(1).flatten().argmax())] = True
        else:
            in_needed = out_needed
        self.out_need[name] = self.out_need.get(name, torch.zeros_like(out_needed)) | out_needed
        self.in_need[name] = self.in_need.get(name, torch.zeros_like(in_needed)) | in_needed
        return _mask_like(g_in, in_needed, _channel_dim(m, g_in))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def locate(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
           thresholds: Thresholds = Thresholds(), *, share: float = 0.01, minimum: int = 32
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Needed output and input channels of every conv/linear/norm layer (by name), union over `classes`."""
    work = copy.deepcopy(module).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    loc = _Locator(work, thresholds)
    try:
        for cls in classes:
            x = class_samples(work, images, labels, cls, share=share, minimum=minimum).clone().requires_grad_(True)
            logits = work(x)
            seed = torch.zeros_like(logits)
            seed[:, cls] = 1.0
            logits.backward(seed)
    finally:
        loc.close()
    prefix = "net."
    strip = (lambda n: n[len(prefix):]) if any(k.startswith(prefix) for k in loc.out_need) else (lambda n: n)
    return ({strip(k): v for k, v in loc.out_need.items()}, {strip(k): v for k, v in loc.in_need.items()})


def _check_cnn(net: nn.Module, label: str) -> None:
    for name, m in net.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.MultiheadAttention) or kind in ("Attention", "WindowAttention", "PatchEmbed"):
            raise DeryError(f"{label} cannot be disassembled: it has attention ({name}: {kind}); disassembly "
                            f"supports convolutional networks (conv, linear, BatchNorm, LayerNorm)", exit_code=USAGE)


def _graph(net: nn.Module, example: torch.Tensor):
    """torch-pruning's dependency graph of `net` (it traces autograd, so parameters need gradients meanwhile)."""
    import torch_pruning as tp

    for p in net.parameters():
        p.requires_grad_(True)
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    for p in net.parameters():
        p.requires_grad_(False)
    return dg


def input_means(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean input of every conv (groups 1) and linear layer over `images` (already normalised): a conv's per
    channel and position, a linear layer's per feature."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(m: nn.Module, inputs: tuple) -> None:
            a = inputs[0].detach()
            a = a if isinstance(m, nn.Conv2d) else a.reshape(-1, a.shape[-1])
            sums[name] = sums.get(name, 0) + a.double().sum(0)
            counts[name] = counts.get(name, 0) + a.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in net.named_modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    try:
        with torch.no_grad():
            for i in range(0, len(images), 128):
                net(images[i:i + 128])
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _compensate(layer: nn.Module, idxs: Sequence[int], mean: torch.Tensor) -> None:
    """Fold the mean contribution of the input channels `idxs`, about to be removed, into the layer's bias: for
    a conv, the spatial mean of its output on their mean input maps (so padding and stride count exactly)."""
    idx = torch.tensor(list(idxs), dtype=torch.int64)
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            x = torch.zeros(1, *mean.shape)
            x[0, idx] = mean[idx]
            delta = layer._conv_forward(x, layer.weight, None).mean((0, 2, 3))
        else:
            delta = layer.weight[:, idx] @ mean[idx]
    if layer.bias is None:
        layer.bias = nn.Parameter(delta, requires_grad=False)
    else:
        with torch.no_grad():
            layer.bias.add_(delta)


def _prune_groups(net: nn.Module, example: torch.Tensor,
                  keep_of: Callable[[Any, Any, nn.Module, int], torch.Tensor],
                  means: dict[str, torch.Tensor] | None = None) -> None:
    """Remove, in place, the channels of every dependency group that `keep_of(graph, group, root, size)` drops;
    the plan is made for all groups before any is pruned. With `means` (from `input_means`), a conv or linear
    layer that loses input channels keeps their mean contribution in its bias."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = _graph(net, example)
        plan = []
        for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            drop = (~keep_of(dg, group, root, len(group[0].idxs))).nonzero().flatten().tolist()
            if drop:
                plan.append((root, group[0].dep.handler, drop))
        names = {m: n for n, m in net.named_modules()}
        for root, fn, drop in plan:
            group = dg.get_pruning_group(root, fn, drop)
            for item in group if means is not None else ():
                layer = item.dep.target.module
                if dg.is_in_channel_pruning_fn(item.dep.handler) and names.get(layer) in means:
                    _compensate(layer, [int(i) for i in item.idxs], means[names[layer]])
            group.prune()


def _keep(size: int, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[indices] = True
    return keep


def rounded(keep: torch.Tensor, root: nn.Module, round_to: int) -> torch.Tensor:
    """`keep` with as many more channels as bring it to a multiple of `round_to`: the root's largest-norm ones."""
    short = -int(keep.sum()) % round_to
    if not short or bool(keep.all()):
        return keep
    weight = root.weight.detach()
    norm = weight.abs().flatten(1).sum(1) if weight.shape[0] == len(keep) else torch.zeros(len(keep))
    norm = norm.masked_fill(keep, -1.0)
    extra = torch.argsort(norm, descending=True, stable=True)[:min(short, int((~keep).sum()))]
    return keep | _keep(len(keep), extra)


def prune_to(net: nn.Module, example: torch.Tensor, out_need: dict[str, torch.Tensor],
             in_need: dict[str, torch.Tensor], classifier: str, classes: Sequence[int], label: str,
             round_to: int = defaults.LEGO_ROUND_TO, means: dict[str, torch.Tensor] | None = None) -> None:
    """Remove, in place, every channel no member of its dependency group needs (kept ones rounded up to a
    multiple of `round_to`, removed ones' mean contributions kept in biases given `means`); the classifier keeps
    `classes`."""
    modules = dict(net.named_modules())
    head = modules[classifier]
    out_need = {**out_need, classifier: _keep(head.weight.shape[0], list(classes))}
    names = {m: n for n, m in modules.items()}

    def needed(dg, group, root: nn.Module, size: int) -> torch.Tensor:
        if root is head:
            return out_need[classifier]
        keep = torch.zeros(size, dtype=torch.bool)
        for item in group:
            dep, idxs, roots = item.dep, item.idxs, item.root_idxs
            name = names.get(dep.target.module)
            if name is None or roots is None:
                continue
            need = (out_need.get(name) if dg.is_out_channel_pruning_fn(dep.handler)
                    else in_need.get(name) if dg.is_in_channel_pruning_fn(dep.handler) else None)
            if need is None:
                continue
            for i, r in zip(idxs, roots):
                if r is not None and i < len(need) and bool(need[i]):
                    keep[r] = True
        if not bool(keep.any()):
            keep[0] = True
        return rounded(keep, root, round_to)

    try:
        _prune_groups(net, example, needed, means)
    except DeryError:
        raise
    except Exception as e:
        raise DeryError(f"{label} cannot be disassembled: torch-pruning cannot trace or prune it "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        exit_code=USAGE) from e


def classifier_name(net: nn.Module) -> str:
    """The name of the layer that produces the logits (timm's get_classifier, else the last Linear)."""
    modules = dict(net.named_modules())
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        raise DeryError(f"{type(net).__name__} cannot be disassembled: no linear classifier produces its logits",
                        exit_code=USAGE)
    return next(n for n, m in modules.items() if m is head)


def structure_of(net: nn.Module) -> dict[str, dict[str, Any]]:
    """The channel attributes of every layer that has them (enough, with a state dict, to rebuild a pruned net)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in net.named_modules():
        attrs = {a: (list(getattr(m, a)) if isinstance(getattr(m, a), tuple) else getattr(m, a))
                 for a in SHAPE_ATTRS if isinstance(getattr(m, a, None), (int, tuple))}
        if attrs:
            out[name] = attrs
    return out


def restructure(net: nn.Module, structure: dict[str, dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> None:
    """Give a freshly built net the channel counts of `structure` and the tensors of `state_dict` (in place)."""
    modules = dict(net.named_modules())
    for name, attrs in structure.items():
        m = modules[name]
        for a, v in attrs.items():
            setattr(m, a, tuple(v) if isinstance(v, list) else v)
    for key, t in state_dict.items():
        owner, _, attr = key.rpartition(".")
        m = modules[owner]
        if attr in m._parameters:  # a bias that compensation added is created here
            m._parameters[attr] = nn.Parameter(torch.empty_like(t), requires_grad=False)
        elif attr in m._buffers:
            m._buffers[attr] = torch.empty_like(t)
    net.load_state_dict(state_dict, strict=True)


def rebuilt(arch: str, kwargs: Sequence[Sequence[Any]], num_classes: int, structure: dict[str, dict[str, Any]],
            state_dict: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """A timm classifier built afresh with `structure`'s channel counts and `state_dict`'s tensors, behind its
    normalisation (`Normalized`), frozen and in eval mode."""
    from dery.zoo import Normalized, _timm

    net = _timm().create_model(arch, num_classes=int(num_classes),
                               **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs})
    restructure(net, structure, state_dict)
    module = Normalized(net, tuple(mean), tuple(std)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def unit_counts(net: nn.Module) -> dict[str, int]:
    """Output units of every conv and linear layer."""
    return {n: int(m.weight.shape[0]) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def disassemble(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                class_names: Sequence[str], thresholds: Thresholds = Thresholds(), *, share: float = 0.01,
                minimum: int = 32, label: str = "network", round_to: int = defaults.LEGO_ROUND_TO,
                compensate: str = defaults.LEGO_COMPENSATE) -> Component:
    """The component of a `Normalized` classifier for `classes`, located on the given training images, its kept
    channels per dependency group rounded up to a multiple of `round_to` (1: as located).

    `compensate`: "on" keeps, in the bias of a layer that loses input channels, their mean contribution over the
    classes' training images (MDA drops it; without it, every removed channel that inhibits a kept one shifts
    that one's input); "off" removes them as MDA does; "auto" builds both and keeps the one more accurate on
    the classes' training images."""
    net = module.net
    _check_cnn(net, label)
    classes = tuple(sorted(classes))
    head = classifier_name(net)
    out_need, in_need = locate(module, images, labels, classes, thresholds, share=share, minimum=minimum)

    def build(net: nn.Module, example: torch.Tensor, means: dict[str, torch.Tensor] | None) -> None:
        prune_to(net, example, out_need, in_need, head, classes, label, round_to, means)

    comp, compensated = _pruned(module, build, images, labels, classes, compensate)
    with torch.no_grad():
        out = comp(images[:2])
    if out.shape != (2, len(classes)):
        raise DeryError(f"{label} cannot be disassembled: its pruned output has shape {tuple(out.shape)}, not "
                        f"(batch, {len(classes)})", exit_code=USAGE)
    return Component(comp, classes, tuple(class_names[c] for c in classes), head,
                     sum(p.numel() for p in comp.parameters()), sum(p.numel() for p in module.parameters()),
                     unit_counts(comp.net), compensated)


def _pruned(module: nn.Module, build: Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor] | None], None],
            images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], compensate: str
            ) -> tuple[nn.Module, bool]:
    """A frozen copy of `module` pruned by `build(net, example, means)`, with or without compensation as
    `compensate` says ("auto": the more accurate on the classes' training images; plain removal on a tie)."""
    if compensate not in defaults.LEGO_COMPENSATIONS:
        raise DeryError(f"compensate {compensate!r} is not one of {', '.join(defaults.LEGO_COMPENSATIONS)}",
                        exit_code=USAGE)
    with torch.no_grad():
        x = images[torch.isin(labels, torch.tensor(list(classes)))]
        normalised = (x[:defaults.LEGO_MEAN_SAMPLES] - module.mean) / module.std
    means = input_means(module.net, normalised) if compensate != "off" else None

    def one(with_means: dict[str, torch.Tensor] | None) -> nn.Module:
        comp = copy.deepcopy(module).eval()
        for p in comp.parameters():
            p.requires_grad_(False)
        build(comp.net, normalised[:1], with_means)
        return comp

    if compensate != "auto":
        return one(means), means is not None
    kept, plain = one(means), one(None)
    y = labels[torch.isin(labels, torch.tensor(list(classes)))]
    scores = [task_accuracy(c, x, y, classes, range(len(classes))) for c in (kept, plain)]
    return (kept, True) if scores[0] > scores[1] else (plain, False)


def random_component(module: nn.Module, like: Component, images: torch.Tensor, labels: torch.Tensor, seed: int,
                     *, compensate: str = defaults.LEGO_COMPENSATE) -> Component:
    """A control: the same classes and the same units per dependency group as `like`, chosen at random, with
    compensation chosen as for a located component."""
    def build(net: nn.Module, example: torch.Tensor, means: dict[str, torch.Tensor] | None) -> None:
        gen = torch.Generator().manual_seed(seed)
        names = {m: n for n, m in net.named_modules()}

        def chosen(dg, group, root: nn.Module, size: int) -> torch.Tensor:
            if names[root] == like.classifier:
                return _keep(size, list(like.classes))
            return _keep(size, torch.randperm(size, generator=gen)[:like.kept_units[names[root]]])

        _prune_groups(net, example, chosen, means)

    comp, compensated = _pruned(module, build, images, labels, like.classes, compensate)
    return Component(comp, like.classes, like.class_names, like.classifier,
                     sum(p.numel() for p in comp.parameters()), like.whole_params, unit_counts(comp.net), compensated)


def task_accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                  outputs: Sequence[int] | None = None) -> float:
    """Accuracy on the samples of `classes`, choosing among those classes only.

    `outputs`: which of the module's logits are those classes (default: the logits at `classes`, for a whole net;
    a component's logits are its classes in order, so pass range(len(classes)))."""
    classes = list(classes)
    mask = torch.isin(labels, torch.tensor(classes))
    x, y = images[mask], labels[mask]
    cols = list(outputs) if outputs is not None else classes
    with torch.no_grad():
        logits = torch.cat([module(x[i:i + 256]) for i in range(0, len(x), 256)])[:, cols]
    pred = torch.tensor(classes)[logits.argmax(-1)]
    return float((pred == y).float().mean())


def located(net: Any, data: Any, classes: Sequence[int], names: Sequence[str], thresholds: Thresholds = Thresholds(),
            *, samples: int = defaults.LEGO_SAMPLES, scale: bool = True, round_to: int = defaults.LEGO_ROUND_TO,
            compensate: str = defaults.LEGO_COMPENSATE) -> tuple[Component, dict[str, Any]]:
    """A zoo member's component for `classes`, located on the train split and (unless `scale` is off) with its
    logits scaled on the train split, and the dery checkpoint that holds it."""
    from .lego import apply_scale, calibrate_scale, component_checkpoint

    train = data.split("train")
    comp = disassemble(net.module, data.images("train"), train.labels, classes, names, thresholds,
                       minimum=samples, label=net.name, round_to=round_to, compensate=compensate)
    factors = calibrate_scale(comp, data.images("train"), train.labels) if scale else None
    if factors is not None:
        apply_scale(comp.module.net, comp.classifier, factors)
    return comp, component_checkpoint(comp, net.spec, net.num_classes, net.input_shape[-1], factors)


def sliced(module: nn.Module, classes: Sequence[int]) -> nn.Module:
    """A copy of a whole `Normalized` classifier whose classifier keeps the rows of `classes` alone."""
    import torch_pruning as tp

    out = copy.deepcopy(module)
    head = out.net.get_submodule(classifier_name(out.net))
    tp.prune_linear_out_channels(head, idxs=[i for i in range(head.out_features) if i not in set(classes)])
    return out


def class_zoo(zoo: Sequence[Any], data: Any, request: str | Sequence[str], cache: Any,
              thresholds: Thresholds = Thresholds()) -> tuple[tuple[Any, ...], Any]:
    """`dery-compile --classes`: every member whole (its classifier cut to the classes) and as its component
    (`NAME@part`, located and scaled on the train split; cached), and the data restricted to the classes."""
    from dery.cache import content_key
    from dery.zoo import as_network

    from .lego import module_from_checkpoint

    classes = parse_classes(request, data.classes if data.labelled else None)
    for n in zoo:
        names = member_class_names(n.spec, data)
        if names is None or tuple(names) != tuple(data.classes):
            why = ("records no class names" if names is None
                   else f"has classes {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
            raise DeryError(f"--classes: member {n.name} {why}, not the data's ({', '.join(data.classes[:5])}"
                            f"{', ...' if data.num_classes > 5 else ''}); its logits cannot be matched to the "
                            f"classes", exit_code=USAGE)
    out = []
    for n in zoo:
        out.append(as_network(n.name, n.spec, sliced(n.module, classes)))
        key = content_key("component", n.weights_key, classes, thresholds, data.fingerprint, defaults.LEGO_ROUND_TO,
                          defaults.LEGO_MEAN_SAMPLES, defaults.LEGO_COMPENSATE, 2)

        def make(n: Any = n) -> dict[str, Any]:
            try:
                return located(n, data, classes, data.classes, thresholds)[1]
            except DeryError as e:  # this member cannot be disassembled; the refusal is cached like a component
                return {"refused": str(e)}

        ckpt = cache.get_or_make("lego", f"{n.name}-{key}", ".pt", make=make, save=lambda c, p: torch.save(c, p),
                                 load=lambda p: torch.load(p, map_location="cpu", weights_only=True),
                                 what="component")
        if "refused" in ckpt:
            progress.say(f"{ckpt['refused']}; it takes part whole only")
            continue
        out.append(as_network(f"{n.name}{PART}", n.spec, module_from_checkpoint(ckpt)))
    return tuple(out), data.only(classes)


# ---------------------------------------------------------------------------------------------------- command


def resolve_member(model: str):
    """The one MemberSpec a MODEL argument names (a default-zoo member name, or anything --zoo takes)."""
    from dery.zoo import parse_zoo

    specs = parse_zoo(model)
    if len(specs) != 1:
        raise DeryError(f"MODEL {model!r} names {len(specs)} networks; give one (e.g. resnet_wide or a checkpoint)",
                        exit_code=USAGE)
    return specs[0]


def member_class_names(spec, data) -> tuple[str, ...] | None:
    """The member's class names: its checkpoint's, or the data's for a member dery trains on that data."""
    if spec.weights == "train":
        return tuple(data.classes)
    path = Path(spec.weights)
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if isinstance(ckpt, dict) and ckpt.get("classes") is not None:
            return tuple(str(c) for c in ckpt["classes"])
    return None


def cmd_disassemble(args: argparse.Namespace) -> int:
    """`dery disassemble`: locate a member's component for some classes and write it as a dery checkpoint."""
    from dery.cache import Cache
    from dery.data import load_data
    from dery.zoo import default_data, input_shape, load_member

    from .lego import save_checkpoint

    thresholds = Thresholds(args.conv_alpha, args.conv_beta, args.linear_alpha, args.linear_beta)
    if args.samples < 1:
        raise DeryError(f"--samples must be >= 1, got {args.samples}", exit_code=USAGE)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise DeryError(f"-o {out}: directory {out.parent} does not exist; create it first", exit_code=USAGE)
    spec = resolve_member(args.model)
    resolution = spec.resolution or 224
    fallback, cache = default_data((spec,)), Cache()
    data = load_data(args.data, resolution, default=fallback, seed=args.seed, cache=cache)
    names = member_class_names(spec, data)
    if names is None:
        raise DeryError(f"{args.model}: the checkpoint records no class names, so --classes cannot be matched to "
                        f"its outputs; use a checkpoint dery wrote or a member dery trains on the data",
                        exit_code=USAGE)
    classes = parse_classes(args.classes, names)
    net = load_member(spec, data, cache)
    if input_shape(spec, net.module.net)[-1] != data.resolution:
        data = load_data(args.data, input_shape(spec, net.module.net)[-1], default=fallback, seed=args.seed,
                         cache=cache)
    if net.num_classes != len(names):
        raise DeryError(f"{args.model} has {net.num_classes} outputs but {len(names)} class names; its classes "
                        f"cannot be matched", exit_code=USAGE)
    comp, ckpt = located(net, data, classes, names, thresholds, samples=args.samples, scale=not args.no_scale,
                         round_to=args.round_to, compensate=args.compensate)
    save_checkpoint(out, ckpt)
    test = data.split("test")
    acc_whole = task_accuracy(net.module, data.images("test"), test.labels, classes)
    acc_comp = task_accuracy(comp.module, data.images("test"), test.labels, classes, range(len(classes)))
    print(f"{net.name} -> {out}: classes {', '.join(comp.class_names)}; {comp.kept_params:,} of "
          f"{comp.whole_params:,} parameters ({100 * comp.kept_fraction:.1f}%); test accuracy on the classes "
          f"{100 * acc_comp:.1f}% (whole network {100 * acc_whole:.1f}%)")
    return 0
