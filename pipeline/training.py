"""The one training loop dery runs: zoo members, stitch refinement and fine-tunes.

AdamW over chosen parameters, shuffled mini-batches with random shifts of up to
2 px, cross-entropy, deterministic for a seed. Everything else in a model keeps
its `requires_grad` flags and, with `train_mode=False`, its BatchNorm statistics.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import progress
from .errors import DeryError

SCHEDULES = ("one-cycle", "cosine")


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Roll a batch by up to 2 px each way."""
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def mean_loss(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Mean cross-entropy of an eval-mode module over all images."""
    with torch.no_grad():
        total = sum(float(F.cross_entropy(module(images[i:i + batch]), labels[i:i + batch], reduction="sum"))
                    for i in range(0, images.shape[0], batch))
    return total / images.shape[0]


@contextlib.contextmanager
def trainable_only(module: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block, exactly `params` require gradients; every flag is restored afterwards."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fit(module: nn.Module, params: Sequence[nn.Parameter], images: torch.Tensor, labels: torch.Tensor, *,
        epochs: int, lr: float, weight_decay: float, batch: int, seed: int, schedule: str, train_mode: bool,
        label: str, shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Train `params` of `module` on float images and labels; returns the steps and the last epoch's mean loss.

    `schedule`: "one-cycle" (warm-up then anneal, for training from scratch) or
    "cosine" (anneal from `lr`, for refining a fitted start). `train_mode`: run
    the module in train mode (BatchNorm statistics move) or keep it in eval mode.
    `shard` = (rank, ranks): this process takes every ranks-th sample of each batch,
    for data-parallel training (a DistributedDataParallel `module` averages the
    gradients); every rank draws the same order and shifts.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if labels.shape[0] != images.shape[0]:
        raise DeryError(f"{label}: {labels.shape[0]} labels for {images.shape[0]} images")
    n = images.shape[0]
    steps = epochs * ((n + batch - 1) // batch)
    gen = torch.Generator().manual_seed(seed)
    last = float("nan")
    with trainable_only(module, params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = (torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1)) if schedule == "one-cycle"
                 else torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)))
        module.train(train_mode)
        with progress.task(label, epochs) as advance:
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                total = 0.0
                for i in range(0, n, batch):
                    idx = order[i:i + batch][shard[0]::shard[1]]
                    loss = F.cross_entropy(module(random_shift(images[idx], gen)), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item() * len(idx)
                last = total / n
                advance(note=f"loss {last:.3f}")
        module.eval()
    return {"epochs": epochs, "steps": steps, "trained_params": sum(p.numel() for p in params),
            "last_epoch_loss": last}
