"""stitch: fit the layers that join a block of one network to the next block of another.

At boundary j, network A's tensor must become what network B's block j+1
expects. Every stitch works on a spatial grid:

1. read A's tensor as a grid: feature maps as they are (NHWC permuted), tokens
   without their class/register tokens reshaped to their square grid;
2. resample to B's grid, as the shapes dictate (never at random): an exact
   integer factor down is average pooling, anything else bilinear;
3. a 1x1 convolution (a linear map per position) to B's channels;
4. write B's layout; for token targets add a per-position offset (the part of
   B's position embedding the map cannot carry) and B's prefix tokens, mapped
   from A's pooled features and A's own prefix tokens.

Weights come in closed form from ridge least squares on probe features,
accumulated as sufficient statistics batch by batch (memory does not grow with
the number of images). The ridge strength is picked from a small grid by R^2 on
the held-out val split, and that held-out R^2 is recorded as the fit quality.

Two optional training steps start from an assembled network (see
benchmarks/bench_reassembly.py): `refine_stitches` trains only the stitches of
one assembly, end to end with cross-entropy, from the closed-form solution,
everything else frozen; `fine_tune` trains a private copy of the whole
assembly. Neither touches the zoo networks or the fitted `Stitches`.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dery import defaults, progress
from dery.cache import Cache, atomic_write, content_key, damaged
from dery.data import Dataset
from dery.errors import DeryError
from dery.ir import GRAPH_REVISION, CutPoint, Partition, Stitch
from dery.passes.lower import Lowered
from dery.training import fit, mean_loss

if TYPE_CHECKING:
    from dery.passes.assemble import Assembled

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
GRID_LAYOUTS = ("nchw", "nhwc", "nlc")


def stitchable(src: CutPoint, dst: CutPoint) -> bool:
    """Whether a stitch can join these two cut points (both have a spatial grid)."""
    return src.layout in GRID_LAYOUTS and dst.layout in GRID_LAYOUTS and src.grid is not None and dst.grid is not None


def to_grid(x: torch.Tensor, cut: CutPoint) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, H, W) grid and the (B, P, C) prefix tokens (None without) of a tensor at a cut."""
    if cut.layout == "nchw":
        return x, None
    if cut.layout == "nhwc":
        return x.permute(0, 3, 1, 2), None
    h, w = cut.grid
    p = cut.prefix_tokens
    grid = x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return grid, (x[:, :p] if p else None)


