"""Deep Incubation (REFERENCES.md section 4): train K sequential modules inside a shared frozen meta model.

Stage 1 trains a meta model (one small layer per module, same shapes) end to end; stage 2 puts module i in
place of meta layer i and trains only it, every frozen part in eval mode (parameters and BatchNorm buffers
bit-identical); stage 3 loads the incubated modules into one `Assembled` and fine-tunes briefly. Every
module's checkpoint is written atomically to the run directory; a rerun loads finished modules instead of
training them again.

Meta layers are residual wherever a module maps a shape to itself: x + f(x) with f starting at zero for
feature maps, a pre-norm transformer block with ViT initialisation for token sequences (the paper's meta
layers are ViT blocks), so a stream passing a module keeps the meta model's coordinates.

Output anchor (not in the paper; benchmarks/results/incubation.md shows why it is needed): in stage 2,
module i < K-1 also gets the gradient of `anchor * mean(((m_i(h) - meta_i(h)) / s)^2)`, where h is what the
frozen meta layers before it produce, meta_i is the meta layer it replaces and s is meta_i's per-channel
standard deviation on the training images. Without it the hybrid loss fixes module i's output only along
the directions the frozen meta layers after it read; module i+1 was trained on meta_i's outputs and reads
directions (and, behind BatchNorm, low-variance channels) that module i is free to fill with anything. On
the test CNN the plain assembly is at chance although every hybrid is accurate; on the test ViT it keeps
40-66% of the hybrids' accuracy, lost mostly at the patch-embedding boundary. `anchor=0` is the paper's
plain incubation.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import defaults
from .cache import atomic_write
from .data import Dataset
from .errors import USAGE, DeryError
from .training import fit

FORMAT = "dery.incubate/2"


class _Pool(nn.Module):
    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.size)


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class TokenBlock(nn.Module):
    """A pre-norm transformer block on N x L x D tokens (attention and MLP, both residual)."""

    def __init__(self, d: int, mlp_ratio: float = 2.0):
        super().__init__()
        heads = next(h for h in (4, 2, 1) if d % h == 0)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Image to L tokens of width D: non-overlapping patches, an optional class token, learned positions."""

    def __init__(self, channels: int, d: int, patch: int, tokens: int, cls: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cls else None
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return x + self.pos


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _small_init(m: nn.Module) -> nn.Module:
    """ViT initialisation: linear weights truncated-normal with std 0.02, biases zero."""
    for name, p in m.named_parameters():
        if p.dim() >= 2:
            nn.init.trunc_normal_(p, std=0.02)
        elif name.endswith("bias") and "norm" not in name:
            nn.init.zeros_(p)
    return m


def _zero_last(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _patch(in_shape: tuple[int, ...], tokens: int) -> tuple[int, bool] | None:
    _, h, w = in_shape
    for p in range(1, math.gcd(h, w) + 1):
        if h % p == 0 and w % p == 0 and (h // p) * (w // p) in (tokens, tokens - 1):
            return p, (h // p) * (w // p) == tokens - 1
    return None


def meta_layer(in_shape: tuple[int, ...], out_shape: tuple[int, ...], index: int) -> nn.Module:
    """One small layer mapping `in_shape` to `out_shape` (per-sample shapes); residual where they are equal."""
    if len(in_shape) == 3 and tuple(in_shape) == tuple(out_shape):
        c = in_shape[0]
        return Residual(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), _zero_last(nn.Conv2d(c, c, 3, padding=1))))
    if len(in_shape) == 3 and len(out_shape) == 3:  # pre-activation: the output has no dead (ReLU) channels
        act = [nn.BatchNorm2d(in_shape[0]), nn.ReLU()] if index > 0 else []
        return nn.Sequential(*act, nn.Conv2d(in_shape[0], out_shape[0], 3, padding=1), nn.BatchNorm2d(out_shape[0]),
                             _Pool(out_shape[1:]))
    if len(in_shape) == 3 and len(out_shape) == 1:
        return nn.Sequential(nn.BatchNorm2d(in_shape[0]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(in_shape[0], out_shape[0]))
    if len(in_shape) == 3 and len(out_shape) == 2 and (found := _patch(in_shape, out_shape[0])):
        embed = PatchEmbed(in_shape[0], out_shape[1], found[0], out_shape[0], found[1])
        return nn.Sequential(embed, _small_init(TokenBlock(out_shape[1])))
    if len(in_shape) == 2 and tuple(in_shape) == tuple(out_shape):
        return _small_init(TokenBlock(in_shape[1]))
    if len(in_shape) == 2 and len(out_shape) == 2 and in_shape[0] == out_shape[0]:
        return nn.Sequential(nn.LayerNorm(in_shape[1]), nn.Linear(in_shape[1], out_shape[1]), nn.GELU())
    if len(in_shape) == 2 and len(out_shape) == 1:
        return nn.Sequential(_small_init(TokenBlock(in_shape[1])), nn.LayerNorm(in_shape[1]), _TokenMean(),
                             nn.Linear(in_shape[1], out_shape[0]))
    raise DeryError(f"module {index}: no meta layer maps shape {tuple(in_shape)} to {tuple(out_shape)}; "
                    "modules must map CxHxW to CxHxW, LxD (patches) or logits, or LxD to LxD (same L) or logits",
                    exit_code=USAGE)


class AnchorGrad(torch.autograd.Function):
    """Identity forward; backward adds the gradient of weight * mean(((y - ref) / scale)^2)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(y, ref, scale)
        ctx.weight = weight
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, ref, scale = ctx.saved_tensors
        return g + ctx.weight * 2.0 * (y - ref) / scale.pow(2) / y.numel(), None, None, None


def _channel_dims(t: torch.Tensor) -> list[int]:
    """The dimensions statistics run over: all but channels (N x C x H x W) or features (N x ... x D)."""
    return [0, 2, 3] if t.dim() == 4 else list(range(t.dim() - 1))


class Hybrid(nn.Module):
    """Parts applied in order; in train mode only part `live` trains, the rest stay in eval mode.

    With `anchor` = (meta layer, per-channel scale, weight), a training forward also pulls the live part's
    output towards the meta layer's output on the same input (see the module docstring).
    """

    def __init__(self, parts: Sequence[nn.Module], live: int | None,
                 anchor: tuple[nn.Module, torch.Tensor, float] | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.live = live
        self._anchor = anchor  # a plain tuple: the meta layer is not a submodule (no state, no train mode)

    def train(self, mode: bool = True) -> Hybrid:
        super().train(mode)
        for j, p in enumerate(self.parts):
            if j != self.live:
                p.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, p in enumerate(self.parts):
            if j == self.live and self.training and self._anchor is not None and torch.is_grad_enabled():
                meta, scale, weight = self._anchor
                with torch.no_grad():
                    ref = meta(x)
                x = AnchorGrad.apply(p(x), ref, scale, weight)
            else:
                x = p(x)
        return x


def _outputs(modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output on `x` passed through the modules before it, in eval mode (modes restored)."""
    out = []
    with torch.no_grad():
        for m in modules:
            was = m.training
            m.eval()
            x = m(x)
            m.train(was)
            out.append(x)
    return out


def module_shapes(modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes between modules (K + 1 of them), found with one eval-mode batch of two."""
    return [tuple(input_shape), *(tuple(y.shape[1:]) for y in _outputs(modules, torch.zeros(2, *input_shape)))]


def nonnegative_outputs(modules: Sequence[nn.Module], images: torch.Tensor) -> list[bool]:
    """Whether each module's output is never negative on `images` (it ends in a ReLU, as a ResNet stage does)."""
    return [bool((y >= 0).all()) for y in _outputs(modules, images)]


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


def _restore(module: nn.Module, path: Path, what: str) -> None:
    """Load `what`'s checkpoint into `module`; one that does not fit it is named."""
    try:
        module.load_state_dict(_load(path, what)["state"])
    except RuntimeError as e:
        raise DeryError(f"{what} checkpoint {path} does not fit this job's {what} ({str(e).splitlines()[0]}); "
                        f"delete it to retrain", exit_code=USAGE) from e


def _train(model: nn.Module, params: list[nn.Parameter], data: Dataset, epochs: int, lr: float, seed: int,
           schedule: str, label: str, device: torch.device | None = None, shard: tuple[int, int] = (0, 1)) -> None:
    images, labels = data.images("train"), data.split("train").labels
    if device is not None:
        images, labels = images.to(device), labels.to(device)
    fit(model, params, images, labels, epochs=epochs, lr=lr, weight_decay=0.05, batch=64, seed=seed,
        schedule=schedule, train_mode=True, label=label, shard=shard)


def _meta_io(meta: Hybrid, i: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the meta layers before i produce from `images`, and what meta layer i makes of it (eval mode)."""
    meta.eval()
    with torch.no_grad():
        h = images
        for p in meta.parts[:i]:
            h = p(h)
        return h, meta.parts[i](h)


def _scale(out: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation, floored at a tenth of the mean one (dead channels still count)."""
    s = out.std(dim=_channel_dims(out), keepdim=True)
    return s.clamp_min(0.1 * float(s.mean()) + 1e-8)


def drift(module: nn.Module, meta: Hybrid, i: int, images: torch.Tensor) -> float:
    """RMS of (module i - meta layer i) on the meta model's input to layer i, in meta layer i's channel units."""
    h, ref = _meta_io(meta, i, images)
    module.eval()
    with torch.no_grad():
        return float(((module(h) - ref) / _scale(ref)).pow(2).mean().sqrt())


def meta_model(shapes: Sequence[tuple[int, ...]], data: Dataset, *, epochs: int, lr: float, seed: int,
               path: Path | None = None, nonnegative: Sequence[bool] | None = None) -> tuple[Hybrid, bool]:
    """Stage 1: the meta model for modules between `shapes` (K + 1 of them), trained end to end (eval mode).

    `nonnegative[i]`: module i's output is never negative, so meta layer i ends in a ReLU too (a stream the
    module cannot produce would leave the next module trained on inputs it never gets in the assembly:
    benchmarks/results/incubation.md: resnet_wide assembles to 0.109 without, 0.837 with). With `path`, a finished meta
    model there is loaded instead, and a newly trained one is saved there. Returns the model and whether it
    was trained now.
    """
    torch.manual_seed(seed)
    layers = [meta_layer(shapes[i], shapes[i + 1], i) for i in range(len(shapes) - 1)]
    if nonnegative is not None:
        layers = [nn.Sequential(layer, nn.ReLU()) if relu else layer for layer, relu in zip(layers, nonnegative)]
    meta = Hybrid(layers, None)
    if path is not None and path.exists():
        _restore(meta, path, "meta model")
        return meta.eval(), False
    _train(meta, list(meta.parameters()), data, epochs, lr, seed, "one-cycle", "incubate: meta")
    if path is not None:
        _save(path, {"format": FORMAT, "state": meta.state_dict()})
    return meta.eval(), True


def tiny_meta(modules: Sequence[nn.Module], data: Dataset, *, epochs: int, lr: float, seed: int,
              path: Path | None = None) -> tuple[Hybrid, bool]:
    """`meta_model` for these modules (as they are now): their shapes, and a ReLU after each meta layer whose
    module's output is never negative on training images."""
    shapes = module_shapes(modules, (3, data.resolution, data.resolution))
    return meta_model(shapes, data, epochs=epochs, lr=lr, seed=seed, path=path,
                      nonnegative=nonnegative_outputs(modules, data.images("train", 256)))


def incubate_module(module: nn.Module, i: int, meta: Hybrid, data: Dataset, *, epochs: int, lr: float, seed: int,
                    anchor: float = defaults.INCUBATE_ANCHOR, device: torch.device | None = None,
                    wrap: Callable[[nn.Module], nn.Module] | None = None, shard: tuple[int, int] = (0, 1)) -> Hybrid:
    """Stage 2 for one module: train `module` in place of meta layer i, everything else frozen; returns the hybrid.

    Independent of every other module and of what ran before (the seed covers every random draw), so the K
    calls give the same modules in any order, process or machine. `device`: where module and meta model
    are and training runs. `wrap` and `shard`: data-parallel training of this one module across processes
    (DistributedDataParallel over a process group, and this process's share of each batch; dery.parallel).
    """
    torch.manual_seed(seed)
    meta.eval()
    pull = None
    if anchor > 0 and i < len(meta.parts) - 1:
        _, ref = _meta_io(meta, i, data.images("train", 1024).to(device or "cpu"))
        pull = (meta.parts[i], _scale(ref), anchor)
    hybrid = Hybrid([*meta.parts[:i], module, *meta.parts[i + 1:]], i, pull)
    params = list(module.parameters())
    for p in hybrid.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    _train(hybrid if wrap is None else wrap(hybrid), params, data, epochs, lr, seed, "one-cycle",
           f"incubate: module {i}", device, shard)
    return hybrid.eval()


def train_modules(modules: Sequence[nn.Module], meta: Hybrid, data: Dataset, run_dir: Path, todo: Sequence[int], *,
                  epochs: int, lr: float, seed: int, anchor: float = defaults.INCUBATE_ANCHOR) -> None:
    """Stage 2 in this process: incubate modules `todo` one after another, each saved when it is done."""
    for i in todo:
        incubate_module(modules[i], i, meta, data, epochs=epochs, lr=lr, seed=seed + 1 + i, anchor=anchor)
        save_module(run_dir, i, modules[i])


def save_module(run_dir: Path, i: int, module: nn.Module) -> None:
    """Write incubated module i's checkpoint (atomically: a run cut short leaves none)."""
    _save(Path(run_dir) / f"module_{i}.pt",
          {"format": FORMAT, "index": i, "state": {k: v.cpu() for k, v in module.state_dict().items()}})


def incubate_modules(modules: Sequence[nn.Module], data: Dataset, run_dir: Path, *, epochs_meta: int,
                     epochs_module: int, epochs_finetune: int, lr: float = 3e-3, seed: int = 0,
                     meta: nn.Module | None = None, anchor: float = defaults.INCUBATE_ANCHOR,
                     stage2: Callable[[list[int], Hybrid], None] | None = None
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """Run the three stages over `modules` (changed in place); returns the fine-tuned assembly and a report.

    `meta`: a ready meta model (K parts) to incubate in, instead of training one (stage 1). `anchor`: the
    weight of the output anchor (module docstring); 0 trains the hybrids on their task loss alone. Module i
    trains with seed `seed + 1 + i`. `stage2(todo, meta)`: trains the modules without a checkpoint in `run_dir`
    elsewhere (dery.parallel runs them on torchrun) instead of one after another here; every module is
    then loaded from its checkpoint. The report's `drift` is `drift()` of each module but the last.
    """
    from .passes.assemble import Assembled

    run_dir = Path(run_dir)
    k = len(modules)
    shapes = module_shapes(modules, (3, data.resolution, data.resolution))
    tx, ty = data.images("test"), data.split("test").labels
    report: dict[str, Any] = {"k": k, "shapes": [list(s) for s in shapes], "anchor": anchor, "trained": [],
                              "wall_s": {}}
    t = time.perf_counter()
    if meta is None:
        meta, trained = tiny_meta(modules, data, epochs=epochs_meta, lr=lr, seed=seed, path=run_dir / "meta.pt")
        if trained:
            report["trained"].append("meta")
    meta.eval()
    report["meta_accuracy"] = accuracy(meta, tx, ty)
    report["wall_s"]["meta"] = time.perf_counter() - t
    t = time.perf_counter()
    todo = [i for i in range(k) if not (run_dir / f"module_{i}.pt").exists()]
    if todo:
        if stage2 is None:
            train_modules(modules, meta, data, run_dir, todo, epochs=epochs_module, lr=lr, seed=seed, anchor=anchor)
        else:
            stage2(todo, meta)
        report["trained"].extend(f"module {i}" for i in todo)
    hybrids, drifts = [], []
    for i, m in enumerate(modules):
        _restore(m, run_dir / f"module_{i}.pt", f"module {i}")
        hybrid = Hybrid([*meta.parts[:i], m, *meta.parts[i + 1:]], i)
        hybrids.append(accuracy(hybrid, tx, ty))
        if i < k - 1:
            drifts.append(drift(m, meta, i, tx))
    report["hybrid_accuracy"] = hybrids
    report["drift"] = drifts
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


def frozen_meta(modules: Sequence[nn.Module]) -> Hybrid:
    """The "self" meta model: copies of the modules as they are now, frozen, so each module is incubated
    inside the rest of its own network."""
    return Hybrid([copy.deepcopy(m) for m in modules], None).eval()


def assembly_modules(assembled: nn.Module) -> list[nn.Module]:
    """An assembly's K modules (dery.passes.assemble's `Assembled`): each block with the stitch before it."""
    out, stitch = [], []
    for part, label in zip(assembled.parts, assembled.labels):
        if label.startswith("stitch "):
            stitch.append(part)
        else:
            out.append(nn.Sequential(*stitch, part) if stitch else part)
            stitch = []
    return out


def repair(modules: Sequence[nn.Module], data: Dataset, run_dir: Path, *, meta: str = defaults.REPAIR_META,
           epochs_meta: int = defaults.INCUBATE_EPOCHS_META, epochs_module: int = defaults.INCUBATE_EPOCHS_MODULE,
           epochs_finetune: int = defaults.INCUBATE_EPOCHS_FINETUNE, lr: float = defaults.INCUBATE_LR,
           seed: int = 0, anchor: float = defaults.INCUBATE_ANCHOR,
           stage2: Callable[[list[int], Hybrid], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Incubate pretrained modules (a reassembled network's, from `assembly_modules`) to make them fit each
    other: in a tiny trained meta model ("tiny") or in the network itself, frozen around each module ("self";
    benchmarks/results/incubation.md measures which serves better). Returns the fine-tuned network and the
    incubation report, with the accuracy as it was before under "before_accuracy"."""
    if meta not in defaults.INCUBATE_METAS:
        raise DeryError(f"unknown meta model {meta!r}; valid: {', '.join(defaults.INCUBATE_METAS)}", exit_code=USAGE)
    before = accuracy(Hybrid(list(modules), None), data.images("test"), data.split("test").labels)
    given = frozen_meta(modules) if meta == "self" else None
    net, report = incubate_modules(modules, data, run_dir, epochs_meta=epochs_meta, epochs_module=epochs_module,
                                   epochs_finetune=epochs_finetune, lr=lr, seed=seed, meta=given, anchor=anchor,
                                   stage2=stage2)
    return net, {**report, "meta": meta, "before_accuracy": before}
