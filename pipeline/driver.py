"""The driver: runs the passes in one explicit order and closes the latency loop.

    zoo -> lower -> similarity -> partition -> stitch -> profile -> calibrate -> proxy
        -> [solve -> assemble -> repair -> compile -> verify] (repeated while over budget)
        -> report

Each pass's expensive output is cached under DERY_CACHE_DIR keyed by its
inputs; every error names the pass it came from. Nothing is written to the
output directory until a result exists, and each file is written atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import defaults, progress
from .backends import availability
from .cache import Cache, atomic_write, atomic_write_json, content_key, ensure_dir
from .data import Dataset
from .errors import USAGE, DeryError, InternalError
from .ir import LatencyRecord, Partition, from_json, to_json
from .measure import Method
from .problem import Problem, Solution
from .profile_store import ProfileStore, group_of
from .targets import Target, get_target
from .zoo import Network, load_zoo, parse_zoo, zoo_data

ASSEMBLY_FILE = "assembly.pt"  # the answer as a dery checkpoint, beside the engine

if TYPE_CHECKING:
    import torch.nn as nn
    from dery.ir import Assembly
    from dery.measure import Timing
    from dery.passes.compile import Engine
    from dery.passes.lower import Lowered
    from dery.passes.profile import Costs, Profiler
    from dery.passes.proxy import Quality
    from dery.passes.repair import Repaired
    from dery.passes.solve import SearchSpace
    from dery.passes.stitch import Stitches
    from dery.profile_store import Calibration
    from dery.report import Facts

@dataclass(frozen=True)
class CompileConfig:
    """Everything a `dery-compile` run depends on; every default comes from `dery.defaults`."""

    target: str
    latency_ms: float
    zoo: str | None = None
    data: str | Path | None = None  # an embedded set's name or an ImageFolder directory
    classes: str | None = None  # `--classes`: compile for these classes, from every member whole and as component
    out: Path = Path(defaults.OUT)
    k: int = defaults.K
    balance: str = defaults.BALANCE
    slack: float = defaults.SLACK
    similarity: str = defaults.SIMILARITY
    probe: int = defaults.PROBE
    predictor: str | None = None  # None: defaults.PREDICTOR, or defaults.REPAIR_PREDICTOR when a repair follows
    rerank: str = defaults.RERANK
    top: int = defaults.TOP
    params_limit: float | None = None
    flops_limit: float | None = None
    memory_limit_mb: float | None = None
    max_rounds: int = defaults.MAX_ROUNDS
    finetune: str = defaults.FINETUNE
    epochs: int = defaults.FINETUNE_EPOCHS
    measure: str = defaults.MEASURE
    save_problem: Path | None = None
    pareto: bool = False
    allow_estimates: bool = False
    seed: int = defaults.SEED
    profiling: defaults.Profiling = field(default_factory=defaults.Profiling)

    @property
    def repairs(self) -> bool:
        """Whether the chosen assembly (and every member it is compared with) is trained before its engine."""
        return self.finetune != "none" and self.epochs > 0

    @property
    def quality_model(self) -> str:
        """The program's quality model: the one asked for, else the default for accuracy as is or after repair."""
        if self.predictor is not None:
            return self.predictor
        return defaults.REPAIR_PREDICTOR if self.repairs else defaults.PREDICTOR


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Run one pass: time it, say so in one line when stderr is no terminal, and tag any error with the pass name."""
    if name not in PASSES:
        raise InternalError(f"unknown pass {name!r}; the passes are {', '.join(PASSES)}")
    t0 = time.perf_counter()
    try:
        yield
    except DeryError as e:
        e.in_pass(name)
        raise
    except Exception as e:
        e.add_note(f"(in dery pass {name!r})")
        raise
    finally:
        elapsed = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + elapsed
        if not progress.enabled():
            progress.say(f"dery: {name} {elapsed:.1f} s")


def check_target(target: Target) -> None:
    """Fail in one line when the target's backend or device is not here."""
    _, reason = availability(target)
    if reason is not None:
        raise DeryError(f"target {target.name} ({target.description}) cannot compile here: {reason}; "
                        f"--allow-estimates plans with estimated latencies instead")


