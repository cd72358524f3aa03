"""profile: the latency of every block, joint and whole zoo member on the target.

Blocks are cut out of each network's ONNX export and whole networks are their
ONNX with the extra outputs dropped. An engine is not the sum of its blocks
timed alone: it is one call instead of one per block, and the runtime fuses
and keeps its memory layout across a boundary. So every boundary an assembly
can have is timed in context, as a joint: block a of set j, the stitch from a
to b (none when a == b) and block b of set j + 1 chained into one graph. What a
boundary adds to an engine is its joint less its two blocks (`Costs.boundary_ms`,
often negative). Two boundaries around one block interact as well (a small
block between two stitches can cost several percent more or less than its two
joints say, repeatably), so every run of three blocks is timed too, as a
triple; what it adds beyond its two joints is the context term
(`Costs.context_ms`): the triple plus its middle block less its two joints.
Every record of a device is at one speed (dery.reference anchors each window
to the reference graph's), so the four records can come from different
measurement groups; triples are timed like every other piece. A context term
is a small difference of large times: one of its pieces caught alone in a
slow spell shows as a term far larger than real ones (`Profiling.odd_context`), and the four
pieces are then measured again together (`settle_contexts`). An assembly's
latency is its blocks plus its boundaries plus its contexts.
Each piece has a fingerprint (what decides its latency), so the profile store
answers for pieces measured before, by this run or on another machine; only
what is missing is measured, and each group of new records is saved as soon
as it is measured (`Profiling.chunk`); ONNX graphs are built only for what is measured.
A group whose reference graph ran slow against the quickest of the whole pass
is measured once more at the end (`measure_groups`).

When the target's device is not here, stored records are used; anything
missing is an error that lists the pieces and the command that measures them
on the right device.

A compile measures on demand (`Profiler`): the blocks, the members and every
member's own joints and triples first, every other joint and triple only when
a solution rests on it. Until then an unmeasured boundary or context term
takes its floor, a figure below any the measured ones reach: the least of its
members' own terms at that place (measured first; a stitch only adds work)
less half its largest block (`Costs._floor`; `floors`, the zoo-wide figure,
where an own term is missing), so a solution that rests on measured terms only
is optimal for the full table too.
`dery profile` measures everything.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx
import torch
import torch.nn as nn
from dery import progress
from dery.backends import Backend, Piece, availability, get_backend
from dery.cache import Cache, content_key
from dery.defaults import Profiling
from dery.errors import DeryError
from dery.ir import GRAPH_REVISION, LatencyRecord, Partition, utc_timestamp
from dery.measure import Method
from dery.onnx_graph import INPUT, OUTPUT, chain, cut_tensor, export, extract
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches
from dery.profile_store import ProfileStore, group_of
from dery.reference import SLOW, Pace, measure_referenced, reference_piece
from dery.targets import Target


@dataclass(frozen=True, eq=False)
class Costs:
    """Latency records for the search space: blocks by (model, set), joints by (source, target, boundary),
    triples by (first, middle, last, first's set), whole zoo members by name."""

    blocks: dict[tuple[str, int], LatencyRecord] = field(repr=False)
    joints: dict[tuple[str, str, int], LatencyRecord] = field(repr=False)
    triples: dict[tuple[str, str, str, int], LatencyRecord] = field(repr=False)
    networks: dict[str, LatencyRecord] = field(repr=False)
    measured: int
    reused: int
    boundary_floor_ms: float = 0.0
    context_floor_ms: float = 0.0
    floor_margin: float | None = None  # None: unmeasured terms take the zoo-wide floors only

    def boundary_ms(self, a: str, b: str, j: int) -> float:
        """What boundary j from model a to model b adds to an engine: its joint less its two blocks (its floor
        while the joint is not measured)."""
        if (a, b, j) not in self.joints:
            own = [(m, m, j) for m in (a, b)]
            if self.floor_margin is None or a == b or any(k not in self.joints for k in own):
                return self.boundary_floor_ms
            return self._floor([self.boundary_ms(*k) for k in own], [self.blocks[a, j], self.blocks[b, j + 1]])
        return self.joints[a, b, j].median_ms - self.blocks[a, j].median_ms - self.blocks[b, j + 1].median_ms

    def context_measured(self, a: str, b: str, c: str, j: int) -> bool:
        """Whether the context term of a, b, c at boundary j rests on measured records only."""
        return (a, b, c, j) in self.triples and (a, b, j) in self.joints and (b, c, j + 1) in self.joints

    def context_ms(self, a: str, b: str, c: str, j: int) -> float:
        """What boundaries j and j + 1 add together beyond each alone: the triple a, b, c less its two joints,
        plus its middle block (counted by both joints); none when any of the four is an estimate, its floor
        while one is not measured."""
        if not self.context_measured(a, b, c, j):
            own = [(m, m, m, j) for m in dict.fromkeys((a, b, c))]
            if self.floor_margin is None or len(own) == 1 or not all(self.context_measured(*k) for k in own):
                return self.context_floor_ms
            return self._floor([self.context_ms(*k) for k in own],
                               [self.blocks[a, j], self.blocks[b, j + 1], self.blocks[c, j + 2]])
        records = (self.triples[a, b, c, j], self.blocks[b, j + 1], self.joints[a, b, j], self.joints[b, c, j + 1])
        if any(r.estimated for r in records):
            return 0.0
        triple, middle, first, second = (r.median_ms for r in records)
        return triple + middle - first - second

    def _floor(self, own: Sequence[float], blocks: Sequence[LatencyRecord]) -> float:
        """An unmeasured term's floor: the least of its members' own terms at that place (no stitch; a stitch
        only adds work), less `floor_margin` of its largest block."""
        return min(own) - self.floor_margin * max(r.median_ms for r in blocks)

    def missing(self, models: Sequence[str]) -> list[tuple]:
        """The piece keys of an assembly's joints and triples that are not measured yet."""
        joints = [("joint", a, b, j) for j, (a, b) in enumerate(zip(models, models[1:]))
                  if (a, b, j) not in self.joints]
        triples = [("triple", *run, j) for j, run in enumerate(zip(models, models[1:], models[2:]))
                   if (*run, j) not in self.triples]
        return joints + triples

    def used(self, models: Sequence[str]) -> list[LatencyRecord]:
        """The records an assembly's in-context latency is made of."""
        return [*(self.blocks[m, k] for k, m in enumerate(models)),
                *(self.joints[a, b, j] for j, (a, b) in enumerate(zip(models, models[1:]))),
                *(self.triples[(*run, j)] for j, run in enumerate(zip(models, models[1:], models[2:])))]

    def sums(self, models: Sequence[str], *, contexts: bool = True) -> tuple[float, float]:
        """(sum of block medians, what the boundaries add: each alone and, with `contexts`, each adjacent pair
        together); their total is the assembly's in-context latency."""
        boundaries = sum(self.boundary_ms(a, b, j) for j, (a, b) in enumerate(zip(models, models[1:])))
        if contexts:
            boundaries += sum(self.context_ms(*run, j) for j, run in enumerate(zip(models, models[1:], models[2:])))
        return sum(self.blocks[m, k].median_ms for k, m in enumerate(models)), boundaries


def network_onnx(lowered: Lowered, cuts: Sequence[str], batch: int, cache: Cache) -> onnx.ModelProto:
    """The network's ONNX with the named cuts as extra outputs (cached by weights and cuts)."""
    net = lowered.network
    key = content_key("onnx", net.spec.arch, net.weights_key, list(cuts), batch, torch.__version__, GRAPH_REVISION)

    def make() -> onnx.ModelProto:
        x = torch.rand(batch, *net.input_shape)
        return export(lowered.with_cut_outputs(tuple(cuts)), (x,), [INPUT], [OUTPUT, *map(cut_tensor, cuts)])

    return cache.get_or_make("onnx", f"{lowered.name}-{key}", ".onnx", make=make,
                             save=lambda m, p: p.write_bytes(m.SerializeToString()),
                             load=lambda p: onnx.load(str(p)), what="ONNX export")


class _Bundle(nn.Module):
    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.items = nn.ModuleList(modules)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.items, xs))


