"""similarity: the Gram-product CKA engine against direct formulas, its invariances, the pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dery.passes.similarity import cka_from_grams, pool, similarity


def direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from centred features: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def direct_hsic1(k: np.ndarray, g: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) written out term by term."""
    n = k.shape[0]
    k, g = k.copy(), g.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(g, 0)
    one = np.ones(n)
    return float((np.trace(k @ g) + (one @ k @ one) * (one @ g @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ k @ g @ one)) / (n * (n - 3)))


def features(seed: int, n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 6))
    return [base @ rng.normal(size=(6, 12)) + 0.5 * rng.normal(size=(n, 12)),
            rng.normal(size=(n, 5)),
            np.tanh(base @ rng.normal(size=(6, 20)))]


def grams(feats: list[np.ndarray], chunks: int = 1) -> np.ndarray:
    n = feats[0].shape[0] // chunks
    return np.stack([np.stack([f[c * n:(c + 1) * n] @ f[c * n:(c + 1) * n].T for c in range(chunks)])
                     for f in feats])


def test_exact_estimator_equals_the_direct_formula() -> None:
    feats = features(0)
    m, est = cka_from_grams(grams(feats))
    assert est == "exact"
    for i, a in enumerate(feats):
        for j, b in enumerate(feats):
            assert m[i, j] == pytest.approx(direct_cka(a, b), abs=1e-6)
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    x, y, _ = features(1)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))
    m, _ = cka_from_grams(grams([x, y, 3.7 * x @ q]))
    assert m[0, 2] == pytest.approx(1.0, abs=1e-9)
    assert m[2, 1] == pytest.approx(m[0, 1], abs=1e-9)
    # a non-isotropic scaling does change it: the invariance test can fail
    skew = x * np.linspace(0.1, 10, 12)
    m2, _ = cka_from_grams(grams([x, skew]))
    assert m2[0, 1] < 0.99


def test_minibatch_estimator_equals_the_unbiased_formula() -> None:
    feats = features(3, n=60)
    m, est = cka_from_grams(grams(feats, chunks=3))
    assert est == "minibatch"
    g = grams(feats, chunks=3)
    for i in range(3):
        for j in range(3):
            num = sum(direct_hsic1(g[i, c], g[j, c]) for c in range(3))
            den = np.sqrt(sum(direct_hsic1(g[i, c], g[i, c]) for c in range(3))
                          * sum(direct_hsic1(g[j, c], g[j, c]) for c in range(3)))
            assert m[i, j] == pytest.approx(num / den, abs=1e-6)


def test_pooling_follows_the_layout() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(pool(x, "nchw"), x.mean((2, 3)))
    assert torch.equal(pool(x, "nhwc"), x.mean((1, 2)))
    assert torch.equal(pool(x[:, 0], "nlc"), x[:, 0].mean(1))


def test_similarity_pass_on_the_zoo_is_cached_and_consistent(tiny, tmp_path, monkeypatch) -> None:
    """In an empty cache the first call computes each network's Grams once; a second call with Gram
    computation made to raise returns the identical matrix, so every Gram came from the cache; another
    chunking is another key (it computes)."""
    from dery.cache import Cache
    from dery.passes import similarity as similarity_pass

    cache = Cache(tmp_path)
    real = similarity_pass.model_grams
    computed: list[str] = []

    def counted(lw, *args, **kwargs):
        computed.append(lw.name)
        return real(lw, *args, **kwargs)

    monkeypatch.setattr(similarity_pass, "model_grams", counted)
    sim = similarity(tiny.lowered, tiny.data, cache, n=64)
    assert computed == [lw.name for lw in tiny.lowered]
    assert sim.matrix.shape == (len(sim.points),) * 2
    assert np.allclose(sim.matrix, sim.matrix.T) and np.allclose(np.diag(sim.matrix), 1.0)
    assert sim.estimator == "exact" and sim.n == 64

    def missed(lw, *args, **kwargs):
        raise AssertionError(f"cache miss: the Grams of {lw.name} were computed again")

    monkeypatch.setattr(similarity_pass, "model_grams", missed)
    again = similarity(tiny.lowered, tiny.data, cache, n=64)
    assert np.array_equal(again.matrix, sim.matrix) and again.points == sim.points
    with pytest.raises(AssertionError, match="cache miss"):
        similarity(tiny.lowered, tiny.data, cache, n=64, chunk=32)
    monkeypatch.setattr(similarity_pass, "model_grams", real)
    mb = similarity(tiny.lowered, tiny.data, cache, n=64, chunk=32)
    assert mb.estimator == "minibatch"
    assert np.corrcoef(mb.matrix.ravel(), sim.matrix.ravel())[0, 1] > 0.9
