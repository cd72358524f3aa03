"""The model zoo: presets, timm names and checkpoints, loaded as `Network`s.

A zoo spec is a comma-separated list; each item is one of
  default              a preset: small timm classifiers dery trains itself on the data
  resnet50             a timm architecture with its pretrained weights (timm's loader,
                       Hugging Face cache; works offline once the weights are cached)
  resnet50:random      a timm architecture with seeded random weights (latency work only)
  resnet50=PATH        a timm architecture with weights from a local checkpoint file
  PATH.pt              a checkpoint written by dery (it records its own architecture)
Every network is wrapped with its own input normalisation, so blocks taken from
networks that expect different mean/std still see what they were trained on.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import defaults
from .cache import Cache, atomic_write, content_key, ensure_dir
from .data import Dataset, load_data
from .errors import USAGE, DeryError
from .training import fit

CHECKPOINT_FORMAT = "dery.checkpoint/1"


@dataclass(frozen=True)
class Recipe:
    """How dery trains an embedded member: AdamW + one-cycle, random shifts of up to 2 px."""

    epochs: int
    lr: float
    batch: int = 64
    weight_decay: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class MemberSpec:
    """One zoo entry before loading. `weights`: 'train', 'pretrained', 'random' or a file path; `data`: the
    embedded data its weights learn (or learnt) from, which `--data` defaults to."""

    name: str
    arch: str
    weights: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    recipe: Recipe | None = None
    resolution: int | None = None  # native input size when it is not the timm default
    data: str | None = None


_GLYPH_MEMBERS = (
    MemberSpec("resnet", "resnet18", "train",
               (("channels", (12, 24, 48, 96)), ("layers", (1, 1, 1, 1)), ("stem_type", "deep"), ("stem_width", 6)),
               Recipe(epochs=15, lr=2e-3), 32, "glyphs"),
    MemberSpec("resnet_wide", "resnet18", "train",
               (("channels", (32, 64, 128, 256)), ("stem_type", "deep"), ("stem_width", 16)),
               Recipe(epochs=12, lr=2e-3), 32, "glyphs"),
    MemberSpec("convnext", "convnext_atto", "train",
               (("depths", (1, 1, 2, 1)), ("dims", (24, 48, 96, 192))),
               Recipe(epochs=15, lr=2e-3), 32, "glyphs"),
    MemberSpec("mobilenetv3", "mobilenetv3_small_050", "train", (),
               Recipe(epochs=20, lr=5e-3), 32, "glyphs"),
    MemberSpec("mobilenext", "mobilenext_035", "train", (),
               Recipe(epochs=15, lr=5e-3), 32, "glyphs"),
    MemberSpec("vit", "vit_tiny_patch16_224", "train",
               (("img_size", 32), ("patch_size", 8), ("embed_dim", 64), ("depth", 4), ("num_heads", 2),
                ("mlp_ratio", 2.0)),
               Recipe(epochs=60, lr=3e-3), 32, "glyphs"),
)

_TINY_MEMBERS = tuple(MemberSpec(m.name, m.arch, m.weights, m.kwargs, Recipe(epochs=e, lr=m.recipe.lr), m.resolution,
                                 "digits")
                      for m, e in ((_GLYPH_MEMBERS[0], 4), (_GLYPH_MEMBERS[3], 5), (_GLYPH_MEMBERS[5], 8)))

_ALT_MEMBERS = (
    MemberSpec("regnet", "regnetx_002", "train", (), Recipe(epochs=15, lr=2e-3), 32, "glyphs"),
    MemberSpec("lcnet", "lcnet_050", "train", (), Recipe(epochs=20, lr=5e-3), 32, "glyphs"),
    MemberSpec("ghostnet", "ghostnet_050", "train", (), Recipe(epochs=20, lr=5e-3), 32, "glyphs"),
    MemberSpec("rexnet", "rexnet_100", "train", (("width_mult", 0.5),), Recipe(epochs=20, lr=5e-3), 32, "glyphs"),
    MemberSpec("densenet", "densenet121", "train",
               (("growth_rate", 16), ("block_config", (2, 2, 2, 2)), ("stem_type", "deep")),
               Recipe(epochs=15, lr=2e-3), 32, "glyphs"),
)

PRESETS: dict[str, tuple[MemberSpec, ...]] = {
    "default": _GLYPH_MEMBERS,  # six architectures, trained on glyphs (shipped)
    "tiny": _TINY_MEMBERS,  # three of them, briefly trained on digits: for quick trials and the test suite
    "alt": _ALT_MEMBERS,  # five other architectures trained the same way (trained here on first use, not shipped)
}
_DEFAULT_MEMBERS = {m.name: m for m in _GLYPH_MEMBERS}  # `--zoo resnet_wide` names one member of the default zoo


class Normalized(nn.Module):
    """A classifier with its own input normalisation in front: takes images in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True, eq=False)