def _stitch_name(a: str, b: str, j: int) -> str:
    return f"{a}>{b}@{j}"


def stitches_onnx(stitches: Stitches, batch: int, cache: Cache) -> onnx.ModelProto:
    """All stitches exported together (inputs in:<name>, outputs out:<name>), cached."""
    keys = sorted(stitches.modules)
    key = content_key("stitch-onnx", [(k, s.fingerprint, s.weights) for k in keys for s in [stitches.get(*k)]],
                      batch, torch.__version__, GRAPH_REVISION)

    def make() -> onnx.ModelProto:
        mods = [stitches.modules[k] for k in keys]
        xs = [torch.rand(batch, *m.src.shape[1:]) for m in mods]
        names = [_stitch_name(*k) for k in keys]
        return export(_Bundle(mods), xs, [f"in:{n}" for n in names], [f"out:{n}" for n in names])

    return cache.get_or_make("onnx", f"stitches-{key}", ".onnx", make=make,
                             save=lambda m, p: p.write_bytes(m.SerializeToString()),
                             load=lambda p: onnx.load(str(p)), what="ONNX export")


def stitch_bundle(stitches: Stitches, batch: int, cache: Cache) -> Callable[[], onnx.ModelProto]:
    """The stitches' ONNX (`stitches_onnx`), built or loaded once when first asked for."""
    return functools.cache(lambda: stitches_onnx(stitches, batch, cache))


