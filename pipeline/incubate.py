"""Deep Incubation (REFERENCES.md section 4): train K sequential modules inside a shared frozen meta model.

Stage 1 trains a meta model (one small layer per module, same shapes) end to end; stage 2 puts module i in
place of meta layer i and trains only it, every frozen part in eval mode (parameters and BatchNorm buffers
bit-identical); stage 3 loads the incubated modules into one `Assembled` and fine-tunes briefly. Every
module's checkpoint is written atomically to the run directory; a rerun loads finished modules instead of
training them again.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .cache import atomic_write
from .data import Dataset
from .errors import USAGE, DeryError
from .training import fit

FORMAT = "dery.incubate/1"


class _Pool(nn.Module):
    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.size)


def meta_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], index: int) -> nn.Module:
    """One small layer mapping `in_shape` to `out_shape` (per-sample shapes)."""
    if len(in_shape) == 3 and len(out_shape) == 3:
        return nn.Sequential(nn.Conv2d(in_shape[0], out_shape[0], 3, padding=1), nn.BatchNorm2d(out_shape[0]),
                             nn.ReLU(), _Pool(out_shape[1:]))
    if len(in_shape) == 3 and len(out_shape) == 1:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_shape[0], out_shape[0]))
    if len(in_shape) == 2 and len(out_shape) == 2 and in_shape[0] == out_shape[0]:
        return nn.Sequential(nn.Linear(in_shape[1], out_shape[1]), nn.GELU())
    if len(in_shape) == 2 and len(out_shape) == 1:
        return nn.Sequential(_TokenMean(), nn.Linear(in_shape[1], out_shape[0]))
    raise DeryError(f"module {index}: no meta layer maps shape {tuple(in_shape)} to {tuple(out_shape)}; "
                    "modules must map CxHxW or LxD (same L) to CxHxW, LxD or logits", exit_code=USAGE)


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class Hybrid(nn.Module):
    """Parts applied in order; in train mode only part `live` trains, the rest stay in eval mode."""

    def __init__(self, parts: Sequence[nn.Module], live: int | None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.live = live

    def train(self, mode: bool = True) -> Hybrid:
        super().train(mode)
        for j, p in enumerate(self.parts):
            if j != self.live:
                p.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p(x)
        return x


def module_shapes(modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes between modules (K + 1 of them), found with one eval-mode batch of two."""
    shapes, x = [tuple(input_shape)], torch.zeros(2, *input_shape)
    with torch.no_grad():
        for m in modules:
            was = m.training
            m.eval()
            x = m(x)
            m.train(was)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of an eval-mode model."""
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _save(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DeryError(f"{what} checkpoint {path} is damaged ({type(e).__name__}); delete it to retrain",
                        exit_code=USAGE) from e
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and "state" in ckpt):
        raise DeryError(f"{what} checkpoint {path} is damaged (not {FORMAT}); delete it to retrain", exit_code=USAGE)
    return ckpt


def _train(model: nn.Module, params: list[nn.Parameter], data: Dataset, epochs: int, lr: float, seed: int,
           schedule: str, label: str) -> None:
    s = data.split("train")
    fit(model, params, s.images.float().div(255.0), s.labels, epochs=epochs, lr=lr, weight_decay=0.05, batch=64,
        seed=seed, schedule=schedule, train_mode=True, label=label)


def incubate_modules(modules: Sequence[nn.Module], data: Dataset, run_dir: Path, *, epochs_meta: int,
                     epochs_module: int, epochs_finetune: int, lr: float = 3e-3, seed: int = 0,
                     meta: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Run the three stages over `modules` (changed in place); returns the fine-tuned assembly and a report.

    `meta`: a ready meta model (K parts) to incubate in, instead of training one (stage 1).
    """
    from .passes.assemble import Assembled

    run_dir = Path(run_dir)
    k = len(modules)
    shape = (3, data.resolution, data.resolution)
    shapes = module_shapes(modules, shape)
    test = data.split("test")
    tx, ty = test.images.float().div(255.0), test.labels
    report: dict[str, Any] = {"k": k, "shapes": [list(s) for s in shapes], "trained": [], "wall_s": {}}
    t = time.perf_counter()
    if meta is None:
        torch.manual_seed(seed)
        meta = Hybrid([meta_layer(shapes[i], shapes[i + 1], i) for i in range(k)], None)
        path = run_dir / "meta.pt"
        if path.exists():
            meta.load_state_dict(_load(path, "meta model")["state"])
        else:
            _train(meta, list(meta.parameters()), data, epochs_meta, lr, seed, "one-cycle", "incubate: meta")
            _save(path, {"format": FORMAT, "state": meta.state_dict()})
            report["trained"].append("meta")
    meta.eval()
    report["meta_accuracy"] = accuracy(meta, tx, ty)
    report["wall_s"]["meta"] = time.perf_counter() - t
    t = time.perf_counter()
    hybrids = []
    for i, m in enumerate(modules):
        path = run_dir / f"module_{i}.pt"
        hybrid = Hybrid([*meta.parts[:i], m, *meta.parts[i + 1:]], i)
        if path.exists():
            m.load_state_dict(_load(path, f"module {i}")["state"])
        else:
            _train(hybrid, list(m.parameters()), data, epochs_module, lr, seed + 1 + i, "one-cycle",
                   f"incubate: module {i}")
            _save(path, {"format": FORMAT, "index": i, "state": m.state_dict()})
            report["trained"].append(f"module {i}")
        hybrids.append(accuracy(hybrid, tx, ty))
    report["hybrid_accuracy"] = hybrids
    report["wall_s"]["modules"] = time.perf_counter() - t
    t = time.perf_counter()
    assembled = Assembled([copy.deepcopy(m) for m in modules], [f"module {i}" for i in range(k)]).eval()
    report["assembled_accuracy"] = accuracy(assembled, tx, ty)
    if epochs_finetune > 0:
        _train(assembled, list(assembled.parameters()), data, epochs_finetune, lr / 10, seed + 1 + k, "cosine",
               "incubate: fine-tune")
    report["finetuned_accuracy"] = accuracy(assembled, tx, ty)
    report["wall_s"]["finetune"] = time.perf_counter() - t
    return assembled, report
