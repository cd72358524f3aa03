"""lower: a network becomes a torch.fx graph with cut points and runnable segments.

A cut point is a node after which the rest of the network depends on that one
tensor alone. We find them by sweeping the graph in execution order and keeping
the set of values still needed later; where that set is exactly the node just
computed, a single tensor crosses. Two things would hide real cuts and are
removed first:

* shape arithmetic: values such as `x.shape[-1]` are the same for every input
  of the network's fixed size, so they are folded into constants; the batch
  size is the one shape value that varies, and a segment recomputes it from
  its own input;
* in-place ops, which would let a later op overwrite a cut's value.

Values that do not depend on the input (parameters, position embeddings, class
tokens) are not crossings: a segment copies what it needs, so a class token
travels with the block that uses it. Fine-grained cuts are reduced to
block-level ones: the output of a module held in a container (blocks.3,
layer2.1, stages.1) or of a direct child of the network, dropping a cut when
nothing with cost lies between it and the next one.

If tracing fails, the network is traced again with timm's feature_info stages
as opaque leaves, with a warning that names the reason.
"""
from __future__ import annotations

import hashlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from dery.errors import DeryError, InternalError
from dery.ir import GRAPH_REVISION, Block, CutPoint
from dery.zoo import Network
from torch.utils.flop_counter import FlopCounterMode

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ROOT = "net"  # the classifier inside dery's Normalized wrapper
_LITERAL = (int, float, bool, str, type(None), torch.dtype, torch.device)


class _Tracer(fx.Tracer):
    """torch.fx tracer that honours timm's do-not-trace lists plus extra leaf module paths."""

    def __init__(self, leaf_paths: frozenset[str] = frozenset()):
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaf_types = tuple(get_notrace_modules())
        self._leaf_paths = leaf_paths

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self._leaf_paths or isinstance(m, self._leaf_types)
                or super().is_leaf_module(m, qualname))


def _is_literal(v: Any) -> bool:
    if isinstance(v, (tuple, list, torch.Size)):
        return all(_is_literal(x) for x in v)
    return isinstance(v, _LITERAL)


def _as_literal(v: Any) -> Any:
    if isinstance(v, (tuple, torch.Size)):
        return tuple(_as_literal(x) for x in v)
    if isinstance(v, list):
        return [_as_literal(x) for x in v]
    return v


def _replace_arg(a: Any, old: fx.Node, new: Any) -> Any:
    if isinstance(a, fx.Node):
        return new if a is old else a
    if isinstance(a, (tuple, list)):
        return type(a)(_replace_arg(x, old, new) for x in a)
    if isinstance(a, dict):
        return {k: _replace_arg(x, old, new) for k, x in a.items()}
    if isinstance(a, slice):
        return slice(*(_replace_arg(x, old, new) for x in (a.start, a.stop, a.step)))
    return a


