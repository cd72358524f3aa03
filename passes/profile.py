"""profile: the latency of every block, joint and whole zoo member on the target.

Blocks are cut out of each network's ONNX export and whole networks are their
ONNX with the extra outputs dropped. An engine is not the sum of its blocks
timed alone: it is one call instead of one per block, and the runtime fuses
and keeps its memory layout across a boundary. So every boundary an assembly
can have is timed in context, as a joint: block a of set j, the stitch from a
to b (none when a == b) and block b of set j + 1 chained into one graph. What a
boundary adds to an engine is its joint less its two blocks (`Costs.boundary_ms`,
often negative); an assembly's latency is its blocks plus its boundaries.
Each piece has a fingerprint (what decides its latency), so the profile store
answers for pieces measured before, by this run or on another machine; only
what is missing is measured, and each group of new records is saved as soon
as it is measured (`CHUNK`); ONNX graphs are built only for what is measured.

When the target's device is not here, stored records are used; anything
missing is an error that lists the pieces and the command that measures them
on the right device.
"""
from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx
import torch
import torch.nn as nn
from dery import progress
from dery.backends import Backend, Piece, availability, get_backend
from dery.cache import Cache, content_key
from dery.errors import DeryError
from dery.ir import LatencyRecord, Partition
from dery.measure import Method
from dery.onnx_graph import INPUT, OUTPUT, chain, cut_tensor, export, extract
from dery.passes.lower import Lowered
from dery.passes.stitch import Stitches
from dery.profile_store import ProfileStore, group_of
from dery.reference import measure_referenced, reference_piece
from dery.targets import Target


@dataclass(frozen=True, eq=False)
class Costs:
    """Latency records for the search space: blocks by (model, set), joints by (source, target, boundary),
    whole zoo members by name."""

    blocks: dict[tuple[str, int], LatencyRecord] = field(repr=False)
    joints: dict[tuple[str, str, int], LatencyRecord] = field(repr=False)
    networks: dict[str, LatencyRecord] = field(repr=False)
    measured: int
    reused: int

    def boundary_ms(self, a: str, b: str, j: int) -> float:
        """What boundary j from model a to model b adds to an engine: its joint less its two blocks."""
        return self.joints[a, b, j].median_ms - self.blocks[a, j].median_ms - self.blocks[b, j + 1].median_ms

    def sums(self, models: Sequence[str]) -> tuple[float, float]:
        """(sum of block medians, sum of boundaries) of an assembly; their total is its in-context latency."""
        return (sum(self.blocks[m, k].median_ms for k, m in enumerate(models)),
                sum(self.boundary_ms(a, b, j) for j, (a, b) in enumerate(zip(models, models[1:]))))


def network_onnx(lowered: Lowered, cuts: Sequence[str], batch: int, cache: Cache) -> onnx.ModelProto:
    """The network's ONNX with the named cuts as extra outputs (cached by weights and cuts)."""
    net = lowered.network
    key = content_key("onnx", net.spec.arch, net.weights_key, list(cuts), batch, torch.__version__)

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
                      batch, torch.__version__)

    def make() -> onnx.ModelProto:
        mods = [stitches.modules[k] for k in keys]
        xs = [torch.rand(batch, *m.src.shape[1:]) for m in mods]
        names = [_stitch_name(*k) for k in keys]
        return export(_Bundle(mods), xs, [f"in:{n}" for n in names], [f"out:{n}" for n in names])

    return cache.get_or_make("onnx", f"stitches-{key}", ".onnx", make=make,
                             save=lambda m, p: p.write_bytes(m.SerializeToString()),
                             load=lambda p: onnx.load(str(p)), what="ONNX export")


def pieces(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, batch: int,
           cache: Cache) -> dict[tuple, Piece]:
    """Every piece of the search space: ("block", model, k), ("joint", a, b, j) for every boundary an assembly
    can have, ("network", model)."""
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
    bundle = functools.cache(lambda: stitches_onnx(stitches, batch, cache))
    for j in range(partition.k - 1):
        for a in partition.models:
            for b in partition.models:
                if a != b and stitches.get(a, b, j) is None:
                    continue
                out["joint", a, b, j] = joint_piece(out["block", a, j], out["block", b, j + 1], a, b, j,
                                                    stitches, bundle)
    return out


