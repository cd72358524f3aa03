"""similarity: linear CKA between every pair of cut points across the zoo.

Each network runs once over the probe images with every boundary cut as an
extra output. Per cut point and per chunk of `chunk` images we keep the linear
Gram matrix K = X X^T of its features (pooled per image as DeRy does, or the
full flattened tensor). Every pairwise CKA then comes from batched products of
those Grams, never from a loop over pairs:

* one chunk (N <= chunk): the exact biased estimator,
  CKA = <HKH, HLH> / (||HKH|| ||HLH||);
* several chunks: the unbiased minibatch estimator of Nguyen et al. (2021),
  CKA = sum_c HSIC1(K_c, L_c) / sqrt(sum_c HSIC1(K_c, K_c) sum_c HSIC1(L_c, L_c)),
  whose memory is bounded by the chunk size whatever N is.

Grams are cached per network and data fingerprint, so adding a model to a zoo
computes features for that model only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from dery import defaults, progress
from dery.cache import Cache, content_key, load_npy, save_npy
from dery.data import Dataset
from dery.errors import USAGE, DeryError
from dery.ir import CutPoint
from dery.passes.lower import Lowered

MODES = ("pooled", "full")


@dataclass(frozen=True, eq=False)
class Similarity:
    """CKA between every pair of `points` (boundary cut points of all networks, model by model)."""

    points: tuple[CutPoint, ...]
    matrix: np.ndarray = field(repr=False)
    mode: str
    estimator: str
    n: int

    def index(self, model: str, cut: str) -> int:
        for i, p in enumerate(self.points):
            if p.model == model and p.name == cut:
                return i
        raise KeyError((model, cut))

    def of_model(self, model: str) -> list[int]:
        """Indices of a model's points, in network order."""
        return [i for i, p in enumerate(self.points) if p.model == model]


def pool(x: torch.Tensor, layout: str) -> torch.Tensor:
    """DeRy's per-image pooling: feature maps averaged over space, tokens over the sequence."""
    if layout == "nchw":
        return x.mean(dim=(2, 3))
    if layout == "nhwc":
        return x.mean(dim=(1, 2))
    if layout == "nlc":
        return x.mean(dim=1)
    return x.flatten(1)


def centred(k: np.ndarray) -> np.ndarray:
    """H K H for a stack of Grams (..., n, n)."""
    k = k - k.mean(axis=-1, keepdims=True)
    return k - k.mean(axis=-2, keepdims=True)


def cka_from_grams(grams: np.ndarray) -> tuple[np.ndarray, str]:
    """CKA matrix (P x P) from Grams shaped (P, chunks, n, n); exact for one chunk, minibatch otherwise."""
    p, c, n, _ = grams.shape
    if c == 1:
        g = centred(grams[:, 0]).reshape(p, n * n)
        hsic = g @ g.T
        estimator = "exact"
    else:
        if n < 4:
            raise DeryError(f"similarity chunk of {n} images is too small for the unbiased estimator (need >= 4)",
                            exit_code=USAGE)
        hsic = np.zeros((p, p))
        for ci in range(c):
            k = grams[:, ci].copy()
            idx = np.arange(n)
            k[:, idx, idx] = 0.0
            flat = k.reshape(p, n * n)
            sums = flat.sum(axis=1)
            rows = k.sum(axis=2)
            hsic += (flat @ flat.T + np.outer(sums, sums) / ((n - 1) * (n - 2))
                     - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))
        estimator = "minibatch"
    d = np.sqrt(np.clip(np.diag(hsic), 1e-300, None))
    return hsic / np.outer(d, d), estimator


def model_grams(lowered: Lowered, images: torch.Tensor, *, mode: str, chunk: int, batch: int = 64) -> np.ndarray:
    """Grams (P_m, chunks, chunk, chunk) of a network's boundary cuts over `images` (N a multiple of chunk)."""
    cuts = lowered.boundary_cuts()
    n = images.shape[0]
    net = lowered.with_cut_outputs(tuple(c.name for c in cuts))
    chunks = n // chunk
    out = np.zeros((len(cuts), chunks, chunk, chunk))
    with torch.no_grad(), progress.task(f"features {lowered.name}", chunks) as advance:
        for ci in range(chunks):
            feats: list[list[torch.Tensor]] = [[] for _ in cuts]
            for bi in range(ci * chunk, (ci + 1) * chunk, batch):
                outs = net(images[bi:min(bi + batch, (ci + 1) * chunk)])[1:]
                for j, (c, t) in enumerate(zip(cuts, outs)):
                    feats[j].append(pool(t, c.layout) if mode == "pooled" else t.flatten(1))
            for j, f in enumerate(feats):
                x = torch.cat(f).double()
                out[j, ci] = (x @ x.T).numpy()
            advance()
    return out


def similarity(zoo: Sequence[Lowered], data: Dataset, cache: Cache, *, mode: str = defaults.SIMILARITY,
               n: int | None = None, chunk: int | None = None) -> Similarity:
    """The similarity pass: CKA between all boundary cut points of the zoo on the probe split."""
    if mode not in MODES:
        raise DeryError(f"similarity mode {mode!r} is not one of {', '.join(MODES)}", exit_code=USAGE)
    probe = data.images("probe", n)
    n = probe.shape[0]
    chunk = min(chunk or n, n)
    usable = (n // chunk) * chunk
    if usable < 4:
        raise DeryError(f"need at least 4 probe images for similarity, got {n}", exit_code=USAGE)
    probe = probe[:usable]
    blocks = []
    for lw in zoo:
        key = content_key("grams", lw.network.weights_key, lw.network.spec.arch, [c.name for c in lw.boundary_cuts()],
                          data.fingerprint, mode, usable, chunk)
        blocks.append(cache.get_or_make(
            "grams", f"{lw.name}-{key}", ".npy", make=lambda lw=lw: model_grams(lw, probe, mode=mode, chunk=chunk),
            save=save_npy, load=load_npy, what="similarity features"))
    grams = np.concatenate(blocks, axis=0)
    matrix, estimator = cka_from_grams(grams)
    points = tuple(c for lw in zoo for c in lw.boundary_cuts())
    return Similarity(points, matrix, mode, estimator, usable)
