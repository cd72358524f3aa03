"""proxy: the pairwise quality model is exact on single-switch assemblies; NASWOT and the probe are right."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from dery.passes.assemble import assemble
from dery.passes.proxy import linear_probe, naswot, quality


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def measured_val_accuracy(module: nn.Module, tiny) -> float:
    """Top-1 accuracy on the val split's labels, computed here."""
    val = tiny.data.split("val")
    with torch.no_grad():
        return float((module(tiny.data.images("val")).argmax(1) == val.labels).double().mean())


def clamped(acc: float, n: int) -> float:
    return min(max(acc, 0.5 / n), 1 - 0.5 / n)


def test_pairwise_model_predicts_every_single_switch_and_member_exactly(tiny) -> None:
    """Every member and every single-switch assembly is built and its val accuracy measured here; the
    pairwise predictor gives each of them exactly (the half-sample clamp aside; the product keeps accuracies
    in float32, so 1e-6, far below one val image's 1/n)."""
    q = quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, "pairwise")
    assert q.labels == "labels"
    n = len(tiny.data.split("val"))
    k = tiny.partition.k
    for network in tiny.zoo:
        acc = measured_val_accuracy(network.module, tiny)
        assert sigmoid(q.score((network.name,) * k)) == pytest.approx(clamped(acc, n), abs=1e-6)
    checked = 0
    for st in tiny.stitches.items:
        a, b, j = st.source, st.target, st.boundary
        models = (a,) * (j + 1) + (b,) * (k - j - 1)
        _, module = assemble(tiny.lowered, tiny.partition, tiny.stitches, models)
        acc = measured_val_accuracy(module, tiny)
        assert sigmoid(q.score(models)) == pytest.approx(clamped(acc, n), abs=1e-6), (models, acc)
        checked += 1
    assert checked == len(tiny.stitches.items) >= k - 1


def test_member_accuracy_predictor_ignores_stitches(tiny) -> None:
    q = quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, "member-acc")
    a, b = tiny.partition.models[:2]
    assert q.score((a, a, b)) == pytest.approx(q.unary[a, 0] + q.unary[a, 1] + q.unary[b, 2])


def test_predictors_without_pairwise_terms_build_no_switch_assembly(tiny, monkeypatch) -> None:
    """stitch-r2 and member-acc read member accuracies only: no forward pass per stitch, the same members'
    accuracies as the pairwise predictor's, and the same stitch-r2 terms."""
    import dery.passes.proxy as proxy

    full = quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, "pairwise")
    built = []
    monkeypatch.setattr(proxy, "assemble", lambda *a, **kw: built.append(a) or assemble(*a, **kw))
    for predictor in ("stitch-r2", "member-acc"):
        q = quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, predictor)
        assert q.member_val == full.member_val
    assert built == []
    r2 = {(st.source, st.target, st.boundary): math.log(max(st.r2, 1e-3)) for st in tiny.stitches.items}
    assert quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, "stitch-r2").pairwise == r2


def slow_naswot(codes: list[torch.Tensor]) -> float:
    c = torch.cat(codes, 1).double()
    n = c.shape[0]
    k = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            k[i, j] = (c[i] == c[j]).sum()  # count of units where the two codes agree
    return float(torch.linalg.slogdet(k)[1])


def test_naswot_matches_the_hamming_kernel_definition() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(32, 6)
    with torch.no_grad():
        h1 = torch.relu(net[0](x))
        h2 = torch.relu(net[2](h1))
    expect = slow_naswot([(h1 > 0).float(), (h2 > 0).float()])
    assert naswot(net, x, batches=1, batch=32) == pytest.approx(expect, rel=1e-9)


def test_linear_probe_separates_separable_features_and_not_noise() -> None:
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    feats = nn.functional.one_hot(labels, 4).float() * 3 + 0.1 * torch.randn(200, 4)

    class Fixed(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f
            self.fc = nn.Linear(4, 4)

        def forward(self, idx):
            return self.fc(self.f[idx])

    idx = torch.arange(200)
    assert linear_probe(Fixed(feats), idx, labels) == 1.0
    assert linear_probe(Fixed(torch.randn(200, 4)), idx, labels) < 0.5