def prepare_out(out: Path) -> Path:
    """The output directory, created and checked writable before any work starts."""
    if out.exists() and not out.is_dir():
        raise DeryError(f"--out {out} exists and is not a directory", exit_code=USAGE)
    return ensure_dir(out, "--out directory")


@dataclass(eq=False)
class Session:
    """What the front stages produce, filled in stage by stage (a prefix of FRONT leaves the rest None)."""

    config: CompileConfig
    target: Target
    device: str | None
    cache: Cache
    store: ProfileStore
    on_missing: Callable[..., Any] | None
    timings: dict[str, float] = field(default_factory=dict)
    data: Dataset | None = None
    zoo: tuple[Network, ...] = ()
    lowered: tuple[Lowered, ...] = ()
    partition: Partition | None = None
    stitches: Stitches | None = None
    profiler: Profiler | None = None
    costs: Costs | None = None
    calibration: Calibration | None = None
    quality: Quality | None = None


def _zoo(s: Session) -> None:
    specs = parse_zoo(s.config.zoo)
    s.data = zoo_data(specs, s.config.data, probe=s.config.probe, seed=s.config.seed, cache=s.cache)
    s.zoo = load_zoo(specs, s.data, s.cache)
    if s.config.classes is not None:
        from dery.passes.disassemble import class_zoo

        with stage("disassemble", s.timings):
            s.zoo, s.data = class_zoo(s.zoo, s.data, s.config.classes, s.cache)


def _lower(s: Session) -> None:
    from dery.passes.lower import lower

    s.lowered = tuple(lower(n) for n in s.zoo)


def _partition(s: Session) -> None:
    """similarity -> partition (latency-balanced partitions measure their segments first), cached as IR JSON;
    the partition's time includes the similarity and profile stages it runs."""
    from dery.passes.partition import partition
    from dery.passes.profile import segment_latencies
    from dery.passes.similarity import similarity

    cfg, segment_ms = s.config, None
    if cfg.balance == "latency":
        with stage("profile", s.timings):
            segment_ms = segment_latencies(s.lowered, s.target, s.store, s.cache, on_missing=s.on_missing)
    key = content_key("partition", [(lw.name, lw.network.weights_key, [c.name for c in lw.boundary_cuts()])
                                    for lw in s.lowered], s.data.fingerprint, cfg.similarity, cfg.probe, cfg.k,
                      cfg.balance, cfg.slack, sorted(map(str, (segment_ms or {}).items())), 2)

    def make() -> dict:
        with stage("similarity", s.timings):
            sim = similarity(s.lowered, s.data, s.cache, mode=cfg.similarity)
        cost = (lambda lw, a, b: segment_ms[lw.name, a, b]) if segment_ms is not None else None
        return to_json(partition(s.lowered, sim, cfg.k, balance=cfg.balance, slack=cfg.slack, segment_cost=cost))

    s.partition = from_json(Partition, s.cache.json("partition", key, make, what="partition"))


def _stitch(s: Session) -> None:
    from dery.passes.stitch import stitch

    s.stitches = stitch(s.lowered, s.partition, s.data, s.cache)


def _profile(s: Session) -> None:
    from dery.passes.profile import profile

    s.profiler = profile(s.lowered, s.partition, s.stitches, s.target, s.store, s.cache, method=Method(),
                         settings=s.config.profiling, on_missing=s.on_missing,
                         on_demand=s.config.measure == "on-demand" and s.device is not None)
    s.costs = s.profiler.costs()


def _calibrate(s: Session) -> None:
    from dery.passes.calibrate import calibrate

    s.calibration = calibrate(s.lowered, s.partition, s.stitches, s.profiler, s.target, s.store, seed=s.config.seed,
                              settings=s.config.profiling)
    s.profiler.settle_floors()
    s.costs = s.profiler.costs()