def pieces(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, batch: int, cache: Cache,
           bundle: Callable[[], onnx.ModelProto] | None = None) -> dict[tuple, Piece]:
    """Every piece of the search space: ("block", model, k), ("joint", a, b, j) for every boundary an assembly
    can have, ("triple", a, b, c, j) for every two adjacent ones, ("network", model)."""
    out: dict[tuple, Piece] = {}
    for lw in zoo:
        cuts = partition.boundaries[partition.models.index(lw.name)]
        model = functools.cache(lambda lw=lw, cuts=cuts: network_onnx(lw, cuts, batch, cache))
        names = [INPUT, *map(cut_tensor, cuts), OUTPUT]
        for k, block in enumerate(partition.blocks[partition.models.index(lw.name)]):
            shape = lw.network.input_shape if block.first is None else lw.cut(block.first).shape[1:]
            out["block", lw.name, k] = Piece(f"{lw.name}[{k}]", block.fingerprint, tuple(shape),
                                             lambda m=model, a=names[k], b=names[k + 1]: extract(m(), a, b),
                                             lambda lw=lw, b=block: lw.segment(b.first, b.last))
        out["network", lw.name] = Piece(lw.name, lw.fingerprint(None, None), lw.network.input_shape,
                                        lambda m=model: extract(m(), INPUT, OUTPUT), lambda lw=lw: lw.network.module)
    bundle = bundle or stitch_bundle(stitches, batch, cache)
    joins = [(a, b, j) for j in range(partition.k - 1) for a in partition.models for b in partition.models
             if a == b or stitches.get(a, b, j) is not None]
    for a, b, j in joins:
        out["joint", a, b, j] = run_piece((a, b), j, out, stitches, bundle)
    for a, b, j in joins:
        for c in partition.models:
            if ("joint", b, c, j + 1) in out:
                out["triple", a, b, c, j] = run_piece((a, b, c), j, out, stitches, bundle)
    return out


def run_piece(models: Sequence[str], j: int, blocks: dict[tuple, Piece], stitches: Stitches,
              bundle: Callable[[], onnx.ModelProto]) -> Piece:
    """Consecutive blocks of `models` from set j on, with the stitch between each two that differ, as one graph."""
    parts: list[Piece | tuple[str, str, int]] = []
    for k, (before, m) in enumerate(zip((None, *models), models), start=j):
        if before is not None and before != m:
            parts.append((before, m, k - 1))
        parts.append(blocks["block", m, k])

    def graph(part: Piece | tuple[str, str, int]) -> onnx.ModelProto:
        if isinstance(part, Piece):
            return part.onnx
        return extract(bundle(), f"in:{_stitch_name(*part)}", f"out:{_stitch_name(*part)}")

    def module(part: Piece | tuple[str, str, int]) -> nn.Module:
        return part.module() if isinstance(part, Piece) else stitches.modules[part]

    return Piece(">".join(p.name for p in parts if isinstance(p, Piece)),
                 content_key("run", [p.fingerprint if isinstance(p, Piece) else stitches.get(*p).fingerprint
                                     for p in parts]),
                 parts[0].input_shape, lambda: chain([graph(p) for p in parts]),
                 lambda: nn.Sequential(*map(module, parts)))


