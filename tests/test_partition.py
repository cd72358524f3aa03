"""The exact cover-set partition against enumeration, planted optima, its messages and its pass."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from dery.errors import DeryError
from dery.passes.partition import (
    PartitionProblem,
    brute_force_partition,
    min_max_share,
    partition_objective,
    solve_partition,
    synthetic_problem,
)


def shares(cum: np.ndarray, choice: tuple[int, ...]) -> np.ndarray:
    """Block shares recomputed from scratch: differences of [0, cum at the boundaries, 1]."""
    ends = [0.0, *(float(cum[c]) for c in choice), 1.0]
    return np.diff(ends)


def assert_valid(problem: PartitionProblem, choice: tuple[tuple[int, ...], ...]) -> None:
    assert len(choice) == len(problem.groups)
    for cum, c in zip(problem.cum, choice):
        assert len(c) == problem.k - 1
        assert all(0 <= x < cum.size for x in c)
        assert all(a < b for a, b in zip(c, c[1:])), f"boundaries not strictly increasing: {c}"
        assert shares(cum, c).max() <= problem.max_share + 1e-9


def objective_by_definition(problem: PartitionProblem, choice: tuple[tuple[int, ...], ...]) -> float:
    """Sum over sets and model pairs of CKA(first cuts) + CKA(last cuts); input-input = 1, logits left out."""
    total = 0.0
    for a, b in itertools.combinations(range(len(choice)), 2):
        ends_a = [None, *(problem.groups[a][c] for c in choice[a]), "logits"]
        ends_b = [None, *(problem.groups[b][c] for c in choice[b]), "logits"]
        for s in range(problem.k):
            for pa, pb in ((ends_a[s], ends_b[s]), (ends_a[s + 1], ends_b[s + 1])):
                if pa is None:
                    total += 1.0
                elif pa != "logits":
                    total += problem.sim[pa, pb]
    return total


def random_sim(rng: np.random.Generator, p: int) -> np.ndarray:
    """Unstructured CKA-like matrix: cosine of non-negative random features (PSD, [0, 1], unit diagonal)."""
    f = rng.exponential(1.0, (p, int(rng.integers(2, 8))))
    g = f @ f.T
    d = np.sqrt(np.diag(g))
    return g / np.outer(d, d)


def random_small(seed: int) -> tuple[PartitionProblem, bool]:
    """2-4 models, 4-8 cuts, K 2-4; half the instances get a cap just above the tightest feasible one."""
    rng = np.random.default_rng(seed)
    models, k = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    top = 7 if models == 4 else 8
    sizes = rng.integers(max(4, k - 1), top + 1, models)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    groups = tuple(np.arange(offsets[m], offsets[m + 1]) for m in range(models))
    cum = []
    for n in sizes:
        upto = np.cumsum(rng.uniform(0.2, 2.0, n + 1))
        cum.append(upto[:-1] / upto[-1])
    if seed % 2:
        sim = random_sim(rng, int(offsets[-1]))
    else:
        sim = synthetic_problem(seed, 1, (int(offsets[-1]), int(offsets[-1])), k).sim
    binding = bool(rng.integers(2))
    need = max(min_max_share(c, k) for c in cum)
    max_share = need + rng.uniform(0.0, 0.08) if binding else 1.0
    return PartitionProblem(sim, groups, tuple(cum), k, max_share, tuple(f"m{i}" for i in range(models))), binding


def test_mip_matches_brute_force_on_random_instances():
    binding_bites = 0
    for seed in range(60):
        problem, binding = random_small(seed)
        exact = solve_partition(problem)
        brute = brute_force_partition(problem)
        assert exact.status == "optimal" and exact.gap == 0.0
        assert_valid(problem, exact.choice)
        assert_valid(problem, brute.choice)
        assert exact.objective == pytest.approx(brute.objective, rel=1e-12, abs=1e-9), seed
        assert exact.objective == pytest.approx(objective_by_definition(problem, exact.choice), abs=1e-9)
        assert exact.objective == partition_objective(problem, exact.choice)
        if binding:
            free = solve_partition(replace(problem, max_share=1.0))
            binding_bites += free.objective > exact.objective + 1e-9
    assert binding_bites >= 5, "the caps never changed the optimum: the test does not exercise balance"


def test_negative_cka_from_the_minibatch_estimator_is_handled_exactly():
    rng = np.random.default_rng(7)
    for seed in range(8):
        problem, _ = random_small(100 + seed)
        sim = problem.sim - rng.uniform(0.0, 0.6)
        shifted = replace(problem, sim=sim)
        exact, brute = solve_partition(shifted), brute_force_partition(shifted)
        assert exact.objective == pytest.approx(brute.objective, abs=1e-9)


def planted(rng: np.random.Generator, boundaries: list[tuple[int, ...]], sizes: list[int],
            hit: float = 0.9, miss: float = 0.1) -> PartitionProblem:
    """CKA = `hit` between the planted boundary j of every model, `miss` elsewhere (plus a small PSD noise)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    p = int(offsets[-1])
    label = np.arange(p) + 1000
    for m, bounds in enumerate(boundaries):
        for j, c in enumerate(bounds):
            label[offsets[m] + c] = j
    same = (label[:, None] == label[None, :]).astype(float)
    noise = rng.uniform(0, 1, (p, 3))
    noise = 0.02 * noise @ noise.T / 3
    sim = miss + (hit - miss) * same + noise
    sim[np.diag_indices(p)] = 1.0
    groups = tuple(np.arange(offsets[m], offsets[m + 1]) for m in range(len(sizes)))
    cum = tuple(np.arange(1, n + 1) / (n + 1) for n in sizes)
    return PartitionProblem(sim, groups, cum, len(boundaries[0]) + 1, 1.0, tuple(f"m{i}" for i in range(len(sizes))))