def _no_inplace(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _trace(module: nn.Module, leaf_paths: frozenset[str]) -> fx.GraphModule:
    params = list(inspect.signature(module.forward).parameters.values())
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    graph = _Tracer(leaf_paths).trace(module, concrete_args=concrete or None)
    return fx.GraphModule(module, graph)


def _outplace(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.kwargs.get("inplace") is True:
            n.kwargs = {**n.kwargs, "inplace": False}
        if n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_") \
                and hasattr(torch.Tensor, n.target[:-1]):
            n.target = n.target[:-1]


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping every node's value and (optionally) its FLOPs."""

    def __init__(self, gm: fx.GraphModule, count_flops: bool):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}
        self.flops: dict[fx.Node, int] = {}
        self._count = count_flops

    def run_node(self, n: fx.Node) -> Any:
        if self._count and n.op in ("call_module", "call_function", "call_method"):
            with FlopCounterMode(display=False) as fc:
                out = super().run_node(n)
            self.flops[n] = int(fc.get_total_flops())
        else:
            out = super().run_node(n)
        self.values[n] = out
        return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


@dataclass(frozen=True, eq=False)
class Lowered:
    """A network as an fx graph, its block-level cut points, and per-node costs."""

    network: Network
    gm: fx.GraphModule = field(repr=False)
    cuts: tuple[CutPoint, ...]
    method: str
    warning: str | None
    kinds: dict[str, str] = field(repr=False)
    node_flops: dict[str, int] = field(repr=False)
    node_params: dict[str, frozenset[str]] = field(repr=False)
    param_sizes: dict[str, int] = field(repr=False)
    fine_cuts: tuple[str, ...] = field(repr=False)
    features_end: int = -1
    node_bytes: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.network.name

    def cut(self, name: str) -> CutPoint:
        for c in self.cuts:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no cut point {name!r}")

    def boundary_cuts(self) -> tuple[CutPoint, ...]:
        """Cut points where a partition may place a block boundary: feature maps and tokens
        up to the end of the feature extractor (the head stays whole in the last block)."""
        return tuple(c for c in self.cuts[:self.features_end + 1] if c.layout in ("nchw", "nhwc", "nlc"))

    def _nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)

    def _span(self, first: str | None, last: str | None) -> list[fx.Node]:
        nodes = self._nodes()
        pos = {n.name: i for i, n in enumerate(nodes)}
        lo = pos[first] + 1 if first is not None else 0
        hi = pos[last] if last is not None else len(nodes) - 1
        return [n for n in nodes[lo:hi + 1] if self.kinds[n.name] != "const" and n.op not in ("placeholder", "output")
                and self.kinds[n.name] != "static"]

    def segment(self, first: str | None, last: str | None) -> fx.GraphModule:
        """The network from just after cut `first` (None: input) to cut `last` (None: logits) as a module."""
        nodes = self._nodes()
        by_name = {n.name: n for n in nodes}
        out_node = next(n for n in nodes if n.op == "output")
        src = by_name[first] if first is not None else next(n for n in nodes if n.op == "placeholder")
        end = by_name[last] if last is not None else out_node.args[0]
        g = fx.Graph()
        x = g.placeholder("x")
        env: dict[fx.Node, fx.Node] = {src: x}

        def arg(n: fx.Node) -> fx.Node:
            if n in env:
                return env[n]
            kind = self.kinds[n.name]
            if kind == "batch":
                env[n] = g.call_method("size", (x, 0))
            elif kind == "static":
                env[n] = g.node_copy(n, arg)
            else:
                raise InternalError(f"segment {first}->{last} of {self.name} needs {n.name} from outside")
            return env[n]

        for n in self._span(first, last):
            env[n] = g.node_copy(n, arg)
        g.output(arg(end) if isinstance(end, fx.Node) else end)
        sub = fx.GraphModule(self.gm, g)
        sub.eval()
        return sub

    def with_cut_outputs(self, names: tuple[str, ...] | None = None) -> fx.GraphModule:
        """The whole network returning (logits, *cut tensors) for the named cuts (default: all)."""
        names = tuple(c.name for c in self.cuts) if names is None else names
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for n in self.gm.graph.nodes:
            if n.op == "output":
                g.output((env[n.args[0]], *(env[nodes[c]] for c in names)))
            else:
                env[n] = g.node_copy(n, lambda a: env[a])
        sub = fx.GraphModule(self.gm, g)
        sub.eval()
        return sub

    def cost(self, first: str | None, last: str | None) -> tuple[int, int]:
        """(params, FLOPs at batch 1) of the segment first -> last."""
        span = self._span(first, last)
        params = frozenset().union(*(self.node_params.get(n.name, frozenset()) for n in span))
        return sum(self.param_sizes[p] for p in params), sum(self.node_flops.get(n.name, 0) for n in span)

    def peak_activation(self, first: str | None, last: str | None) -> int:
        """Peak bytes of live activations (batch 1, float32) while the segment runs, its input included."""
        span = self._span(first, last)
        inside = {n.name for n in span}
        pos = {n.name: i for i, n in enumerate(span)}
        last_use = {n.name: max((pos[u.name] for u in n.users if u.name in inside), default=pos[n.name])
                    for n in span}
        source = first if first is not None else next(n.name for n in self.gm.graph.nodes if n.op == "placeholder")
        src_end = max((pos[u.name] for u in self._nodes()[self._index(source)].users if u.name in inside), default=0)
        peak = 0
        for i in range(len(span)):
            live = sum(self.node_bytes.get(m.name, 0) for m in span[:i + 1] if last_use[m.name] >= i)
            peak = max(peak, live + (self.node_bytes.get(source, 0) if src_end >= i else 0))
        return peak

    def _index(self, name: str) -> int:
        return next(i for i, n in enumerate(self._nodes()) if n.name == name)

    def fingerprint(self, first: str | None, last: str | None) -> str:
        """Hash of what determines the segment's latency: structure, parameter shapes, input shape, dtype."""
        sub = self.segment(first, last)
        h = hashlib.sha256(sub.code.encode())
        for n in sub.graph.nodes:
            if n.op == "call_module":
                h.update(repr(sub.get_submodule(n.target)).encode())
        for name, t in sorted({**dict(sub.named_parameters()), **dict(sub.named_buffers())}.items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        shape = self.network.input_shape if first is None else self.cut(first).shape[1:]
        h.update(f"in:{tuple(shape)}:float32:graph{GRAPH_REVISION}".encode())
        return h.hexdigest()[:24]

    def block(self, first: str | None, last: str | None) -> Block:
        """The IR Block of a segment."""
        params, flops = self.cost(first, last)
        return Block(self.name, first, last, self.fingerprint(first, last), params, flops,
                     self.peak_activation(first, last))


def _classify(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> tuple[dict[str, str], _Recorder]:
    """Label each node: tensor / batch (== batch size) / const (same at any batch) / other; static = no input dep."""
    runs = []
    for b in (1, 2):
        rec = _Recorder(gm, count_flops=(b == 1))
        with torch.no_grad():
            rec.run(torch.rand(b, *input_shape, generator=torch.Generator().manual_seed(0)))
        runs.append(rec)
    dep: set[fx.Node] = set()
    kinds: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
        v1, v2 = runs[0].values.get(n), runs[1].values.get(n)
        if n.op == "output":
            kinds[n.name] = "output"
        elif n not in dep:
            kinds[n.name] = "static"
        elif isinstance(v1, torch.Tensor):
            kinds[n.name] = "tensor"
        elif _is_literal(v1) and _same(v1, v2):
            kinds[n.name] = "const"
        elif isinstance(v1, int) and not isinstance(v1, bool) and v1 == 1 and v2 == 2:
            kinds[n.name] = "batch"
        else:
            kinds[n.name] = "other"
    return kinds, runs[0]


def _fold_constants(gm: fx.GraphModule, kinds: dict[str, str], values: dict[fx.Node, Any]) -> None:
    """Replace shape-only values with literals and drop the assertions that checked them."""
    for n in list(gm.graph.nodes):
        if kinds.get(n.name) == "const":
            lit = _as_literal(values[n])
            for user in list(n.users):
                user.args = _replace_arg(user.args, n, lit)
                user.kwargs = _replace_arg(user.kwargs, n, lit)
    for n in reversed(list(gm.graph.nodes)):
        literal_call = n.op == "call_function" and not n.all_input_nodes
        if not n.users and (kinds.get(n.name) == "const" or (literal_call and n.target in (torch._assert,))):
            gm.graph.erase_node(n)
    for n in reversed(list(gm.graph.nodes)):
        if not n.users and n.op in ("call_function", "call_method", "call_module", "get_attr") \
                and kinds.get(n.name) in ("const", "static", "batch", "other"):
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()


def _single_tensor_cuts(gm: fx.GraphModule, kinds: dict[str, str]) -> list[fx.Node]:
    """Nodes after which exactly one value (that node's tensor) is still needed."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    live: set[fx.Node] = set()
    cuts = []
    for n in nodes:
        if n.op == "output":
            break
        for a in n.all_input_nodes:
            if a in live and last_use[a] <= pos[n]:
                live.discard(a)
        if kinds[n.name] in ("tensor", "other") and n.users:
            live.add(n)
        if live == {n} and n.op != "placeholder" and kinds[n.name] == "tensor":
            cuts.append(n)
    return cuts


def _module_stack(n: fx.Node | None) -> dict[str, type]:
    stack = n.meta.get("nn_module_stack", {}) if n is not None else {}
    return {path: info[1] if isinstance(info, tuple) else type(None) for path, info in stack.items()}


def _stages(module: nn.Module) -> frozenset[str]:
    """Paths of timm's feature_info stage modules (their children are blocks)."""
    info = getattr(getattr(module, ROOT, None), "feature_info", None) or []
    return frozenset(f"{ROOT}.{f['module']}" for f in info if isinstance(f, dict) and f.get("module"))


def _block_level(gm: fx.GraphModule, root: nn.Module, cuts: list[fx.Node], kinds: dict[str, str]) -> list[fx.Node]:
    """Keep cuts that end a block: a composite module held in a container (layers inside a block's own
    Sequential are not blocks), a child of a feature_info stage (timm's RegNet stages hold b1, b2, ...
    as plain attributes), or a direct child of the network."""
    modules = dict(root.named_modules())
    stages = _stages(root)
    order = [n for n in gm.graph.nodes if kinds[n.name] in ("tensor", "other", "batch")]
    nxt = {a: b for a, b in zip(order, order[1:])}

    def is_block(path: str) -> bool:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        me = modules.get(path)
        composite = me is not None and next(me.children(), None) is not None
        return parent == ROOT or parent in stages or (composite and isinstance(modules.get(parent), CONTAINERS))

    return [n for n in cuts if any(is_block(p) for p in set(_module_stack(n)) - set(_module_stack(nxt.get(n))))]


def _layout(n: fx.Node, rec: _Recorder, gm: fx.GraphModule, prefix: int) -> tuple[str, int]:
    """How to read a cut's tensor. 4-D tensors are NCHW or NHWC: told apart by which dimensions are
    equal (square grids), else by the first module that consumes the tensor unchanged in shape."""
    shape = _shape(rec, n)
    if len(shape) == 2:
        return "nc", 0
    if len(shape) == 3:
        n_tok = shape[1] - prefix
        side = int(round(max(n_tok, 0) ** 0.5))
        return "nlc", prefix if side * side == n_tok and n_tok > 0 else 0
    if len(shape) != 4:
        return "other", 0
    _, d1, d2, d3 = shape
    if d2 == d3 and d1 != d2:
        return "nchw", 0
    if d1 == d2 and d3 != d1:
        return "nhwc", 0
    modules = dict(gm.named_modules())
    frontier, seen = list(n.users), set()
    while frontier:
        u = frontier.pop(0)
        if u in seen or getattr(u.target, "__name__", u.target) in ("permute", "transpose"):
            continue
        seen.add(u)
        if u.op == "call_module":
            m = modules[u.target]
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                return "nchw", 0
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                return "nhwc", 0
        out = rec.values.get(u)
        if isinstance(out, torch.Tensor) and tuple(out.shape) == shape:
            frontier.extend(u.users)
    return "nchw", 0


def _param_index(gm: fx.GraphModule) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    by_id = {id(p): name for name, p in gm.named_parameters(remove_duplicate=True)}
    sizes = {name: p.numel() for name, p in gm.named_parameters(remove_duplicate=True)}
    per_node: dict[str, frozenset[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            per_node[n.name] = frozenset(by_id[id(p)] for p in gm.get_submodule(n.target).parameters()
                                         if id(p) in by_id)
        elif n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            if id(obj) in by_id:
                per_node[n.name] = frozenset({by_id[id(obj)]})
    return per_node, sizes


def _static_users(gm: fx.GraphModule, kinds: dict[str, str], node_params: dict[str, frozenset[str]]) -> None:
    """Charge parameters read through static nodes (e.g. pos_embed) to the first input-dependent user."""
    for n in gm.graph.nodes:
        if kinds[n.name] != "static" or n.name not in node_params:
            continue
        frontier, seen = list(n.users), set()
        while frontier:
            u = frontier.pop(0)
            if u in seen:
                continue
            seen.add(u)
            if kinds.get(u.name) == "static":
                frontier.extend(u.users)
            else:
                node_params[u.name] = node_params.get(u.name, frozenset()) | node_params[n.name]


def _shape(rec: _Recorder, n: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in rec.values[n].shape)


def _features_end(network: Network, kept: list[fx.Node], rec: _Recorder) -> int:
    """Index of the last kept cut inside the feature extractor: the one whose value is timm's
    forward_features output (every cut when the network has no forward_features)."""
    forward_features = getattr(network.module.net, "forward_features", None)
    if forward_features is None:
        return len(kept) - 1
    x = next(v for n, v in rec.values.items() if n.op == "placeholder")
    with torch.no_grad():
        feats = forward_features((x - network.module.mean) / network.module.std)
    for i in range(len(kept) - 1, -1, -1):
        v = rec.values[kept[i]]
        if isinstance(feats, torch.Tensor) and v.shape == feats.shape and torch.allclose(v, feats, atol=1e-6):
            return i
    return len(kept) - 1


def lower(network: Network) -> Lowered:
    """Trace a network and find its block-level cut points (the `lower` pass)."""
    module = network.module
    _no_inplace(module)
    method, warning = "fx", None
    try:
        gm = _trace(module, frozenset())
    except Exception as e:  # tracing failures come in every exception type
        stages = _stages(module)
        if not stages:
            raise DeryError(f"cannot lower {network.name}: torch.fx tracing failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}) and it has no timm feature_info to fall back on") from e
        warning = (f"{network.name}: torch.fx could not trace inside its stages ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:160]}); cutting only at timm feature_info stages")
        warnings.warn(warning, stacklevel=2)
        try:
            gm = _trace(module, stages)
        except Exception as e2:
            raise DeryError(f"cannot lower {network.name}: torch.fx tracing failed ({e}) and so did tracing with "
                            f"its feature_info stages as leaves ({e2})") from e2
        method = "feature_info"
    _outplace(gm)
    gm.recompile()
    kinds, rec = _classify(gm, network.input_shape)
    _fold_constants(gm, kinds, rec.values)
    node_params, sizes = _param_index(gm)
    _static_users(gm, kinds, node_params)
    fine = _single_tensor_cuts(gm, kinds)
    coarse = _block_level(gm, module, fine, kinds)
    prefix = int(getattr(module.net, "num_prefix_tokens", 0) or 0)
    node_flops = {n.name: f for n, f in rec.flops.items()}
    node_bytes = {n.name: v.numel() * 4 for n, v in rec.values.items() if isinstance(v, torch.Tensor)}

    draft = Lowered(network, gm, (), method, warning, kinds, node_flops, node_params, sizes,
                    tuple(n.name for n in fine))
    kept: list[fx.Node] = []
    for n in coarse:
        if kept and _shape(rec, kept[-1]) == _shape(rec, n) and draft.cost(kept[-1].name, n.name) == (0, 0):
            kept.pop()
        kept.append(n)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    kept = [n for n in kept if n is not out]
    cuts = []
    end = _features_end(network, kept, rec)
    for i, n in enumerate(kept):
        shape = _shape(rec, n)
        layout, pre = _layout(n, rec, gm, prefix)
        cuts.append(CutPoint(network.name, n.name, i, shape, layout, pre))
    return Lowered(network, gm, tuple(cuts), method, warning, kinds, node_flops, node_params, sizes,
                   tuple(n.name for n in fine), end, node_bytes)


def run_blockwise(lowered: Lowered, x: torch.Tensor, cuts: tuple[str, ...] | None = None) -> torch.Tensor:
    """Run the network segment by segment through the given cuts (default: all)."""
    names = [c.name for c in lowered.cuts] if cuts is None else list(cuts)
    bounds: list[str | None] = [None, *names, None]
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            x = lowered.segment(a, b)(x)
    return x

