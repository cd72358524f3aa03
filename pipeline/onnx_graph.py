"""ONNX export of networks and extraction of blocks and stitches with onnx-graphsurgeon.

Each zoo network is exported once, with every boundary cut as an extra named
output. A block is then cut out of that graph at its boundary tensors: the
graph's inputs become the block's first cut tensor, its outputs the last, and
graphsurgeon drops everything outside. The profile measures exactly these
graphs, so what is timed is what the exporter produced for the whole network.

One rewrite follows every export. A flatten of a tensor whose strides torch
left in channels-last order (ConvNeXt's LayerNorm permutes, and every conv
after it, keep them) is exported as as_strided: a Gather of every element in
order. ONNX Runtime runs that Gather; it cost an engine 7-8% of 0.13 ms, and
whether it appears depends on what came before a block, so a block timed alone
and the same block in an engine differed (`benchmarks/results/joined.md`). An
order-preserving Gather of a whole flat tensor is a Reshape, and is written as
one.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn as nn

from .errors import DeryError, InternalError

OPSET = 18
INPUT = "x"
OUTPUT = "logits"


def cut_tensor(name: str) -> str:
    """The ONNX output name that carries a cut point's tensor."""
    return f"cut:{name}"


def export(module: nn.Module, example: Sequence[torch.Tensor], input_names: Sequence[str],
           output_names: Sequence[str]) -> onnx.ModelProto:
    """Export a module with torch.onnx's dynamo exporter (quietly), weights embedded."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), tuple(example), dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), opset_version=OPSET,
                                        external_data=False, verbose=False)
            program.save(buf)
    except Exception as e:
        raise DeryError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return gathers_as_reshapes(onnx.load_from_string(buf.getvalue()))


def gathers_as_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Gather that reads a whole 1-D tensor in order (constant indices 0..n-1 over its n
    elements, in any shape) written as a Reshape to the indices' shape."""
    graph = gs.import_onnx(model)
    changed = 0
    for node in graph.nodes:
        if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
            continue
        data, indices = node.inputs
        if not isinstance(indices, gs.Constant) or data.shape is None or len(data.shape) != 1:
            continue
        values = indices.values
        if data.shape[0] != values.size or not np.array_equal(values.ravel(), np.arange(values.size)):
            continue
        shape = gs.Constant(f"{node.name or node.outputs[0].name}:shape", np.array(values.shape, dtype=np.int64))
        node.op, node.attrs, node.inputs = "Reshape", {}, [data, shape]
        changed += 1
    if not changed:
        return model
    return _written(graph.cleanup().toposort(), model)


def _written(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """A graphsurgeon graph as a model with the IR version and opsets of `like`."""
    out = gs.export_onnx(graph)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    return out


def _resolve(graph: gs.Graph, name: str) -> gs.Variable:
    """The real tensor behind a graph output (exporters may add Identity nodes in front of outputs)."""
    tensors = graph.tensors()
    if name not in tensors:
        raise InternalError(f"tensor {name!r} is not in the exported graph")
    t = tensors[name]
    while len(t.inputs) == 1 and t.inputs[0].op == "Identity" and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return t


def extract(model: onnx.ModelProto, first: str, last: str, *, input_name: str = INPUT,
            output_name: str = OUTPUT) -> onnx.ModelProto:
    """The subgraph between tensor `first` and tensor `last` (graph output names) as a model."""
    graph = gs.import_onnx(model)
    src, dst = _resolve(graph, first), _resolve(graph, last)
    if dst is src:
        raise InternalError(f"empty segment {first} -> {last}")
    for i, t in enumerate([*graph.inputs, *graph.outputs]):
        if t is not src and t is not dst and t.name in (input_name, output_name):
            t.name = f"dropped:{i}"
    src.inputs.clear()
    src.name, dst.name = input_name, output_name
    graph.inputs = [src]
    graph.outputs = [dst]
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    sub = _written(graph, model)
    missing = {i.name for i in sub.graph.input} - {input_name}
    if missing:
        raise InternalError(f"segment {first} -> {last} needs more inputs than its first cut: {sorted(missing)}")
    return sub


def chain(models: Sequence[onnx.ModelProto], *, input_name: str = INPUT,
          output_name: str = OUTPUT) -> onnx.ModelProto:
    """Models of one input and one output each, joined output to input into one model (`input_name` in,
    `output_name` out), so that a runtime optimises across the joins as it does in a whole engine."""
    joined = onnx.compose.add_prefix(models[0], "p0/")
    for i, model in enumerate(models[1:], start=1):
        following = onnx.compose.add_prefix(model, f"p{i}/")
        joined = onnx.compose.merge_models(joined, following,
                                           io_map=[(joined.graph.output[0].name, following.graph.input[0].name)])
    graph = gs.import_onnx(joined)
    graph.inputs[0].name, graph.outputs[0].name = input_name, output_name
    return _written(graph.cleanup().toposort(), models[0])
