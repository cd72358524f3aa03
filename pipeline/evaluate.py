"""Accuracy on a data split, against real labels or the zoo's consensus.

Real labels count only when the data is labelled and every zoo member predicts
over the data's classes. Otherwise (e.g. ImageNet classifiers on an unlabelled
or differently labelled folder) quality is measured as agreement with the zoo
ensemble's prediction, and reported accuracy is null.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .data import Dataset
from .zoo import Network


def predictions(module: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits of a module over images, batch by batch."""
    with torch.no_grad():
        return torch.cat([module(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def has_labels(zoo: Sequence[Network], data: Dataset) -> bool:
    """Whether accuracy against the data's labels means anything for this zoo."""
    return data.labelled and all(n.num_classes == data.num_classes for n in zoo)


def reference_labels(zoo: Sequence[Network], data: Dataset, split: str) -> tuple[torch.Tensor, str]:
    """Labels to score against, and which kind they are ("labels" or "pseudo")."""
    if has_labels(zoo, data):
        return data.split(split).labels, "labels"
    images = data.images(split)
    probs = torch.stack([predictions(n.module, images).softmax(-1) for n in zoo]).mean(0)
    return probs.argmax(-1), "pseudo"


def accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a module."""
    return float((predictions(module, images).argmax(-1) == labels).float().mean())
