"""assemble: the chosen blocks and stitches as one runnable nn.Module."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from dery.errors import DeryError
from dery.ir import Assembly, Partition
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches


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
    blocks, chosen, parts, labels = [], [], [], []
    for k, m in enumerate(models):
        if m not in by_name:
            raise DeryError(f"assembly names {m!r}, which is not in the zoo ({', '.join(by_name)})")
        if k > 0 and models[k - 1] != m:
            s = stitches.get(models[k - 1], m, k - 1)
            if s is None:
                raise DeryError(f"no stitch from {models[k - 1]} to {m} at boundary {k - 1}")
            chosen.append(s)
            parts.append(stitches.modules[models[k - 1], m, k - 1])
            labels.append(f"stitch {models[k - 1]}>{m}")
        elif k > 0:
            chosen.append(None)
        block = partition.block(m, k)
        blocks.append(block)
        parts.append(by_name[m].segment(block.first, block.last))
        labels.append(f"{m}[{k}]")
    return Assembly(tuple(models), tuple(blocks), tuple(chosen)), Assembled(parts, labels).eval()
