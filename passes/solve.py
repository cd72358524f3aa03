"""The reassembly mixed-integer program: pick one block per set, joined by listed transitions.

A problem ("dery.problem/1") is a layered graph: `sets` layers of candidate blocks and
transitions (adapters) between consecutive layers. An assembly is a path through all layers;
it is feasible when every limited resource total (fixed + blocks + adapters) is within its
limit, and the best one maximises the summed score. `solve` answers it exactly with HiGHS;
`brute_force` enumerates for checking; `random_problem` makes realistic instances.

Exactness conventions, shared by every function here so that results compare exactly:
* totals and objective are accumulated left to right with float addition: fixed (for totals)
  or 0.0 (for the objective), then the chosen candidates in set order, then the chosen
  transitions in set order;
* an assembly meets a limit when total <= limit + FEAS_RTOL * max(1, |limit|).
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import highspy
import numpy as np
from dery.errors import FAILED, USAGE, DeryError
from dery.highs import exact_highs
from dery.ir import Partition
from dery.passes.profile import Costs
from dery.passes.proxy import Quality
from dery.passes.stitch import Stitches
from dery.profile_store import Calibration

SCHEMA = "dery.problem/1"
STANDARD_RESOURCES = ("latency_ms", "params", "flops")
FEAS_RTOL = 1e-9
_CANDIDATE_KEYS = ("id", "set", "score")
_TRANSITION_KEYS = ("from", "to", "score")


def _bad(path: str, message: str) -> DeryError:
    return DeryError(f"{path}: {message}", exit_code=USAGE)


def _number(value: Any, path: str, *, nonnegative: bool) -> float:
    """A finite JSON number (bools are not numbers), optionally >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, f"must be a number, got {json.dumps(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        shown = json.dumps(value)
        raise _bad(path, f"must be finite, got {shown if len(shown) < 24 else shown[:20] + '...'}")
    if nonnegative and number < 0:
        raise _bad(path, f"must be >= 0, got {value}")
    return number


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(path, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise _bad(path, f"must be a list, got {type(value).__name__}")
    return value


def _tolerance(limit: float) -> float:
    return FEAS_RTOL * max(1.0, abs(limit))


@dataclass(frozen=True)
class Candidate:
    """One block: the part of a pretrained model that can fill set `set`."""

    id: str
    set: int
    score: float
    resources: Mapping[str, float] = field(default_factory=dict, hash=False)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict:
        return {"id": self.id, "set": self.set, **self.resources, "score": self.score, **self.extra}


@dataclass(frozen=True)
class Transition:
    """An allowed junction (usually an adapter) from a block of set k to one of set k+1."""

    source: str
    target: str
    score: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict, hash=False)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict:
        return {"from": self.source, "to": self.target, **self.resources, "score": self.score,
                **self.extra}


@dataclass(frozen=True)
class _Segments:
    """Transitions of one layer grouped by the candidate at one end, for `reduceat`."""

    order: np.ndarray   # transition indices, grouped
    keys: np.ndarray    # the candidate of each group, ascending
    starts: np.ndarray  # where each group starts in `order`


