"""proxy: predicted quality of assemblies, without training.

The program's objective is a quality model made of unary (block) and pairwise
(stitch) terms, in a link of accuracy on the held-out val split (log-odds
unless said otherwise):

* `pairwise`: a block of model m carries 1/K of logit(acc(m)); a
  stitch a->b at boundary j carries what that stitch actually costs: the
  logit accuracy of the two-piece network (a's blocks up to j, the stitch, b's
  blocks after) minus what the unary terms already give it. Every single-
  switch assembly is then predicted exactly; several switches add up. Whatever
  the split of a member's term over its blocks, an assembly a->b->c is then
  predicted as odds(a->b) * odds(b->c) / odds(b): the two stitches are
  taken to act independently on the odds of a correct answer.
* `pairwise-log` (default): the same construction on log accuracy instead of log-odds,
  so acc(a->b->c) = acc(a->b) * acc(b->c) / acc(b): each stitch keeps a
  fraction of the intermediate network's correct answers, independently of
  the other stitches (independent failures multiply probabilities, not odds).
  Pure members and single switches are still exact. On the default zoo it
  ranks the held-out accuracy of multi-switch assemblies better than
  `pairwise` (Kendall tau, benchmarks/results/quality.md). Scores are log-probabilities, not log-odds:
  `Quality.accuracy` converts either kind back to an accuracy.
* `pairwise-repaired`: the `pairwise-log` construction on accuracies measured after a brief repair
  (`defaults.REPAIR_TERM_EPOCHS` of the run's `--finetune` kind) of every member and single switch: a
  model of accuracy after repair, whose terms are measured, not guessed. It ranks repaired multi-switch
  assemblies better than the untrained terms (benchmarks/results/quality.md) at the cost of one brief
  training per stitch.
* `stitch-r2`: the same unary terms, stitches penalised by their held-out fit
  (log R^2), no network evaluation.
* `member-acc`: unary terms only (the plain weighted mix of members).

Whole-network proxies re-rank the program's best few solutions: `val-acc`
(accuracy of the assembled network on val), `naswot` (Mellor et al.: log-det
of the Hamming kernel of binarised activations over 5 batches of 32 images)
and `linear-probe` (a ridge classifier on the assembly's pre-logit features,
fitted on half of val, scored on the other half). Both catch their layers at
the function level (activations, the last linear map), so layers that an fx
trace inlined count as well as modules.

Scores use the data's labels when they mean something for this zoo, and the
zoo ensemble's predictions otherwise (see dery.evaluate).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dery import defaults, progress
from dery.cache import Cache, content_key
from dery.data import Dataset
from dery.errors import USAGE, DeryError
from dery.evaluate import accuracy, reference_labels
from dery.ir import Partition
from dery.passes.assemble import assemble
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches
from torch.overrides import TorchFunctionMode

PREDICTORS = defaults.PREDICTORS
PROXIES = defaults.PROXIES
PAIRWISE = ("pairwise", "pairwise-log", "pairwise-repaired")  # the predictors whose stitch terms are measured
# Module or traced functional form alike, every activation runs through one of these.
ACTIVATIONS = frozenset({F.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish,
                         torch.relu, torch.Tensor.relu})


def logit(p: float, n: int) -> float:
    """Log-odds with a half-sample correction so 0% and 100% stay finite."""
    eps = 0.5 / max(n, 1)
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def log_accuracy(p: float, n: int) -> float:
    """Log accuracy with the same half-sample correction as `logit`."""
    eps = 0.5 / max(n, 1)
    return math.log(min(max(p, eps), 1 - eps))


@dataclass(frozen=True, eq=False)
class Quality:
    """Unary scores by (model, set), pairwise by (source, target, boundary), in val log-odds ("logit") or
    log accuracy ("log"), as `link` says."""

    predictor: str
    labels: str
    unary: dict[tuple[str, int], float] = field(repr=False)
    pairwise: dict[tuple[str, str, int], float] = field(repr=False)
    member_val: dict[str, float] = field(repr=False)
    link: str = "logit"

    def score(self, models: Sequence[str]) -> float:
        """Predicted score of an assembly (one model per set), in the units of `link`."""
        s = sum(self.unary[m, k] for k, m in enumerate(models))
        return s + sum(self.pairwise.get((a, b, j), 0.0) for j, (a, b) in enumerate(zip(models, models[1:]))
                       if a != b)

    def accuracy(self, models: Sequence[str]) -> float:
        """Predicted val accuracy of an assembly (the score through the inverse link)."""
        s = self.score(models)
        return min(math.exp(s), 1.0) if self.link == "log" else 1.0 / (1.0 + math.exp(-s))


def switch_accuracies(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, data: Dataset,
                      cache: Cache, switches_too: bool = True, repaired: tuple[str, int] | None = None,
                      seed: int = 0) -> tuple[dict[tuple[str, str, int], float], dict[str, float], str]:
    """Val accuracy (on the first `defaults.TERM_IMAGES` val images) of every zoo member and, with
    `switches_too`, of every single-switch (two-piece) assembly (cached): a forward pass per stitch, which
    only the pairwise predictors read. With `repaired` = (kind, epochs), each is scored after that repair
    (dery.passes.repair) instead of as it is."""
    from dery.passes.repair import repair

    nets = [lw.network for lw in zoo]
    labels, kind = reference_labels(nets, data, "val")
    labels = labels[:defaults.TERM_IMAGES]
    train = reference_labels(nets, data, "train")[0] if repaired else None
    images = data.images("val", defaults.TERM_IMAGES)
    k = partition.k
    key = content_key("switch-acc", [(lw.name, lw.network.weights_key) for lw in zoo], partition.boundaries,
                      [(s.source, s.target, s.boundary, s.weights) for s in stitches.items], data.fingerprint, kind,
                      defaults.TERM_IMAGES,
                      *(() if switches_too else ("members only",)), *((repaired, seed) if repaired else ()))

    def score(models: tuple[str, ...]) -> float:
        _, module = assemble(zoo, partition, stitches, models)
        if repaired:
            with tempfile.TemporaryDirectory() as run_dir:
                module = repair(module, *repaired, data, train, seed=seed, run_dir=Path(run_dir)).module
        return accuracy(module, images, labels)

    def make() -> dict:
        members = {lw.name: score((lw.name,) * k) for lw in zoo}
        switches = {}
        what = "repairing and scoring stitches" if repaired else "scoring stitches"
        with progress.task(what, len(stitches.items) if switches_too else 0) as advance:
            for s in stitches.items if switches_too else ():
                models = (s.source,) * (s.boundary + 1) + (s.target,) * (k - s.boundary - 1)
                switches[f"{s.source}|{s.target}|{s.boundary}"] = score(models)
                advance()
        return {"members": members, "switches": switches}

    raw = cache.json("quality", key, make, what="stitch accuracies")
    switches = {}
    for name, acc in raw["switches"].items():
        a, b, j = name.split("|")
        switches[a, b, int(j)] = float(acc)
    return switches, {m: float(v) for m, v in raw["members"].items()}, kind


def quality(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, data: Dataset, cache: Cache,
            predictor: str = defaults.PREDICTOR, finetune: str = defaults.FINETUNE, seed: int = 0) -> Quality:
    """The proxy pass: unary and pairwise quality terms for the program (`finetune`: the repair kind that
    `pairwise-repaired` measures its terms after)."""
    if predictor not in PREDICTORS:
        raise DeryError(f"unknown quality predictor {predictor!r}; known: {', '.join(PREDICTORS)}", exit_code=USAGE)
    pairwise = predictor in PAIRWISE
    repaired = (finetune, defaults.REPAIR_TERM_EPOCHS) if predictor == "pairwise-repaired" else None
    switches, members, kind = switch_accuracies(zoo, partition, stitches, data, cache, switches_too=pairwise,
                                                repaired=repaired, seed=seed)
    return from_accuracies(predictor, kind, partition, stitches, members, switches,
                           min(len(data.split("val")), defaults.TERM_IMAGES))


def from_accuracies(predictor: str, labels: str, partition: Partition, stitches: Stitches, members: dict[str, float],
                    switches: dict[tuple[str, str, int], float], n: int) -> Quality:
    """A predictor's terms from the val accuracies (of `n` images) of the members and the single switches."""
    k = partition.k
    link = "log" if predictor in ("pairwise-log", "pairwise-repaired") else "logit"
    g = log_accuracy if link == "log" else logit
    lm = {m: g(members[m], n) for m in partition.models}
    unary = {(m, s): lm[m] / k for m in partition.models for s in range(k)}
    pairwise: dict[tuple[str, str, int], float] = {}
    for st in stitches.items:
        a, b, j = st.source, st.target, st.boundary
        if predictor in PAIRWISE:
            pairwise[a, b, j] = g(switches[a, b, j], n) - ((j + 1) * lm[a] + (k - j - 1) * lm[b]) / k
        elif predictor == "stitch-r2":
            pairwise[a, b, j] = math.log(max(st.r2, 1e-3))
        else:
            pairwise[a, b, j] = 0.0
    return Quality(predictor, labels, unary, pairwise, members, link)