def segment_pieces(zoo: Sequence[Lowered], batch: int, cache: Cache) -> dict[tuple, Piece]:
    """The segments between consecutive boundary cuts of every network: ("segment", model, first, last)."""
    out: dict[tuple, Piece] = {}
    for lw in zoo:
        cuts = [c.name for c in lw.boundary_cuts()]
        model = functools.cache(lambda lw=lw, cuts=cuts: network_onnx(lw, cuts, batch, cache))
        names = [INPUT, *map(cut_tensor, cuts), OUTPUT]
        bounds: list[str | None] = [None, *cuts, None]
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            shape = lw.network.input_shape if a is None else lw.cut(a).shape[1:]
            out["segment", lw.name, a, b] = Piece(
                f"{lw.name}[{a or 'input'}..{b or 'logits'}]", lw.fingerprint(a, b), tuple(shape),
                lambda m=model, x=names[i], y=names[i + 1]: extract(m(), x, y),
                lambda lw=lw, a=a, b=b: lw.segment(a, b))
    return out


def segment_latencies(zoo: Sequence[Lowered], target: Target, store: ProfileStore, cache: Cache, *,
                      method: Method = Method(),
                      on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None
                      ) -> dict[tuple[str, str | None, str | None], float]:
    """Median latency of every segment between boundary cuts (for balancing a partition by latency)."""
    found, _ = ensure_records(segment_pieces(zoo, target.batch, cache), target, store, method=method,
                              on_missing=on_missing)
    return {(k[1], k[2], k[3]): r.median_ms for k, r in found.items()}


def probe_record(piece: Piece, target: Target, device: str, backend: Backend) -> LatencyRecord:
    """A record with the lookup key of `piece` and empty timings."""
    return LatencyRecord.in_group(group_of(target, device), piece.fingerprint, (target.batch, *piece.input_shape),
                                  median_ms=0.0, p90_ms=0.0, min_ms=0.0, cv=0.0, runs=0, when="", how="")


def measure_pieces(items: Sequence[Piece], target: Target, device: str, backend: Backend, method: Method,
                   pace: Pace) -> list[LatencyRecord]:
    """Measure pieces together now, with the reference graph (their windows in turn, see dery.measure and
    dery.reference), and return their records."""
    timings, reference_ms, anchor_ms, slow = measure_referenced(
        [backend.step(p, target) for p in items], backend.step(reference_piece(), target), method, pace)
    when, group = utc_timestamp(), group_of(target, device)
    return [LatencyRecord.in_group(group, p.fingerprint, (target.batch, *p.input_shape), median_ms=t.median_ms,
                                   p90_ms=t.p90_ms, min_ms=t.min_ms, cv=t.cv, runs=t.runs, when=when,
                                   how=method.describe() + ("; noisy" if t.noisy else "")
                                   + ("; in a slow spell" if slow else ""),
                                   reference_ms=reference_ms, anchor_ms=anchor_ms)
            for p, t in zip(items, timings)]


def missing_error(target: Target, names: Sequence[str], why: str) -> DeryError:
    """The error for records that cannot be measured here."""
    listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return DeryError(f"no latency records for {len(names)} pieces on target {target.name} ({listing}) and {why}; "
                     f"run `dery profile --target {target.name}` with the same --zoo on a machine with the "
                     f"target's device and merge its table (`dery profile --merge`), or pass --allow-estimates")