def _segments(end: np.ndarray, ts: np.ndarray) -> _Segments:
    order = ts[np.argsort(end[ts], kind="stable")]
    keys = end[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if order.size else order
    return _Segments(order, keys[starts], starts)


@dataclass(frozen=True)
class _Arrays:
    """The problem as index and value arrays, resources in `Problem.resources` order."""

    cand_set: np.ndarray      # (C,) set of each candidate
    cand_score: np.ndarray    # (C,)
    cand_res: np.ndarray      # (C, R)
    src: np.ndarray           # (T,) candidate index a transition leaves
    dst: np.ndarray           # (T,) candidate index it enters
    tr_score: np.ndarray      # (T,)
    tr_res: np.ndarray        # (T, R)
    fixed: np.ndarray         # (R,)
    limit: np.ndarray         # (R,) +inf where unlimited


@dataclass(frozen=True)
class Problem:
    """A validated reassembly problem; construct it with `from_json` or directly.

    Construction checks the cross-references (sets in range, unique ids, transitions between
    consecutive sets, every set populated) and raises DeryError(exit_code=2) naming the field.
    """

    sets: int
    candidates: tuple[Candidate, ...]
    transitions: tuple[Transition, ...]
    fixed: Mapping[str, float] = field(default_factory=dict, hash=False)
    limits: Mapping[str, float | None] = field(default_factory=dict, hash=False)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.sets, bool) or not isinstance(self.sets, int) or self.sets < 1:
            raise _bad("sets", f"must be an integer >= 1, got {json.dumps(self.sets)}")
        first_at: dict[str, int] = {}
        for i, c in enumerate(self.candidates):
            if c.id in first_at:
                raise _bad(f"candidates[{i}].id", f"duplicate id {json.dumps(c.id)} "
                                                   f"(first at candidates[{first_at[c.id]}])")
            first_at[c.id] = i
            if not 0 <= c.set < self.sets:
                raise _bad(f"candidates[{i}].set", f"{c.set} is out of range 0..{self.sets - 1}")
        populated = {c.set for c in self.candidates}
        for k in range(self.sets):
            if k not in populated:
                raise _bad("candidates", f"set {k} has no candidates (sets is {self.sets})")
        seen: dict[tuple[str, str], int] = {}
        for i, t in enumerate(self.transitions):
            for key, ref in (("from", t.source), ("to", t.target)):
                if ref not in first_at:
                    raise _bad(f"transitions[{i}].{key}", f"unknown candidate id {json.dumps(ref)}")
            a = self.candidates[first_at[t.source]].set
            b = self.candidates[first_at[t.target]].set
            if b != a + 1:
                raise _bad(f"transitions[{i}]",
                           f"{json.dumps(t.source)} (set {a}) -> {json.dumps(t.target)} (set {b}) "
                           f"does not join set k to set k+1")
            if (t.source, t.target) in seen:
                raise _bad(f"transitions[{i}]",
                           f"duplicate of transitions[{seen[t.source, t.target]}]")
            seen[t.source, t.target] = i
        known = {*STANDARD_RESOURCES, *self.fixed}
        for c in self.candidates:
            known.update(c.resources)
        for t in self.transitions:
            known.update(t.resources)
        for name in self.limits:
            if name not in known:
                raise _bad(f"limits.{name}",
                           f"unknown resource; known: {', '.join(sorted(known))} "
                           f"(a resource must be standard, in fixed, or on a candidate)")

    @property
    def resources(self) -> tuple[str, ...]:
        """The standard resources, then any others named by limits or fixed, in that order."""
        names = dict.fromkeys(STANDARD_RESOURCES)
        names.update(dict.fromkeys(self.limits))
        names.update(dict.fromkeys(self.fixed))
        return tuple(names)

    @property
    def limited(self) -> tuple[str, ...]:
        """Resources with a (non-null) limit."""
        return tuple(r for r in self.resources if self.limits.get(r) is not None)

    @cached_property
    def index(self) -> dict[str, int]:
        """Candidate id -> position in `candidates`."""
        return {c.id: i for i, c in enumerate(self.candidates)}

    @cached_property
    def arrays(self) -> _Arrays:
        """The problem as numpy arrays, built once, for the sweeps and the MIP."""
        res, cands, trans = self.resources, self.candidates, self.transitions

        def table(items: Sequence[Candidate | Transition]) -> np.ndarray:
            # One list per resource converts far faster than one short list per item.
            return np.array([[i.resources.get(r, 0.0) for i in items] for r in res],
                            dtype=float).reshape(len(res), len(items)).T

        return _Arrays(
            cand_set=np.array([c.set for c in cands], dtype=np.int64),
            cand_score=np.array([c.score for c in cands], dtype=float),
            cand_res=table(cands),
            src=np.array([self.index[t.source] for t in trans], dtype=np.int64),
            dst=np.array([self.index[t.target] for t in trans], dtype=np.int64),
            tr_score=np.array([t.score for t in trans], dtype=float),
            tr_res=table(trans),
            fixed=np.array([self.fixed.get(r, 0.0) for r in res], dtype=float),
            limit=np.array([math.inf if self.limits.get(r) is None else self.limits[r]
                            for r in res], dtype=float),
        )

    @cached_property
    def layers(self) -> tuple[tuple[_Segments, _Segments], ...]:
        """Per layer k (set k to k+1): its transitions grouped by target and by source."""
        a = self.arrays
        layer_of = a.cand_set[a.src]
        return tuple((_segments(a.dst, ts), _segments(a.src, ts))
                     for ts in (np.flatnonzero(layer_of == k) for k in range(self.sets - 1)))

    @cached_property
    def transition_of(self) -> dict[tuple[str, str], Transition]:
        """(from id, to id) -> the listed transition."""
        return {(t.source, t.target): t for t in self.transitions}

    @classmethod
    def from_json(cls, data: Any) -> Problem:
        """Parse and validate a "dery.problem/1" document (already decoded from JSON)."""
        data = _object(data, "problem")
        if data.get("schema") != SCHEMA:
            raise _bad("schema",
                       f"expected {json.dumps(SCHEMA)}, got {json.dumps(data.get('schema'))}")
        for key in ("sets", "candidates", "transitions", "limits"):
            if key not in data:
                raise _bad(key, "missing")
        # fixed may be negative: a calibration intercept takes back per-block call overheads
        fixed = {k: _number(v, f"fixed.{k}", nonnegative=False)
                 for k, v in _object(data.get("fixed", {}), "fixed").items()}
        limits = {k: None if v is None else _number(v, f"limits.{k}", nonnegative=True)
                  for k, v in _object(data["limits"], "limits").items()}
        resources = set(STANDARD_RESOURCES) | set(fixed) | set(limits)

        def split(item: dict, path: str, keys: tuple[str, ...]) -> tuple[dict, dict]:
            res = {k: _number(v, f"{path}.{k}", nonnegative=True)
                   for k, v in item.items() if k in resources}
            extra = {k: v for k, v in item.items() if k not in resources and k not in keys}
            return res, extra

        candidates = []
        for i, item in enumerate(_list(data["candidates"], "candidates")):
            path = f"candidates[{i}]"
            item = _object(item, path)
            for key in _CANDIDATE_KEYS:
                if key not in item:
                    raise _bad(f"{path}.{key}", "missing")
            if not isinstance(item["id"], str) or not item["id"]:
                raise _bad(f"{path}.id",
                           f"must be a non-empty string, got {json.dumps(item['id'])}")
            k = item["set"]
            if isinstance(k, bool) or not isinstance(k, int):
                raise _bad(f"{path}.set", f"must be an integer, got {json.dumps(k)}")
            res, extra = split(item, path, _CANDIDATE_KEYS)
            candidates.append(Candidate(item["id"], k, _number(item["score"], f"{path}.score",
                                                               nonnegative=False), res, extra))
        transitions = []
        for i, item in enumerate(_list(data["transitions"], "transitions")):
            path = f"transitions[{i}]"
            item = _object(item, path)
            for key in ("from", "to"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"{path}.{key}",
                               f"must be a candidate id, got {json.dumps(item.get(key))}")
            res, extra = split(item, path, _TRANSITION_KEYS)
            score = _number(item.get("score", 0.0), f"{path}.score", nonnegative=False)
            transitions.append(Transition(item["from"], item["to"], score, res, extra))
        extra = {k: v for k, v in data.items()
                 if k not in ("schema", "sets", "candidates", "transitions", "fixed", "limits")}
        return cls(data["sets"], tuple(candidates), tuple(transitions), fixed, limits, extra)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "sets": self.sets,
                "candidates": [c.to_json() for c in self.candidates],
                "transitions": [t.to_json() for t in self.transitions],
                "fixed": dict(self.fixed), "limits": dict(self.limits), **self.extra}

    def evaluate(self, chosen: Sequence[str]) -> tuple[float, dict[str, float]]:
        """(objective, totals) of an assembly, accumulated in the module's canonical order.

        `chosen` is one id per set in set order; a pair that is not listed raises KeyError.
        """
        cands = [self.candidates[self.index[i]] for i in chosen]
        trans = [self.transition_of[a, b] for a, b in zip(chosen, chosen[1:])]
        objective = 0.0
        for item in (*cands, *trans):
            objective += item.score
        totals = {}
        for r in self.resources:
            total = self.fixed.get(r, 0.0)
            for item in (*cands, *trans):
                total += item.resources.get(r, 0.0)
            totals[r] = total
        return objective, totals

    def meets_limits(self, totals: Mapping[str, float]) -> bool:
        """Whether totals meet every limit, within FEAS_RTOL (the one feasibility test used)."""
        return all(totals[r] <= self.limits[r] + _tolerance(self.limits[r]) for r in self.limited)


