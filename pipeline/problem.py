"""The reassembly problem format ("dery.problem/1"): candidates, transitions, limits, and its validation.

A problem is a layered graph: `sets` layers of candidate blocks and transitions (adapters) between consecutive
layers. An assembly is a path through all layers; it is feasible when every limited resource total (fixed + blocks
+ adapters) is within its limit, and the best one maximises the summed score. `dery.solver` answers it.

Exactness conventions, shared by every function that sums an assembly, so that results compare exactly:
* totals and objective are accumulated left to right with float addition: fixed (for totals)
  or 0.0 (for the objective), then the chosen candidates in set order, then the chosen
  transitions in set order;
* an assembly meets a limit when total <= limit + FEAS_RTOL * max(1, |limit|).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from dery.errors import USAGE, DeryError

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


def tolerance(limit: float) -> float:
    """How far a total may exceed `limit` and still meet it."""
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
        return all(totals[r] <= self.limits[r] + tolerance(self.limits[r]) for r in self.limited)


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

