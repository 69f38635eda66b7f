"""Blockwise verification: compare each attention block of the original and the converted model.

Whole-model verification runs both models in onnxruntime, which holds every weight of a model in
memory (about 3.3x the weights of an fp16 model on the CPU provider: 40+ GB for 7B). Here each
attention block is cut out of both graphs as a small model and run on its own, so memory is
bounded by one block's weights (0.8-1.3 GB peak for 7B/8B, see benchmarks/RESULTS.md).

Boundaries come from the dataflow, not from names of layers. A value is *stable* when the other
model has a value of the same name, dtype and shape: the split never reuses a name for a different
tensor (new tensors get ``.h<k>`` / ``.concat_heads`` / ``.split_heads`` names), and the shape check
covers a layout pass keeping a tensor's name in another layout. For every attention core
(``Softmax`` -> ``MatMul(P, V)``) of the original:

- the block **output** is the first stable value after ``MatMul(P, V)`` (breadth first over
  consumers): usually the ``o_proj`` output; a graph output also ends the search;
- the block **inputs** (a cut of both graphs) start as the stable values where the original's walk
  back from the output stops (the normalised hidden state feeding q/k/v, the mask and RoPE tables,
  past KV graph inputs). Graph outputs are never a stopping point, so present KV outputs computed
  inside the block are compared too (extra block outputs). When the converted graph's walk reaches
  further back (packed q|k|v: each head's q is computed from the hidden state, upstream of the
  original's Split), that value joins the cut and cut values computed from it leave it, so no two
  fed values depend on each other; repeated until both walks stop on the cut;
- the converted block is the converted graph walked back from the same outputs to the same cut
  (per-head KV inputs/outputs, ``<name>.h<k>``, are cut from / joined into the original ones).

Values for the cut, in this order: graph inputs from :func:`plan_inputs` (or the caller's
``inputs``: real causal masks, positions, RoPE, normal KV cache; a graph input only one block reads,
such as a layer's past KV, is taken from the mapping when that block runs and dropped after it, so
a lazy :class:`~mha2sha.verify.inputs.ModelInputs` never holds every layer's cache); intermediate values whose
computation from graph inputs needs at most :data:`CHEAP_CONE_BYTES` of weights (mask expansion,
RoPE cos/sin from position ids, everything in small models) are computed by running that part of
the original model once; anything else (hidden states behind the embedding and earlier layers) is
normal(0, 1) in its dtype, seeded by its name, drawn when its block runs.

Each block model is serialised in memory (weights embedded; lazy per-head slices are materialised
one block at a time) and run by onnxruntime's CPU provider at the optimisation level of the full
verification. fp16/bf16 outputs beyond ``rtol`` are re-run in fp32 (weights, I/O, Casts and
constants upcast): CPU kernels round a 64-column fp16 matmul differently from a 2048-column one, so
a block passes when its fp32 run matches and the fp16 difference is within
:data:`LOW_PRECISION_EPS` eps (the row's note keeps both numbers). Rows of the returned
:class:`Verification` are named ``<block>/<output>``.

Command line: ``mha2sha verify original.onnx converted.onnx [--verify blocks|full] [--rtol 1e-5]``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.errors import InternalError, UserError
from mha2sha.find.anchors import find_attention_cores
from mha2sha.graph import FUSED_ATTENTION_OPS, name_of
from mha2sha.io.names import values_by_name
from mha2sha.io.prepare import infer_shapes
from mha2sha.verify.runner import (
    Optimization,
    Verification,
    compare_outputs,
    from_ort,
    one_line,
    session_options,
    to_ort,
)

__all__ = [
    "Block",
    "CHEAP_CONE_BYTES",
    "cone_of",
    "run_sub_model",
    "LOW_PRECISION_EPS",
    "find_blocks",
    "infer_pieces",
    "low_precision_bound",
    "verify_blocks",
]

logger = logging.getLogger(__name__)

#: Intermediate block inputs computed exactly (from graph inputs) when that needs at most this
#: many bytes of weights; bigger computations (hidden states) are drawn instead.
CHEAP_CONE_BYTES = 64 << 20
_PROTO_LIMIT = (2 << 30) - (64 << 20)  # protobuf's 2 GB, with room for the graph itself
#: fp16/bf16 outputs that differ by more than rtol are re-checked in fp32; they pass when the fp32
#: run matches and the as-is difference is within this many units of the dtype's epsilon (a
#: rounding difference of the CPU kernels, e.g. a matmul 64 columns wide vs 2048, never a wrong
#: head).
LOW_PRECISION_EPS = 8
_LOW_EPS: dict[int, float] = {onnx.TensorProto.FLOAT16: 2.0**-10, onnx.TensorProto.BFLOAT16: 2.0**-7}


def low_precision_bound(dtype: ir.DataType) -> float:
    """Largest relative difference taken for fp16/bf16 kernel rounding: LOW_PRECISION_EPS eps."""
    return LOW_PRECISION_EPS * _LOW_EPS[dtype.value]


@dataclasses.dataclass(frozen=True)
class Block:
    """One attention block: values fed to both sides and values compared."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


