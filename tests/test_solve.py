"""The reassembly MIP against exhaustive enumeration, its messages, and its file interface."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from dery.errors import DeryError
from dery.passes.solve import CandidateKey, SearchSpace, assembly_ids, chosen_models
from dery.problem import Candidate, Problem, Transition
from dery.solver import best_solutions, max_achievable, min_achievable, solve, solve_file
from problems import brute_force, random_problem


def all_assemblies(p: Problem) -> list[tuple[str, ...]]:
    """Every path of listed transitions, by plain enumeration."""
    by_set = [[c.id for c in p.candidates if c.set == k] for k in range(p.sets)]
    return [ids for ids in itertools.product(*by_set)
            if all((a, b) in p.transition_of for a, b in zip(ids, ids[1:]))]


def recomputed(p: Problem, chosen: tuple[str, ...]) -> tuple[float, dict[str, float]]:
    """Objective and totals summed independently in the documented order."""
    cands = [next(c for c in p.candidates if c.id == i) for i in chosen]
    trans = [next(t for t in p.transitions if (t.source, t.target) == pair)
             for pair in zip(chosen, chosen[1:])]
    objective = 0.0
    for item in cands + trans:
        objective += item.score
    totals = {}
    for r in p.resources:
        total = p.fixed.get(r, 0.0)
        for item in cands + trans:
            total += item.resources.get(r, 0.0)
        totals[r] = total
    return objective, totals


def with_limits(p: Problem, **limits: float | None) -> Problem:
    return replace(p, limits={**p.limits, **limits})


def random_instances(seed: int, count: int):
    """Varied small instances: shapes, densities, loose/tight/impossible and multiple limits."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        models, sets = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        while models ** sets > 3000:
            sets -= 1
        density = float(rng.choice([0.0, 0.2, 0.5, 1.0]))
        quantile = rng.choice([None, -0.2, 0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
        quantile = None if quantile is None else float(quantile)
        p = random_problem(rng, models, sets, density, quantile)
        if rng.random() < 0.4:
            extra = {}
            for r in ("params", "flops"):
                if rng.random() < 0.6:
                    lo, hi = min_achievable(p, r), max_achievable(p, r)
                    extra[r] = max(0.0, lo + float(rng.uniform(-0.1, 0.8)) * (hi - lo))
            p = with_limits(p, **extra)
        yield p


def test_matches_brute_force_on_240_random_instances():
    statuses = []
    for p in random_instances(seed=7, count=240):
        got, want = solve(p), brute_force(p)
        statuses.append(want.status)
        assert got.status == want.status, p.to_json()
        if want.status == "optimal":
            assert got.objective == pytest.approx(want.objective, abs=1e-9)
            assert got.gap == 0.0
            assert got.chosen in all_assemblies(p)
            assert p.meets_limits(got.totals)
    # The mix must exercise both outcomes, or the comparison proves little.
    assert statuses.count("infeasible") >= 20 and statuses.count("optimal") >= 150


def test_never_chooses_an_unlisted_pair():
    # a0 -> b0 would score 20 but is not listed; the best listed pair is a1 -> b0 (11).
    p = Problem(2, (Candidate("a0", 0, 10.0), Candidate("a1", 0, 1.0),
                    Candidate("b0", 1, 10.0), Candidate("b1", 1, 0.5)),
                (Transition("a0", "b1"), Transition("a1", "b0")),
                limits={"latency_ms": None})
    sol = solve(p)
    assert sol.chosen == ("a1", "b0") and sol.objective == 11.0


def test_totals_and_objective_are_the_exact_sums():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = random_problem(rng, 6, 5, density=0.6)
        sol = solve(p)
        objective, totals = recomputed(p, sol.chosen)
        assert sol.objective == objective
        assert sol.totals == totals


def test_reduction_is_exact_on_instances_too_big_to_enumerate():
    rng = np.random.default_rng(11)
    for quantile in (0.05, 0.3, 0.5, 0.9):
        p = random_problem(rng, 12, 7, density=0.7, limit_quantile=quantile)
        p = with_limits(p, params=min_achievable(p, "params") * 1.3)
        full, reduced = solve(p, reduce=False), solve(p)
        assert full.status == reduced.status == "optimal"
        assert reduced.objective == pytest.approx(full.objective, abs=1e-9)


def test_incumbent_within_solver_tolerance_but_over_the_limit_is_rejected():
    # "a" breaks the 1.0 ms limit by 1e-7, which HiGHS's own tolerance would let through.
    p = Problem(1, (Candidate("a", 0, 1.0, {"latency_ms": 1.0 + 1e-7}),
                    Candidate("b", 0, 0.5, {"latency_ms": 0.5})), (), limits={"latency_ms": 1.0})
    for reduce in (True, False):
        assert solve(p, reduce=reduce).chosen == ("b",)


def test_limit_exactly_at_the_minimum_is_met():
    rng = np.random.default_rng(5)
    for _ in range(10):
        p = random_problem(rng, 5, 4, density=0.5, limit_quantile=0.0)
        sol = solve(p)
        assert sol.status == "optimal"
        assert sol.totals["latency_ms"] == pytest.approx(p.limits["latency_ms"], rel=1e-12)


def test_infeasible_budget_reports_the_smallest_achievable_latency():
    rng = np.random.default_rng(9)
    for _ in range(10):
        p = random_problem(rng, 4, 4, density=0.5, limit_quantile=None)
        least = min(recomputed(p, ids)[1]["latency_ms"] for ids in all_assemblies(p))
        p = with_limits(p, latency_ms=0.9 * least)
        sol = solve(p)
        assert sol.status == "infeasible" and brute_force(p).status == "infeasible"
        assert min_achievable(p, "latency_ms") == pytest.approx(least, rel=1e-12)
        assert (f"latency_ms limit {0.9 * least:.6g} is below the smallest achievable "
                f"latency_ms {least:.6g}") == sol.reason
        assert sol.to_json()["reason"] == sol.reason


def test_limits_that_only_clash_together_are_explained():
    p = Problem(1, (Candidate("fast", 0, 1.0, {"latency_ms": 1.0, "params": 10.0}),
                    Candidate("small", 0, 1.0, {"latency_ms": 10.0, "params": 1.0})), (),
                limits={"latency_ms": 5.0, "params": 5.0})
    sol = solve(p)
    assert sol.status == "infeasible"
    assert sol.reason.startswith("each limit alone can be met but not all together")
    assert "latency_ms 1 (limit 5)" in sol.reason and "params 1 (limit 5)" in sol.reason


@pytest.mark.parametrize("transitions, unreachable", [
    ((("a0", "b0"),), 2),                 # nothing leaves set 1
    ((("a0", "b0"), ("b1", "c0")), 2),    # set 1's only reachable block is a dead end
    ((), 1),
])
def test_structural_infeasibility_names_the_unreachable_set(transitions, unreachable):
    cands = tuple(Candidate(f"{s}{i}", k, 1.0) for k, s in enumerate("abc") for i in range(2))
    p = Problem(3, cands, tuple(Transition(a, b) for a, b in transitions),
                limits={"latency_ms": None})
    sol = solve(p)
    assert sol.status == "infeasible"
    assert f"set {unreachable} cannot be reached" in sol.reason


def test_best_solutions_are_the_top_n_of_the_enumeration():
    rng = np.random.default_rng(21)
    for _ in range(25):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)),
                           density=float(rng.choice([0.3, 1.0])), limit_quantile=0.5)
        feasible = sorted((recomputed(p, ids)[0] for ids in all_assemblies(p)
                           if p.meets_limits(recomputed(p, ids)[1])), reverse=True)
        got = best_solutions(p, 5)
        assert len(got) == min(5, len(feasible))
        assert len({s.chosen for s in got}) == len(got)
        objectives = [s.objective for s in got]
        assert objectives == sorted(objectives, reverse=True)
        assert objectives == pytest.approx(feasible[:5], abs=1e-9)


