"""Model LEGO assembly: parameter scaling, alignment padding, parallel branches, component checkpoints.

Scaling multiplies logit row c by 1 / mean(logit c of the correctly classified training samples of c), so that
separately located components become comparable (train split only). Components of one architecture with one input
normalisation merge by alignment padding: the image-consuming convolutions concatenate their output channels,
every later conv/linear becomes block-diagonal, depthwise convs and BatchNorms concatenate, and the classifier's
rows are put in the global class order; one network then computes exactly [A(x), B(x)]. Anything else (another
architecture, a LayerNorm, which mixes channels) becomes parallel branches.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from dery.errors import USAGE, DeryError
from dery.zoo import CHECKPOINT_FORMAT, Normalized, read_checkpoint

from .disassemble import Component, rebuilt, structure_of

BRANCHES = "dery.branches"


def calibrate_scale(comp: Component, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per logit: 1 / mean logit of the correctly classified TRAIN samples of its class (1 when none or <= 0)."""
    classes = torch.tensor(comp.classes)
    mask = torch.isin(labels, classes)
    x, y = images[mask], labels[mask]
    with torch.no_grad():
        logits = torch.cat([comp.module(x[i:i + 256]) for i in range(0, len(x), 256)])
    pred = classes[logits.argmax(-1)]
    out = []
    for j, c in enumerate(comp.classes):
        ok = (y == c) & (pred == c)
        m = float(logits[ok, j].mean()) if bool(ok.any()) else 0.0
        out.append(1.0 / m if m > 0 else 1.0)
    return out


def apply_scale(net: nn.Module, classifier: str, factors: Sequence[float]) -> None:
    """Multiply each logit row (weight and bias) of the classifier by its factor, in place."""
    head = net.get_submodule(classifier)
    f = torch.tensor(list(factors), dtype=head.weight.dtype)
    with torch.no_grad():
        head.weight.mul_(f[:, None])
        if head.bias is not None:
            head.bias.mul_(f)


