"""repair: train a chosen assembly before its engine is built (`dery-compile --finetune`).

A reassembled network loses accuracy at its stitches until it is trained. The
repair kinds (`defaults.FINETUNES`):

* `none`: the blocks and the least-squares stitches as they are;
* `stitches`: only the stitches, end to end through the frozen blocks
  (`passes.stitch.refine_stitches`);
* `e2e`: the whole network (`passes.stitch.fine_tune`, on a copy);
* `incubate`: Deep Model Assembling's engine (`dery.incubate.repair`): each
  module trained inside the rest of the network frozen, then the whole.

Every kind trains on the train split, deterministically for a seed, on a copy:
the zoo and the session's stitches stay as they are. The architecture never
changes, so the engine's latency decomposition is the untrained one's.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from dery import defaults
from dery.data import Dataset
from dery.errors import USAGE, DeryError
from dery.passes.assemble import Assembled


@dataclass(frozen=True, eq=False)
class Repaired:
    """An assembly after its repair, what the repair did (kind, epochs, train losses) and its wall time."""

    module: nn.Module
    log: dict[str, Any]
    seconds: float


def repair(module: Assembled, kind: str, epochs: int, data: Dataset, labels: torch.Tensor, *, seed: int,
           run_dir: Path) -> Repaired:
    """Repair `module` by `kind` for `epochs` epochs (`run_dir`: the incubation's module checkpoints)."""
    from dery.incubate import assembly_modules
    from dery.incubate import repair as incubate_repair
    from dery.passes.stitch import fine_tune, refine_stitches

    if kind not in defaults.FINETUNES:
        raise DeryError(f"unknown --finetune {kind!r}; valid: {', '.join(defaults.FINETUNES)}", exit_code=USAGE)
    t0 = time.perf_counter()
    if kind == "none" or epochs == 0:
        out, log = module, {}
    elif kind == "stitches":
        out = copy.deepcopy(module)
        log = refine_stitches(out, data, labels, epochs, seed=seed)
    elif kind == "e2e":
        out, log = fine_tune(module, data, labels, epochs, seed=seed)
    else:
        out = copy.deepcopy(module)
        parts = assembly_modules(out)
        tuned, report = incubate_repair(parts, data, run_dir, epochs_module=epochs, epochs_finetune=epochs, seed=seed)
        for part, done in zip(parts, tuned.parts):  # the network keeps its own layout (and engine graph)
            part.load_state_dict(done.state_dict())
        log = {"meta": report["meta"]}
    out.eval()
    return Repaired(out, {"kind": kind if epochs else "none", "epochs": epochs if kind != "none" else 0, **log},
                    time.perf_counter() - t0)
