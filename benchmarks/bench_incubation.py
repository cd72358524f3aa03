"""Incubation against end-to-end training of the same small BN CNN at matched total epochs (embedded digits)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from dery.data import digits
from dery.incubate import Hybrid, accuracy, incubate_modules
from dery.training import fit

OUT = Path(__file__).parent / "results"
EPOCHS = {"meta": 30, "module": 15, "finetune": 5}


def cnn(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))]


def main() -> None:
    torch.set_num_threads(1)
    data = digits(16)
    t = time.perf_counter()
    _, rep = incubate_modules(cnn(0), data, Path(tempfile.mkdtemp()), epochs_meta=EPOCHS["meta"],
                              epochs_module=EPOCHS["module"], epochs_finetune=EPOCHS["finetune"], lr=1e-2)
    inc_s = time.perf_counter() - t
    total = EPOCHS["meta"] + 3 * EPOCHS["module"] + EPOCHS["finetune"]
    net = Hybrid(cnn(0), None)
    s, te = data.split("train"), data.split("test")
    t = time.perf_counter()
    fit(net, list(net.parameters()), s.images.float() / 255, s.labels, epochs=total, lr=1e-2, weight_decay=0.05,
        batch=64, seed=0, schedule="one-cycle", train_mode=True, label="end-to-end")
    e2e_s = time.perf_counter() - t
    e2e = accuracy(net, te.images.float() / 255, te.labels)
    result = {"epochs": EPOCHS, "matched_total_epochs": total, "incubation": rep, "incubation_wall_s": inc_s,
              "end_to_end_accuracy": e2e, "end_to_end_wall_s": e2e_s}
    (OUT / "incubation.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = ["# Incubation vs end-to-end training", "",
             "Small BN CNN (3 modules: stride-2 conv 16, stride-2 conv 32, pool+linear), embedded digits at 16 px, "
             "1 thread, on a shared 2-core machine (wall times are noisy). Stage 2 ran in one process; the "
             "torchrun module-parallel stage is not built yet, so there is no 1-vs-2-process timing and no "
             "pretrained-assembly meta-model comparison.", "",
             "| run | test accuracy | wall s |", "|---|---|---|",
             f"| meta model alone | {rep['meta_accuracy']:.3f} | {rep['wall_s']['meta']:.1f} |"]
    lines += [f"| hybrid {i} | {a:.3f} | |" for i, a in enumerate(rep["hybrid_accuracy"])]
    lines += [f"| assembled before fine-tune | {rep['assembled_accuracy']:.3f} | {rep['wall_s']['modules']:.1f} "
              "(stage 2) |",
              f"| assembled after {EPOCHS['finetune']} fine-tune epochs | {rep['finetuned_accuracy']:.3f} | "
              f"{rep['wall_s']['finetune']:.1f} |",
              f"| incubation total | {rep['finetuned_accuracy']:.3f} | {inc_s:.1f} |",
              f"| end to end, {total} epochs | {e2e:.3f} | {e2e_s:.1f} |", "",
              "Finding: the hybrids are compatible with the meta model but not with each other: the assembly "
              "before fine-tuning is near chance on this CNN, so the compatibility test is an open xfail.", ""]
    (OUT / "incubation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
