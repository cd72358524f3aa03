"""assemble: the chosen blocks and stitches as one runnable nn.Module, and its checkpoint (which `--zoo` and
`dery incubate` load)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from dery.errors import USAGE, DeryError
from dery.ir import Assembly, Partition
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches, StitchModule

if TYPE_CHECKING:
    from dery.data import Dataset
    from dery.zoo import Network, Normalized

ASSEMBLY_ARCH = "dery-assembly"  # the `arch` of an assembly checkpoint: blocks of zoo members and their stitches


class Assembled(nn.Module):
    """Blocks and stitches applied in order; takes [0, 1] images like every zoo member."""

    def __init__(self, parts: Sequence[nn.Module], labels: Sequence[str]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.labels = tuple(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


def assemble(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches,
             models: Sequence[str]) -> tuple[Assembly, Assembled]:
    """Build the network that takes set k's block from `models[k]` (the assemble pass)."""
    if len(models) != partition.k:
        raise DeryError(f"an assembly needs one model per set ({partition.k}), got {len(models)}")
    by_name = {lw.name: lw for lw in zoo}
    chosen = []
    for k, m in enumerate(models):
        if m not in by_name:
            raise DeryError(f"assembly names {m!r}, which is not in the zoo ({', '.join(by_name)})")
        if k > 0 and models[k - 1] == m:
            chosen.append(None)
        elif k > 0:
            s = stitches.get(models[k - 1], m, k - 1)
            if s is None:
                raise DeryError(f"no stitch from {models[k - 1]} to {m} at boundary {k - 1}")
            chosen.append(s)
    blocks = [partition.block(m, k) for k, m in enumerate(models)]
    module = _assembled(models, lambda k: by_name[models[k]].segment(blocks[k].first, blocks[k].last),
                        lambda k: stitches.modules[models[k - 1], models[k], k - 1])
    return Assembly(tuple(models), tuple(blocks), tuple(chosen)), module


def _assembled(models: Sequence[str], block: Callable[[int], nn.Module],
               stitch: Callable[[int], nn.Module]) -> Assembled:
    """Set k's block, after the stitch into it wherever the model changes, for every set in order."""
    parts, labels = [], []
    for k, m in enumerate(models):
        if k > 0 and models[k - 1] != m:
            parts.append(stitch(k))
            labels.append(f"stitch {models[k - 1]}>{m}")
        parts.append(block(k))
        labels.append(f"{m}[{k}]")
    return Assembled(parts, labels).eval()


# ------------------------------------------------------------------------------------------------- checkpoint


def member_entry(network: Network) -> dict[str, Any]:
    """What rebuilds one zoo member exactly: its timm architecture, every layer's channel counts (a pruned or
    class-cut member has its own) and its tensors."""
    from dery.passes.disassemble import structure_of
    from dery.passes.lego import Branches
    from dery.zoo import _timm

    net = network.module.net
    if isinstance(net, (Assembled, Branches)) or not _timm().is_model(network.spec.arch):
        raise DeryError(f"member {network.name} ({type(net).__name__}) is not a timm architecture, so an assembly "
                        f"checkpoint cannot rebuild it")
    return {"arch": network.spec.arch, "kwargs": [list(kv) for kv in network.spec.kwargs],
            "resolution": network.input_shape[-1], "num_classes": network.num_classes,
            "mean": network.module.mean.flatten().tolist(), "std": network.module.std.flatten().tolist(),
            "structure": structure_of(net), "state_dict": net.state_dict()}


def member_from_entry(name: str, entry: dict[str, Any]) -> Network:
    """A zoo member rebuilt from its `member_entry`."""
    from dery.passes.disassemble import rebuilt
    from dery.zoo import MemberSpec, as_network

    spec = MemberSpec(name, entry["arch"], "assembly", tuple(tuple(kv) for kv in entry["kwargs"]), None,
                      entry["resolution"])
    return as_network(name, spec, rebuilt(entry["arch"], entry["kwargs"], entry["num_classes"], entry["structure"],
                                          entry["state_dict"], entry["mean"], entry["std"]))


def assembly_checkpoint(zoo: Sequence[Lowered], assembly: Assembly, module: Assembled,
                        data: Dataset) -> dict[str, Any]:
    """A dery checkpoint of an assembly (`--zoo` and `dery incubate` load it): its members, blocks and stitches,
    and the assembled network's own tensors (trained, when it was repaired)."""
    from dery.zoo import CHECKPOINT_FORMAT, embedded_name

    by_name = {lw.name: lw.network for lw in zoo}
    first = by_name[assembly.models[0]]
    return {"format": CHECKPOINT_FORMAT, "name": "+".join(assembly.models), "arch": ASSEMBLY_ARCH, "kwargs": [],
            "resolution": first.input_shape[-1], "num_classes": first.num_classes, "classes": list(data.classes),
            "data": embedded_name(data), "class_index": list(range(len(data.classes))),
            "mean": [0.0] * first.input_shape[0], "std": [1.0] * first.input_shape[0],
            "assembly": {"members": {m: member_entry(by_name[m]) for m in dict.fromkeys(assembly.models)},
                         "models": list(assembly.models), "blocks": [[b.first, b.last] for b in assembly.blocks],
                         "stitches": [None if p is None else [p.src.name, p.dst.name]
                                      for p in _stitch_parts(module, assembly)]},
            "state_dict": module.state_dict()}


def _stitch_parts(module: Assembled, assembly: Assembly) -> list[StitchModule | None]:
    parts = iter(p for p, label in zip(module.parts, module.labels) if label.startswith("stitch "))
    return [None if s is None else next(parts) for s in assembly.stitches]


def module_from_assembly(ckpt: dict[str, Any]) -> Normalized:
    """The network of an assembly checkpoint: its members rebuilt and lowered, their blocks cut again, its
    stitches rebuilt, and the checkpoint's tensors loaded (strictly)."""
    from dery.passes.lower import lower
    from dery.zoo import Normalized

    spec = ckpt["assembly"]
    models, cuts = spec["models"], spec["stitches"]
    lowered = {m: lower(member_from_entry(m, e)) for m, e in spec["members"].items()}
    net = _assembled(models, lambda k: lowered[models[k]].segment(*spec["blocks"][k]),
                     lambda k: StitchModule(lowered[models[k - 1]].cut(cuts[k - 1][0]),
                                            lowered[models[k]].cut(cuts[k - 1][1])))
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise DeryError(f"assembly checkpoint {ckpt['name']} does not fit the network its members rebuild: "
                        f"{str(e).splitlines()[0][:200]}", exit_code=USAGE) from e
    return Normalized(net, tuple(ckpt["mean"]), tuple(ckpt["std"])).eval()