def test_planted_block_structure_is_recovered_exactly():
    rng = np.random.default_rng(3)
    truth = [(1, 4, 7), (2, 5, 8), (0, 3, 9), (2, 6, 10), (4, 5, 6)]
    problem = planted(rng, truth, [10, 10, 11, 12, 9])
    found = solve_partition(problem)
    assert found.choice == tuple(truth)
    assert found.status == "optimal"


def test_blocks_from_different_stages_can_share_a_set():
    # Stage labels of each cut, as a DeRy-style node list would have them.
    stages_a = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    stages_b = [0, 0, 1, 1, 1, 1, 1, 2, 2, 3]
    truth = [(2, 5, 8), (3, 7, 9)]  # a's stage-1 cut 5 best matches b's stage-2 cut 7, and 8 (2) matches 9 (3)
    problem = planted(np.random.default_rng(5), truth, [10, 10])
    found = solve_partition(problem)
    assert found.choice == tuple(truth)
    matched = [(stages_a[x], stages_b[y]) for x, y in zip(*found.choice)]
    assert any(sa != sb for sa, sb in matched), matched


def test_balance_cap_is_respected_and_binds():
    free_problem = synthetic_problem(11, 5, (12, 20), 4, slack=3.0)
    problem = replace(free_problem, max_share=max(min_max_share(c, 4) for c in free_problem.cum) + 0.01)
    free = solve_partition(free_problem)
    capped = solve_partition(problem)
    assert_valid(problem, capped.choice)
    assert max(shares(c, ch).max() for c, ch in zip(problem.cum, free.choice)) > problem.max_share
    assert capped.objective < free.objective


def brute_min_max(cum: np.ndarray, k: int) -> float:
    return min(shares(cum, c).max() for c in itertools.combinations(range(cum.size), k - 1))


def test_min_max_share_matches_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(80):
        n, k = int(rng.integers(1, 10)), int(rng.integers(1, 6))
        upto = np.cumsum(rng.lognormal(0, 1, n + 1))
        cum = upto[:-1] / upto[-1]
        if n < k - 1:
            assert min_max_share(cum, k) == np.inf
        else:
            assert min_max_share(cum, k) == pytest.approx(brute_min_max(cum, k), abs=1e-15)


def test_infeasible_cap_names_the_network_and_its_minimum_share():
    rng = np.random.default_rng(1)
    even = np.arange(1, 12) / 12
    lumpy = np.array([0.05, 0.1, 0.15, 0.6, 0.95])  # one segment holds 45% of the network
    problem = PartitionProblem(random_sim(rng, 11 + lumpy.size), (np.arange(11), 11 + np.arange(lumpy.size)),
                               (even, lumpy), 4, 1.5 / 4, ("even_net", "resnet_wide"), balance="params")
    need = min_max_share(lumpy, 4)
    assert need > problem.max_share
    assert need == pytest.approx(brute_min_max(lumpy, 4))
    with pytest.raises(DeryError) as e:
        solve_partition(problem)
    assert e.value.exit_code == 1
    assert str(e.value) == (f"no partition into 4 blocks keeps every block within 37.5% of its network's params: "
                            f"resnet_wide needs at least {100 * need:.1f}% (raise --partition-slack or choose "
                            f"another --k)")
    with pytest.raises(DeryError):
        brute_force_partition(problem)
    with pytest.raises(DeryError, match=r"resnet_wide needs at least 45\.0%"):
        solve_partition(replace(problem, max_share=need - 1e-6))
    # exactly at the minimum share it becomes feasible, and the worst block is that share
    at = solve_partition(replace(problem, max_share=need))
    assert shares(lumpy, at.choice[1]).max() == pytest.approx(need)


def test_too_few_cuts_names_the_network():
    rng = np.random.default_rng(2)
    problem = PartitionProblem(random_sim(rng, 10), (np.arange(8), np.arange(8, 10)),
                               (np.arange(1, 9) / 9, np.array([0.3, 0.6])), 4, 1.0, ("vit_small", "tiny_net"))
    with pytest.raises(DeryError, match=r"tiny_net has only 2 boundary cuts; 4 blocks need 3") as e:
        solve_partition(problem)
    assert e.value.exit_code == 2
    assert "vit_small" not in str(e.value)