def joint_piece(left: Piece, right: Piece, a: str, b: str, j: int, stitches: Stitches,
                bundle: Callable[[], onnx.ModelProto]) -> Piece:
    """Block a of set j, the stitch a -> b (none when a == b) and block b of set j + 1 as one graph."""
    if a == b:
        return Piece(f"{a}[{j}..{j + 1}]", content_key("joint", left.fingerprint, right.fingerprint),
                     left.input_shape, lambda: chain([left.onnx, right.onnx]),
                     lambda: nn.Sequential(left.module(), right.module()))
    n = _stitch_name(a, b, j)
    return Piece(f"{a}[{j}]>{b}[{j + 1}]", content_key("joint", left.fingerprint, stitches.get(a, b, j).fingerprint,
                                                         right.fingerprint),
                 left.input_shape, lambda: chain([left.onnx, extract(bundle(), f"in:{n}", f"out:{n}"), right.onnx]),
                 lambda: nn.Sequential(left.module(), stitches.modules[a, b, j], right.module()))


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
    return LatencyRecord(piece.fingerprint, target.name, device, backend.NAME, backend.version(), target.precision,
                         target.batch, (target.batch, *piece.input_shape), 0.0, 0.0, 0.0, 0.0, 0, "", "")


def measure_pieces(items: Sequence[Piece], target: Target, device: str, backend: Backend, method: Method,
                   quickest_ms: float | None) -> list[LatencyRecord]:
    """Measure pieces together now, with the reference graph (their windows in turn, see dery.measure and
    dery.reference), and return their records."""
    timings, reference_ms, slow = measure_referenced([backend.step(p, target) for p in items],
                                                     backend.step(reference_piece(), target), method, quickest_ms)
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return [LatencyRecord(p.fingerprint, target.name, device, backend.NAME, backend.version(), target.precision,
                          target.batch, (target.batch, *p.input_shape), t.median_ms, t.p90_ms, t.min_ms, t.cv,
                          t.runs, when, method.describe() + ("; noisy" if t.noisy else "")
                          + ("; in a slow spell" if slow else ""), reference_ms=reference_ms)
            for p, t in zip(items, timings)]


def missing_error(target: Target, names: Sequence[str], why: str) -> DeryError:
    """The error for records that cannot be measured here."""
    listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return DeryError(f"no latency records for {len(names)} pieces on target {target.name} ({listing}) and {why}; "
                     f"run `dery profile --target {target.name}` with the same --zoo on a machine with the "
                     f"target's device and merge its table (`dery profile --merge`), or pass --allow-estimates")


CHUNK = 32  # pieces measured together: their windows spread over time; saved (and resumed) per chunk


def ensure_records(items: dict[tuple, Piece], target: Target, store: ProfileStore, *, method: Method,
                   on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None
                   ) -> tuple[dict[tuple, LatencyRecord], int]:
    """Look every piece up in the store; measure what is missing (here) or hand it to `on_missing`."""
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
        return found, 0
    with progress.task(f"profiling on {target.name}", len(todo)) as advance:
        for start in range(0, len(todo), CHUNK):
            keys = todo[start:start + CHUNK]
            records = measure_pieces([items[k] for k in keys], target, device, backend, method,
                                     store.quickest_ms(group_of(target, device)))
            store.add_all(records)
            found.update(zip(keys, records))
            advance(len(keys), note=items[keys[-1]].name)
    return found, len(todo)


def profile(zoo: Sequence[Lowered], partition: Partition, stitches: Stitches, target: Target,
            store: ProfileStore, cache: Cache, *, method: Method = Method(),
            on_missing: Callable[[dict[tuple, Piece]], dict[tuple, LatencyRecord]] | None = None) -> Costs:
    """The profile pass: a latency record for every block, joint and zoo member."""
    items = pieces(zoo, partition, stitches, target.batch, cache)
    found, measured = ensure_records(items, target, store, method=method, on_missing=on_missing)
    return Costs({(k[1], k[2]): r for k, r in found.items() if k[0] == "block"},
                 {(k[1], k[2], k[3]): r for k, r in found.items() if k[0] == "joint"},
                 {k[1]: r for k, r in found.items() if k[0] == "network"},
                 measured, len(found) - measured)