class _ActivationCodes(TorchFunctionMode):
    """Collects the binarised output (> 0) of every activation function that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ACTIVATIONS:
            self.codes.append((out.detach().flatten(1) > 0).float())
        return out


def naswot(module: nn.Module, images: torch.Tensor, *, batches: int = 5, batch: int = 32) -> float:
    """NASWOT score: mean over batches of logdet of the Hamming kernel of binarised activations.

    Activations are caught at the function level, so timm's own activation
    modules and activations an fx trace inlined (ConvNeXt's GELU) count too.
    """
    scores = []
    with torch.no_grad():
        for bi in range(batches):
            x = images[bi * batch:(bi + 1) * batch]
            if x.shape[0] < 2:
                break
            with _ActivationCodes() as seen:
                module(x)
            if not seen.codes:
                raise DeryError("NASWOT needs activation functions (ReLU/GELU/...) in the network")
            c = torch.cat(seen.codes, dim=1).double()
            kmat = c @ c.T + (1 - c) @ (1 - c).T
            scores.append(float(torch.linalg.slogdet(kmat)[1]))
    return float(np.mean(scores))


class _LastLinearInput(TorchFunctionMode):
    """Remembers the input of the last linear map run (nn.Linear or a traced F.linear alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.input: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.input = args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


def _pre_logits(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Inputs of the final linear map (the classifier) of a network."""
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, images.shape[0], 256):
            with _LastLinearInput() as seen:
                module(images[i:i + 256])
            if seen.input is None:
                raise DeryError("linear-probe proxy needs a network whose classifier is a linear layer")
            feats.append(seen.input.detach().flatten(1))
    return torch.cat(feats)


def linear_probe(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, ridge: float = 1e-2) -> float:
    """Accuracy of a ridge classifier on the network's pre-logit features (fit on half, score on the rest)."""
    x = _pre_logits(module, images).double()
    n = x.shape[0] // 2
    classes = int(labels.max()) + 1
    y = torch.nn.functional.one_hot(labels, classes).double()
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    z = torch.cat([(x - mu) / sd, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    w = torch.linalg.solve(z[:n].T @ z[:n] + ridge * n * torch.eye(z.shape[1], dtype=x.dtype), z[:n].T @ y[:n])
    return float(((z[n:] @ w).argmax(1) == labels[n:]).double().mean())


def whole_network_score(proxy: str, module: nn.Module, data: Dataset, labels: torch.Tensor) -> float:
    """A whole-network proxy of an assembled module on the val split (higher is better)."""
    images = data.images("val")
    if proxy == "val-acc":
        return accuracy(module, images, labels)
    if proxy == "naswot":
        return naswot(module, images)
    if proxy == "linear-probe":
        return linear_probe(module, images, labels)
    raise DeryError(f"unknown proxy {proxy!r}; known: {', '.join(PROXIES)}", exit_code=USAGE)