def test_same_inputs_give_the_same_partition():
    first = solve_partition(synthetic_problem(21, 6, (10, 24), 4))
    second = solve_partition(synthetic_problem(21, 6, (10, 24), 4))
    assert first.choice == second.choice
    assert repr(first.objective) == repr(second.objective)


def test_degenerate_sizes():
    problem = synthetic_problem(4, 3, (5, 9), 1)
    one_block = solve_partition(problem)
    assert one_block.choice == ((), (), ()) and one_block.objective == 3.0
    single = synthetic_problem(4, 1, (5, 9), 3, slack=1.0)
    alone = solve_partition(single)
    assert_valid(single, alone.choice)
    assert alone.objective == 0.0


def test_time_limit_returns_a_valid_incumbent_with_its_gap():
    """Stopped at once, the answer is a feasible partition (every constraint, the cap without tolerance),
    its objective is its own by definition and below the proven optimum, and its gap covers the distance to
    that optimum (the bound it comes from is a true upper bound)."""
    problem = synthetic_problem(5, 4, (12, 16), 4, slack=3.0)
    problem = replace(problem, max_share=max(min_max_share(c, 4) for c in problem.cum) + 0.02)
    found = solve_partition(problem, time_limit_s=0.0)
    assert found.status == "time_limit"
    assert len(found.choice) == len(problem.groups)
    for cum, c in zip(problem.cum, found.choice):
        assert len(c) == problem.k - 1 and all(0 <= x < cum.size for x in c)
        assert list(c) == sorted(set(c)), c
        assert shares(cum, c).max() <= problem.max_share
    assert found.objective == pytest.approx(objective_by_definition(problem, found.choice), abs=1e-9)
    optimum = solve_partition(problem)
    assert optimum.status == "optimal" and optimum.gap == 0.0
    assert found.objective <= optimum.objective + 1e-9
    assert found.gap is not None
    assert found.gap >= (optimum.objective - found.objective) / abs(found.objective) - 1e-9, (found, optimum)


@pytest.mark.slow
def test_partition_pass_on_real_networks(tmp_path):
    torch = pytest.importorskip("torch")
    from dery.cache import Cache
    from dery.passes.lower import lower
    from dery.passes.partition import partition, partition_json
    from dery.passes.similarity import Similarity, cka_from_grams, model_grams
    from dery.zoo import load_member, parse_zoo

    specs = parse_zoo("resnet18:random,mobilenetv3_small_050:random")
    zoo = [lower(load_member(s, None, Cache(tmp_path))) for s in specs]
    images = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    matrix, estimator = cka_from_grams(np.concatenate([model_grams(lw, images, mode="pooled", chunk=16) for lw in zoo]))
    sim = Similarity(tuple(c for lw in zoo for c in lw.boundary_cuts()), matrix, "pooled", estimator, 16)

    # resnet18's last stage holds most of its weights: 4 blocks within 37.5% of params is impossible
    with pytest.raises(DeryError, match=r"params: resnet18 needs at least \d+\.\d%"):
        partition(zoo, sim, 4, balance="params")

    part = partition(zoo, sim, 4, balance="flops")
    doc = partition_json(part)
    assert doc["status"] == "optimal" and doc["k"] == 4 and doc["balance"] == "flops"
    for lw, entry in zip(zoo, doc["models"]):
        cuts = [c.name for c in lw.boundary_cuts()]
        assert entry["model"] == lw.name
        assert [cuts.index(b) for b in entry["boundaries"]] == sorted(cuts.index(b) for b in entry["boundaries"])
        ends = [None, *entry["boundaries"], None]
        assert [(b["first"], b["last"]) for b in entry["blocks"]] == list(zip(ends, ends[1:]))
        total = lw.cost(None, None)[1]
        assert sum(b["flops"] for b in entry["blocks"]) == total
        assert max(b["flops"] for b in entry["blocks"]) <= 1.5 / 4 * total * (1 + 1e-9)
    idx = [[sim.index(m["model"], b) for b in m["boundaries"]] for m in doc["models"]]
    assert doc["objective"] == pytest.approx(1 + 2 * sum(matrix[i, j] for i, j in zip(*idx)))
    assert partition(zoo, sim, 4, balance="flops") == part


def test_same_zoo_same_partition_byte_for_byte(tiny, tmp_path):
    """Similarity recomputed from scratch in two empty caches, then partitioned: identical bytes, and the
    same partition the session cached."""
    from dery.cache import Cache
    from dery.ir import to_json
    from dery.passes.partition import partition, partition_json
    from dery.passes.similarity import similarity

    docs, matrices = [], []
    for run in range(2):
        sim = similarity(tiny.lowered, tiny.data, Cache(tmp_path / f"cache{run}"), mode="pooled")
        matrices.append(np.asarray(sim.matrix).tobytes())
        part = partition(tiny.lowered, sim, 3, balance="flops", slack=0.5)
        docs.append(json.dumps(partition_json(part), sort_keys=True).encode())
        assert to_json(part) == to_json(tiny.partition)
    assert matrices[0] == matrices[1]
    assert docs[0] == docs[1]
