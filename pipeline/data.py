"""Probe, training and evaluation data.

Two sources: a set generated from scikit-learn's digits (ships inside the
dependency, so the default run downloads nothing) and a user's ImageFolder
directory (`--data DIR`). Both
become the same `Dataset`: uint8 images at the zoo's resolution in four
disjoint-by-purpose splits: train (the embedded zoo trains on it), probe
(similarity features and stitch fitting, a subset of train), val (held out:
stitch R^2 and quality-model calibration) and test (held out: every accuracy in
the report).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import content_key
from .errors import USAGE, DeryError

SPLITS = ("train", "probe", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True, eq=False)
class Split:
    """Images as uint8 N x 3 x H x W, labels as int64 N (or None when unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named, fingerprinted set of splits at one resolution."""

    name: str
    fingerprint: str
    resolution: int
    classes: tuple[str, ...]
    splits: dict[str, Split] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        return self.splits["test"].labels is not None

    def split(self, name: str) -> Split:
        return self.splits[name]

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Float images in [0, 1] and labels, in order, `batch_size` at a time."""
        s = self.splits[split]
        for i in range(0, len(s), batch_size):
            x = s.images[i:i + batch_size].float().div_(255.0)
            y = s.labels[i:i + batch_size] if s.labels is not None else None
            yield x, y

    def images(self, split: str, limit: int | None = None) -> torch.Tensor:
        """All float images of a split in [0, 1] (at most `limit`)."""
        s = self.splits[split]
        return s.images[:limit].float().div_(255.0)

    def only(self, classes: Sequence[int]) -> Dataset:
        """The samples of `classes` alone, relabelled 0..n-1 in the order given (every split; labelled data)."""
        if not self.labelled:
            raise DeryError(f"data {self.name} has no labels, so it cannot be restricted to some classes",
                            exit_code=USAGE)
        keep = torch.tensor(list(classes), dtype=torch.int64)
        relabel = torch.full((self.num_classes,), -1, dtype=torch.int64)
        relabel[keep] = torch.arange(len(keep))
        splits = {}
        for name, s in self.splits.items():
            mask = torch.isin(s.labels, keep)
            splits[name] = Split(s.images[mask], relabel[s.labels[mask]])
        names = tuple(self.classes[c] for c in classes)
        return Dataset(f"{self.name}[{','.join(names)}]", content_key(self.fingerprint, "classes", list(classes)),
                       self.resolution, names, splits)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def _partition(n: int, seed: int, test: float, val: float, probe: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test)), int(round(n * val))
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": train_idx, "probe": train_idx[:probe], "val": val_idx, "test": test_idx}


@dataclass(frozen=True)
class Distortion:
    """Seeded random affine distortion plus pixel noise, applied once to every generated image."""

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.1)
    shift: float = 0.08
    noise: float = 0.12

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Distort N x C x H x W images in [0, 1]."""
        n = x.shape[0]
        angle = (torch.rand(n, generator=gen) * 2 - 1) * self.rotate_deg * np.pi / 180
        zoom = self.scale[0] + torch.rand(n, generator=gen) * (self.scale[1] - self.scale[0])
        move = (torch.rand(n, 2, generator=gen) * 2 - 1) * self.shift * 2  # affine_grid spans [-1, 1]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
        return (out + self.noise * torch.randn(out.shape, generator=gen)).clamp(0, 1)


DIGITS_DISTORTION = Distortion()


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797 x 64 pixels in 0..16, 1797 labels), read from the file scikit-learn ships
    without importing scikit-learn (its import is 1.5 s of every run; `load_digits` reads the same file)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    raw = np.loadtxt(path, delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(np.int64)


def digits(resolution: int = 32, *, probe: int = 256, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), distorted, at `resolution`, 3 channels.

    Every digit is upsampled to 32 px, rotated, scaled, shifted and noised once with a fixed seed,
    then resized to `resolution`. Clean digits are so easy that the smallest network is also the
    most accurate; distorted ones separate small networks from large ones, as real data does.
    """
    pixels, targets = digits_arrays()
    x = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = DIGITS_DISTORTION(x, torch.Generator().manual_seed(seed))
    if resolution != 32:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = _to_uint8(x.repeat(1, 3, 1, 1))
    labels = torch.tensor(targets, dtype=torch.int64)
    idx = _partition(len(images), seed, test=0.25, val=0.15, probe=probe)
    splits = {k: Split(images[v], labels[v]) for k, v in idx.items()}
    fp = content_key("digits", resolution, probe, seed, DIGITS_DISTORTION, 2)
    return Dataset("digits", fp, resolution, tuple(str(i) for i in range(10)), splits)


def image_folder(root: Path, resolution: int, *, probe: int = 256, limit: int = 4000, seed: int = 0) -> Dataset:
    """An ImageFolder directory (one sub-folder per class), resized and centre-cropped.

    The class order is the sorted folder names, as torchvision's ImageFolder
    orders them; accuracy is meaningful only when that order matches the zoo's
    classifier outputs.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DeryError(f"--data {root}: not a directory; give an ImageFolder directory (one sub-folder per class)",
                        exit_code=USAGE)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DeryError(f"--data {root}: no images found (expected {root}/<class>/<image>.jpg|png|...)",
                        exit_code=USAGE)
    rng = np.random.default_rng(seed)
    if len(files) > limit:
        keep = np.sort(rng.choice(len(files), size=limit, replace=False))
        files = [files[i] for i in keep]
    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f, _ in files]
    fp = content_key("imagefolder", str(root.resolve()), stats, resolution, probe, limit, seed, 1)
    resize = int(round(resolution / 0.875))
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = resize / min(w, h)
                im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                arrays.append(np.asarray(im.crop((left, top, left + resolution, top + resolution))))
        except (OSError, UnidentifiedImageError) as e:
            raise DeryError(f"--data: cannot read image {f}: {e}", exit_code=USAGE) from e
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    idx = _partition(len(images), seed, test=0.3, val=0.15, probe=probe)
    splits = {k: Split(images[v], labels[v]) for k, v in idx.items()}
    return Dataset(f"imagefolder:{root.name}", fp, resolution, tuple(classes), splits)


def load_data(data_dir: Path | None, resolution: int, *, probe: int = 256, seed: int = 0) -> Dataset:
    """`--data DIR` if given, else the embedded digits at the zoo's resolution."""
    if data_dir is None:
        return digits(resolution, probe=probe, seed=seed)
    return image_folder(data_dir, resolution, probe=probe, seed=seed)