@dataclass(frozen=True)
class Solution:
    """The answer: status "optimal" | "time_limit" | "infeasible", chosen ids in set order.

    `totals` follow the canonical accumulation order (see the module docstring); `gap` is the
    relative MIP gap HiGHS proved (0 when optimal); `reason` explains an infeasible answer.
    """

    status: str
    chosen: tuple[str, ...] = ()
    objective: float | None = None
    totals: Mapping[str, float] | None = field(default=None, hash=False)
    solve_ms: float = 0.0
    gap: float | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        out = {"status": self.status, "chosen": list(self.chosen), "objective": self.objective,
               "totals": None if self.totals is None else dict(self.totals),
               "solve_ms": round(self.solve_ms, 3), "gap": self.gap}
        if self.status == "infeasible":
            out["reason"] = self.reason
        return out


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
               if m > problem.limits[r] + _tolerance(problem.limits[r])]
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
    tol = np.array([_tolerance(a.limit[r]) for r in lim])
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
        self.h = exact_highs(mip_allow_restart=False)
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
    covers the whole enumeration, which stops after the first answer not proven optimal.
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
    return found


# ---------------------------------------------------------------------------------------------
# Reference enumeration and instance generator.

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


def activation_mb(nbytes: int, batch: int) -> float:
    """Peak activation memory in MB at a batch size, from bytes at batch 1."""
    return nbytes * batch / 1e6


