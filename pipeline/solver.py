"""The reassembly MIP: the best assembly of a `dery.problem/1` problem, proven optimal with HiGHS.

Longest-path sweeps over the layered graph give the extreme totals and explain infeasibility; an exact reduction
(resource pruning and a Lagrangian bound) shrinks the model before HiGHS proves the optimum. The exactness
conventions are those of `dery.problem`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import highspy
import numpy as np
from dery.errors import FAILED, USAGE, DeryError
from dery.highs import exact_highs
from dery.problem import FEAS_RTOL, Problem, Solution, tolerance

# ---------------------------------------------------------------------------------------------
# Longest paths over the layered graph (exact for one additive weight; min = -max of -weight).

def _sweep(p: Problem, cand_w: np.ndarray, tr_w: np.ndarray, *, backward: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Heaviest partial paths: for each candidate, the largest weight of a path from set 0 ending
    at it (or, backward, from it to the last set), itself included, and the transition used
    last (first) on that path; -inf and -1 where there is no such path."""
    a = p.arrays
    edge = p.sets - 1 if backward else 0
    best = np.where(a.cand_set == edge, cand_w, -np.inf)
    via = np.full(len(best), -1)
    far = a.dst if backward else a.src
    for into, out in (reversed(p.layers) if backward else p.layers):
        seg = out if backward else into
        if not seg.order.size:
            continue
        step = best[far[seg.order]] + tr_w[seg.order]
        top = np.maximum.reduceat(step, seg.starts)
        hit = step == np.repeat(top, np.diff(np.r_[seg.starts, step.size]))
        first = np.minimum.reduceat(np.where(hit, np.arange(step.size), step.size), seg.starts)
        best[seg.keys] = top + cand_w[seg.keys]
        via[seg.keys] = seg.order[first]
    return best, via


