"""Benchmark of the reassembly MIP (dery.solver): exactness, speed, DeRy's search, and `dery solve`'s start.

    /work/venv/bin/python benchmarks/bench_solver.py [--quick]

One run writes benchmarks/results/solver.md and benchmarks/results/solver.json:
(a) exactness against exhaustive enumeration on random instances of at most 5,000 assemblies;
(b) build-and-solve wall time (numpy conversion, exact reduction, HiGHS model and solve) for
    dense instances at a median latency limit, next to the unreduced model;
(c) the objective DeRy's randomised swap search reaches in the same wall time as the solver;
(d) what solving a saved 50 x 12 problem file costs a fresh process: import time (`python -X importtime`), whether
    torch or onnx is loaded, and wall time, next to the import of the DeRy search space (which loads torch).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import highspy
import numpy as np
from dery.problem import Problem
from dery.solver import _Mip, _reduce, max_achievable, min_achievable, solve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import brute_force, random_problem  # the generators live with the tests

RESULTS = common.RESULTS


def fresh(p: Problem) -> Problem:
    """The same problem without its cached arrays, so a timing includes the whole build."""
    return Problem(p.sets, p.candidates, p.transitions, p.fixed, p.limits)


def machine() -> dict:
    return common.machine("numpy", "highspy", highs=highspy.Highs().version())


# ---------------------------------------------------------------------------------------------
# (a) exactness

def exactness(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    equal = infeasible = 0
    max_diff = 0.0
    shapes = []
    for _ in range(count):
        models, sets = int(rng.integers(2, 11)), int(rng.integers(1, 7))
        while models ** sets > 5000:
            sets -= 1
        density = float(rng.choice([0.1, 0.3, 0.6, 1.0]))
        quantile = float(rng.choice([-0.1, 0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
        p = random_problem(rng, models, sets, density, quantile)
        if rng.random() < 0.3:  # a second, params, budget
            lo, hi = min_achievable(p, "params"), max_achievable(p, "params")
            p = Problem(p.sets, p.candidates, p.transitions, p.fixed,
                        {**p.limits, "params": lo + float(rng.uniform(0.0, 0.8)) * (hi - lo)})
        got, want = solve(p), brute_force(p)
        same = got.status == want.status
        if same and want.status == "optimal":
            diff = abs(got.objective - want.objective)
            max_diff = max(max_diff, diff)
            same = diff <= 1e-9
        equal += same
        infeasible += want.status == "infeasible"
        shapes.append(models ** sets)
    return {"instances": count, "equal": equal, "infeasible_instances": infeasible,
            "max_abs_objective_diff": max_diff, "largest_enumeration": max(shapes),
            "median_enumeration": int(statistics.median(shapes))}


# ---------------------------------------------------------------------------------------------
# (b) build-and-solve time

def with_option(name: str, value: object, reduce: bool):
    """A variant that was tried: the shipped model (or the unreduced one) with one HiGHS option
    changed, solved the way `solve` does it."""
    def run(p: Problem):
        mip = _Mip(p, reduce=reduce)
        mip.h.setOptionValue(name, value)
        return mip.run(None)
    return run


VARIANTS = {
    "reduced (shipped)": lambda p: solve(p),
    "reduced, HiGHS restarts on": with_option("mip_allow_restart", True, reduce=True),
    "full model": lambda p: solve(p, reduce=False),
    "full model, presolve off": with_option("presolve", "off", reduce=False),
}


def timing(sizes: list[tuple[int, int]], instances: int, repeats: int, seed: int) -> list[dict]:
    rows = []
    for models, sets in sizes:
        rng = np.random.default_rng(seed + models * 100 + sets)
        problems = [random_problem(rng, models, sets, 1.0, 0.5) for _ in range(instances)]
        kept = [int(r.keep_c.sum() + r.keep_t.sum()) for r in (_reduce(p, 1, ()) for p in problems)]
        columns = len(problems[0].candidates) + len(problems[0].transitions)
        for name, run in VARIANTS.items():
            heavy = name.startswith("full")  # seconds per solve at 50 x 12: fewer runs
            shown = columns if heavy else int(statistics.median(kept))
            times, statuses, gaps, objectives = [], [], [], []
            for p in problems[: 2 if heavy else None]:
                per = []
                for _ in range(1 if heavy else repeats):
                    q = fresh(p)
                    t0 = time.perf_counter()
                    sol = run(q)
                    per.append((time.perf_counter() - t0) * 1e3)
                times.append(statistics.median(per))
                statuses.append(sol.status)
                gaps.append(sol.gap)
                objectives.append(sol.objective)
            rows.append({"models": models, "sets": sets, "variant": name,
                         "transitions": len(problems[0].transitions),
                         "columns": f"{shown} / {columns}",
                         "instances": len(times), "repeats": 1 if heavy else repeats,
                         "median_ms": statistics.median(times), "max_ms": max(times),
                         "statuses": sorted(set(statuses)), "max_gap": max(gaps),
                         "objectives": objectives})
    return rows


# ---------------------------------------------------------------------------------------------
# (c) DeRy's randomised swap search, re-implemented as a baseline

class DerySearch:
    """DeRy's zero-shot reassembly search (Adamdad/DeRy, simlarity/zeroshot_reassembly.py).

    Each trial shuffles all blocks, starts from a random assembly, then walks the shuffled
    blocks once, proposing to swap each into its set; a swap is kept when the assembly stays
    valid (listed transitions, every limit met) and its score improves on the trial's best.
    Trials restart until the time budget is spent; the best assembly of all trials wins.
    As the brief asks, the start is a random *feasible* assembly (rejection-sampled walks
    along listed transitions), which only helps the baseline.
    """

    def __init__(self, p: Problem) -> None:
        a = p.arrays
        self.p = p
        lim = [p.resources.index(r) for r in p.limited]
        self.budget = tuple(a.limit[r] - a.fixed[r] for r in lim)
        self.set_of = a.cand_set.tolist()
        self.score = a.cand_score.tolist()
        self.res = [tuple(row) for row in a.cand_res[:, lim].tolist()]
        pairs = zip(a.src.tolist(), a.dst.tolist(), a.tr_score.tolist(),
                    a.tr_res[:, lim].tolist())
        self.edge = {(s, d): (sc, tuple(r)) for s, d, sc, r in pairs}
        self.succ: list[list[int]] = [[] for _ in self.set_of]
        for s, d in self.edge:
            self.succ[s].append(d)
        self.first = [c for c, k in enumerate(self.set_of) if k == 0]

    def value(self, chosen: list[int]) -> tuple[float, tuple[float, ...]] | None:
        """(score, resource use) of a full assembly, or None if a junction is not listed."""
        score = 0.0
        use = [0.0] * len(self.budget)
        for i, c in enumerate(chosen):
            score += self.score[c]
            use = [u + r for u, r in zip(use, self.res[c])]
            if i:
                edge = self.edge.get((chosen[i - 1], c))
                if edge is None:
                    return None
                score += edge[0]
                use = [u + r for u, r in zip(use, edge[1])]
        return score, tuple(use)

    def fits(self, use: tuple[float, ...]) -> bool:
        return all(u <= b + 1e-9 * max(1.0, abs(b)) for u, b in zip(use, self.budget))

    def random_start(self, rng: random.Random, deadline: float) -> tuple[list[int], float] | None:
        while time.perf_counter() < deadline:
            chosen = [rng.choice(self.first)]
            while len(chosen) < self.p.sets and self.succ[chosen[-1]]:
                chosen.append(rng.choice(self.succ[chosen[-1]]))
            if len(chosen) == self.p.sets:
                score, use = self.value(chosen)
                if self.fits(use):
                    return chosen, score
        return None

    def run(self, seconds: float, seed: int) -> float | None:
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds
        blocks = list(range(len(self.set_of)))
        best = None
        while time.perf_counter() < deadline:
            start = self.random_start(rng, deadline)
            if start is None:
                break
            current, current_score = start
            rng.shuffle(blocks)
            for block in blocks:
                if time.perf_counter() >= deadline:
                    break
                proposal = list(current)
                proposal[self.set_of[block]] = block
                scored = self.value(proposal)
                if scored is not None and self.fits(scored[1]) and scored[0] > current_score:
                    current, current_score = proposal, scored[0]
            best = current_score if best is None else max(best, current_score)
        return best


def dery_baseline(sizes: list[tuple[int, int]], per_size: int, seed: int) -> dict:
    rows = []
    for models, sets in sizes:
        rng = np.random.default_rng(seed + models)
        for i in range(per_size):
            p = random_problem(rng, models, sets, 1.0, 0.5)
            t0 = time.perf_counter()
            sol = solve(fresh(p))
            seconds = time.perf_counter() - t0
            search = DerySearch(p)
            same = search.run(seconds, seed=i)
            longer = search.run(10 * seconds, seed=i)
            rows.append({"models": models, "sets": sets, "optimum": sol.objective,
                         "solver_ms": seconds * 1e3, "dery_same_time": same,
                         "dery_10x_time": longer})

    def summary(key: str) -> dict:
        ratios = [(r[key] or 0.0) / r["optimum"] for r in rows]
        return {"mean_ratio": statistics.fmean(ratios), "min_ratio": min(ratios),
                "reached_optimum": sum(abs((r[key] or 0.0) - r["optimum"]) <= 1e-9 for r in rows),
                "no_feasible_found": sum(r[key] is None for r in rows)}

    sizes = ", ".join(f"{per_size} x ({m} models x {k} sets)" for m, k in sizes)
    return {"instances": len(rows), "sizes": sizes, "same_time": summary("dery_same_time"),
            "ten_times": summary("dery_10x_time"), "rows": rows}


# ---------------------------------------------------------------------------------------------
# (d) a fresh process solving a problem file

HEAVY = ("torch", "onnx", "onnxruntime", "onnx_graphsurgeon")
SOLVE_FILE = ("import sys, time; t0 = time.perf_counter(); from dery.solver import solve_file; "
              "t1 = time.perf_counter(); code, out, err = solve_file(sys.argv[1]); "
              "print(code, t1 - t0, time.perf_counter() - t1, file=sys.stderr)")


def import_profile(module: str) -> dict:
    """`python -X importtime -c 'import module'`: its cumulative import time and the heavy libraries it loaded."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                         text=True, check=True).stderr
    cumulative = {}
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cum, name = line.split("|")
            cumulative[name.strip()] = int(cum) / 1e3
    return {"module": module, "import_ms": cumulative[module], "heavy_loaded": [m for m in HEAVY if m in cumulative]}