# ----------------------------------------------------------------------------- graph helpers


@dataclasses.dataclass
class _Cone:
    nodes: set[int] = dataclasses.field(default_factory=set)
    inputs: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    initializers: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    graph_outputs: list[str] = dataclasses.field(default_factory=list)

    def weight_bytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.initializers.values() if v.const_value is not None)


def _cone(outputs: Iterable[ir.Value], stop: Callable[[ir.Value], bool]) -> _Cone:
    """Nodes computing ``outputs``, walking back until graph inputs, constants or ``stop``."""
    cone = _Cone()
    targets = {v.name for v in outputs}
    stack = [producer for v in outputs if (producer := v.producer()) is not None]
    while stack:
        node = stack.pop()
        if id(node) in cone.nodes:
            continue
        cone.nodes.add(id(node))
        for out in node.outputs:
            if out.is_graph_output() and out.name not in targets and out.name not in cone.graph_outputs:
                cone.graph_outputs.append(name_of(out))
        for inp in _node_inputs(node):
            producer = inp.producer()
            if inp.is_initializer() or (producer is None and inp.const_value is not None):
                cone.initializers[name_of(inp)] = inp
            elif producer is None or stop(inp):
                cone.inputs[name_of(inp)] = inp
            else:
                stack.append(producer)
    return cone


def _node_inputs(node: ir.Node) -> list[ir.Value]:
    """Inputs of ``node`` and outer-scope values its subgraphs (If/Loop/Scan bodies) read."""
    values = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        graphs: list[ir.Graph] = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.as_graphs())
        for g in graphs:
            inner = {id(v) for v in values_by_name(g).values()}
            for sub in g.all_nodes():
                values += [v for v in sub.inputs if v is not None and id(v) not in inner]
    return values


def _named_in(names: Container[str]) -> Callable[[ir.Value], bool]:
    """A ``stop`` for :func:`_cone`: the value's name is in ``names`` (read at each call)."""
    return lambda v: v.name in names


def _first_stable_after(value: ir.Value, stable: Callable[[ir.Value], bool]) -> ir.Value | None:
    seen: set[int] = set()
    queue = collections.deque([value])
    while queue:
        v = queue.popleft()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if stable(v) or v.is_graph_output():
            return v
        for user in v.consumers():
            queue.extend(user.outputs)
    return None


def _compatible(a: ir.Value, b: ir.Value) -> bool:
    """Same dtype and shape where both are known (symbolic dims match anything)."""
    if a.dtype is not None and b.dtype is not None and a.dtype != b.dtype:
        return False
    if a.shape is None or b.shape is None:
        return True
    if len(a.shape) != len(b.shape):
        return False
    return all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y
        for x, y in zip(a.shape, b.shape, strict=True)
    )


def _stable_in(other: ir.Model, graph: ir.Graph) -> Callable[[ir.Value], bool]:
    """A value of ``graph`` that ``other`` has too: same name, dtype and shape.

    The shape check matters: a layout pass may keep a tensor's name (and so its encoding) for the
    same values in another layout (``[B,S,C]`` -> ``[B,C,1,S]``); that is not the same tensor here.
    """
    values = values_by_name(other.graph)
    outputs = {v.name for v in graph.outputs}

    def stable(v: ir.Value) -> bool:
        producer = v.producer()
        twin = values.get(name_of(v))
        return (
            twin is not None
            and v.name not in outputs
            and (producer is None or producer.op_type != "Constant")
            and _compatible(v, twin)
        )

    return stable


def _downstream(value: ir.Value) -> set[str]:
    """Names of every value computed from ``value``."""
    seen: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        for user in v.consumers():
            for out in user.outputs:
                if out.name not in seen:
                    seen.add(name_of(out))
                    stack.append(out)
    return seen