def _paths_through(p: Problem, rows: np.ndarray, fwd_via: np.ndarray, bwd_via: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The heaviest full path through each candidate in `rows`: (candidates, transitions) arrays
    of shape (len(rows), sets) and (len(rows), sets - 1), from `_sweep`'s `via` outputs."""
    a, k_of = p.arrays, p.arrays.cand_set[rows]
    cands = np.zeros((rows.size, p.sets), dtype=np.int64)
    trans = np.zeros((rows.size, p.sets - 1), dtype=np.int64)
    cands[np.arange(rows.size), k_of] = rows
    for k in range(p.sets - 1, 0, -1):
        r = np.flatnonzero(k_of >= k)
        trans[r, k - 1] = fwd_via[cands[r, k]]
        cands[r, k - 1] = a.src[trans[r, k - 1]]
    for k in range(p.sets - 1):
        r = np.flatnonzero(k_of <= k)
        trans[r, k] = bwd_via[cands[r, k]]
        cands[r, k + 1] = a.dst[trans[r, k]]
    return cands, trans


def min_achievable(problem: Problem, resource: str) -> float:
    """Smallest total of `resource` over all assemblies, ignoring the limits (inf: no assembly)."""
    if resource not in problem.resources:
        raise DeryError(f"unknown resource {resource!r}; known: {', '.join(problem.resources)}",
                        exit_code=USAGE)
    return -_extreme(problem, resource, -1.0)


def fastest_problem(problem: Problem, resource: str = "latency_ms") -> Problem:
    """The problem whose best solution is the assembly with the least `resource` under the other limits."""
    return dataclasses.replace(
        problem, candidates=tuple(dataclasses.replace(c, score=-c.resources.get(resource, 0.0))
                                  for c in problem.candidates),
        transitions=tuple(dataclasses.replace(t, score=-t.resources.get(resource, 0.0)) for t in problem.transitions),
        limits={**problem.limits, resource: None})


def max_achievable(problem: Problem, resource: str) -> float:
    """Largest total of `resource` over all assemblies, ignoring the limits (-inf: no assembly)."""
    return _extreme(problem, resource, 1.0)


def _extreme(p: Problem, resource: str, sign: float) -> float:
    a, r = p.arrays, p.resources.index(resource)
    fwd, _ = _sweep(p, sign * a.cand_res[:, r], sign * a.tr_res[:, r])
    best = fwd[a.cand_set == p.sets - 1].max()
    return float(best + sign * a.fixed[r])


def _unreachable_set(problem: Problem) -> int | None:
    """The first set that no path of listed transitions from set 0 reaches, or None."""
    a = problem.arrays
    reach = np.isfinite(_sweep(problem, np.zeros(len(a.cand_set)), np.zeros(len(a.src)))[0])
    for k in range(problem.sets):
        if not reach[a.cand_set == k].any():
            return k
    return None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def explain_infeasible(problem: Problem) -> str:
    """Why no assembly meets the limits: a missing path, a limit below its minimum, or the mix."""
    k = _unreachable_set(problem)
    if k is not None:
        return (f"no assembly exists: set {k} cannot be reached from set 0 (no listed transition "
                f"joins a reachable candidate of set {k - 1} to a candidate of set {k})")
    mins = {r: min_achievable(problem, r) for r in problem.limited}
    too_low = [f"{r} limit {_fmt(problem.limits[r])} is below the smallest achievable {r} "
               f"{_fmt(m)}" for r, m in mins.items()
               if m > problem.limits[r] + tolerance(problem.limits[r])]
    if too_low:
        return "; ".join(too_low)
    each = ", ".join(f"{r} {_fmt(m)} (limit {_fmt(problem.limits[r])})" for r, m in mins.items())
    return f"each limit alone can be met but not all together; smallest achievable: {each}"


# ---------------------------------------------------------------------------------------------
# Exact reduction: drop every candidate and transition that cannot be part of a wanted answer.

@dataclass(frozen=True)
class _Reduction:
    keep_c: np.ndarray                          # (C,) bool
    keep_t: np.ndarray                          # (T,) bool
    known: list[tuple[float, tuple[str, ...]]]  # feasible, allowed assemblies met, best first
    bound: float = math.inf                     # upper bound on any feasible assembly's score


def _excluded(chosen: tuple[str, ...], exclude: Sequence[tuple[str, ...]]) -> bool:
    return any(set(ids) <= set(chosen) for ids in exclude)


def _reduce(p: Problem, n: int, exclude: Sequence[tuple[str, ...]]) -> _Reduction:
    """Prune what no feasible assembly among the n best can use, and find incumbents on the way.

    1. Resources: drop an element whose cheapest full path breaks a limit (per resource).
    2. Score: Lagrangian relaxation of the budget rows. For multipliers lam >= 0, an assembly
       that meets the limits and passes through element e scores at most
       UB(e) = max over paths P through e of (score(P) - lam . res(P)) + lam . (limit - fixed),
       a longest-path computation. lam is chosen to make the bound tight, and the heaviest
       path through each candidate at that lam supplies feasible assemblies; if the n-th best
       of those scores z, an element with UB(e) < z is on no assembly among the n best.
    """
    a = p.arrays
    lim = np.array([p.resources.index(r) for r in p.limited], dtype=np.int64)
    keep_c = np.ones(len(a.cand_set), dtype=bool)
    keep_t = np.ones(len(a.src), dtype=bool)
    tol = np.array([tolerance(a.limit[r]) for r in lim])
    for j, r in enumerate(lim if lim.size else [None]):
        cw = np.zeros(len(keep_c)) if r is None else -a.cand_res[:, r]
        tw = np.zeros(len(keep_t)) if r is None else -a.tr_res[:, r]
        (f, _), (b, _) = _sweep(p, cw, tw), _sweep(p, cw, tw, backward=True)
        cap = math.inf if r is None else a.limit[r] - a.fixed[r] + 2 * tol[j]
        keep_c &= -(f + b - cw) <= cap
        keep_t &= -(f[a.src] + tw + b[a.dst]) <= cap
    keep_t &= keep_c[a.src] & keep_c[a.dst]
    last = np.flatnonzero(a.cand_set == p.sets - 1)
    reach, _ = _sweep(p, np.where(keep_c, 0.0, -np.inf), np.where(keep_t, 0.0, -np.inf))
    if not np.isfinite(reach[last]).any():  # the limits together leave no path
        return _Reduction(np.zeros_like(keep_c), np.zeros_like(keep_t), [], -math.inf)

    scale = np.maximum(1.0, np.abs(a.limit[lim]))
    rho_c, rho_t = a.cand_res[:, lim] / scale, a.tr_res[:, lim] / scale
    beta = (a.limit[lim] + tol - a.fixed[lim]) / scale
    score_c = np.where(keep_c, a.cand_score, -np.inf)
    score_t = np.where(keep_t, a.tr_score, -np.inf)
    best_bound, best_lam = math.inf, np.zeros(lim.size)

    def dual(lam: np.ndarray) -> np.ndarray:
        """The Lagrangian bound at lam (kept if the best so far); returns its subgradient."""
        nonlocal best_bound, best_lam
        fwd, via = _sweep(p, score_c - rho_c @ lam, score_t - rho_t @ lam)
        end = last[np.argmax(fwd[last])]
        bound = float(fwd[end] + lam @ beta)
        if bound < best_bound:
            best_bound, best_lam = bound, lam.copy()
        cands, trans = _paths_through(p, np.array([end]), via, via)
        return beta - rho_c[cands[0]].sum(axis=0) - rho_t[trans[0]].sum(axis=0)

    lam = np.zeros(lim.size)
    dual(lam)
    # Coordinate-wise bisection on the convex dual: each multiplier in turn moves to where the
    # heaviest path stops breaking its own budget.
    for _ in range(1 if lim.size == 1 else 2):
        for j in range(lim.size):
            lam[j] = 0.0
            if dual(lam)[j] >= 0:
                continue
            lo, hi = 0.0, 1.0
            while True:
                lam[j] = hi
                if dual(lam)[j] >= 0 or hi > 1e12:
                    break
                lo, hi = hi, hi * 4
            for _ in range(30):
                lam[j] = (lo + hi) / 2
                if dual(lam)[j] >= 0:
                    hi = lam[j]
                else:
                    lo = lam[j]
            lam[j] = hi

    cw, tw = score_c - rho_c @ best_lam, score_t - rho_t @ best_lam
    (f, fvia), (b, bvia) = _sweep(p, cw, tw), _sweep(p, cw, tw, backward=True)
    ub_c = np.where(keep_c, f + b - np.where(keep_c, cw, 0.0), -np.inf) + best_lam @ beta
    ub_t = f[a.src] + tw + b[a.dst] + best_lam @ beta
    rows = np.flatnonzero(ub_c > -np.inf)
    cands, trans = _paths_through(p, rows, fvia, bvia)
    # Screen the traced paths with a vectorised score and budget check, then confirm the most
    # promising distinct ones exactly (the canonical sums decide feasibility).
    score = a.cand_score[cands].sum(axis=1) + a.tr_score[trans].sum(axis=1)
    use = a.cand_res[cands][:, :, lim].sum(axis=1) + a.tr_res[trans][:, :, lim].sum(axis=1)
    fits = np.all(use <= (a.limit[lim] + 2 * tol - a.fixed[lim]), axis=1)
    seen: set[tuple[str, ...]] = set()
    found: list[tuple[float, tuple[str, ...]]] = []
    for i in np.flatnonzero(fits)[np.argsort(-score[fits], kind="stable")]:
        chosen = tuple(p.candidates[c].id for c in cands[i])
        if chosen in seen:
            continue
        seen.add(chosen)
        objective, totals = p.evaluate(chosen)
        if p.meets_limits(totals) and not _excluded(chosen, exclude):
            found.append((objective, chosen))
            if len(found) == n:
                break
    found.sort(key=lambda zc: (-zc[0], zc[1]))
    if len(found) >= n:
        threshold = found[n - 1][0]
        margin = 1e-7 * (1.0 + abs(threshold) + abs(best_bound))
        keep_c &= ub_c >= threshold - margin
        keep_t &= (ub_t >= threshold - margin) & keep_c[a.src] & keep_c[a.dst]
    return _Reduction(keep_c, keep_t, found, best_bound)


# ---------------------------------------------------------------------------------------------
# The MIP.
class _Mip:
    """HiGHS model of the reduced problem; no-good rows can be added between solves."""

    def __init__(self, problem: Problem, n: int = 1, exclude: Sequence[tuple[str, ...]] = (),
                 reduce: bool = True) -> None:
        self.p = problem
        a = problem.arrays
        red = _reduce(problem, n, exclude) if reduce else _Reduction(
            np.ones(len(a.cand_set), dtype=bool), np.ones(len(a.src), dtype=bool), [])
        self.bound = red.bound
        cand, tr = np.flatnonzero(red.keep_c), np.flatnonzero(red.keep_t)
        self.cand = cand
        self.empty = np.bincount(a.cand_set[cand], minlength=problem.sets).min() == 0
        if self.empty:
            return
        n_c, n_t, last = cand.size, tr.size, problem.sets - 1
        col_of = np.full(len(a.cand_set), -1)
        col_of[cand] = np.arange(n_c)
        self.col_of = col_of
        cset = a.cand_set[cand]
        # Rows: one "choose exactly one" per set, flow out of every candidate before the last
        # set, flow into every candidate after the first, one budget row per limited resource.
        has_out, has_in = cset < last, cset > 0
        out_row = np.full(n_c, -1)
        out_row[has_out] = problem.sets + np.arange(has_out.sum())
        in_row = np.full(n_c, -1)
        in_row[has_in] = problem.sets + has_out.sum() + np.arange(has_in.sum())
        n_flow = problem.sets + int(has_out.sum() + has_in.sum())
        limited = [problem.resources.index(r) for r in problem.limited]
        cols_x, cols_y = np.arange(n_c), n_c + np.arange(n_t)
        src, dst = col_of[a.src[tr]], col_of[a.dst[tr]]
        rows = [cset, out_row[has_out], in_row[has_in], out_row[src], in_row[dst]]
        cols = [cols_x, cols_x[has_out], cols_x[has_in], cols_y, cols_y]
        vals = [np.ones(n_c), -np.ones(has_out.sum()), -np.ones(has_in.sum()),
                np.ones(n_t), np.ones(n_t)]
        upper = []
        # Budget rows are scaled by max(1, |limit|) so the solver's absolute tolerances act as
        # relative ones; the bound includes this module's feasibility tolerance.
        for j, r in enumerate(limited):
            scale = max(1.0, abs(a.limit[r]))
            coef = np.concatenate([a.cand_res[cand, r], a.tr_res[tr, r]]) / scale
            nz = np.flatnonzero(coef)
            rows.append(np.full(nz.size, n_flow + j))
            cols.append(nz)
            vals.append(coef[nz])
            upper.append((a.limit[r] - a.fixed[r]) / scale + FEAS_RTOL)
        row, col, val = (np.concatenate(x) for x in (rows, cols, vals))
        order = np.lexsort((row, col))
        n_col, n_row = n_c + n_t, n_flow + len(limited)
        start = np.concatenate([[0], np.cumsum(np.bincount(col, minlength=n_col))])[:-1]
        bound = np.concatenate([np.ones(problem.sets), np.zeros(n_flow - problem.sets)])
        # Only the choices x need be integral: with x binary the flow rows force y_ab = 1 for
        # the chosen consecutive pair (a, b) and 0 elsewhere.
        integrality = np.concatenate([np.ones(n_c), np.zeros(n_t)]).astype(np.int32)
        # Restarts cost more than they save on the small reduced models (bench_solver.py measures both).
        # Presolve off: highspy 1.16's presolve proved a suboptimal assembly of a reduced model optimal
        # (tests/data/highs_presolve.json); the reduced models are small, and exactness is the contract.
        self.h = exact_highs(mip_allow_restart=False, presolve="off")
        self.h.passModel(
            n_col, n_row, len(val), int(highspy.MatrixFormat.kColwise),
            int(highspy.ObjSense.kMaximize), 0.0,
            np.concatenate([a.cand_score[cand], a.tr_score[tr]]), np.zeros(n_col), np.ones(n_col),
            np.concatenate([bound, np.full(len(limited), -highspy.kHighsInf)]),
            np.concatenate([bound, upper]), start.astype(np.int32),
            row[order].astype(np.int32), val[order], integrality)
        if red.known:  # hand the best assembly the reduction met to HiGHS as its incumbent
            path = np.array([problem.index[i] for i in red.known[0][1]])
            on_path = ((path[a.cand_set[a.src[tr]]] == a.src[tr])
                       & (path[a.cand_set[a.dst[tr]]] == a.dst[tr]))
            value = np.concatenate([np.isin(cand, path), on_path]).astype(float)
            self.h.setSolution(n_col, np.arange(n_col, dtype=np.int32), value)
        for ids in exclude:
            self.forbid(ids)

    def _gap(self, objective: float, dual_bound: float) -> float | None:
        """Relative gap to the tighter of HiGHS's bound and the Lagrangian one (None if unknown)."""
        bound = min(dual_bound, self.bound)
        if not math.isfinite(bound) or objective == 0:
            return None
        return max(0.0, (bound - objective) / abs(objective))

    def forbid(self, chosen: Sequence[str]) -> None:
        """No-good cut: no assembly containing every id of `chosen` may be chosen again."""
        cols = self.col_of[[self.p.index[i] for i in chosen]]
        if (cols >= 0).all():  # otherwise the reduction already ruled it out
            self.h.addRow(-highspy.kHighsInf, len(cols) - 1.0, len(cols),
                          np.sort(cols).astype(np.int32), np.ones(len(cols)))

    def run(self, time_limit_s: float | None) -> Solution:
        """Solve; an incumbent breaking a limit by more than FEAS_RTOL is cut off and re-solved."""
        started = time.perf_counter()
        if self.empty:
            return Solution("infeasible")
        while True:
            spent = time.perf_counter() - started
            left = math.inf if time_limit_s is None else max(time_limit_s - spent, 0.0)
            self.h.setOptionValue("time_limit", left)
            self.h.run()
            status = self.h.getModelStatus()
            info = self.h.getInfo()
            if status in (highspy.HighsModelStatus.kInfeasible,
                          highspy.HighsModelStatus.kUnboundedOrInfeasible):
                return Solution("infeasible")
            if status == highspy.HighsModelStatus.kOptimal:
                label = "optimal"
            elif status == highspy.HighsModelStatus.kTimeLimit:
                label = "time_limit"
            else:
                raise DeryError(f"HiGHS stopped with status {self.h.modelStatusToString(status)}",
                                exit_code=FAILED)
            if info.primal_solution_status != highspy.kSolutionStatusFeasible:
                return Solution(label)
            x = np.asarray(self.h.getSolution().col_value)[: self.cand.size]
            picked = self.cand[x > 0.5]
            picked = picked[np.argsort(self.p.arrays.cand_set[picked])]
            chosen = tuple(self.p.candidates[c].id for c in picked)
            objective, totals = self.p.evaluate(chosen)
            if not self.p.meets_limits(totals):
                self.forbid(chosen)
                continue
            gap = 0.0 if label == "optimal" else self._gap(objective, info.mip_dual_bound)
            return Solution(label, chosen, objective, totals, gap=gap)


def _check_exclude(problem: Problem, exclude: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    out = []
    for n, ids in enumerate(exclude):
        ids = tuple(ids)
        for i in ids:
            if i not in problem.index:
                raise DeryError(f"exclude[{n}]: unknown candidate id {i!r}", exit_code=USAGE)
        out.append(ids)
    return out


def solve(problem: Problem, *, time_limit_s: float | None = None,
          exclude: Iterable[Sequence[str]] = (), reduce: bool = True) -> Solution:
    """The best assembly that meets every limit, proven optimal unless the time limit stops it.

    `exclude` lists assemblies (tuples of ids) that may not be chosen again. `reduce=False`
    hands HiGHS the whole model, skipping the exact reduction (to measure what it buys).
    """
    started = time.perf_counter()
    exclude = _check_exclude(problem, exclude)
    mip = _Mip(problem, 1, exclude, reduce)
    spent = time.perf_counter() - started
    found = mip.run(None if time_limit_s is None else time_limit_s - spent)
    if found.status == "infeasible":
        reason = explain_infeasible(problem)
        together = reason.startswith("each limit alone")
        if exclude and together and solve(problem).status != "infeasible":
            reason = f"every assembly that meets the limits is among the {len(exclude)} excluded"
        found = Solution("infeasible", reason=reason)
    return Solution(found.status, found.chosen, found.objective, found.totals,
                    (time.perf_counter() - started) * 1e3, found.gap, found.reason)


def best_solutions(problem: Problem, n: int, time_limit_s: float | None = None,
                   exclude: Iterable[Sequence[str]] = ()) -> list[Solution]:
    """The n best distinct assemblies, best first (fewer if fewer exist), none of `exclude`.

    Each one after the first is the optimum once all earlier ones are cut off; the time limit
    covers the whole enumeration, which stops after the first answer not proven optimal. Equal
    objectives are ordered by their ids, so the order does not depend on HiGHS's search path.
    """
    if n < 1:
        return []
    started = time.perf_counter()
    mip = _Mip(problem, n, _check_exclude(problem, exclude))
    found: list[Solution] = []
    while len(found) < n:
        t0 = time.perf_counter()
        left = None if time_limit_s is None else time_limit_s - (t0 - started)
        sol = mip.run(left)
        if not sol.chosen:
            break
        found.append(Solution(sol.status, sol.chosen, sol.objective, sol.totals,
                              (time.perf_counter() - t0) * 1e3, sol.gap))
        if sol.status != "optimal":
            break
        mip.forbid(sol.chosen)
    return sorted(found, key=lambda s: (-s.objective, s.chosen))


def solve_file(path: str, time_limit_s: float | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of solving a problem file.

    0: solved (stdout is the solution JSON); 1: no assembly (infeasible, or the time limit came
    first; the reason on stderr, the solution JSON still on stdout); 2: unreadable file, invalid
    JSON or an invalid problem (stderr names the file and the line/column or field).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return USAGE, "", f"{path}: cannot read: {e.strerror or e}\n"
    except UnicodeDecodeError as e:
        return USAGE, "", f"{path}: not UTF-8 text: {e.reason} at byte {e.start}\n"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return USAGE, "", f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}\n"
    try:
        solution = solve(Problem.from_json(data), time_limit_s=time_limit_s)
    except DeryError as e:
        return e.exit_code, "", f"{path}: {e}\n"
    out = json.dumps(solution.to_json()) + "\n"
    if solution.status == "infeasible":
        return FAILED, out, f"{path}: infeasible: {solution.reason}\n"
    if not solution.chosen:
        return FAILED, out, f"{path}: time limit reached before any feasible assembly was found\n"
    return 0, out, ""

