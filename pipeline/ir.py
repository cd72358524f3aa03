"""dery's IR: small frozen dataclasses that passes exchange, JSON-serialisable.

Every value carries enough to be cached and reported: names of fx nodes, shapes
at batch 1, fingerprints of what determines latency. `to_json`/`from_json` are
exact inverses (tested).
"""
from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# How dery writes a piece's or an engine's graph (dery.onnx_graph): part of every latency fingerprint and export
# key, so records and exports made with an earlier graph writer are not reused. 2: identity Gathers as Reshapes.
GRAPH_REVISION = 2


@dataclass(frozen=True)
class CutPoint:
    """A place where a network can be cut: after fx node `name`, one tensor crosses.

    `layout` says how to read the tensor: nchw / nhwc feature maps, nlc token
    sequences (the first `prefix_tokens` are class/register tokens, the rest a
    square grid), nc vectors. `shape` is at batch 1.
    """

    model: str
    name: str
    index: int
    shape: tuple[int, ...]
    layout: str
    prefix_tokens: int = 0

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "nchw" else self.shape[-1]

    @property
    def grid(self) -> tuple[int, int] | None:
        """Spatial grid (H, W) of a feature map or of the patch tokens, if it has one."""
        if self.layout == "nchw":
            return (self.shape[2], self.shape[3])
        if self.layout == "nhwc":
            return (self.shape[1], self.shape[2])
        if self.layout == "nlc":
            n = self.shape[1] - self.prefix_tokens
            side = int(round(n ** 0.5))
            return (side, side) if side * side == n else None
        return None


@dataclass(frozen=True)
class Block:
    """Model `model` from just after cut `first` (None: the network input) to cut `last`
    (None: the logits). `fingerprint` hashes what decides its latency, not its weights;
    `activation_bytes` is the peak of live activations while it runs (batch 1, float32)."""

    model: str
    first: str | None
    last: str | None
    fingerprint: str
    params: int
    flops: int
    activation_bytes: int = 0


@dataclass(frozen=True)
class Partition:
    """K blocks per network; the k-th blocks of all networks form equivalence set k.

    `boundaries[m]` lists the K-1 cut names of model `models[m]`; set k runs from
    boundary k-1 to boundary k (the input and the logits at the ends).
    """

    k: int
    models: tuple[str, ...]
    boundaries: tuple[tuple[str, ...], ...]
    blocks: tuple[tuple[Block, ...], ...]
    objective: float
    balance: str
    status: str

    def block(self, model: str, k: int) -> Block:
        return self.blocks[self.models.index(model)][k]


@dataclass(frozen=True)
class Stitch:
    """Maps model `source`'s tensor at boundary `boundary` to what model `target`'s next block expects."""

    source: str
    target: str
    boundary: int
    kind: str
    weights: str
    r2: float
    fingerprint: str
    params: int
    flops: int


@dataclass(frozen=True)
class Group:
    """A measurement group: what a record or calibration point was measured with, but the piece. Records of one
    group compare with each other; records and points carry these fields themselves."""

    target: str
    device: str
    backend: str
    backend_version: str
    precision: str
    batch: int

    @property
    def group(self) -> Group:
        return Group(*(getattr(self, f.name) for f in dataclasses.fields(Group)))


@dataclass(frozen=True)
class LatencyRecord(Group):
    """One measured (or estimated) latency, keyed by what decides it, with the time the reference graph took
    in the same measurement group and the anchor its median is expressed at (0 for estimates; see
    dery.reference)."""

    fingerprint: str
    shape: tuple[int, ...]
    median_ms: float
    p90_ms: float
    min_ms: float
    cv: float
    runs: int
    when: str
    how: str
    estimated: bool = False
    reference_ms: float = 0.0
    anchor_ms: float = 0.0

    @property
    def key(self) -> str:
        return "|".join((self.fingerprint, self.target, self.device, self.backend, self.backend_version,
                         self.precision, str(self.batch), "x".join(map(str, self.shape))))

    @classmethod
    def in_group(cls, group: Group, fingerprint: str, shape: tuple[int, ...], **fields: Any) -> LatencyRecord:
        """A record of `group`; the timing fields by name."""
        return cls(**dataclasses.asdict(group), fingerprint=fingerprint, shape=tuple(shape), **fields)


@dataclass(frozen=True)
class Assembly:
    """One block per set (the model each set takes) and the stitches between them."""

    models: tuple[str, ...]
    blocks: tuple[Block, ...]
    stitches: tuple[Stitch | None, ...]


def to_json(value: Any) -> Any:
    """A dataclass (nested) as plain JSON values; tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def _build(tp: Any, raw: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner[0], raw)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], r) for r in raw)
        return tuple(_build(a, r) for a, r in zip(args, raw))
    if dataclasses.is_dataclass(tp):
        return from_json(tp, raw)
    if tp is float:
        return float(raw)
    return raw


def from_json(cls: type[T], raw: dict[str, Any]) -> T:
    """Inverse of `to_json` for one of the IR dataclasses."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _build(hints[f.name], raw[f.name]) for f in dataclasses.fields(cls) if f.name in raw})


def utc_timestamp() -> str:
    """Now, in UTC to the second, as ISO 8601: the `when` of every record, point and engine."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