def find_blocks(original: ir.Model, converted: ir.Model) -> list[Block]:
    """One :class:`Block` per attention core of ``original`` (see the module docstring).

    The inputs form a cut of both graphs: the original's walk stops at stable values; when the
    converted graph reaches further back on some path (it computes a head's piece from a value
    upstream of the original's cut, e.g. each head's q straight from the hidden state where the
    original splits a packed q|k|v), that value joins the cut and the cut values computed from it
    leave it (they are computed inside the block on both sides, never fed independently).
    """
    if any(n.outputs and n.outputs[0].shape is None for n in original.graph):
        infer_shapes(original)  # raw exports carry few shapes; the stable check needs them
    o_values, c_values = values_by_name(original.graph), values_by_name(converted.graph)
    o_stable = _stable_in(converted, original.graph)
    c_stable = _stable_in(original, converted.graph)
    out_pieces = infer_pieces(list(original.graph.outputs), list(converted.graph.outputs))
    in_pieces = infer_pieces(list(original.graph.inputs), list(converted.graph.inputs))
    whole_of = {p: name for name, (_, pieces) in in_pieces.items() for p in pieces}
    anchors = find_attention_cores(original.graph)
    # a fused attention op of the original is a block too: its outputs keep their names when lowered
    ends = [(c.name, c.output) for c in anchors.cores]
    ends += [(r.name, r.node.outputs[0]) for r in anchors.refused if r.node.op_type in FUSED_ATTENTION_OPS]
    blocks = []
    for name, output in ends:
        end = _first_stable_after(output, o_stable)
        if end is None:
            raise RuntimeError(f"attention block {name}: no value after it exists in the converted model")
        cut = set(_cone([end], o_stable).inputs)
        for _ in range(16):
            o_cone = _cone([end], _named_in(cut))
            names = [name_of(end), *o_cone.graph_outputs]
            c_out = [c_values[p] for n in names for p in (out_pieces[n][1] if n in out_pieces else [n])]
            reached = dict.fromkeys(whole_of.get(n, n) for n in _cone(c_out, c_stable).inputs)
            beyond = [n for n in reached if n not in cut and n in o_values]
            if not beyond:
                break
            for name in beyond:
                cut -= _downstream(o_values[name])
            cut.update(beyond)
        o_cone = _cone([end], _named_in(cut))
        names = [name_of(end), *o_cone.graph_outputs]
        c_out = [c_values[p] for n in names for p in (out_pieces[n][1] if n in out_pieces else [n])]
        c_cone = _cone(c_out, _named_in(cut))
        c_inputs = (whole_of.get(n, n) for n in c_cone.inputs)
        inputs = dict.fromkeys([*o_cone.inputs, *(n for n in c_inputs if n in o_values)])
        blocks.append(Block(name, tuple(inputs), tuple(names)))
    return blocks


# ----------------------------------------------------------------------------- sub-models