def measure_groups(pieces: Sequence[Piece], target: Target, store: ProfileStore, *, method: Method,
                   settings: Profiling, save: Callable[[range, list[LatencyRecord]], None], title: str
                   ) -> list[LatencyRecord]:
    """Measure pieces `settings.chunk` at a time, each group with the reference graph (`measure_pieces`), handing
    a group's positions and records to `save` at once; then measure again, up to `settings.slow_retries` times,
    every group whose reference ran more than `SLOW` above the quickest the device has had by the end, keeping
    the group's reading with the quicker reference. Returns the records in the order of `pieces`. A group
    compares with the quickest before it only, so this is what catches the first group of a fresh store in a
    slow spell, and a spell that outlasted a group's extra rounds."""
    spans = [range(start, min(start + settings.chunk, len(pieces))) for start in range(0, len(pieces), settings.chunk)]
    if not spans:
        return []
    backend = get_backend(target.backend)
    device, _ = availability(target)
    group = group_of(target, device)
    out: list[list[LatencyRecord]] = [[] for _ in spans]

    def run(indices: Sequence[int], what: str) -> None:
        with progress.task(f"{what} on {target.name}", sum(len(spans[i]) for i in indices)) as advance:
            for i in indices:
                records = measure_pieces([pieces[j] for j in spans[i]], target, device, backend, method,
                                         store.pace(group))
                if not out[i] or records[0].reference_ms < out[i][0].reference_ms:
                    out[i] = records
                    save(spans[i], records)
                advance(len(spans[i]), note=pieces[spans[i][-1]].name)

    run(range(len(spans)), title)
    for _ in range(settings.slow_retries):
        quickest = store.pace(group).quickest_ms
        slow = [i for i, records in enumerate(out) if quickest and records[0].reference_ms > quickest * (1 + SLOW)]
        if not slow:
            break
        run(slow, f"{title}: slow groups again")
    return [r for records in out for r in records]


def measure_records(keys: Sequence[tuple], items: dict[tuple, Piece], target: Target, store: ProfileStore, *,
                    method: Method, settings: Profiling = Profiling(), title: str = "profiling"
                    ) -> dict[tuple, LatencyRecord]:
    """Measure the pieces `keys` here (`measure_groups`: in groups with the reference graph, their windows spread
    over time, slow groups again), saving each group at once."""
    return dict(zip(keys, measure_groups([items[k] for k in keys], target, store, method=method, settings=settings,
                                         save=lambda span, records: store.add_all(records), title=title)))


def ensure_records(items: dict[tuple, Piece], target: Target, store: ProfileStore, *, method: Method,
                   settings: Profiling = Profiling(),
                   on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None
                   ) -> tuple[dict[tuple, LatencyRecord], list[tuple]]:
    """Look every piece up in the store (when the target's device is not here, any device's record); measure
    what is missing here, or without the device hand it to `on_missing` (none: an error naming the pieces).
    Returns the records and the keys measured now."""
    backend = get_backend(target.backend)
    device, reason = availability(target)
    found: dict[tuple, LatencyRecord] = {}
    todo: list[tuple] = []
    for key, piece in items.items():
        rec = store.get(probe_record(piece, target, device, backend)) if device is not None \
            else store.find_any(piece.fingerprint, (target.batch, *piece.input_shape), target)
        if rec is not None:
            found[key] = rec
        else:
            todo.append(key)
    if todo and device is None:
        if on_missing is None:
            raise missing_error(target, [items[k].name for k in todo], reason)
        found.update(on_missing({k: items[k] for k in todo}))
        return found, []
    found.update(measure_records(todo, items, target, store, method=method, settings=settings))
    return found, todo


def parts(triple: tuple) -> list[tuple]:
    """The item keys a triple's context term is made of: the triple, its middle block and its two joints."""
    _, a, b, c, j = triple
    return [triple, ("block", b, j + 1), ("joint", a, b, j), ("joint", b, c, j + 1)]


def costs_of(found: dict[tuple, LatencyRecord], measured: int, floors: tuple[float, float] = (0.0, 0.0),
             margin: float | None = None) -> Costs:
    """The records by kind, as the search space uses them, with the floors of unmeasured terms."""
    return Costs({(k[1], k[2]): r for k, r in found.items() if k[0] == "block"},
                 {(k[1], k[2], k[3]): r for k, r in found.items() if k[0] == "joint"},
                 {(k[1], k[2], k[3], k[4]): r for k, r in found.items() if k[0] == "triple"},
                 {k[1]: r for k, r in found.items() if k[0] == "network"},
                 measured, len(found) - measured, *floors, margin)