class Network:
    """A loaded zoo member: eval-mode module taking [0, 1] images of `input_shape`."""

    name: str
    spec: MemberSpec
    module: Normalized = field(repr=False)
    input_shape: tuple[int, int, int]
    num_classes: int
    weights_key: str

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _timm():
    import timm

    from . import models  # noqa: F401  (registers dery's own architectures with timm)

    return timm


def _unknown(item: str) -> DeryError:
    timm = _timm()
    close = difflib.get_close_matches(item, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return DeryError(f"unknown model {item!r}: not a zoo preset ({', '.join(sorted(PRESETS))}), not a timm "
                     f"architecture and not a checkpoint file{hint} (timm.list_models() lists the architectures)",
                     exit_code=USAGE)


def parse_zoo(spec: str | None) -> tuple[MemberSpec, ...]:
    """Turn a `--zoo` string into member specs (no loading yet); unknown names list the valid ones."""
    items = [s.strip() for s in (spec or "default").split(",") if s.strip()]
    if not items:
        raise DeryError("--zoo is empty; give a preset (default) or timm names", exit_code=USAGE)
    timm = _timm()
    members: list[MemberSpec] = []
    for item in items:
        if item in PRESETS:
            members.extend(PRESETS[item])
        elif item in _DEFAULT_MEMBERS:
            members.append(_DEFAULT_MEMBERS[item])
        elif "=" in item:
            arch, path = item.split("=", 1)
            if not timm.is_model(arch):
                raise _unknown(arch)
            if not Path(path).expanduser().is_file():
                raise DeryError(f"--zoo {item}: checkpoint {path} does not exist", exit_code=USAGE)
            members.append(MemberSpec(arch, arch, str(Path(path).expanduser())))
        elif item.endswith(":random"):
            arch = item[: -len(":random")]
            if not timm.is_model(arch):
                raise _unknown(arch)
            members.append(MemberSpec(arch, arch, "random"))
        elif Path(item).expanduser().is_file():
            members.append(_spec_from_checkpoint(Path(item).expanduser()))
        elif timm.is_model(item):
            members.append(MemberSpec(item, item, "pretrained"))
        else:
            raise _unknown(item)
    seen: dict[str, int] = {}
    unique = []
    for m in members:
        seen[m.name] = seen.get(m.name, 0) + 1
        unique.append(m if seen[m.name] == 1 else MemberSpec(**{**m.__dict__, "name": f"{m.name}#{seen[m.name]}"}))
    return tuple(unique)


def read_checkpoint(path: Path, fix: str | None = None) -> dict[str, Any]:
    """A `dery.checkpoint/1` file's contents; anything else is a one-line error ending in `fix`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DeryError(f"cannot load checkpoint {path}: {e}", exit_code=USAGE) from e
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT):
        raise DeryError(f"{path} is not a dery checkpoint (no architecture recorded); "
                        f"{fix or f'pass it as ARCH={path}'}", exit_code=USAGE)
    return ckpt


def _spec_from_checkpoint(path: Path) -> MemberSpec:
    ckpt = read_checkpoint(path)
    return MemberSpec(str(ckpt["name"]), str(ckpt["arch"]), str(path), tuple(map(tuple, ckpt["kwargs"])),
                      None, ckpt.get("resolution"), ckpt.get("data"))


def _kwargs(spec: MemberSpec) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.kwargs}


def _state_key(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def shipped_path(spec: MemberSpec, data: Dataset) -> Path:
    """Where the package keeps an embedded member's weights for this data (`dery train-zoo` writes them)."""
    key = content_key("zoo-shipped", spec.name, spec.arch, spec.kwargs, spec.recipe, data.fingerprint)
    return defaults.SHIPPED_WEIGHTS / f"{spec.name}-{key[:16]}.pt"


def remake_shipped(out: Path = defaults.SHIPPED_WEIGHTS) -> list[Path]:
    """Train the default preset afresh on the embedded data and write the package's weights into `out`; weights
    there that the preset no longer names are removed. Returns the files written."""
    specs = PRESETS["default"]
    data = zoo_data(specs)
    ensure_dir(out, "weights directory")
    written = []
    for spec in specs:
        path = out / shipped_path(spec, data).name
        atomic_write(path, lambda p, spec=spec: save_trained(trained(spec, data), spec, data, p))
        written.append(path)
    for stale in set(out.glob("*.pt")) - set(written):
        stale.unlink()
    return written


def trained(spec: MemberSpec, data: Dataset) -> Normalized:
    """A member built from the recipe's seed (whatever ran before) and trained on `data`."""
    torch.manual_seed(spec.recipe.seed)
    m = _wrap(_build(spec, data.num_classes), spec)
    train(m, data, spec.recipe, spec.name)
    return m


def save_trained(m: Normalized, spec: MemberSpec, data: Dataset, path: Path) -> None:
    """Write a trained member as a dery checkpoint."""
    torch.save({"format": CHECKPOINT_FORMAT, "name": spec.name, "arch": spec.arch,
                "kwargs": [list(kv) for kv in spec.kwargs], "resolution": spec.resolution,
                "num_classes": data.num_classes, "classes": list(data.classes), "data": embedded_name(data),
                "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist(),
                "state_dict": m.net.state_dict()}, path)


def train(module: Normalized, data: Dataset, recipe: Recipe, label: str) -> None:
    """Train a freshly initialised member on the data's train split (deterministic for a seed)."""
    torch.manual_seed(recipe.seed)
    split = data.split("train")
    fit(module, list(module.parameters()), data.images("train"), split.labels, epochs=recipe.epochs, lr=recipe.lr,
        weight_decay=recipe.weight_decay, batch=recipe.batch, seed=recipe.seed, schedule="one-cycle",
        train_mode=True, label=f"training {label}")


def _build(spec: MemberSpec, num_classes: int | None, pretrained: bool = False) -> nn.Module:
    timm = _timm()
    kwargs = _kwargs(spec)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(spec.arch, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise DeryError(f"cannot build timm model {spec.arch} with {kwargs}: {e}", exit_code=USAGE) from e
        raise DeryError(
            f"cannot load pretrained weights for {spec.arch} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"timm fetches them from the Hugging Face hub into its cache, which needs network once. Put the "
            f"weights in the cache, pass a local file as {spec.arch}=PATH, or use {spec.arch}:random for "
            f"latency-only work", exit_code=USAGE) from e


def _wrap(net: nn.Module, spec: MemberSpec) -> Normalized:
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    if spec.weights == "train":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return Normalized(net, mean, std).eval()


def input_shape(spec: MemberSpec, net: nn.Module) -> tuple[int, int, int]:
    """The member's native input (C, H, W)."""
    if spec.resolution is not None:
        return (3, spec.resolution, spec.resolution)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    return (int(c), int(h), int(w))


def embedded_name(data: Dataset) -> str | None:
    """The data's name when it is one of dery's embedded sets (a checkpoint records it for `--data`'s default)."""
    return data.name if data.name in defaults.EMBEDDED_DATA else None


def default_data(specs: tuple[MemberSpec, ...]) -> str:
    """The embedded data the zoo's dery-trained members learn from (digits when none is): `--data`'s default."""
    found = sorted({s.data for s in specs if s.data is not None})
    if len(found) > 1:
        raise DeryError(f"the zoo's members train on different embedded data ({', '.join(found)}); "
                        f"choose one with --data", exit_code=USAGE)
    return found[0] if found else "digits"


def zoo_data(specs: tuple[MemberSpec, ...], data: str | Path | None = None, **kw: Any) -> Dataset:
    """`--data` (an embedded set's name or a directory; None: the one the zoo trains on) at the zoo's resolution."""
    return load_data(data, native_resolution(specs), default=default_data(specs), **kw)


def native_resolution(specs: tuple[MemberSpec, ...]) -> int:
    """The one input resolution every member expects; mixed resolutions are an error."""
    found = {}
    for s in specs:
        if s.resolution is not None:
            found[s.name] = s.resolution
        else:
            cfg = _timm().get_pretrained_cfg(s.arch)
            found[s.name] = int(cfg.input_size[-1]) if cfg is not None else 224
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{k}: {v}px" for k, v in found.items())
        raise DeryError(f"zoo members expect different input resolutions ({listing}); use members of one "
                        f"resolution", exit_code=USAGE)
    return next(iter(found.values()))


def load_member(spec: MemberSpec, data: Dataset | None, cache: Cache) -> Network:
    """Build one member's weights: train it on `data` (cached), load a checkpoint, pretrained or seeded random."""
    if spec.weights == "train":
        if data is None:
            raise DeryError(f"{spec.name} is trained by dery and needs data to train on", exit_code=USAGE)
        shipped = shipped_path(spec, data)
        if shipped.is_file():
            module = _load_dery_checkpoint(spec, shipped)
        else:
            key = content_key("zoo", spec.arch, spec.kwargs, spec.recipe, data.fingerprint,
                              torch.__version__.split("+")[0], 2)
            module = cache.get_or_make("zoo", f"{spec.name}-{key}", ".pt", make=lambda: trained(spec, data),
                                       save=lambda m, p: save_trained(m, spec, data, p),
                                       load=lambda p: _load_dery_checkpoint(spec, p), what="trained zoo member")
    elif spec.weights == "pretrained":
        module = _wrap(_build(spec, None, pretrained=True), spec)
    elif spec.weights == "random":
        torch.manual_seed(int(content_key(spec.arch)[:8], 16))
        module = _wrap(_build(spec, None), spec)
    else:
        module = _load_file(spec, Path(spec.weights))
    return as_network(spec.name, spec, module)


def as_network(name: str, spec: MemberSpec, module: Normalized) -> Network:
    """A zoo member from its module (frozen, in eval mode): input shape, class count and weights key read off it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    shape = input_shape(spec, module.net)
    with torch.no_grad():
        num_classes = int(module(torch.zeros(1, *shape)).shape[-1])
    return Network(name, spec, module, shape, num_classes, _state_key(module))


def _load_dery_checkpoint(spec: MemberSpec, path: Path) -> Normalized:
    ckpt = read_checkpoint(path)
    if "lego" in ckpt:
        from dery.passes.lego import module_from_checkpoint

        return module_from_checkpoint(ckpt)
    if "assembly" in ckpt:
        from dery.passes.assemble import module_from_assembly

        return module_from_assembly(ckpt)
    net = _build(MemberSpec(spec.name, ckpt["arch"], "train", tuple(map(tuple, ckpt["kwargs"]))),
                 int(ckpt["num_classes"]))
    net.load_state_dict(ckpt["state_dict"])
    return Normalized(net, tuple(ckpt["mean"]), tuple(ckpt["std"])).eval()


def _load_file(spec: MemberSpec, path: Path) -> Normalized:
    try:
        head = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".safetensors" else None
    except Exception as e:
        raise DeryError(f"cannot load checkpoint {path}: {e}", exit_code=USAGE) from e
    if isinstance(head, dict) and head.get("format") == CHECKPOINT_FORMAT:
        return _load_dery_checkpoint(spec, path)
    from timm.models import load_checkpoint

    net = _build(spec, None)
    try:
        load_checkpoint(net, str(path), strict=True)
    except Exception as e:
        raise DeryError(f"checkpoint {path} does not fit {spec.arch}: {str(e).splitlines()[0][:300]}",
                        exit_code=USAGE) from e
    return _wrap(net, spec)


def load_zoo(specs: tuple[MemberSpec, ...], data: Dataset, cache: Cache) -> tuple[Network, ...]:
    """Load every member; all must agree on the input shape."""
    nets = tuple(load_member(s, data, cache) for s in specs)
    shapes = {n.input_shape for n in nets}
    if len(shapes) > 1:
        raise DeryError("zoo members expect different input shapes: "
                        + ", ".join(f"{n.name} {n.input_shape}" for n in nets), exit_code=USAGE)
    return nets