def test_exclude_gives_the_runner_up_and_then_explains():
    p = Problem(1, (Candidate("a", 0, 3.0), Candidate("b", 0, 2.0)), (),
                limits={"latency_ms": None})
    assert solve(p, exclude=[("a",)]).chosen == ("b",)
    sol = solve(p, exclude=[("a",), ("b",)])
    assert sol.status == "infeasible" and "excluded" in sol.reason
    with pytest.raises(DeryError) as err:
        solve(p, exclude=[("zz",)])
    assert err.value.exit_code == 2


def test_same_problem_same_answer_byte_for_byte():
    p = random_problem(np.random.default_rng(2), 20, 6, density=0.8)
    first, second = solve(p).to_json(), solve(Problem.from_json(p.to_json())).to_json()
    first.pop("solve_ms"), second.pop("solve_ms")
    assert json.dumps(first) == json.dumps(second)


def test_time_limit_reports_a_feasible_incumbent_and_an_honest_gap():
    stopped = 0
    for seed in range(4):
        p = random_problem(np.random.default_rng(seed), 40, 10)
        sol = solve(p, time_limit_s=0.0)
        if sol.status == "optimal":  # HiGHS's presolve alone finished the reduced model
            continue
        stopped += 1
        best = solve(p)
        assert sol.status == "time_limit" and sol.chosen and p.meets_limits(sol.totals)
        assert sol.objective <= best.objective + 1e-12
        assert sol.gap > 0 and sol.objective * (1 + sol.gap) >= best.objective - 1e-9
    assert stopped