def _proxy(s: Session) -> None:
    from dery.passes.proxy import quality

    s.quality = quality(s.lowered, s.partition, s.stitches, s.data, s.cache, s.config.quality_model,
                        s.config.finetune, s.config.seed)


# The front of the pipeline as data: each stage fills its fields of the Session; `dery partition` and
# `dery profile` run prefixes of it. The solve loop (solve -> assemble -> compile -> verify) and report follow.
FRONT: tuple[tuple[str, Callable[[Session], None]], ...] = (
    ("zoo", _zoo), ("lower", _lower), ("partition", _partition), ("stitch", _stitch), ("profile", _profile),
    ("calibrate", _calibrate), ("proxy", _proxy))
PASSES = ("zoo", "disassemble", "lower", "similarity", "partition", "stitch", "profile", "calibrate", "proxy",
          "solve", "assemble", "repair", "compile", "verify", "report")


def front(cfg: CompileConfig, until: str = "proxy") -> Session:
    """Run the FRONT stages up to and including `until`, each served from the cache where it can be.

    Without the target's device here, latencies come from stored records and, with
    --allow-estimates, from the estimate model for whatever is missing.
    """
    from dery.passes.estimate import estimator

    names = [name for name, _ in FRONT]
    if until not in names:
        raise InternalError(f"unknown front stage {until!r}; the stages are {', '.join(names)}")
    target = get_target(cfg.target)
    device, _ = availability(target)
    if not cfg.allow_estimates:
        check_target(target)
    cache = Cache()
    cache.ensure_writable()
    s = Session(cfg, target, device, cache, ProfileStore(cache, target.name),
                estimator(target, cache) if cfg.allow_estimates else None)
    for name, run in FRONT[:names.index(until) + 1]:
        with stage(name, s.timings):
            run(s)
    return s


