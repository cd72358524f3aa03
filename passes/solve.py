"""The DeRy search space as a `dery.problem/1` problem: candidates from blocks, transitions from stitches and costs.

A candidate is model m's block in set k entered from model p's block in set k - 1 (its `CandidateKey`); the
problem's ids are strings, and the `SearchSpace` keeps the key of each id, so that nothing parses an id back.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dery.errors import DeryError
from dery.ir import Partition
from dery.passes.profile import Costs
from dery.passes.proxy import Quality
from dery.passes.stitch import Stitches
from dery.problem import Candidate, Problem, Solution, Transition
from dery.profile_store import Calibration


@dataclass(frozen=True)
class CandidateKey:
    """Model `model`'s block in set `set`, entered from model `before`'s block of the set before (None in set 0)."""

    model: str
    set: int
    before: str | None = None

    @property
    def id(self) -> str:
        """The candidate's id in the problem."""
        return f"{self.model}[{self.set}]" if self.before is None else f"{self.model}[{self.set}]<{self.before}"


@dataclass(frozen=True)
class SearchSpace:
    """A search problem and the key of each of its candidate ids."""

    problem: Problem
    keys: Mapping[str, CandidateKey]


def activation_mb(nbytes: int, batch: int) -> float:
    """Peak activation memory in MB at a batch size, from bytes at batch 1."""
    return nbytes * batch / 1e6


def search_problem(partition: Partition, costs: Costs, quality: Quality, stitches: Stitches, *,
                   limits: Mapping[str, float | None], calibration: Calibration, memory_mb: float | None = None,
                   batch: int = 1) -> SearchSpace:
    """The reassembly search space as a dery.problem/1 instance, with the key of each candidate.

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
    candidates, keys = [], {}
    for m, k, before in sorted(entries, key=lambda e: (e[1], partition.models.index(e[0]), str(e[2]))):
        block, rec = partition.block(m, k), costs.blocks[m, k]
        key = CandidateKey(m, k, before)
        keys[key.id] = key
        candidates.append(Candidate(
            key.id, k, quality.unary[m, k],
            {"latency_ms": cal.block_scale * rec.median_ms, "params": float(block.params), "flops": float(block.flops)},
            {"model": m, "activation_mb": round(activation_mb(block.activation_bytes, batch), 6),
             **({"estimated": True} if rec.estimated else {})}))
    latency, extras = {}, {}
    for (a, b, j), (_, _, extra) in joins.items():
        for before in [None] if j == 0 else [p for p in fitting[j - 1] if (p, a, j - 1) in joins]:
            used = [costs.joints.get((a, b, j))]
            added = costs.boundary_ms(a, b, j)
            if before is not None:
                used.append(costs.triples.get((before, a, b, j - 1)))
                added += costs.context_ms(before, a, b, j - 1)
            latency[before, a, b, j] = cal.boundary_ms(added, a != b)
            extras[before, a, b, j] = {**extra, **({"estimated": True} if any(r and r.estimated for r in used) else {}),
                                       **({"unmeasured": True} if None in used else {})}
    # Every assembly crosses exactly K-1 boundaries, so lifting each by the largest saving and lowering the
    # fixed latency by K-1 times it keeps every total exact and every figure non-negative, as the format needs.
    lift = max(0.0, -min(latency.values(), default=0.0))
    transitions = [Transition(CandidateKey(a, j, before).id, CandidateKey(b, j + 1, a).id, joins[a, b, j][0],
                              {"latency_ms": ms + lift, **joins[a, b, j][1]}, extras[before, a, b, j])
                   for (before, a, b, j), ms in latency.items()]
    fixed = {"latency_ms": cal.intercept_ms - (partition.k - 1) * lift, "params": 0.0, "flops": 0.0}
    return SearchSpace(Problem(partition.k, tuple(candidates), tuple(transitions), fixed, dict(limits)), keys)



def assembly_ids(models: Sequence[str]) -> list[str]:
    """The candidate ids of an assembly in a `search_problem`: each block with the model it is entered from."""
    return [CandidateKey(m, k, models[k - 1] if k else None).id for k, m in enumerate(models)]


def stitch_activation_bytes(stitches: Stitches, a: str, b: str, j: int) -> int:
    """A stitch holds its input and its output (batch 1, float32)."""
    module = stitches.modules[a, b, j]
    return 4 * (math.prod(module.src.shape[1:]) + math.prod(module.dst.shape[1:]))



def chosen_models(space: SearchSpace, solution: Solution) -> tuple[str, ...]:
    """The model of each set in a solution of `space.problem`."""
    return tuple(space.keys[i].model for i in solution.chosen)