def search_problem(partition: Partition, costs: Costs, quality: Quality, stitches: Stitches, *,
                   limits: Mapping[str, float | None], calibration: Calibration, memory_mb: float | None = None,
                   batch: int = 1) -> Problem:
    """The reassembly search space as a dery.problem/1 instance.

    A candidate is model m's block in set k, entered from model p's block in set k - 1 (ids
    `assembly_ids` gives), so that a transition `a[j] -> b[j+1]` knows the model before a and
    prices its boundary with its context: what the boundary adds in context
    (`Costs.boundary_ms`) plus what it adds together with the boundary before it
    (`Costs.context_ms`); a candidate's latency is its block median. Both go through the
    target's additivity calibration, which is linear, so the program stays exact. Peak
    activation memory is a maximum over the pieces, not a sum, so `memory_mb` removes the
    pieces above it instead of adding a row.
    """
    cal = calibration
    fitting: dict[int, list[str]] = {}
    for k in range(partition.k):
        fitting[k] = [m for m in partition.models
                      if memory_mb is None or activation_mb(partition.block(m, k).activation_bytes, batch) <= memory_mb]
        if not fitting[k]:
            least = min(activation_mb(partition.block(m, k).activation_bytes, batch) for m in partition.models)
            raise DeryError(f"no block of set {k} fits --memory-limit-mb {memory_mb:g}: the smallest needs "
                            f"{least:.3g} MB of activations at batch {batch}")
    joins: dict[tuple[str, str, int], tuple[float, dict, dict]] = {}
    for j in range(partition.k - 1):
        for a in fitting[j]:
            for b in fitting[j + 1]:
                if a == b:
                    joins[a, b, j] = (0.0, {"params": 0.0, "flops": 0.0}, {})
                    continue
                st = stitches.get(a, b, j)
                if st is None:
                    continue
                act = activation_mb(stitch_activation_bytes(stitches, a, b, j), batch)
                if memory_mb is None or act <= memory_mb:
                    joins[a, b, j] = (quality.pairwise[a, b, j], {"params": float(st.params), "flops": float(st.flops)},
                                      {"kind": st.kind, "r2": round(st.r2, 6), "activation_mb": round(act, 6)})
    entries = {(m, 0, None) for m in fitting[0]} | {(b, j + 1, a) for a, b, j in joins}
    for k in range(1, partition.k):
        if not any(e[1] == k for e in entries):
            raise DeryError(f"no block of set {k} can follow one of set {k - 1} within --memory-limit-mb "
                            f"{memory_mb:g}: every stitch between them needs more activation memory")
    candidates = []
    for m, k, before in sorted(entries, key=lambda e: (e[1], partition.models.index(e[0]), str(e[2]))):
        block, rec = partition.block(m, k), costs.blocks[m, k]
        candidates.append(Candidate(
            _candidate_id(m, k, before), k, quality.unary[m, k],
            {"latency_ms": cal.block_scale * rec.median_ms, "params": float(block.params), "flops": float(block.flops)},
            {"model": m, "activation_mb": round(activation_mb(block.activation_bytes, batch), 6),
             **({"estimated": True} if rec.estimated else {})}))
    latency, extras = {}, {}
    for (a, b, j), (_, _, extra) in joins.items():
        for before in [None] if j == 0 else [p for p in fitting[j - 1] if (p, a, j - 1) in joins]:
            used = [costs.joints[a, b, j]]
            added = costs.boundary_ms(a, b, j)
            if before is not None:
                used.append(costs.triples[before, a, b, j - 1])
                added += costs.context_ms(before, a, b, j - 1)
            latency[before, a, b, j] = cal.boundary_ms(added, a != b)
            extras[before, a, b, j] = {**extra, **({"estimated": True} if any(r.estimated for r in used) else {})}
    # Every assembly crosses exactly K-1 boundaries, so lifting each by the largest saving and lowering the
    # fixed latency by K-1 times it keeps every total exact and every figure non-negative, as the format needs.
    lift = max(0.0, -min(latency.values(), default=0.0))
    transitions = [Transition(_candidate_id(a, j, before), _candidate_id(b, j + 1, a), joins[a, b, j][0],
                              {"latency_ms": ms + lift, **joins[a, b, j][1]}, extras[before, a, b, j])
                   for (before, a, b, j), ms in latency.items()]
    fixed = {"latency_ms": cal.intercept_ms - (partition.k - 1) * lift, "params": 0.0, "flops": 0.0}
    return Problem(partition.k, tuple(candidates), tuple(transitions), fixed, dict(limits))


def _candidate_id(model: str, k: int, before: str | None) -> str:
    return f"{model}[{k}]" if before is None else f"{model}[{k}]<{before}"


def assembly_ids(models: Sequence[str]) -> list[str]:
    """The candidate ids of an assembly in a `search_problem`: each block with the model it is entered from."""
    return [_candidate_id(m, k, models[k - 1] if k else None) for k, m in enumerate(models)]


def stitch_activation_bytes(stitches: Stitches, a: str, b: str, j: int) -> int:
    """A stitch holds its input and its output (batch 1, float32)."""
    module = stitches.modules[a, b, j]
    return 4 * (math.prod(module.src.shape[1:]) + math.prod(module.dst.shape[1:]))


def chosen_models(solution: Solution) -> tuple[str, ...]:
    """The model of each set in a solution of a `search_problem` (the inverse of `assembly_ids`: each id ends
    with its set and the model before it, which the previous id gave)."""
    models: list[str] = []
    for k, cid in enumerate(solution.chosen):
        suffix = _candidate_id("", k, models[-1] if models else None)
        if not cid.endswith(suffix):
            raise DeryError(f"internal: {cid!r} is not a candidate of set {k} after {models}")
        models.append(cid[:-len(suffix)])
    return tuple(models)