def test_json_round_trip_keeps_optional_fields_and_custom_resources():
    doc = {"schema": "dery.problem/1", "sets": 1, "note": "kept",
           "candidates": [{"id": "a", "set": 0, "latency_ms": 1.0, "memory_mb": 90, "score": 2.0,
                           "model": "resnet50", "estimated": True},
                          {"id": "b", "set": 0, "latency_ms": 2.0, "memory_mb": 10, "score": 1.0}],
           "transitions": [], "fixed": {"latency_ms": 0.5, "memory_mb": 5},
           "limits": {"latency_ms": 5.0, "memory_mb": 50}}
    p = Problem.from_json(doc)
    assert p.candidates[0].extra == {"model": "resnet50", "estimated": True}
    assert Problem.from_json(p.to_json()) == p and p.to_json()["note"] == "kept"
    sol = solve(p)  # "a" scores more but needs 95 MB of a 50 MB budget
    assert sol.chosen == ("b",) and sol.totals["memory_mb"] == 15.0


def valid_doc() -> dict:
    cands = [{"id": f"{s}{i}", "set": k, "latency_ms": 1.0, "params": 10, "flops": 1e6,
              "score": 0.5} for k, s in enumerate("abc") for i in range(2)]
    trans = [{"from": f"{s}{i}", "to": f"{t}{j}", "latency_ms": 0.1, "score": -0.01}
             for s, t in ("ab", "bc") for i in range(2) for j in range(2)]
    return {"schema": "dery.problem/1", "sets": 3, "candidates": cands, "transitions": trans,
            "fixed": {"latency_ms": 0.3, "params": 0, "flops": 0},
            "limits": {"latency_ms": 5.0, "params": None, "flops": None}}


def setting(*changes: tuple[list, object]):
    """A malformation: set (or, with DELETE, remove) the value at each path of the document."""
    def apply(doc: dict) -> None:
        for path, value in changes:
            node = doc
            for key in path[:-1]:
                node = node[key]
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
    return apply


DELETE = object()


@pytest.mark.parametrize("change, expected", [
    (setting((["schema"], "dery.problem/2")), 'schema: expected "dery.problem/1"'),
    (setting((["sets"], 0)), "sets: must be an integer >= 1"),
    (setting((["candidates", 3, "set"], 7)), "candidates[3].set: 7 is out of range 0..2"),
    (setting((["candidates", 2, "id"], "a0")),
     'candidates[2].id: duplicate id "a0" (first at candidates[0])'),
    (setting((["transitions", 1, "to"], "zz")), 'transitions[1].to: unknown candidate id "zz"'),
    (setting((["transitions", 0, "to"], "c0")),
     'transitions[0]: "a0" (set 0) -> "c0" (set 2) does not join set k to set k+1'),
    (setting((["transitions", 1, "to"], "b0")), "transitions[1]: duplicate of transitions[0]"),
    (setting((["candidates", 2, "set"], 0), (["candidates", 3, "set"], 0)),
     "candidates: set 1 has no candidates"),
    (setting((["candidates", 0, "latency_ms"], "fast")),
     'candidates[0].latency_ms: must be a number, got "fast"'),
    (setting((["candidates", 1, "params"], -5)), "candidates[1].params: must be >= 0, got -5"),
    (setting((["candidates", 4, "score"], float("nan"))), "candidates[4].score: must be finite"),
    (setting((["candidates", 0, "flops"], 10 ** 400)), "candidates[0].flops: must be finite"),
    (setting((["transitions", 2, "latency_ms"], True)),
     "transitions[2].latency_ms: must be a number, got true"),
    (setting((["limits", "latency"], 3.0)), "limits.latency: unknown resource"),
    (setting((["limits", "latency_ms"], -1.0)), "limits.latency_ms: must be >= 0"),
    (setting((["candidates", 0, "score"], DELETE)), "candidates[0].score: missing"),
    (setting((["candidates"], {"a0": 1})), "candidates: must be a list"),
    (setting((["candidates", 5, "set"], "2")), 'candidates[5].set: must be an integer, got "2"'),
    (setting((["transitions", 3], ["b0", "c0"])), "transitions[3]: must be an object"),
    (setting((["limits"], DELETE)), "limits: missing"),
])
def test_malformed_problems_name_the_field(change, expected):
    doc = valid_doc()
    change(doc)
    with pytest.raises(DeryError) as err:
        Problem.from_json(doc)
    assert err.value.exit_code == 2
    assert expected in str(err.value)