def run_compile(cfg: CompileConfig) -> dict:
    """A whole dery-compile run; returns the report (also written to --out)."""
    if not cfg.latency_ms > 0:
        raise DeryError(f"--latency-ms must be a positive number of milliseconds, got {cfg.latency_ms}",
                        exit_code=USAGE)
    fresh = not cfg.out.exists()
    out = prepare_out(cfg.out)
    try:
        s = front(cfg)
    except DeryError:
        if fresh and not any(out.iterdir()):  # a user error before any work leaves nothing behind
            out.rmdir()
        raise
    workdir = Path(tempfile.mkdtemp(prefix=".dery-", dir=out))
    try:
        return _closed_loop(cfg, s, Search(s, workdir), out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _closed_loop(cfg: CompileConfig, s: Session, search: Search, out: Path) -> dict:
    from dery.passes.verify import next_limit
    from dery.report import write_outputs

    problem = search.problem(cfg.latency_ms)
    if cfg.save_problem is not None:
        atomic_write_json(cfg.save_problem, problem.to_json())
    progress.say(f"searching {len(s.partition.models)} networks x {s.partition.k} sets under "
                 f"{cfg.latency_ms:g} ms on {s.target.name}")
    if s.device is None:
        return _plan_only(cfg, s, search, out)
    limit = cfg.latency_ms
    rounds: list[dict] = []
    over: list[tuple[str, ...]] = []
    final = None
    status = None
    for r in range(cfg.max_rounds):
        result = search.best(limit, exclude=over)
        if result is None:
            status = search.infeasible_reason(limit, cfg.latency_ms, rounds)
            break
        rounds.append(result.round_json(r, limit, cfg.latency_ms))
        if result.measured_ms <= cfg.latency_ms:
            final, status = result, "ok"
            break
        over.append(result.solution.chosen)
        final = final if final is not None and final.measured_ms <= result.measured_ms else result
        limit = next_limit(limit, cfg.latency_ms, result.measured_ms)
    if status is None:
        status = (f"over budget: no assembly measured within {cfg.latency_ms:g} ms after {cfg.max_rounds} rounds "
                  f"(fastest measured {min(rr['measured_ms'] for rr in rounds):.4g} ms)")
    if final is None:
        raise DeryError(f"no assembly fits: {status}")
    pareto = search.pareto_sweep() if cfg.pareto else None
    return write_outputs(out, facts(search, final), final, rounds, status, pareto, save_assembly(s, final, out))


def _plan_only(cfg: CompileConfig, s: Session, search: Search, out: Path) -> dict:
    """No device here: solve on estimated latencies and hand over the ONNX to build on the target."""
    from dery.report import write_outputs

    result = search.best(cfg.latency_ms, exclude=[])
    if result is None:
        search.infeasible_reason(cfg.latency_ms, cfg.latency_ms, [])
    status = (f"estimated: predicted {result.predicted_ms:.4g} ms <= {cfg.latency_ms:g} ms from estimated latencies; "
              f"nothing was measured. Build and verify on a {s.target.device_pattern} machine with the same "
              f"command (without --allow-estimates), or `dery profile --target {s.target.name}` there and merge "
              f"its table here")
    return write_outputs(out, facts(search, result), result,
                         [result.round_json(0, cfg.latency_ms, cfg.latency_ms)], status, None,
                         save_assembly(s, result, out))


def save_assembly(s: Session, final: Result, out: Path) -> str | None:
    """Write the answer (repaired) as an assembly checkpoint in `out` and return its name; None, said in one
    line, when a member cannot be rebuilt from a checkpoint."""
    import torch
    from dery.passes.assemble import assembly_checkpoint

    try:
        ckpt = assembly_checkpoint(s.lowered, final.assembly, final.module, s.data)
    except DeryError as e:
        progress.say(f"no {ASSEMBLY_FILE}: {e}")
        return None
    atomic_write(out / ASSEMBLY_FILE, lambda p: torch.save(ckpt, p))
    return ASSEMBLY_FILE


def facts(search: Search, final: Result) -> Facts:
    """What the report shows beside the final assembly: the members whole (as they are and, where they fit the
    budget, after the same repair) and the assembly (as is and repaired), scored on test."""
    from dery.evaluate import accuracy, has_labels
    from dery.passes.assemble import assemble
    from dery.passes.disassemble import component_of
    from dery.report import Facts

    s = search.s
    labelled = has_labels(s.zoo, s.data)
    test_x, test_y = s.data.images("test"), s.data.split("test").labels

    def score(module: nn.Module) -> float | None:
        return accuracy(module, test_x, test_y) if labelled else None

    members = []
    for n, lw in zip(s.zoo, s.lowered):
        params, flops = lw.cost(None, None)
        rec = s.costs.networks[n.name]
        fits = rec.median_ms <= s.config.latency_ms
        members.append({"model": n.name, "arch": n.spec.arch, "component_of": component_of(n.name),
                        "latency_ms": rec.median_ms,
                        "latency_p90_ms": rec.p90_ms, "params": params, "flops": flops, "estimated": rec.estimated,
                        "fits": fits, "accuracy": score(n.module),
                        "accuracy_repaired": score(search.repaired((n.name,) * s.partition.k).module)
                        if fits and s.config.repairs else None})
    as_is = score(assemble(s.lowered, s.partition, s.stitches, final.models)[1])
    return Facts(s.target, s.config.latency_ms, tuple(s.zoo[0].input_shape),
                 {"name": s.data.name, "resolution": s.data.resolution,
                  "classes": list(s.data.classes) if s.config.classes is not None else None,
                  "splits": {k: len(v) for k, v in s.data.splits.items()}, "labelled": labelled},
                 s.partition, {"predictor": s.quality.predictor, "labels": s.quality.labels,
                               "rerank": s.config.rerank},
                 members, score(final.module), as_is, final.repair,
                 s.quality.accuracy(final.models), any(r.estimated for r in s.costs.used(final.models)),
                 {"search_space": len(s.profiler.items), "asked": len(s.profiler.found)},
                 {"timings_s": {name: round(t, 3) for name, t in s.timings.items()},
                  "pieces_measured": len(s.profiler.fresh),
                  "repair_s": round(search.repaired(final.models).seconds, 3)})


@dataclass(frozen=True, eq=False)
class Result:
    """One solved, assembled, compiled and measured assembly."""

    solution: Solution
    models: tuple[str, ...]
    assembly: Assembly
    module: nn.Module
    engine: Engine
    timing: Timing | LatencyRecord | None  # the engine's reading; a member whole: its end-to-end record
    proxy: float
    repair: dict

    @property
    def measured_ms(self) -> float | None:
        return self.timing.median_ms if self.timing is not None else None

    @property
    def predicted_ms(self) -> float:
        return self.solution.totals["latency_ms"]

    def round_json(self, r: int, limit_ms: float, budget_ms: float) -> dict:
        t = self.timing
        return {"round": r, "limit_ms": limit_ms, "chosen": list(self.models), "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "p90_ms": t.p90_ms if t else None, "cv": t.cv if t else None,
                "within_budget": t.median_ms <= budget_ms if t else None, "score": self.solution.objective,
                "proxy": self.proxy, "reading": "member record" if isinstance(t, LatencyRecord) else "engine"}


class Search:
    """solve -> assemble -> compile -> verify over one session's search space."""

    def __init__(self, session: Session, workdir: Path):
        self.s = session
        self.workdir = workdir
        self._proxy: dict[tuple[str, ...], float] = {}
        self._repaired: dict[tuple[str, ...], Repaired] = {}
        self._labels: dict[str, Any] = {}
        self.solves = 0  # programs solved, on-demand rounds included

    def labels(self, split: str) -> Any:
        """A split's labels, or the zoo ensemble's predictions where there are none that fit (once per session)."""
        from dery.evaluate import reference_labels

        if split not in self._labels:
            self._labels[split] = reference_labels(self.s.zoo, self.s.data, split)
        return self._labels[split]

    def space(self, limit_ms: float) -> SearchSpace:
        """The search space under `limit_ms`: the program and the assembly key of every candidate."""
        from dery.passes.solve import search_problem

        s, cfg = self.s, self.s.config
        return search_problem(s.partition, s.costs, s.quality, s.stitches, calibration=s.calibration,
                              limits={"latency_ms": limit_ms, "params": cfg.params_limit, "flops": cfg.flops_limit},
                              memory_mb=cfg.memory_limit_mb, batch=s.target.batch)

    def problem(self, limit_ms: float) -> Problem:
        return self.space(limit_ms).problem

    def trained(self) -> tuple:
        """What the run's repair depends on beside the assembly (empty without a repair)."""
        cfg = self.s.config
        return (cfg.finetune, cfg.epochs, cfg.seed, self.s.data.fingerprint) if cfg.repairs else ()

    def repaired(self, models: tuple[str, ...]) -> Repaired:
        """The assembly after the run's repair (`--finetune`; cached, so a rerun trains nothing)."""
        import torch
        from dery.passes.assemble import assemble
        from dery.passes.repair import repair
        from dery.passes.verify import identity

        if models not in self._repaired:
            s, cfg = self.s, self.s.config
            with stage("assemble", s.timings):
                _, module = assemble(s.lowered, s.partition, s.stitches, models)
            labels, _ = self.labels("train")

            def make() -> Repaired:
                if cfg.repairs:
                    progress.say(f"repairing {' > '.join(models)} ({cfg.finetune}, {cfg.epochs} epochs)")
                return repair(module, cfg.finetune, cfg.epochs, s.data, labels, seed=cfg.seed,
                              run_dir=self.workdir / "incubate" / "-".join(models))

            with stage("repair", s.timings):
                self._repaired[models] = make() if not cfg.repairs else s.cache.get_or_make(
                    "repair", identity(models, s.partition, s.stitches, s.lowered, self.trained()), ".pt",
                    make=make, save=lambda r, p: torch.save(r, p), load=lambda p: torch.load(p, weights_only=False),
                    what="repaired network")
        return self._repaired[models]

    def proxy(self, models: tuple[str, ...]) -> float:
        """The re-ranking proxy of an assembly after the run's repair (cached for the session)."""
        from dery.passes.proxy import whole_network_score

        if models not in self._proxy:
            labels, _ = self.labels("val")
            self._proxy[models] = whole_network_score(self.s.config.rerank, self.repaired(models).module, self.s.data,
                                                      labels)
        return self._proxy[models]

    def members(self, space: SearchSpace, exclude: list[tuple[str, ...]]) -> list[tuple[tuple[str, ...], Solution]]:
        """Every zoo member, whole, that meets the limits: the re-ranking weighs each against the assemblies.
        A member's latency is its own end-to-end reading, the figure by which the report says it fits, not
        the sum of its blocks."""
        from dery.passes.solve import assembly_ids

        out = []
        for m in self.s.partition.models:
            ids = tuple(assembly_ids((m,) * self.s.partition.k))
            objective, totals = space.problem.evaluate(ids)
            totals = {**totals, "latency_ms": self.s.costs.networks[m].median_ms}
            if ids not in exclude and space.problem.meets_limits(totals):
                out.append(((m,) * self.s.partition.k, Solution("optimal", ids, objective, totals)))
        return out

    def settled(self, limit_ms: float, solve: Callable[[Problem], list[Solution]]
                ) -> tuple[SearchSpace, list[Solution]]:
        """Solve, measure the joints and triples that the solutions rest on and are not measured yet, and solve
        again until they rest on measured ones only. Unmeasured terms take their floors, below any real figure,
        so solutions that rest on measured terms only are those of the full table."""
        from dery.passes.solve import chosen_models

        s = self.s
        while True:
            space = self.space(limit_ms)
            with stage("solve", s.timings):
                sols = solve(space.problem)
            self.solves += 1
            need = [key for sol in sols for key in s.costs.missing(chosen_models(space, sol))]
            if not need:
                return space, sols
            with stage("profile", s.timings):
                s.profiler.ensure(need)
                s.costs = s.profiler.costs()

    def fastest(self, limit_ms: float) -> float:
        """The smallest latency any assembly is predicted at under the other limits (measured on demand)."""
        from dery.solver import best_solutions, fastest_problem

        _, sols = self.settled(limit_ms, lambda p: best_solutions(fastest_problem(p), 1))
        return sols[0].totals["latency_ms"] if sols else float("inf")

    def choose(self, limit_ms: float, exclude: list[tuple[str, ...]]):
        """The program's best few solutions under `limit_ms`, re-ranked by the proxy (None if infeasible)."""
        from dery.passes.solve import chosen_models
        from dery.solver import best_solutions

        space, sols = self.settled(limit_ms, lambda p: best_solutions(p, self.s.config.top, exclude=exclude))
        if not sols:
            return None
        picks = {chosen_models(space, sol): sol for sol in sols}
        for models, sol in self.members(space, exclude):
            picks.setdefault(models, sol)
        for models in picks:
            self.repaired(models)
        with stage("proxy", self.s.timings):
            scored = [(self.proxy(models), -i, sol, models) for i, (models, sol) in enumerate(picks.items())]
        return max(scored, key=lambda t: (t[0], t[1]))

    def realise(self, models: tuple[str, ...], solution: Solution, proxy: float, name: str) -> Result:
        """Assemble, repair, compile and measure one solution."""
        from dery.passes.assemble import assemble
        from dery.passes.compile import cached_engine
        from dery.passes.verify import identity, measure_engine

        s = self.s
        assembly, _ = assemble(s.lowered, s.partition, s.stitches, models)
        repaired = self.repaired(models)
        module = repaired.module
        engine_id = identity(models, s.partition, s.stitches, s.lowered, self.trained())
        with stage("compile", s.timings):
            engine = cached_engine(module, s.zoo[0].input_shape, s.target, self.workdir, name, s.cache, engine_id)
        if s.device is None:
            return Result(solution, models, assembly, module, engine, None, proxy, repaired.log)
        if len(set(models)) == 1:
            # A member whole is the graph its end-to-end record timed: one figure says whether it fits, here, in
            # the search and in the report, where a second reading would differ by the measurement's noise only.
            return Result(solution, models, assembly, module, engine, s.costs.networks[models[0]], proxy,
                          repaired.log)
        with stage("verify", s.timings):
            timing = measure_engine(engine.path, engine_id, s.target,
                                    s.cache, pace=s.store.pace(group_of(s.target, s.device)),
                                    attempts=s.config.profiling.verify_attempts,
                                    predicted_ms=solution.totals["latency_ms"], off=s.config.profiling.verify_off)
        return Result(solution, models, assembly, module, engine, timing, proxy, repaired.log)

    def best(self, limit_ms: float, exclude: list[tuple[str, ...]]) -> Result | None:
        picked = self.choose(limit_ms, exclude)
        if picked is None:
            return None
        proxy, _, solution, models = picked
        return self.realise(models, solution, proxy, f"round{len(exclude)}")

    def infeasible_reason(self, limit_ms: float, budget_ms: float, rounds: list[dict]) -> str:
        """Why nothing fits; before any round this is a plain error (nothing is written)."""
        fastest = self.fastest(limit_ms)
        if not rounds:
            member = min(self.s.costs.networks.values(), key=lambda r: r.median_ms)
            raise DeryError(f"budget {budget_ms:g} ms is below the fastest achievable assembly on target "
                            f"{self.s.target.name}: {fastest:.4g} ms predicted (the fastest zoo member measures "
                            f"{member.median_ms:.4g} ms); raise --latency-ms")
        return (f"over budget: every assembly predicted within the tightened limit {limit_ms:.4g} ms was tried; "
                f"the fastest measured {min(r['measured_ms'] for r in rounds):.4g} ms > {budget_ms:g} ms")

    def pareto_sweep(self, points: int = 8) -> list[dict]:
        """Solve, build and measure a sweep of budgets from the fastest assembly to the slowest member."""
        from dery.evaluate import accuracy as acc
        from dery.evaluate import has_labels

        s = self.s
        lat = sorted(r.median_ms for r in s.costs.networks.values())
        lo = min(lat[0], self.fastest(lat[-1]))
        out, seen = [], set()
        labelled = has_labels(s.zoo, s.data)
        for i in range(points):
            budget = lo + (lat[-1] - lo) * i / max(points - 1, 1) * 1.05
            picked = self.choose(budget, [])
            if picked is None or picked[2].chosen in seen:
                continue
            seen.add(picked[2].chosen)
            res = self.realise(picked[3], picked[2], picked[0], f"pareto{i}")
            out.append({"budget_ms": budget, "chosen": list(res.models), "predicted_ms": res.predicted_ms,
                        "measured_ms": res.measured_ms,
                        "accuracy": acc(res.module, s.data.images("test"), s.data.split("test").labels)
                        if labelled else None})
        return out


def inspect_json(model: str) -> dict:
    """`dery inspect`: cut points of one network and the block-by-block check."""
    import torch
    from dery.passes.lower import lower, run_blockwise
    from dery.zoo import load_member

    specs = parse_zoo(model)
    if len(specs) != 1:
        raise DeryError(f"dery inspect takes one model, {model!r} names {len(specs)}", exit_code=USAGE)
    spec = dataclasses.replace(specs[0], weights="random") if specs[0].weights in ("train", "pretrained") \
        else specs[0]
    net = load_member(spec, None, Cache())
    lw = lower(net)
    x = torch.rand(2, *net.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((run_blockwise(lw, x) - net.module(x)).abs().max())
    return {"model": net.name, "method": lw.method, "warning": lw.warning, "input_shape": list(net.input_shape),
            "cut_points": [{"name": c.name, "shape": list(c.shape), "layout": c.layout,
                            "boundary": c in lw.boundary_cuts()} for c in lw.cuts],
            "max_abs_diff": diff}