def resample(grid: torch.Tensor, src: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Resize a grid from `src` to `size`: average pooling by an exact integer factor, bilinear otherwise (the
    sizes are the cut points' own, so torch.fx traces a stitch)."""
    h, w = src
    if (h, w) == tuple(size):
        return grid
    if h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]:
        return F.avg_pool2d(grid, h // size[0])
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)


class StitchModule(nn.Module):
    """A fitted stitch from cut `src` (network A) to cut `dst` (network B)."""

    def __init__(self, src: CutPoint, dst: CutPoint):
        super().__init__()
        if not stitchable(src, dst):
            raise DeryError(f"cannot stitch {src.model}:{src.name} ({src.layout}) to {dst.model}:{dst.name} "
                            f"({dst.layout}): both sides need a spatial grid")
        self.src, self.dst = src, dst
        cs, ct = src.channels, dst.channels
        h, w = dst.grid
        self.weight = nn.Parameter(torch.zeros(ct, cs, 1, 1))
        self.bias = nn.Parameter(torch.zeros(ct))
        self.tokens = dst.layout == "nlc"
        if self.tokens:
            self.pos = nn.Parameter(torch.zeros(1, h * w, ct))
        if dst.prefix_tokens:
            self.prefix = nn.Linear(prefix_inputs(src), dst.prefix_tokens * ct)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, prefix = to_grid(x, self.src)
        y = F.conv2d(resample(grid, self.src.grid, self.dst.grid), self.weight, self.bias)
        if self.dst.layout == "nchw":
            return y
        if self.dst.layout == "nhwc":
            return y.permute(0, 2, 3, 1)
        tokens = y.flatten(2).transpose(1, 2) + self.pos
        if self.dst.prefix_tokens:
            u = prefix_features(grid, prefix)
            head = self.prefix(u).view(x.shape[0], self.dst.prefix_tokens, self.dst.channels)
            tokens = torch.cat([head, tokens], dim=1)
        return tokens


def prefix_inputs(src: CutPoint) -> int:
    """Width of what a stitch maps to the target's prefix tokens: pooled grid plus source prefix tokens."""
    return src.channels * (1 + src.prefix_tokens)


def prefix_features(grid: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """The source summary that becomes the target's class tokens."""
    pooled = grid.mean(dim=(2, 3))
    return pooled if prefix is None else torch.cat([pooled, prefix.flatten(1)], dim=1)


def stitch_kind(src: CutPoint, dst: CutPoint) -> str:
    """A readable label: layouts and the resampling used."""
    (hs, ws), (ht, wt) = src.grid, dst.grid
    how = "same" if (hs, ws) == (ht, wt) else (f"pool{hs // ht}" if hs % ht == 0 and hs // ht == ws // wt and
                                                 ws % wt == 0 else "bilinear")
    return f"{src.layout}>{dst.layout}:{how}"


def stitch_cost(src: CutPoint, dst: CutPoint) -> tuple[int, int]:
    """(params, FLOPs at batch 1) of a stitch."""
    ht, wt = dst.grid
    cs, ct = src.channels, dst.channels
    params = cs * ct + ct
    flops = 2 * cs * ct * ht * wt
    if dst.layout == "nlc":
        params += ht * wt * ct
    if dst.prefix_tokens:
        k = prefix_inputs(src)
        params += (k + 1) * dst.prefix_tokens * ct
        flops += 2 * k * dst.prefix_tokens * ct
    return params, flops


def stitch_fingerprint(src: CutPoint, dst: CutPoint) -> str:
    """What decides a stitch's latency: its layouts, shapes and prefix tokens."""
    return content_key("stitch", src.layout, src.shape[1:], src.prefix_tokens, dst.layout, dst.shape[1:],
                       dst.prefix_tokens, GRAPH_REVISION)


class _Normal:
    """Sufficient statistics for ridge regression y = W x + b (+ per-position offset)."""

    def __init__(self, din: int, dout: int, positions: int):
        self.xx = torch.zeros(din, din, dtype=torch.float64)
        self.xy = torch.zeros(din, dout, dtype=torch.float64)
        self.sx = torch.zeros(positions, din, dtype=torch.float64)
        self.sy = torch.zeros(positions, dout, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (B, P, din), y: (B, P, dout)."""
        x, y = x.double(), y.double()
        self.xx += torch.einsum("bpi,bpj->ij", x, x)
        self.xy += torch.einsum("bpi,bpj->ij", x, y)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.n += x.shape[0]

    def solve(self, per_position: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W: din x dout, offset: positions x dout) for every ridge strength in RIDGES."""
        mx, my = self.sx / self.n, self.sy / self.n
        if not per_position:
            mx = mx.mean(0, keepdim=True).expand_as(mx)
            my = my.mean(0, keepdim=True).expand_as(my)
        xx = self.xx - self.n * mx.T @ mx
        xy = self.xy - self.n * mx.T @ my
        scale = float(torch.trace(xx)) / xx.shape[0] + 1e-12
        eye = torch.eye(xx.shape[0], dtype=torch.float64)
        out = []
        for lam in RIDGES:
            w = torch.linalg.solve(xx + lam * scale * eye, xy)
            out.append((w, my - mx @ w))
        return out


def _stitch_inputs(src: CutPoint, dst: CutPoint, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    grid, prefix = to_grid(xs, src)
    g = resample(grid, src.grid, dst.grid).flatten(2).transpose(1, 2)
    u = prefix_features(grid, prefix)[:, None, :] if dst.prefix_tokens else None
    return g, u


def _stitch_targets(dst: CutPoint, yt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    grid, prefix = to_grid(yt, dst)
    head = prefix.flatten(1)[:, None, :] if prefix is not None else None
    return grid.flatten(2).transpose(1, 2), head


def _boundary_features(zoo: Sequence[Lowered], partition: Partition, data: Dataset, split: str,
                       batch: int, limit: int | None = None) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    nets = {lw.name: lw.with_cut_outputs(partition.boundaries[partition.models.index(lw.name)]) for lw in zoo}
    with torch.no_grad():
        for x, _ in data.batches(split, batch, limit):
            yield {(m, j): t for m, net in nets.items() for j, t in enumerate(net(x)[1:])}


def fit_stitches(zoo: Sequence[Lowered], partition: Partition, data: Dataset, *,
                 batch: int = 64) -> dict[tuple[str, str, int], tuple[dict[str, np.ndarray], float]]:
    """Fit every stitch (source, target, boundary) of a partition; returns weights and held-out R^2."""
    cuts = {(lw.name, j): lw.cut(name) for lw in zoo
            for j, name in enumerate(partition.boundaries[partition.models.index(lw.name)])}
    pairs = [(a, b, j) for j in range(partition.k - 1) for a in partition.models for b in partition.models
             if a != b and stitchable(cuts[a, j], cuts[b, j])]
    stats: dict[tuple[str, str, int], tuple[_Normal, _Normal | None]] = {}
    for a, b, j in pairs:
        src, dst = cuts[a, j], cuts[b, j]
        h, w = dst.grid
        main = _Normal(src.channels, dst.channels, h * w)
        head = _Normal(prefix_inputs(src), dst.prefix_tokens * dst.channels, 1) if dst.prefix_tokens else None
        stats[a, b, j] = (main, head)
    batches = (len(data.split("probe")) + batch - 1) // batch
    with progress.task("fitting stitches", batches) as advance:
        for feats in _boundary_features(zoo, partition, data, "probe", batch):
            for (a, b, j), (main, head) in stats.items():
                g, u = _stitch_inputs(cuts[a, j], cuts[b, j], feats[a, j])
                y, v = _stitch_targets(cuts[b, j], feats[b, j])
                main.add(g, y)
                if head is not None:
                    head.add(u, v)
            advance()
    candidates = {k: (main.solve(per_position=cuts[k[1], k[2]].layout == "nlc"),
                      head.solve(per_position=False) if head is not None else None)
                  for k, (main, head) in stats.items()}
    sse = {k: np.zeros(len(RIDGES)) for k in stats}
    moments: dict[tuple[str, str, int], list] = {k: [0.0, 0.0, 0] for k in stats}  # sum y^2, sum y, count
    for feats in _boundary_features(zoo, partition, data, "val", batch, defaults.TERM_IMAGES):
        for key, (mains, heads) in candidates.items():
            a, b, j = key
            g, u = _stitch_inputs(cuts[a, j], cuts[b, j], feats[a, j])
            y, v = _stitch_targets(cuts[b, j], feats[b, j])
            target = torch.cat([y.flatten(1), v.flatten(1)], 1) if v is not None else y.flatten(1)
            target = target.double()
            for r, (wm, om) in enumerate(mains):
                pred = (g.double() @ wm + om).flatten(1)
                if heads is not None:
                    wh, oh = heads[r]
                    pred = torch.cat([pred, (u.double() @ wh + oh).flatten(1)], 1)
                sse[key][r] += float(((pred - target) ** 2).sum())
            m = moments[key]
            m[0] += float((target ** 2).sum())
            m[1] = m[1] + target.sum(0)
            m[2] += target.shape[0]
    fitted = {}
    for key, (mains, heads) in candidates.items():
        sq, total, n = moments[key]
        sst = sq - float((total ** 2).sum()) / n
        r = int(np.argmin(sse[key]))
        wm, om = mains[r]
        weights = {"weight": wm.T.float().numpy(), "offset": om.float().numpy()}
        if heads is not None:
            wh, oh = heads[r]
            weights["prefix_weight"] = wh.T.float().numpy()
            weights["prefix_bias"] = oh[0].float().numpy()
        fitted[key] = (weights, 1.0 - sse[key][r] / sst if sst > 0 else 0.0)
    return fitted


def build(src: CutPoint, dst: CutPoint, weights: dict[str, np.ndarray]) -> StitchModule:
    """A StitchModule with fitted weights."""
    m = StitchModule(src, dst)
    offset = torch.from_numpy(weights["offset"])
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(weights["weight"])[:, :, None, None])
        if m.tokens:
            m.bias.zero_()
            m.pos.copy_(offset[None])
        else:
            m.bias.copy_(offset[0])
        if dst.prefix_tokens:
            m.prefix.weight.copy_(torch.from_numpy(weights["prefix_weight"]))
            m.prefix.bias.copy_(torch.from_numpy(weights["prefix_bias"]))
    return m.eval()


def _save(weights: dict[str, np.ndarray], path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, **weights)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True, eq=False)
class Stitches:
    """All fitted stitches of a partition, with their modules."""

    items: tuple[Stitch, ...]
    modules: dict[tuple[str, str, int], StitchModule]

    def get(self, source: str, target: str, boundary: int) -> Stitch | None:
        for s in self.items:
            if (s.source, s.target, s.boundary) == (source, target, boundary):
                return s
        return None


def stitch(zoo: Sequence[Lowered], partition: Partition, data: Dataset, cache: Cache) -> Stitches:
    """The stitch pass: fit (or load from the cache) every stitch between different networks."""
    by_name = {lw.name: lw for lw in zoo}
    key = content_key("stitches", [(lw.name, lw.network.weights_key) for lw in zoo], partition.boundaries,
                      data.fingerprint, len(data.split("probe")), RIDGES, defaults.TERM_IMAGES, 2)
    index_path = cache.path("stitches", key, ".json")
    fitted = None if index_path.exists() else fit_stitches(zoo, partition, data)
    records = cache.json("stitches", key, lambda: [
        {"source": a, "target": b, "boundary": j, "r2": r2,
         "weights": str(_store(cache, key, a, b, j, w))} for (a, b, j), (w, r2) in sorted(fitted.items())],
        what="stitch index")
    items, modules = [], {}
    for r in records:
        a, b, j = r["source"], r["target"], int(r["boundary"])
        src = by_name[a].cut(partition.boundaries[partition.models.index(a)][j])
        dst = by_name[b].cut(partition.boundaries[partition.models.index(b)][j])
        path = Path(r["weights"])
        try:
            weights = _load(path)
        except Exception as e:
            raise damaged(path, "stitch weights", e) from e
        params, flops = stitch_cost(src, dst)
        items.append(Stitch(a, b, j, stitch_kind(src, dst), str(path), float(r["r2"]),
                            stitch_fingerprint(src, dst), params, flops))
        modules[a, b, j] = build(src, dst, weights)
    return Stitches(tuple(items), modules)


def _store(cache: Cache, key: str, a: str, b: str, j: int, weights: dict[str, np.ndarray]) -> Path:
    path = cache.path("stitches", f"{key}-{a}-{b}-{j}", ".npz")
    atomic_write(path, lambda p: _save(weights, p))
    return path


def _train(module: nn.Module, params: Sequence[nn.Parameter], data: Dataset, labels: torch.Tensor, epochs: int,
           lr: float, weight_decay: float, batch: int, seed: int, train_mode: bool, label: str) -> dict[str, float]:
    """Cosine-annealed training of `params` on the train split, with the loss before and after over its first
    `defaults.LOSS_IMAGES` images."""
    images = data.images("train")
    if labels.shape[0] != images.shape[0]:
        raise DeryError(f"{label}: {labels.shape[0]} labels for {images.shape[0]} train images")
    before = _train_loss(module, data, labels)
    out = fit(module, params, images, labels, epochs=epochs, lr=lr, weight_decay=weight_decay, batch=batch,
              seed=seed, schedule="cosine", train_mode=train_mode, label=label)
    return {"loss_before": before, "loss_after": _train_loss(module, data, labels), **out}


def _train_loss(module: nn.Module, data: Dataset, labels: torch.Tensor) -> float:
    """The eval-mode loss over the first `defaults.LOSS_IMAGES` train images."""
    return mean_loss(module.eval(), data.images("train", defaults.LOSS_IMAGES), labels[:defaults.LOSS_IMAGES])


def refine_stitches(module: Assembled, data: Dataset, labels: torch.Tensor, epochs: int, *, lr: float = 1e-2,
                    weight_decay: float = 0.0, batch: int = 64, seed: int = 0) -> dict[str, float]:
    """Train only the stitches of an assembly end to end from their closed-form fit; returns train losses.

    The least-squares fit matches the target's features, not what the target's
    classifier needs; a few epochs of cross-entropy through the frozen blocks
    close that gap (`labels`: the train split's, or pseudo-labels from
    `dery.evaluate.reference_labels`). Each stitch of `module` is first
    replaced by a private copy, so the session's fitted `Stitches` (shared by
    every assembly) stay as they are; blocks stay frozen, BatchNorm in eval
    mode (no running statistics move). Deterministic for a seed. Training that
    raises the train loss is undone (`kept` is False), so refinement never
    leaves the assembly worse on the train split than its fit.
    """
    for i, part in enumerate(module.parts):
        if isinstance(part, StitchModule):
            module.parts[i] = copy.deepcopy(part)
    params = [p for part in module.parts if isinstance(part, StitchModule) for p in part.parameters()]
    if not params:
        loss = _train_loss(module, data, labels)
        return {"loss_before": loss, "loss_after": loss, "epochs": 0, "steps": 0, "trained_params": 0, "kept": False}
    fitted = [p.detach().clone() for p in params]
    out = _train(module, params, data, labels, epochs, lr, weight_decay, batch, seed, train_mode=False,
                 label="refining stitches")
    if out["loss_after"] >= out["loss_before"]:  # training made it worse: keep the closed-form fit
        with torch.no_grad():
            for p, w in zip(params, fitted):
                p.copy_(w)
        out = {**out, "loss_after": out["loss_before"]}
    return {**out, "kept": out["loss_after"] < out["loss_before"]}


def fine_tune(module: Assembled, data: Dataset, labels: torch.Tensor, epochs: int, *, lr: float = 1e-3,
              weight_decay: float = 0.01, batch: int = 64, seed: int = 0) -> tuple[Assembled, dict[str, float]]:
    """A short fine-tune of a deep copy of the whole assembly; returns the copy and its train losses.

    Blocks share their parameters with the zoo networks, so training happens on
    a copy: the zoo, the session's stitches and `module` are left untouched.
    """
    tuned = copy.deepcopy(module)
    return tuned, _train(tuned, list(tuned.parameters()), data, labels, epochs, lr, weight_decay, batch, seed,
                         train_mode=True, label="fine-tuning")