def test_solve_file_exit_codes(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(valid_doc()))
    code, out, err = solve_file(str(good))
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert set(answer) == {"status", "chosen", "objective", "totals", "solve_ms", "gap"}
    assert answer["status"] == "optimal" and len(answer["chosen"]) == 3

    tight = valid_doc()
    tight["limits"]["latency_ms"] = 1.0
    infeasible = tmp_path / "tight.json"
    infeasible.write_text(json.dumps(tight))
    code, out, err = solve_file(str(infeasible))
    assert code == 1 and "below the smallest achievable latency_ms 3.5" in err
    assert json.loads(out)["status"] == "infeasible"

    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "dery.problem/1",\n  "sets": 3,\n  oops}')
    code, out, err = solve_file(str(broken))
    assert code == 2 and out == "" and f"{broken}:3:3: invalid JSON" in err

    bad = valid_doc()
    bad["candidates"][3]["set"] = 7
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(bad))
    code, _, err = solve_file(str(wrong))
    assert code == 2 and "candidates[3].set: 7 is out of range 0..2" in err

    code, _, err = solve_file(str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_min_and_max_achievable_match_enumeration():
    rng = np.random.default_rng(13)
    for _ in range(15):
        p = random_problem(rng, 4, 4, density=0.4, limit_quantile=None)
        for r in ("latency_ms", "params", "flops"):
            values = [recomputed(p, ids)[1][r] for ids in all_assemblies(p)]
            assert min_achievable(p, r) == pytest.approx(min(values), rel=1e-12)
            assert max_achievable(p, r) == pytest.approx(max(values), rel=1e-12)
    with pytest.raises(DeryError):
        min_achievable(p, "latency")
    disconnected = Problem(2, (Candidate("a", 0, 1.0), Candidate("b", 1, 1.0)), ())
    assert math.isinf(min_achievable(disconnected, "latency_ms"))


def test_a_negative_fixed_term_is_a_correction_that_counts_in_totals_and_limits() -> None:
    doc = {"schema": "dery.problem/1", "sets": 2,
           "candidates": [{"id": "a0", "set": 0, "latency_ms": 1.0, "score": 1.0},
                          {"id": "b0", "set": 0, "latency_ms": 2.0, "score": 2.0},
                          {"id": "a1", "set": 1, "latency_ms": 1.0, "score": 0.0}],
           "transitions": [{"from": "a0", "to": "a1"}, {"from": "b0", "to": "a1"}],
           "fixed": {"latency_ms": -0.5}, "limits": {"latency_ms": 2.5}}
    sol = solve(Problem.from_json(doc))
    assert sol.chosen == ("b0", "a1") and sol.totals["latency_ms"] == pytest.approx(2.5)
    assert brute_force(Problem.from_json(doc)).objective == sol.objective


@pytest.mark.parametrize("models", [("a", "b", "a"), ("x[0]<y", "x", "x[1]<x[0]<y"), ("m",), ("b]<", "b", "b]<")])
def test_assembly_ids_are_unique_per_context_and_map_back_to_their_models(models):
    ids = assembly_ids(models)
    keys = [CandidateKey(m, k, models[k - 1] if k else None) for k, m in enumerate(models)]
    problem = Problem(len(models), tuple(Candidate(key.id, key.set, 1.0) for key in keys),
                      tuple(Transition(a, b) for a, b in zip(ids, ids[1:])))
    space = SearchSpace(problem, {key.id: key for key in keys})
    assert chosen_models(space, solve(problem)) == models
    assert ids[1:] == [f"{m}[{k}]<{models[k - 1]}" for k, m in enumerate(models) if k]
    other = assembly_ids(("z", *models[1:]))
    assert (ids[1] != other[1]) if len(models) > 1 else ids == ["m[0]"]


def loaded_heavy_modules(module: str) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after importing `module`."""
    code = (f"import sys; import {module}; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'onnx_graphsurgeon') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1].replace("'", '"'))


def test_the_solver_imports_neither_torch_nor_onnx():
    assert loaded_heavy_modules("dery.solver") == []
    assert "torch" in loaded_heavy_modules("dery.passes.solve")  # the control: the check sees torch when loaded


def test_an_instance_highs_presolve_got_wrong_is_solved_exactly() -> None:
    """highspy 1.16's presolve called a suboptimal assembly of this reduced model optimal (0.80309 against
    0.80852); the MIP runs without presolve, and must match enumeration here whatever HiGHS is installed."""
    path = Path(__file__).parent / "data" / "highs_presolve.json"
    problem = Problem.from_json(json.loads(path.read_text()))
    best = brute_force(problem)
    got = solve(problem)
    assert got.status == "optimal" and got.chosen == best.chosen and got.objective == best.objective
