"""Probe, training and evaluation data.

Three sources, none downloaded: `glyphs`, letters rendered in the fonts that
matplotlib ships (the embedded zoo trains on them); `digits`, scikit-learn's
digits (ships inside the dependency); and a user's ImageFolder directory
(`--data DIR`). All become the same `Dataset`: uint8 images at the zoo's resolution in four
disjoint-by-purpose splits: train (the embedded zoo trains on it), probe
(similarity features and stitch fitting, a subset of train), val (held out:
stitch R^2 and quality-model calibration) and test (held out: every accuracy in
the report).
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import Cache, content_key
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

    def batches(self, split: str, batch_size: int, limit: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Float images in [0, 1] and labels, in order, `batch_size` at a time (the first `limit` at most)."""
        s = self.splits[split]
        n = len(s) if limit is None else min(len(s), limit)
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            x = s.images[i:j].float().div_(255.0)
            y = s.labels[i:j] if s.labels is not None else None
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


@dataclass(frozen=True)
class GlyphStyle:
    """How each generated letter is drawn: font and size, placement, shear and rotation, crossing strokes,
    contrast (a light letter on darker ground), a brightness ramp and pixel noise; all from one seeded generator."""

    canvas: int = 64
    size: tuple[int, int] = (28, 48)
    jitter: float = 3.0
    shear: float = 0.3
    rotate_deg: float = 25.0
    strokes: int = 2
    dark: tuple[float, float] = (0.0, 0.4)
    light: tuple[float, float] = (0.6, 1.0)
    ramp: float = 0.2
    noise: float = 0.12


GLYPH_STYLE = GlyphStyle()
GLYPH_CLASSES = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GLYPH_FONTS = tuple(f"{family}{face}.ttf" for family, faces in (
    ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
    ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
    ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
    ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
    ("cm", ("r10", "b10", "ss10", "ti10", "tt10"))) for face in faces)
GLYPH_SPLITS = (("train", 8000), ("val", 2000), ("test", 3000))


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyphs(count: int, resolution: int, seed: int, style: GlyphStyle = GLYPH_STYLE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` letters as uint8 count x 1 x resolution x resolution, and their labels (uniform over the classes)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(GLYPH_CLASSES), count)
    fonts: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    out = np.empty((count, resolution, resolution), np.uint8)
    c = style.canvas
    ramp = np.linspace(0.0, 1.0, resolution)[None, :]
    for i in range(count):
        key = (int(rng.integers(len(GLYPH_FONTS))), int(rng.integers(*style.size)))
        if key not in fonts:
            fonts[key] = ImageFont.truetype(str(_font_dir() / GLYPH_FONTS[key[0]]), key[1])
        img = Image.new("L", (c, c), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(style.strokes):
            ends = rng.integers(0, c, 4)
            draw.line([(int(ends[0]), int(ends[1])), (int(ends[2]), int(ends[3]))],
                      fill=int(rng.integers(60, 200)), width=int(rng.integers(1, 4)))
        draw.text((c / 2 + rng.normal(0, style.jitter), c / 2 + rng.normal(0, style.jitter)),
                  GLYPH_CLASSES[labels[i]], fill=255, font=fonts[key], anchor="mm")
        shear = rng.uniform(-style.shear, style.shear)
        img = img.transform((c, c), Image.AFFINE, (1, shear, -shear * c / 2, 0, 1, 0), resample=Image.BILINEAR)
        img = img.rotate(rng.uniform(-style.rotate_deg, style.rotate_deg), resample=Image.BILINEAR)
        a = np.asarray(img.resize((resolution, resolution), Image.BILINEAR), np.float32) / 255
        lo, hi = rng.uniform(*style.dark), rng.uniform(*style.light)
        start, end = rng.uniform(-style.ramp, style.ramp, 2)
        a = lo + (hi - lo) * a + start + (end - start) * ramp + rng.normal(0, style.noise, a.shape)
        out[i] = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(out)[:, None], torch.from_numpy(labels.astype(np.int64))


def glyphs(resolution: int = 32, *, probe: int = 256, seed: int = 0, cache: Cache | None = None) -> Dataset:
    """Capital letters in 21 of matplotlib's fonts, sheared, rotated, crossed by strokes and noised (26 classes;
    train 8,000, val 2,000 and test 3,000 independent draws), 3 channels at `resolution`.

    Hard enough that a network's capacity shows in its accuracy, and large enough that a
    1-point difference on test is beyond noise. With a `cache`, the rendered images are kept there.
    """
    fonts = _font_dir()
    if missing := [f for f in GLYPH_FONTS if not (fonts / f).is_file()]:
        raise DeryError(f"data glyphs: matplotlib's fonts {', '.join(missing)} are missing from {fonts}; "
                        f"reinstall matplotlib or give --data DIR", exit_code=USAGE)
    total = sum(n for _, n in GLYPH_SPLITS)
    key = content_key("glyphs", resolution, seed, GLYPH_STYLE, GLYPH_CLASSES, GLYPH_SPLITS,
                      [hashlib.sha256((fonts / f).read_bytes()).hexdigest() for f in GLYPH_FONTS], 1)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return render_glyphs(total, resolution, seed, GLYPH_STYLE)

    if cache is None:
        images, labels = make()
    else:
        images, labels = cache.get_or_make(
            "data", f"glyphs-{key}", ".pt", make=make, save=lambda v, p: torch.save(v, p),
            load=lambda p: torch.load(p, weights_only=True), what="rendered glyphs")
    images = images.repeat(1, 3, 1, 1)
    splits, start = {}, 0
    for name, n in GLYPH_SPLITS:
        splits[name] = Split(images[start:start + n], labels[start:start + n])
        start += n
    splits["probe"] = Split(splits["train"].images[:probe], splits["train"].labels[:probe])
    fp = content_key("glyphs", key, probe)
    return Dataset("glyphs", fp, resolution, GLYPH_CLASSES, splits)


def load_data(data: str | Path | None, resolution: int, *, default: str = "digits", probe: int = 256,
              seed: int = 0, cache: Cache | None = None) -> Dataset:
    """`--data`: an embedded set's name or an ImageFolder directory; None gives `default` (an embedded name)."""
    name = str(data) if data is not None else default
    if name == "glyphs":
        return glyphs(resolution, probe=probe, seed=seed, cache=cache)
    if name == "digits":
        return digits(resolution, probe=probe, seed=seed)
    return image_folder(Path(data), resolution, probe=probe, seed=seed)
