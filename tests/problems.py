"""Reassembly problems for tests and benchmarks: exhaustive enumeration and a realistic instance generator."""
from __future__ import annotations

import itertools
import time

import numpy as np
from dery.problem import Candidate, Problem, Solution, Transition
from dery.solver import explain_infeasible, max_achievable, min_achievable


def brute_force(problem: Problem) -> Solution:
    """Enumerate every assembly (fine up to ~1e5); same conventions and statuses as `solve`."""
    started = time.perf_counter()
    by_set = [[c.id for c in problem.candidates if c.set == k] for k in range(problem.sets)]
    best: tuple[float, tuple[str, ...], dict] | None = None
    for chosen in itertools.product(*by_set):
        if any((a, b) not in problem.transition_of for a, b in zip(chosen, chosen[1:])):
            continue
        objective, totals = problem.evaluate(chosen)
        if problem.meets_limits(totals) and (best is None or objective > best[0]):
            best = (objective, chosen, totals)
    ms = (time.perf_counter() - started) * 1e3
    if best is None:
        return Solution("infeasible", solve_ms=ms, reason=explain_infeasible(problem))
    return Solution("optimal", best[1], best[0], best[2], ms, 0.0)


def random_problem(rng: np.random.Generator, models: int, sets: int, density: float = 1.0,
                   limit_quantile: float | None = 0.5) -> Problem:
    """A realistic random instance: `models` pretrained models cut into `sets` blocks each.

    Block latency is lognormal around a per-model size, params and flops follow the latency
    with noise, and bigger models score higher. Same-model transitions (a -> a) are free and
    always listed; cross-model adapters exist with probability `density`, cost a little and
    lose a little score. The latency limit sits at `limit_quantile` between the smallest (0)
    and largest (1) achievable latency: below 0 is infeasible, None means no limit.
    """
    size = rng.lognormal(0.0, 0.6, models)                       # relative model size
    quality = 0.5 + 0.3 * np.log1p(size) + rng.normal(0, 0.05, models)
    share = rng.dirichlet(np.full(sets, 4.0), models)            # how each model splits its depth
    lat = size[:, None] * share * sets * rng.lognormal(-0.5, 0.25, (models, sets))
    params = np.round(lat * rng.lognormal(14.5, 0.5, (models, sets)))
    flops = np.round(lat * rng.lognormal(21.0, 0.3, (models, sets)))
    score = quality[:, None] * share + rng.normal(0, 0.01, (models, sets))
    candidates = tuple(
        Candidate(f"m{m}@k{k}", k, float(score[m, k]),
                  {"latency_ms": float(lat[m, k]), "params": float(params[m, k]),
                   "flops": float(flops[m, k])}, {"model": f"m{m}"})
        for k in range(sets) for m in range(models))
    transitions = []
    for k in range(sets - 1):
        listed = rng.random((models, models)) < density
        np.fill_diagonal(listed, True)
        cost = rng.lognormal(-3.0, 0.5, (models, models))
        loss = rng.uniform(0.0, 0.05, (models, models))
        for a, b in zip(*np.nonzero(listed)):
            if a == b:
                transitions.append(Transition(f"m{a}@k{k}", f"m{b}@k{k + 1}", 0.0,
                                              {"latency_ms": 0.0, "params": 0.0, "flops": 0.0}))
            else:
                c = float(cost[a, b])
                transitions.append(Transition(f"m{a}@k{k}", f"m{b}@k{k + 1}", -float(loss[a, b]),
                                              {"latency_ms": c, "params": float(round(c * 2e6)),
                                               "flops": float(round(c * 1e9))}))
    fixed = {"latency_ms": float(rng.lognormal(-1.5, 0.3)), "params": 5e5, "flops": 1e7}
    unlimited = Problem(sets, candidates, tuple(transitions), fixed,
                        {"latency_ms": None, "params": None, "flops": None})
    if limit_quantile is None:
        return unlimited
    lo, hi = min_achievable(unlimited, "latency_ms"), max_achievable(unlimited, "latency_ms")
    limit = lo + limit_quantile * (hi - lo)
    return Problem(sets, candidates, tuple(transitions), fixed,
                   {"latency_ms": float(limit), "params": None, "flops": None})