class Branches(nn.Module):
    """Parallel components on one input; logits concatenated and put in the global class order."""

    def __init__(self, parts: Sequence[nn.Module], order: Sequence[int]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.register_buffer("order", torch.tensor(list(order), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], 1).index_select(1, self.order)


def _identity_normalized(net: nn.Module) -> nn.Module:
    return Normalized(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()


def component_checkpoint(comp: Component, spec: Any, base_classes: int, resolution: int,
                         scale: Sequence[float] | None, index: Sequence[int] | None = None) -> dict[str, Any]:
    """A dery checkpoint of a component (a timm architecture with pruned channels); `--zoo` loads it."""
    net = comp.module.net
    return {"format": CHECKPOINT_FORMAT, "name": f"{spec.name}[{','.join(comp.class_names)}]", "arch": spec.arch,
            "kwargs": [list(kv) for kv in spec.kwargs], "resolution": resolution, "num_classes": len(comp.classes),
            "mean": comp.module.mean.flatten().tolist(), "std": comp.module.std.flatten().tolist(),
            "classes": list(comp.class_names), "class_index": list(index if index is not None else comp.classes),
            "state_dict": net.state_dict(),
            "lego": {"kind": "component", "base_classes": int(base_classes), "structure": structure_of(net),
                     "classifier": comp.classifier, "scale": None if scale is None else list(scale),
                     "source": spec.name}}


def module_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The `Normalized` module of a component or assembly checkpoint."""
    lego = ckpt["lego"]
    if lego["kind"] == "branches":
        parts = [module_from_checkpoint(p) for p in lego["parts"]]
        return Normalized(Branches(parts, lego["order"]), tuple(ckpt["mean"]), tuple(ckpt["std"])).eval()
    return rebuilt(ckpt["arch"], ckpt["kwargs"], lego["base_classes"], lego["structure"], ckpt["state_dict"],
                   ckpt["mean"], ckpt["std"])


def read_part(path: Path) -> dict[str, Any]:
    """A component or assembly checkpoint; one with no class names is refused."""
    ckpt = read_checkpoint(path, "write components with `dery disassemble`")
    if not ckpt.get("classes") or ckpt.get("class_index") is None:
        raise DeryError(f"{path} records no class names, so its logits cannot be put in one class order; "
                        f"write it with `dery disassemble`", exit_code=USAGE)
    if "lego" not in ckpt:
        raise DeryError(f"{path} is a whole network, not a component; disassemble it first", exit_code=USAGE)
    return ckpt


def _image_consumers(net: nn.Module, shape: Sequence[int]) -> set[str]:
    """Names of the layers that read the network's input tensor itself."""
    found: set[str] = set()
    x = torch.zeros(1, *shape)
    hooks = [m.register_forward_pre_hook(lambda m, inp, n=n: found.add(n) if inp[0] is x else None)
             for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def _cat_param(m: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> None:
    t = torch.cat([a, b], dim)
    if name in m._parameters:
        m._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        m._buffers[name] = t


def _cat_bias(m: nn.Module, b: nn.Module) -> None:
    """Concatenate the biases of two layers being merged; a missing one (compensation adds biases) counts as 0."""
    if m.bias is None and b.bias is None:
        return
    zero = (lambda layer: layer.weight.new_zeros(layer.weight.shape[0]))  # called before the weights merge
    _cat_param(m, "bias", m.bias if m.bias is not None else zero(m), b.bias if b.bias is not None else zero(b))


def _block_diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros((a.shape[0] + b.shape[0], a.shape[1] + b.shape[1], *tuple(a.shape[2:])))
    out[:a.shape[0], :a.shape[1]] = a
    out[a.shape[0]:, a.shape[1]:] = b
    return out


def _merge_nets(na: nn.Module, nb: nn.Module, image: set[str]) -> nn.Module | None:
    """Alignment padding of two pruned copies of one architecture; None where a layer cannot be merged exactly."""
    merged = copy.deepcopy(na)
    mb = dict(nb.named_modules())
    for name, m in merged.named_modules():
        b = mb.get(name)
        if b is None or type(b) is not type(m):
            return None
        own = {k for k, v in list(m._parameters.items()) + list(m._buffers.items()) if v is not None}
        if not own:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _cat_bias(m, b)
        if isinstance(m, nn.Conv2d):
            ga, gb = m.groups, b.groups
            if name in image:
                if ga != 1 or gb != 1:
                    return None
                _cat_param(m, "weight", m.weight, b.weight)
            elif ga == 1 and gb == 1:
                m._parameters["weight"] = nn.Parameter(_block_diag(m.weight, b.weight), requires_grad=False)
                m.in_channels = m.in_channels + b.in_channels
            elif (m.in_channels // ga == b.in_channels // gb and m.out_channels // ga == b.out_channels // gb):
                _cat_param(m, "weight", m.weight, b.weight)
                m.in_channels, m.groups = m.in_channels + b.in_channels, ga + gb
            else:
                return None
            m.out_channels = m.out_channels + b.out_channels
        elif isinstance(m, nn.Linear):
            if name in image:
                return None
            m._parameters["weight"] = nn.Parameter(_block_diag(m.weight, b.weight), requires_grad=False)
            m.in_features, m.out_features = m.in_features + b.in_features, m.out_features + b.out_features
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            for k in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, k, None) is not None:
                    _cat_param(m, k, getattr(m, k), getattr(b, k))
            m.num_features = m.num_features + b.num_features
        else:
            return None
    return merged


def assemble(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One checkpoint computing every part's logits in one global class order (disjoint classes required)."""
    if len(parts) < 2:
        raise DeryError(f"assembly needs at least two components, got {len(parts)}", exit_code=USAGE)
    seen: dict[str, int] = {}
    for p in parts:
        for name, idx in zip(p["classes"], p["class_index"]):
            if name in seen:
                raise DeryError(f"class {name!r} is in more than one component; assemble components of disjoint "
                                f"classes", exit_code=USAGE)
            seen[name] = int(idx)
    res = {p["resolution"] for p in parts}
    if len(res) > 1:
        raise DeryError(f"components expect different input resolutions ({sorted(res)}); assemble components of "
                        f"one resolution", exit_code=USAGE)
    out = parts[0]
    for p in parts[1:]:
        out = _merge_pair(out, p)
    return out


def _global(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[int], list[int]]:
    names = list(a["classes"]) + list(b["classes"])
    index = [int(i) for i in a["class_index"]] + [int(i) for i in b["class_index"]]
    order = sorted(range(len(names)), key=lambda j: index[j])
    return [names[j] for j in order], [index[j] for j in order], order


def _merge_pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    names, index, order = _global(a, b)
    same = (a["lego"]["kind"] == b["lego"]["kind"] == "component" and a["arch"] == b["arch"]
            and a["kwargs"] == b["kwargs"] and a["mean"] == b["mean"] and a["std"] == b["std"])
    if same:
        ma, mb = module_from_checkpoint(a), module_from_checkpoint(b)
        image = _image_consumers(ma.net, (3, a["resolution"], a["resolution"]))
        net = _merge_nets(ma.net, mb.net, image)
        if net is not None:
            head = net.get_submodule(a["lego"]["classifier"])
            perm = torch.tensor(order)
            head._parameters["weight"] = nn.Parameter(head.weight[perm].clone(), requires_grad=False)
            if head.bias is not None:
                head._parameters["bias"] = nn.Parameter(head.bias[perm].clone(), requires_grad=False)
            x = torch.rand(4, 3, a["resolution"], a["resolution"], generator=torch.Generator().manual_seed(0))
            merged = Normalized(net, tuple(a["mean"]), tuple(a["std"])).eval()
            with torch.no_grad():
                want = torch.cat([ma(x), mb(x)], 1)[:, perm]
                err = float((merged(x) - want).abs().max())
            if err <= 1e-4 * max(1.0, float(want.abs().max())):
                return {**a, "name": f"{a['name']}+{b['name']}", "num_classes": len(names), "classes": names,
                        "class_index": index, "state_dict": net.state_dict(),
                        "lego": {**a["lego"], "structure": structure_of(net), "scale": None, "source": "assembly",
                                 "base_classes": a["lego"]["base_classes"]}}
    return {"format": CHECKPOINT_FORMAT, "name": f"{a['name']}+{b['name']}", "arch": BRANCHES, "kwargs": [],
            "resolution": a["resolution"], "num_classes": len(names), "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0], "classes": names, "class_index": index, "state_dict": {},
            "lego": {"kind": "branches", "parts": [a, b], "order": order}}


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Write a checkpoint atomically."""
    from dery.cache import atomic_write

    atomic_write(Path(path), lambda p: torch.save(ckpt, p))


def cmd_assemble(args: argparse.Namespace) -> int:
    """`dery assemble`: one classifier for the union of the components' classes."""
    out = Path(args.output)
    if not out.parent.is_dir():
        raise DeryError(f"-o {out}: directory {out.parent} does not exist; create it first", exit_code=USAGE)
    parts = [read_part(Path(p)) for p in args.parts]
    ckpt = assemble(parts)
    save_checkpoint(out, ckpt)
    how = "one network (alignment padding)" if ckpt["lego"]["kind"] == "component" else "parallel branches"
    print(f"{len(parts)} components -> {out}: {len(ckpt['classes'])} classes ({', '.join(ckpt['classes'])}) "
          f"as {how}")
    return 0