def settle_contexts(found: dict[tuple, LatencyRecord], fresh: Sequence[tuple], items: dict[tuple, Piece],
                    target: Target, store: ProfileStore, *, method: Method, settings: Profiling = Profiling()
                    ) -> list[tuple]:
    """Measure again, together, the four pieces of every context term over `settings.odd_context` of its triple
    that rests on a record measured in this run (`fresh`), up to `settings.context_retries` times; the new
    records replace theirs in `found` and in the store. Returns the keys measured again. A piece caught alone
    by a slow spell (every window of it, none of the reference's) is what this catches; a run that measured
    nothing checks nothing."""
    again: list[tuple] = []
    recent = set(fresh)
    for _ in range(settings.context_retries):
        costs = costs_of(found, 0)
        odd = [k for k in found if k[0] == "triple" and recent.intersection(parts(k))
               and all(p in found for p in parts(k))
               and abs(costs.context_ms(*k[1:])) > settings.odd_context * found[k].median_ms]
        if not odd:
            break
        keys = list(dict.fromkeys(p for k in odd for p in parts(k)))
        found.update(measure_records(keys, items, target, store, method=method, settings=settings,
                                     title="measuring odd pieces again"))
        again += keys
        recent = set(keys)
    return again


def first_keys(items: dict[tuple, Piece]) -> list[tuple]:
    """What a compile measures before it solves: every block and member, and each member's own joints and
    triples (the boundaries of the assemblies that keep one model)."""
    return [k for k in items if k[0] in ("block", "network") or len(set(k[1:-1])) == 1]


def floors(costs: Costs, settings: Profiling = Profiling()) -> tuple[float, float]:
    """The figures unmeasured boundary and context terms take: below the lowest measured one by
    `settings.floor_margin` of the slowest block (a stitch only adds work to a boundary, so a measured
    term is never far below them)."""
    margin = settings.floor_margin * max(r.median_ms for r in costs.blocks.values())
    boundaries = [costs.boundary_ms(*k) for k in costs.joints]
    contexts = [costs.context_ms(*k) for k in costs.triples]
    return min(0.0, *boundaries) - margin, min(0.0, *contexts) - margin


@dataclass(eq=False)
class Profiler:
    """The latency records of one search space, measured as they are asked for; `costs()` is what they give."""

    items: dict[tuple, Piece]
    stitches: Stitches
    bundle: Callable[[], onnx.ModelProto]  # the stitches' graphs (`stitch_bundle`)
    target: Target
    store: ProfileStore
    method: Method
    settings: Profiling
    on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None
    found: dict[tuple, LatencyRecord] = field(default_factory=dict)
    fresh: set[tuple] = field(default_factory=set)
    on_demand: bool = False
    floors: tuple[float, float] = (0.0, 0.0)

    def ensure(self, keys: Sequence[tuple]) -> int:
        """Records for the pieces `keys`: looked up, else measured (odd context terms measured again); returns
        how many pieces were measured now."""
        todo = {k: self.items[k] for k in dict.fromkeys(keys) if k not in self.found}
        if not todo:
            return 0
        found, fresh = ensure_records(todo, self.target, self.store, method=self.method, settings=self.settings,
                                      on_missing=self.on_missing)
        self.found.update(found)
        again = settle_contexts(self.found, fresh, self.items, self.target, self.store, method=self.method,
                                settings=self.settings)
        self.fresh |= {*fresh, *again}
        return len(fresh) + len(again)

    def assembly(self, models: Sequence[str]) -> Piece:
        """A whole assembly as one graph, its blocks' and stitches' graphs joined as a joint's are (no export)."""
        return run_piece(models, 0, self.items, self.stitches, self.bundle)

    def settle_floors(self) -> None:
        """Fix the floors of unmeasured terms from what is measured now (nothing is unmeasured without
        `on_demand`)."""
        if self.on_demand:
            self.floors = floors(self.costs(), self.settings)

    def costs(self) -> Costs:
        """The records so far, with the floors for what is not measured."""
        return costs_of(self.found, len(self.fresh), self.floors,
                        self.settings.floor_margin if self.settings.floors == "own" else None)


def profile(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, target: Target,
            store: ProfileStore, cache: Cache, *, method: Method = Method(), settings: Profiling = Profiling(),
            on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None,
            on_demand: bool = False) -> Profiler:
    """The profile pass: a latency record for every block, joint, triple and zoo member (with `on_demand`,
    for the blocks, the members and the members' own joints and triples, the rest left to the solve), with any
    odd context term's pieces measured again."""
    bundle = stitch_bundle(stitches, target.batch, cache)
    items = pieces(zoo, partition, stitches, target.batch, cache, bundle)
    profiler = Profiler(items, stitches, bundle, target, store, method, settings, on_missing, on_demand=on_demand)
    profiler.ensure(first_keys(items) if on_demand else list(items))
    profiler.settle_floors()
    return profiler
