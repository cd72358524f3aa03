"""partition: cut every network into K blocks so that the k-th blocks form equivalence set k.

Each network gets K-1 boundaries among its boundary cuts, strictly increasing; set 0
holds the stems (input .. boundary 1), set K-1 the heads (boundary K-1 .. logits).

Objective, DeRy's cover-set objective: the similarity of two blocks is
CKA(first cut of A, first cut of B) + CKA(last cut of A, last cut of B), summed over
the sets and over every pair of models. Block k's last cut is block k+1's first cut,
so this is

    objective = pairs * 1 + 2 * sum_{j=1..K-1} sum_{a<b} CKA(boundary_j(a), boundary_j(b))

where the constant counts the shared network input (CKA 1) that every pair of stems
starts from. The heads' logit-logit term is left out: logits are not cut points and
have no CKA in the matrix, and it would add the same amount to every partition.
Nothing compares stage indices, so any cut may be matched with any other.

Balance: every block holds at most `max_share` of its network's cost (params, FLOPs
or latency). Shares are measured on the decomposition of the network into segments
between consecutive boundary cuts, so they are additive and the cap is linear in the
choice; for params this equals the blocks' own counts unless segments share weights.

Solver: an exact HiGHS MIP (no restarts, no heuristics deciding the answer):
* z[m, j, c] = 1 when model m's j-th boundary is its candidate c; one per (m, j);
  candidates that no balanced partition can put at boundary j are never created;
* order and balance are implications between boundaries, written on cumulative
  sums Z[m, j, c] = sum_{c' <= c} z[m, j, c'] (tight: one model's rows describe
  exactly the convex hull of its balanced partitions):
    b_j <= c  =>  b_{j-1} <= c - 1           Z[j, c] <= Z[j-1, c-1]
    b_j >= c  =>  b_{j-1} >= lo(c)           Z[j-1, lo(c)-1] <= Z[j, c-1]
  with lo(c) the first candidate whose block up to c is within the cap;
* w[a, b, j, c, d] in [0, 1] pays CKA(c of a, d of b); sum_d w <= z[a, j, c] and
  sum_c w <= z[b, j, d]. With every paid coefficient >= 0 (the matrix is shifted
  by its minimum if that is negative, a constant per pair and boundary) the
  maximisation puts w = 1 exactly on the chosen pair, so the model is exact.
Single thread, fixed seed, zero gap: the same inputs give the same partition.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highspy
import numpy as np
from dery import defaults
from dery.errors import FAILED, USAGE, DeryError, InternalError
from dery.highs import exact_highs
from dery.ir import Partition

if TYPE_CHECKING:
    from dery.passes.lower import Lowered
    from dery.passes.similarity import Similarity

SHARE_TOL = 1e-9  # a block fits when its share <= max_share + SHARE_TOL
BRUTE_FORCE_LIMIT = 10_000_000  # partitions brute_force_partition will enumerate
Choice = tuple[tuple[int, ...], ...]  # per model, its K-1 boundaries as candidate positions


@dataclass(frozen=True, eq=False)
class PartitionProblem:
    """What the partition depends on, free of torch.

    `sim` is the P x P CKA matrix over all points; `groups[m]` lists model m's
    candidate cuts as point indices in network order; `cum[m][c]` is the fraction
    of model m's cost up to and including candidate c (non-decreasing, in [0, 1]).
    `balance` only names the cost in messages.
    """

    sim: np.ndarray
    groups: tuple[np.ndarray, ...]
    cum: tuple[np.ndarray, ...]
    k: int
    max_share: float
    names: tuple[str, ...]
    balance: str = defaults.BALANCE

    def __post_init__(self) -> None:
        sim = np.array(self.sim, dtype=float)
        groups = tuple(np.array(g, dtype=np.int64).reshape(-1) for g in self.groups)
        cum = tuple(np.array(c, dtype=float).reshape(-1) for c in self.cum)
        if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or not np.isfinite(sim).all():
            raise ValueError(f"sim must be a finite square matrix, got shape {sim.shape}")
        if not len(groups) == len(cum) == len(self.names):
            raise ValueError("groups, cum and names must have one entry per model")
        for name, g, c in zip(self.names, groups, cum):
            if g.shape != c.shape:
                raise ValueError(f"{name}: {g.size} candidates but {c.size} cumulative costs")
            if g.size and (g.min() < 0 or g.max() >= sim.shape[0]):
                raise ValueError(f"{name}: point index out of range")
            if c.size and (c[0] < 0 or c[-1] > 1 or (np.diff(c) < 0).any()):
                raise ValueError(f"{name}: cumulative costs must be non-decreasing within [0, 1]")
        for arr in (sim, *groups, *cum):
            arr.flags.writeable = False
        object.__setattr__(self, "sim", sim)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "cum", cum)
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def pairs(self) -> int:
        return len(self.groups) * (len(self.groups) - 1) // 2


@dataclass(frozen=True)
class PartitionSolution:
    """K-1 candidate positions per model, the full objective, and how it was proven."""

    choice: Choice
    objective: float
    status: str
    gap: float | None
    solve_ms: float


def _ext(cum: np.ndarray) -> np.ndarray:
    """Cumulative fractions with the network input (0) and logits (1) at both ends."""
    return np.concatenate([[0.0], cum, [1.0]])


def _fits(cum: np.ndarray, max_share: float) -> np.ndarray:
    """fits[p, q]: a block from extended position p to q (p < q) is within the cap."""
    ext = _ext(cum)
    n = ext.size
    return (np.arange(n)[:, None] < np.arange(n)[None, :]) & (ext[None, :] - ext[:, None] <= max_share + SHARE_TOL)


def _allowed(cum: np.ndarray, k: int, max_share: float) -> np.ndarray:
    """allowed[j, c]: some balanced partition puts boundary j+1 at candidate c."""
    fits = _fits(cum, max_share)
    n = cum.size + 2
    pos = np.arange(n)
    inner = (pos > 0) & (pos < n - 1)
    fwd = np.zeros((k + 1, n), dtype=bool)
    bwd = np.zeros((k + 1, n), dtype=bool)
    fwd[0, 0] = bwd[k, n - 1] = True
    for j in range(1, k + 1):
        fwd[j] = (fwd[j - 1][:, None] & fits).any(axis=0) & (inner if j < k else pos == n - 1)
    for j in range(k - 1, -1, -1):
        bwd[j] = (fits & bwd[j + 1][None, :]).any(axis=1) & (inner if j > 0 else pos == 0)
    return (fwd & bwd)[1:k, 1:-1]


def _min_max(cum: np.ndarray, k: int) -> tuple[float, tuple[int, ...]]:
    """Smallest achievable largest block share with k blocks, and a partition achieving it."""
    ext = _ext(cum)
    n = ext.size
    if cum.size < k - 1:
        return math.inf, ()
    span = np.where(np.arange(n)[:, None] < np.arange(n)[None, :], ext[None, :] - ext[:, None], np.inf)
    best = np.full(n, np.inf)
    best[0] = 0.0
    back = []
    for j in range(1, k + 1):
        worst = np.maximum(best[:, None], span)
        arg = worst.argmin(axis=0)
        best = worst[arg, np.arange(n)]
        best[0] = np.inf
        if j < k:
            best[-1] = np.inf
        back.append(arg)
    pos, choice = n - 1, []
    for arg in reversed(back[1:]):
        pos = int(arg[pos])
        choice.append(pos - 1)
    return float(best[-1]), tuple(reversed(choice))


def min_max_share(cum: np.ndarray, k: int) -> float:
    """The smallest largest-block share any partition of a network into k blocks achieves.

    The linear partition problem over the network's candidate cuts (cumulative cost
    fractions `cum`), solved by dynamic programming; inf if there are fewer than k-1 cuts.
    """
    return _min_max(np.asarray(cum, dtype=float), k)[0]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _check(problem: PartitionProblem) -> list[np.ndarray]:
    """Per model the candidates each boundary may use; DeryError when no partition exists."""
    k = problem.k
    if k < 1:
        raise DeryError(f"the number of blocks K must be at least 1, got {k}", exit_code=USAGE)
    if not problem.groups:
        raise DeryError("cannot partition an empty zoo", exit_code=USAGE)
    short = [(name, g.size) for name, g in zip(problem.names, problem.groups) if g.size < k - 1]
    if short:
        listing = "; ".join(f"{name} has only {n} boundary cut{'s' * (n != 1)}" for name, n in short)
        raise DeryError(f"{listing}; {k} blocks need {k - 1} boundaries per network (choose a smaller --k)",
                        exit_code=USAGE)
    needs = [(name, min_max_share(c, k)) for name, c in zip(problem.names, problem.cum)]
    blocked = [(name, need) for name, need in needs if need > problem.max_share + SHARE_TOL]
    if blocked:
        listing = ", ".join(f"{name} needs at least {_pct(need)}" for name, need in blocked)
        raise DeryError(f"no partition into {k} blocks keeps every block within {_pct(problem.max_share)} of its "
                        f"network's {problem.balance}: {listing} (raise --partition-slack or choose another --k)",
                        exit_code=FAILED)
    return [_allowed(c, k, problem.max_share) for c in problem.cum]


def partition_objective(problem: PartitionProblem, choice: Sequence[Sequence[int]]) -> float:
    """The full cover-set objective of a choice (K-1 candidate positions per model)."""
    if problem.k == 1 or problem.pairs == 0:
        return float(problem.pairs)
    idx = np.array([g[list(c)] for g, c in zip(problem.groups, choice)])
    a, b = np.triu_indices(len(problem.groups), 1)
    return float(problem.pairs + 2.0 * problem.sim[idx[a], idx[b]].sum())


class _Mip:
    """The MIP of the module docstring for one problem, with column bookkeeping."""

    def __init__(self, problem: PartitionProblem, allowed: list[np.ndarray]):
        k1 = problem.k - 1
        sim = problem.sim
        shift = min(0.0, float(sim.min()))
        # z columns: model-major, boundary, candidate ascending.
        self.cands = [[np.flatnonzero(a[j]) for j in range(k1)] for a in allowed]
        sizes = [c.size for per in self.cands for c in per]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.zcol = [[starts[m * k1 + j] + np.arange(self.cands[m][j].size) for j in range(k1)]
                     for m in range(len(allowed))]
        n_z = int(starts[-1])
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        lower: list[np.ndarray] = []
        upper: list[np.ndarray] = []
        n_row = 0

        def add(r: np.ndarray, c: np.ndarray, v: np.ndarray, lo: np.ndarray, up: np.ndarray) -> None:
            nonlocal n_row
            rows.append(r + n_row)
            cols.append(c)
            vals.append(v)
            lower.append(lo)
            upper.append(up)
            n_row += lo.size

        def implies(m: int, pos: tuple[int, np.ndarray], neg: tuple[int, np.ndarray]) -> None:
            """Rows Z[pos boundary](.) - Z[neg boundary](.) <= 0, one per row of the masks (empty rows dropped)."""
            keep = pos[1].any(axis=1)
            rp, cp = np.nonzero(pos[1][keep])
            rn, cn = np.nonzero(neg[1][keep])
            add(np.concatenate([rp, rn]), np.concatenate([self.zcol[m][pos[0]][cp], self.zcol[m][neg[0]][cn]]),
                np.concatenate([np.ones(rp.size), -np.ones(rn.size)]),
                np.full(int(keep.sum()), -highspy.kHighsInf), np.zeros(int(keep.sum())))

        for m, cum in enumerate(problem.cum):
            add(np.repeat(np.arange(k1), sizes[m * k1:(m + 1) * k1]), np.concatenate(self.zcol[m]),
                np.ones(sum(sizes[m * k1:(m + 1) * k1])), np.ones(k1), np.ones(k1))
            fits = _fits(cum, problem.max_share)[1:-1, 1:-1]
            lo = fits.argmax(axis=0)  # first candidate from which a block up to c fits (fits is monotone)
            for j in range(1, k1):
                here, prev = self.cands[m][j], self.cands[m][j - 1]
                implies(m, (j, here[None, :] <= here[:, None]), (j - 1, prev[None, :] <= here[:, None] - 1))
                implies(m, (j - 1, prev[None, :] <= lo[here][:, None] - 1), (j, here[None, :] <= here[:, None] - 1))
        # w columns: pair-major, boundary, candidate of a, candidate of b.
        cost = [np.zeros(n_z)]
        n_col = n_z
        offset = problem.pairs * (1.0 + 2.0 * k1 * shift)
        self.bound = offset  # each pair and boundary at its best allowed match: a bound valid without any search
        self.w_index: list[tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]] = []
        for a, b in itertools.combinations(range(len(allowed)), 2):
            for j in range(k1):
                ca, cb = self.cands[a][j], self.cands[b][j]
                coef = 2.0 * (sim[np.ix_(problem.groups[a][ca], problem.groups[b][cb])] - shift)
                self.bound += float(coef.max(initial=0.0))
                ia, ib = np.nonzero(coef > 0)
                wc = n_col + np.arange(ia.size)
                self.w_index.append((a, b, j, ia, ib, wc))
                n_col += ia.size
                cost.append(coef[ia, ib])
                for mine, z in ((ia, self.zcol[a][j]), (ib, self.zcol[b][j])):
                    add(np.concatenate([mine, np.arange(z.size)]), np.concatenate([wc, z]),
                        np.concatenate([np.ones(mine.size), -np.ones(z.size)]),
                        np.full(z.size, -highspy.kHighsInf), np.zeros(z.size))
        row, col, val = (np.concatenate(x) for x in (rows, cols, vals))
        order = np.lexsort((col, row))
        start = np.searchsorted(row[order], np.arange(n_row))
        self.n_z, self.n_col = n_z, n_col
        self.h = exact_highs()
        self.h.passModel(
            n_col, n_row, val.size, int(highspy.MatrixFormat.kRowwise), int(highspy.ObjSense.kMaximize), offset,
            np.concatenate(cost), np.zeros(n_col), np.ones(n_col), np.concatenate(lower), np.concatenate(upper),
            start.astype(np.int32), col[order].astype(np.int32), val[order],
            np.concatenate([np.ones(n_z), np.zeros(n_col - n_z)]).astype(np.int32))

    def columns(self, choice: Choice) -> np.ndarray:
        """The full column vector of a choice (w = 1 on each chosen pair)."""
        x = np.zeros(self.n_col)
        pos = [[int(np.searchsorted(self.cands[m][j], c)) for j, c in enumerate(ch)] for m, ch in enumerate(choice)]
        for m, per in enumerate(pos):
            for j, i in enumerate(per):
                x[self.zcol[m][j][i]] = 1.0
        for a, b, j, ia, ib, wc in self.w_index:
            x[wc[(ia == pos[a][j]) & (ib == pos[b][j])]] = 1.0
        return x

    def run(self, start: Choice, time_limit_s: float | None) -> tuple[Choice, str, float]:
        """(choice, status, upper bound on the objective) after solving from incumbent `start`."""
        self.h.setSolution(self.n_col, np.arange(self.n_col, dtype=np.int32), self.columns(start))
        self.h.setOptionValue("time_limit", math.inf if time_limit_s is None else max(time_limit_s, 0.0))
        self.h.run()
        status = self.h.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            label = "optimal"
        elif status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt):
            label = "time_limit"
        else:
            raise InternalError(f"HiGHS stopped the partition MIP with status "
                            f"{self.h.modelStatusToString(status)}")
        if self.h.getInfo().primal_solution_status != highspy.kSolutionStatusFeasible:
            return start, label, self.upper()
        z = np.asarray(self.h.getSolution().col_value)[: self.n_z]
        choice = tuple(tuple(int(c[np.argmax(z[zc])]) for c, zc in zip(cands, zcols))
                       for cands, zcols in zip(self.cands, self.zcol))
        return choice, label, self.upper()

    def upper(self) -> float:
        dual = self.h.getInfo().mip_dual_bound
        return min(self.bound, dual) if math.isfinite(dual) else self.bound


def solve_partition(problem: PartitionProblem, time_limit_s: float | None = None) -> PartitionSolution:
    """The partition with the largest cover-set objective, proven optimal unless the time limit stops it.

    Raises DeryError naming the networks when a network has too few cuts or no
    partition meets the balance cap.
    """
    started = time.perf_counter()
    allowed = _check(problem)
    k1 = problem.k - 1
    if k1 == 0:
        choice: Choice = tuple(() for _ in problem.groups)
        return PartitionSolution(choice, partition_objective(problem, choice), "optimal", 0.0,
                                 (time.perf_counter() - started) * 1e3)
    start = tuple(_min_max(cum, problem.k)[1] for cum in problem.cum)
    left = None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)
    choice, status, bound = _Mip(problem, allowed).run(start, left)
    objective = partition_objective(problem, choice)
    gap = 0.0 if status == "optimal" else (max(0.0, (bound - objective) / abs(objective)) if objective else None)
    return PartitionSolution(choice, objective, status, gap, (time.perf_counter() - started) * 1e3)


def _balanced_choices(cum: np.ndarray, k: int, max_share: float) -> np.ndarray:
    """Every balanced choice of k-1 increasing candidates, in lexicographic order."""
    combos = np.array(list(itertools.combinations(range(cum.size), k - 1)), dtype=np.int64).reshape(-1, k - 1)
    ext = _ext(cum)
    bounds = np.concatenate([np.zeros((len(combos), 1), dtype=np.int64), combos + 1,
                             np.full((len(combos), 1), cum.size + 1)], axis=1)
    return combos[(np.diff(ext[bounds], axis=1) <= max_share + SHARE_TOL).all(axis=1)]


def brute_force_partition(problem: PartitionProblem) -> PartitionSolution:
    """The optimum by enumerating every balanced partition of every model (tests, benchmarks).

    Ties go to the lexicographically smallest choice.
    """
    started = time.perf_counter()
    _check(problem)
    options = [_balanced_choices(cum, problem.k, problem.max_share) for cum in problem.cum]
    sizes = [len(o) for o in options]
    if math.prod(sizes) > BRUTE_FORCE_LIMIT:
        raise ValueError(f"{math.prod(sizes)} partitions is too many to enumerate")
    total = np.zeros(sizes)
    points = [g[o] for g, o in zip(problem.groups, options)]
    for a, b in itertools.combinations(range(len(options)), 2):
        shape = [1] * len(sizes)
        shape[a], shape[b] = sizes[a], sizes[b]
        pair = problem.sim[points[a][:, None, :], points[b][None, :, :]].sum(axis=2)
        total = total + pair.reshape(shape)
    best = np.unravel_index(int(np.argmax(total)), sizes)
    choice = tuple(tuple(int(c) for c in o[i]) for o, i in zip(options, best))
    return PartitionSolution(choice, partition_objective(problem, choice), "optimal", 0.0,
                             (time.perf_counter() - started) * 1e3)


def synthetic_problem(seed: int, models: int, cuts: tuple[int, int], k: int, slack: float = 0.5) -> PartitionProblem:
    """A random problem shaped like a real zoo, for tests and benchmarks.

    Each cut sits at a relative depth; networks progress through depth at different
    rates (a per-model warp), so the best matches are not at equal indices. CKA is
    the cosine of non-negative features: smooth bumps over warped depth, a shared
    floor and per-cut noise, which gives a PSD matrix in [0, 1] with unit diagonal
    and high similarity between neighbouring layers, as measured CKA has. Costs grow
    with depth (as parameters do in CNNs) with a heavier head for some networks.
    """
    rng = np.random.default_rng(seed)
    centres = np.linspace(0.0, 1.0, 24)
    feats, groups, cum = [], [], []
    for _ in range(models):
        n = int(rng.integers(cuts[0], cuts[1] + 1))
        depth = np.sort(rng.uniform(0.02, 0.98, n))
        warped = depth ** rng.uniform(0.6, 1.6)
        width = rng.uniform(0.08, 0.2)
        bumps = np.exp(-0.5 * ((warped[:, None] - centres[None, :]) / width) ** 2)
        feats.append(np.concatenate([bumps, np.full((n, 1), rng.uniform(0.3, 0.8)),
                                     rng.exponential(0.25, (n, 8))], axis=1))
        groups.append(np.arange(n) + sum(g.size for g in groups))
        seg = rng.lognormal(0.0, 0.4, n + 1) * np.exp(rng.uniform(0.0, 1.5) * np.linspace(0, 1, n + 1))
        seg[-1] *= rng.uniform(0.3, 1.5)
        cum.append(np.cumsum(seg)[:-1] / seg.sum())
    f = np.concatenate(feats)
    gram = f @ f.T
    d = np.sqrt(np.diag(gram))
    sim = gram / np.outer(d, d)
    names = tuple(f"net{m}" for m in range(models))
    return PartitionProblem(sim, tuple(groups), tuple(cum), k, (1.0 + slack) / k, names)


def balanced_cuts(lowered: Lowered, k: int, balance: str = defaults.BALANCE) -> tuple[str, ...]:
    """The K-1 boundary cuts that split one network into K blocks with the smallest largest share of its cost
    in `balance` ("params" or "flops"); a K the cuts cannot give is a one-line error."""
    cuts = [c.name for c in lowered.boundary_cuts()]
    if not 1 <= k <= len(cuts) + 1:
        raise DeryError(f"{lowered.name} has {len(cuts)} boundary cut points, so K must be between 1 and "
                        f"{len(cuts) + 1}; got K={k}", exit_code=USAGE)
    which = {"params": 0, "flops": 1}[balance]
    bounds = [None, *cuts, None]
    upto = np.cumsum([float(lowered.cost(a, b)[which]) for a, b in zip(bounds, bounds[1:])])
    return tuple(cuts[c] for c in _min_max(upto[:-1] / upto[-1], k)[1])


def partition(zoo: Sequence[Lowered], sim: Similarity, k: int, *, balance: str = defaults.BALANCE,
              slack: float = defaults.SLACK,
              segment_cost: Callable[[Lowered, str | None, str | None], float] | None = None,
              time_limit_s: float | None = None) -> Partition:
    """The partition pass: K balanced blocks per network maximising within-set CKA, solved exactly.

    `zoo` holds `Lowered` networks and `sim` their `Similarity`. Every block holds
    at most (1 + slack) / K of its network's cost in `balance` ("params", "flops",
    or "latency", which needs `segment_cost(lowered, first, last) -> float`).
    """
    if balance not in defaults.BALANCES:
        raise DeryError(f"partition balance {balance!r} is not one of {', '.join(defaults.BALANCES)}", exit_code=USAGE)
    if balance == "latency" and segment_cost is None:
        raise DeryError("latency balance needs measured segment latencies (segment_cost)", exit_code=USAGE)
    if not slack >= 0:
        raise DeryError(f"--partition-slack must be >= 0, got {slack}", exit_code=USAGE)
    if k < 1:
        raise DeryError(f"the number of blocks K must be at least 1, got {k}", exit_code=USAGE)
    groups, cums, names = [], [], []
    for lw in zoo:
        cuts = [c.name for c in lw.boundary_cuts()]
        idx = np.array(sim.of_model(lw.name), dtype=np.int64)
        if [sim.points[i].name for i in idx] != cuts:
            raise DeryError(f"the similarity matrix does not match {lw.name}'s boundary cuts; recompute similarity "
                            f"for this zoo", exit_code=USAGE)
        bounds = [None, *cuts, None]
        if balance == "latency":
            seg = np.array([float(segment_cost(lw, a, b)) for a, b in zip(bounds, bounds[1:])])
        else:
            which = {"params": 0, "flops": 1}[balance]
            seg = np.array([float(lw.cost(a, b)[which]) for a, b in zip(bounds, bounds[1:])])
        if not (np.isfinite(seg).all() and (seg >= 0).all() and seg.sum() > 0):
            raise DeryError(f"{lw.name}: segment {balance} must be finite, >= 0 and not all zero to balance blocks "
                            f"by them (got total {seg.sum():g})", exit_code=USAGE)
        upto = np.cumsum(seg)
        groups.append(idx)
        cums.append(upto[:-1] / upto[-1])
        names.append(lw.name)
    problem = PartitionProblem(sim.matrix, tuple(groups), tuple(cums), k, (1.0 + slack) / k, tuple(names), balance)
    solution = solve_partition(problem, time_limit_s)
    boundaries, blocks = [], []
    for lw, choice in zip(zoo, solution.choice):
        cuts = [c.name for c in lw.boundary_cuts()]
        names_b = tuple(cuts[c] for c in choice)
        ends = [None, *names_b, None]
        boundaries.append(names_b)
        blocks.append(tuple(lw.block(a, b) for a, b in zip(ends, ends[1:])))
    return Partition(k, tuple(names), tuple(boundaries), tuple(blocks), solution.objective, balance,
                     solution.status)


def partition_json(partition: Partition) -> dict:
    """`dery partition --json`: boundaries and blocks (with params and FLOPs) per model."""
    return {
        "k": partition.k,
        "balance": partition.balance,
        "objective": partition.objective,
        "status": partition.status,
        "models": [{"model": model, "boundaries": list(bounds),
                    "blocks": [{"first": b.first, "last": b.last, "params": b.params, "flops": b.flops}
                               for b in blocks]}
                   for model, bounds, blocks in zip(partition.models, partition.boundaries, partition.blocks)],
    }