def startup(repeats: int, seed: int) -> dict:
    """Import profiles of the solver and of the search space, and fresh-process wall times of solving a file."""
    p = random_problem(np.random.default_rng(seed), 50, 12, 1.0, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "problem.json"
        path.write_text(json.dumps(p.to_json()))
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", SOLVE_FILE, str(path)], capture_output=True, text=True,
                                  check=True)
            wall = time.perf_counter() - t0
            code, imported, solved = done.stderr.split()[-3:]
            runs.append({"exit_code": int(code), "wall_ms": wall * 1e3, "import_ms": float(imported) * 1e3,
                         "solve_ms": float(solved) * 1e3})
    return {"problem": f"50 models x 12 sets, {len(p.transitions)} transitions, latency limit at the median",
            "solver": [import_profile("dery.solver") for _ in range(repeats)],
            "search_space": [import_profile("dery.passes.solve") for _ in range(repeats)], "runs": runs}


# ---------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    m, ex, dery = res["machine"], res["exactness"], res["dery_baseline"]
    lines = [
        "# Reassembly MIP benchmark (`benchmarks/bench_solver.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores; Python {m['python']}, "
        f"numpy {m['numpy']}, highspy {m['highspy']} (HiGHS {m['highs']}). "
        f"Mode: {'quick' if res['quick'] else 'full'}; total run {res['total_s']:.1f} s.",
        "",
        "## Formulation",
        "",
        "x[c] binary per candidate, y[t] continuous in [0, 1] per listed transition; one",
        "`sum x = 1` row per set; flow rows (transitions out of c = x[c], into c = x[c]); one",
        "budget row per limited resource, scaled by max(1, |limit|). With x binary the flow rows",
        "force y to the 0/1 path, so only x is integral. HiGHS: 1 thread, seed 0, mip_rel_gap =",
        "mip_abs_gap = 0. The model is passed at once as numpy CSC arrays (`passModel`).",
        "",
        "Before HiGHS an exact reduction runs (vectorised longest-path sweeps over the layered",
        "graph): elements whose cheapest path breaks a limit are dropped; a Lagrangian relaxation",
        "of the budget rows (multipliers by bisection) bounds the best feasible score through each",
        "element, the heaviest path through every candidate gives feasible incumbents, and every",
        "element whose bound is below the best incumbent is dropped. The incumbent is handed to",
        "HiGHS (`setSolution`), which proves optimality on what is left. Every incumbent is",
        "re-checked with exact sums; one over a limit (inside HiGHS's tolerance only) is cut off.",
        "",
        "## (a) Exactness against brute force",
        "",
        f"{ex['equal']} / {ex['instances']} instances equal (status, and objective within 1e-9); "
        f"{ex['infeasible_instances']} of them infeasible. Max |objective difference|: "
        f"{ex['max_abs_objective_diff']:.3g}. Enumerations up to {ex['largest_enumeration']} "
        f"assemblies (median {ex['median_enumeration']}).",
        "",
        "## (b) Build-and-solve time, dense transitions, latency limit at the median",
        "",
        "Wall clock from a fresh `Problem` object (numpy conversion, reduction, HiGHS build and",
        "solve); median over instances of the median over repeats. \"full model\" hands HiGHS",
        "every column with the shipped options (no reduction); \"restarts on\" differs from the",
        "shipped solver only in HiGHS's `mip_allow_restart`.",
        "",
        "| models x sets | transitions | variant | HiGHS columns (median) | instances x repeats "
        "| median ms | max ms | statuses | max gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["timing"]:
        lines.append(f"| {r['models']} x {r['sets']} | {r['transitions']} | {r['variant']} | "
                     f"{r['columns']} | {r['instances']} x {r['repeats']} | "
                     f"{r['median_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{', '.join(r['statuses'])} | {r['max_gap']:g} |")
    big = [r for r in res["timing"] if (r["models"], r["sets"]) == (50, 12)
           and r["variant"] == "reduced (shipped)"]
    if big:
        row = big[0]
        ok = row["max_ms"] < 1000 and row["statuses"] == ["optimal"] and row["max_gap"] == 0
        lines += ["", f"Requirement (50 x 12 dense, proven optimal, under 1 s): "
                      f"{'met' if ok else 'NOT met'} (max {row['max_ms']:.1f} ms)."]
    s, t = dery["same_time"], dery["ten_times"]
    lines += [
        "",
        "## (c) DeRy's randomised swap search with the solver's wall time",
        "",
        f"{dery['instances']} instances ({dery['sizes']}; dense, latency limit at the median).",
        "Each search gets the wall time the solver took on that instance (build included), or",
        "ten times it. Ratio = search objective / proven optimum.",
        "",
        "| time given | mean ratio | min ratio | reached the optimum | no feasible found |",
        "|---|---|---|---|---|",
        f"| same as the solver | {s['mean_ratio']:.4f} | {s['min_ratio']:.4f} | "
        f"{s['reached_optimum']} / {dery['instances']} | {s['no_feasible_found']} |",
        f"| 10x the solver | {t['mean_ratio']:.4f} | {t['min_ratio']:.4f} | "
        f"{t['reached_optimum']} / {dery['instances']} | {t['no_feasible_found']} |",
    ]
    st = res["startup"]
    solver_ms = statistics.median(r["import_ms"] for r in st["solver"])
    space_ms = statistics.median(r["import_ms"] for r in st["search_space"])
    wall = [r["wall_ms"] for r in st["runs"]]
    heavy = sorted({m for r in st["solver"] for m in r["heavy_loaded"]})
    ok = not heavy and max(wall) < 1000 and all(r["exit_code"] == 0 for r in st["runs"])
    lines += [
        "",
        "## (d) A fresh process solving a saved problem file",
        "",
        f"{st['problem']}, written as a `dery.problem/1` file; {len(st['runs'])} fresh interpreters each import",
        "`dery.solver` and run `solve_file` on it (what `dery solve` does). Import times are the cumulative",
        "`python -X importtime` figures (median of the runs); wall time covers the whole process.",
        "",
        "| what | median ms | max ms | loads torch / onnx |",
        "|---|---|---|---|",
        f"| import `dery.solver` | {solver_ms:.1f} | {max(r['import_ms'] for r in st['solver']):.1f} | "
        f"{', '.join(heavy) or 'neither'} |",
        f"| import `dery.passes.solve` (the DeRy search space; the solver's home before the split) | "
        f"{space_ms:.1f} | {max(r['import_ms'] for r in st['search_space']):.1f} | "
        f"{', '.join(sorted({m for r in st['search_space'] for m in r['heavy_loaded']})) or 'neither'} |",
        f"| solve the file (in process, after the import) | "
        f"{statistics.median(r['solve_ms'] for r in st['runs']):.1f} | {max(r['solve_ms'] for r in st['runs']):.1f} "
        f"| |",
        f"| fresh process wall time, start to exit | {statistics.median(wall):.1f} | {max(wall):.1f} | |",
        "",
        f"Requirement (no torch, under 1 s from start to answer): {'met' if ok else 'NOT met'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances, same sizes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    res = {"quick": args.quick, "machine": machine()}
    res["exactness"] = exactness(60 if args.quick else 200, seed=1)
    print(f"(a) {res['exactness']['equal']}/{res['exactness']['instances']} equal", flush=True)
    res["timing"] = timing([(10, 4), (20, 8), (50, 12)], 3 if args.quick else 5,
                           3 if args.quick else 5, seed=2)
    for r in res["timing"]:
        print(f"(b) {r['models']}x{r['sets']} {r['variant']}: median {r['median_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms, {r['statuses']}", flush=True)
    res["dery_baseline"] = dery_baseline([(20, 8), (50, 12)], 5 if args.quick else 10, seed=3)
    print(f"(c) same time: {res['dery_baseline']['same_time']}", flush=True)
    res["startup"] = startup(3 if args.quick else 5, seed=4)
    print(f"(d) fresh process: {[round(r['wall_ms']) for r in res['startup']['runs']]} ms", flush=True)
    res["total_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "solver.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "solver.md").write_text(markdown(res))
    print(f"wrote {RESULTS / 'solver.md'} and solver.json", flush=True)
    return 0


if __name__ == "__main__":
    common.run(main)