def _tensor_proto(name: str, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    if isinstance(tensor, ir.ExternalTensor):  # embed the bytes: the block has no base folder
        proto = onnx.TensorProto(name=name, data_type=tensor.dtype.value)
        proto.dims.extend(tensor.shape.numpy())
        proto.raw_data = tensor.tobytes()
        return proto
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto


def _value_info(name: str, dtype: ir.DataType | None, shape: Sequence[int] | None) -> onnx.ValueInfoProto:
    elem = dtype.value if dtype is not None else onnx.TensorProto.UNDEFINED
    return onnx.helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def _sub_model(
    model: ir.Model,
    cone: _Cone,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[ir.Value],
    types: Mapping[str, ir.Value] | None = None,
) -> onnx.ModelProto:
    """The nodes of ``cone`` as a standalone model: its inputs fed, its weights embedded."""
    graph = model.graph
    nodes = [ir.serde.serialize_node(n) for n in graph if id(n) in cone.nodes]
    for node in nodes:  # a multi-output node (Split) computed for one output, fed for another
        for i, out in enumerate(node.output):
            if out in cone.inputs:
                node.output[i] = f"{out}.fed_instead"
    inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(feeds[name].dtype), feeds[name].shape
        )
        for name in cone.inputs
    ]
    types = types or {}
    outs = [
        _value_info(name_of(v), v.dtype or (types[name_of(v)].dtype if v.name in types else None), None)
        for v in outputs
    ]
    inits = []
    for name, v in cone.initializers.items():
        assert v.const_value is not None  # _cone takes initializers and constants only
        inits.append(_tensor_proto(name, v.const_value))
    proto_graph = onnx.helper.make_graph(nodes, f"{graph.name or 'graph'}_block", inputs, outs, inits)
    proto = onnx.helper.make_model(
        proto_graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def _run(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimization: Optimization, what: str):
    import onnxruntime as ort

    names = [o.name for o in proto.graph.output]
    wanted = [i.name for i in proto.graph.input]
    try:
        options = session_options(optimization)
        if proto.ByteSize() < _PROTO_LIMIT:
            sess = ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        else:  # a block above protobuf's limit: weights go to one external file for the session
            with tempfile.TemporaryDirectory(prefix="mha2sha-block-") as tmp:
                path = os.path.join(tmp, "block.onnx")
                onnx.save_model(proto, path, save_as_external_data=True, location="block.data")
                sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        del proto
        values = sess.run_with_ort_values(names, {n: to_ort(feeds[n]) for n in wanted})
        return {n: from_ort(v) for n, v in zip(names, values, strict=True)}
    except Exception as exc:
        error = UserError if what.startswith("original") else InternalError
        raise error(f"onnxruntime failed on {what}: {one_line(exc)}") from None


def _is_low(elem_type: int) -> bool:
    return elem_type in _LOW_EPS


def _upcast_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
    return onnx.numpy_helper.from_array(array, tensor.name)


def _upcast(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in fp32: fp16/bf16 weights, I/O, Casts and constants upcast."""
    graph = proto.graph
    nodes = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for attr in new.attribute:
            if attr.name == "to" and node.op_type == "Cast" and _is_low(attr.i):
                attr.i = onnx.TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and _is_low(attr.t.data_type):
                attr.t.CopyFrom(_upcast_tensor(attr.t))
        nodes.append(new)
    inits = [_upcast_tensor(t) if _is_low(t.data_type) else t for t in graph.initializer]

    def io(values):
        out = []
        for v in values:
            w = onnx.ValueInfoProto()
            w.CopyFrom(v)
            if _is_low(w.type.tensor_type.elem_type):
                w.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            out.append(w)
        return out

    new_graph = onnx.helper.make_graph(nodes, graph.name, io(graph.input), io(graph.output), inits)
    model = onnx.helper.make_model(new_graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model


def _upcast_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        k: v.astype(np.float32) if v.dtype == np.float16 or v.dtype.name == "bfloat16" else v
        for k, v in feeds.items()
    }


def _compare(
    o_proto: onnx.ModelProto,
    c_proto: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    rtol: float,
    optimization: Optimization,
    name: str,
    output_pieces: Mapping[str, tuple[int, Sequence[str]]],
) -> Verification:
    """Run both sides; fp16/bf16 outputs off by kernel rounding are re-checked in fp32."""

    def run_both(o: onnx.ModelProto, c: onnx.ModelProto, f: Mapping[str, np.ndarray]):
        reference = _run(o, f, optimization, f"original block {name}")
        candidate = _run(c, f, optimization, f"converted block {name}")
        for out, (axis, names) in output_pieces.items():
            if out in reference:
                candidate[out] = np.concatenate([candidate.pop(n) for n in names], axis=axis)
        return compare_outputs(reference, candidate, rtol)

    check = run_both(o_proto, c_proto, feeds)
    low = {
        o.name: o.type.tensor_type.elem_type
        for o in o_proto.graph.output
        if _is_low(o.type.tensor_type.elem_type)
    }
    retry = [r for r in check.rows if not r.ok and r.name in low and math.isfinite(r.max_rel_err)]
    if not retry:
        return check
    fp32 = {r.name: r for r in run_both(_upcast(o_proto), _upcast(c_proto), _upcast_feeds(feeds)).rows}
    rows = []
    for r in check.rows:
        r32 = fp32.get(r.name)
        if r in retry and r32 is not None and r32.ok:
            dtype = "float16" if low[r.name] == onnx.TensorProto.FLOAT16 else "bfloat16"
            if r.max_rel_err <= LOW_PRECISION_EPS * _LOW_EPS[low[r.name]]:
                note = (
                    f"{dtype} kernel rounding ({r.max_rel_err:.1e} as-is); fp32 rel err {r32.max_rel_err:.1e}"
                )
                r = dataclasses.replace(r, ok=True, note=note)
        rows.append(r)
    return Verification(rows=tuple(rows), rtol=rtol, reference=None)


# ----------------------------------------------------------------------------- feeds


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])


def _draw_spec(name: str, value: ir.Value, like: ir.Value | None) -> tuple[ir.Shape, ir.DataType]:
    """The static shape and dtype a drawn ``value`` gets (``like``: its converted twin)."""
    shape = value.shape if value.shape is not None and value.shape.is_static() else None
    dtype = value.dtype
    if like is not None:
        shape = shape or (like.shape if like.shape is not None and like.shape.is_static() else None)
        dtype = dtype or like.dtype
    if shape is None or dtype is None:
        raise UserError(f"blockwise verification: cannot draw block input '{name}' (unknown shape or type)")
    return shape, dtype


def _draw(name: str, value: ir.Value, like: ir.Value | None, seed: int) -> np.ndarray:
    shape, dtype = _draw_spec(name, value, like)
    dims = shape.numpy()  # static: checked by _draw_spec
    np_dtype = np.dtype(dtype.numpy())
    if np_dtype.kind in "fc" or np_dtype.name == "bfloat16":
        return _rng(seed, name).standard_normal(size=dims, dtype=np.float32).astype(np_dtype)
    if np_dtype == np.bool_:
        return np.ones(dims, dtype=np.bool_)
    return np.zeros(dims, dtype=np_dtype)


def _boundary_feeds(
    original: ir.Model,
    converted: ir.Model,
    names: Iterable[str],
    inputs: Mapping[str, np.ndarray],
    seed: int,
    optimization: Optimization,
) -> tuple[dict[str, np.ndarray], dict[str, Callable[[], np.ndarray]]]:
    """Values for block inputs: shared graph inputs and cheap computed values now, the rest on demand.

    Drawn values (hidden states, KV behind big weights) and graph inputs read by one block only
    (a layer's past KV) are made per block and dropped after it, so memory holds one block's
    inputs, not every layer's.
    """
    o_values = values_by_name(original.graph)
    c_values = values_by_name(converted.graph)
    feeds: dict[str, np.ndarray] = {}
    draw: dict[str, Callable[[], np.ndarray]] = {}
    cheap: list[ir.Value] = []
    uses = collections.Counter(names)
    for name in uses:
        value = o_values[name]
        if value.is_graph_input():
            if name not in inputs:
                raise UserError(f"blockwise verification: no value for graph input '{name}'")
            if uses[name] > 1:
                feeds[name] = inputs[name]
            else:
                draw[name] = functools.partial(inputs.__getitem__, name)
            continue
        cone = _cone([value], lambda v: False)
        if cone.weight_bytes() <= CHEAP_CONE_BYTES and all(n in inputs for n in cone.inputs):
            cheap.append(value)
        else:
            _draw_spec(name, value, c_values.get(name))  # fail now, not when the block runs
            draw[name] = functools.partial(_draw, name, value, c_values.get(name), seed)
    if cheap:
        cone = _cone(cheap, lambda v: False)
        cone_feeds = {n: feeds[n] if n in feeds else inputs[n] for n in cone.inputs}
        proto = _sub_model(original, cone, cone_feeds, cheap, c_values)
        feeds.update(_run(proto, cone_feeds, optimization, "the shared inputs of the attention blocks"))
    return feeds, draw


def infer_pieces(
    originals: Sequence[ir.Value], converted: Sequence[ir.Value]
) -> dict[str, tuple[int, list[str]]]:
    """Per-head graph I/O (``--per-head-kv-io``): original name -> (axis, ``<name>.h<k>`` names)."""
    have = {v.name for v in converted}
    pieces: dict[str, tuple[int, list[str]]] = {}
    for value in originals:
        if value.name in have:
            continue
        prefix = name_of(value) + ".h"
        found = [
            v for v in converted if name_of(v).startswith(prefix) and name_of(v)[len(prefix) :].isdigit()
        ]
        if not found or value.shape is None or found[0].shape is None:
            continue
        found.sort(key=lambda v: int(name_of(v)[len(prefix) :]))
        whole, piece = list(value.shape), list(found[0].shape)
        axes = [i for i, (a, b) in enumerate(zip(whole, piece, strict=False)) if a != b]
        if len(whole) == len(piece) and len(axes) == 1:
            pieces[name_of(value)] = (axes[0], [name_of(v) for v in found])
    return pieces


# ----------------------------------------------------------------------------- public


def cone_of(outputs: Sequence[ir.Value], stop: Callable[[ir.Value], bool] = lambda v: False) -> _Cone:
    """The nodes computing ``outputs`` back to graph inputs, constants or ``stop``: ``.nodes``
    (ids), ``.inputs`` (values to feed), ``.initializers``, ``.weight_bytes()``."""
    return _cone(outputs, stop)


def run_sub_model(
    model: ir.Model,
    cone: _Cone,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[ir.Value],
    optimization: Optimization = "basic",
) -> dict[str, np.ndarray]:
    """Run the nodes of ``cone`` (from :func:`cone_of`) on ``feeds`` with onnxruntime's CPU provider."""
    proto = _sub_model(model, cone, feeds, outputs)
    return _run(proto, feeds, optimization, "a part of the model")


def verify_blocks(
    original: ir.Model,
    converted: ir.Model,
    boundaries: Sequence[Block] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-5,
    *,
    seed: int = 0,
    input_pieces: Mapping[str, tuple[int, Sequence[str]]] | None = None,
    output_pieces: Mapping[str, tuple[int, Sequence[str]]] | None = None,
    optimization: Optimization = "basic",
    on_block: Callable[[int], None] | None = None,
) -> Verification:
    """Compare every attention block of ``original`` and ``converted`` on the same block inputs.

    ``boundaries`` defaults to :func:`find_blocks`; ``inputs`` (graph inputs of the original, any
    mapping: a lazy :class:`~mha2sha.verify.inputs.ModelInputs` is read one block at a time)
    default to :func:`mha2sha.verify.inputs.plan_inputs` of ``original`` with ``seed``. ``input_pieces`` / ``output_pieces``
    (``SplitHeadsPass.input_pieces`` / ``output_pieces``: original name -> (axis, per-head names))
    describe per-head KV I/O of the converted model; when not given they are inferred from the
    ``<name>.h<k>`` inputs/outputs that replace an original one. Weights are read lazily, one
    block at a time.
    """
    if inputs is None:
        from mha2sha.verify.inputs import plan_inputs

        inputs = plan_inputs(original, seed)
    blocks = list(boundaries) if boundaries is not None else find_blocks(original, converted)
    if input_pieces is None:
        input_pieces = infer_pieces(list(original.graph.inputs), list(converted.graph.inputs))
    if output_pieces is None:
        output_pieces = infer_pieces(list(original.graph.outputs), list(converted.graph.outputs))
    shared, draw = _boundary_feeds(
        original, converted, [n for b in blocks for n in b.inputs], inputs, seed, optimization
    )

    o_values = values_by_name(original.graph)
    c_values = values_by_name(converted.graph)
    rows = []
    for block in blocks:
        feeds = {n: shared[n] if n in shared else draw[n]() for n in block.inputs}
        for name, (axis, names) in input_pieces.items():
            if name in feeds:
                feeds.update(zip(names, np.split(feeds[name], len(names), axis=axis), strict=True))
        o_out = [o_values[n] for n in block.outputs]
        o_cone = _cone(o_out, _named_in(set(block.inputs)))
        o_proto = _sub_model(original, o_cone, feeds, o_out, c_values)

        c_names = [p for n in block.outputs for p in (output_pieces[n][1] if n in output_pieces else [n])]
        missing = [n for n in c_names if n not in c_values]
        if missing:
            raise UserError(f"blockwise verification: converted model has no value {missing[0]!r}")
        c_out = [c_values[n] for n in c_names]
        stops = set(block.inputs) | {p for n in block.inputs if n in input_pieces for p in input_pieces[n][1]}
        c_cone = _cone(c_out, _named_in(stops))
        # inputs only the converted model has (e.g. --lora-alpha-from-input's lora_alpha) come from ``inputs``
        feeds.update({n: inputs[n] for n in c_cone.inputs if n not in feeds and n in inputs})
        absent = [n for n in c_cone.inputs if n not in feeds]
        if absent:
            raise UserError(
                f"blockwise verification: converted block {block.name} needs '{absent[0]}', "
                "which the original block does not take"
            )
        c_proto = _sub_model(converted, c_cone, feeds, c_out)
        check = _compare(o_proto, c_proto, feeds, rtol, optimization, block.name, output_pieces)
        del o_proto, c_proto, feeds
        rows += [dataclasses.replace(r, name=f"{block.name}/{r.name}") for r in check.rows]
        if on_block is not None:
            on_block(1)
    return Verification(rows=tuple(rows), rtol=rtol, reference=None)
