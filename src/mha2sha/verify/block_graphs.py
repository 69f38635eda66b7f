"""Block graphs without their weights, one onnxruntime session per block *structure*.

Blockwise verification (:mod:`.blocks`) runs every attention block of the original and of the
converted model on its own. The blocks of an LLM are copies of one another with other weights, so
each side of a block is written here as a *canonical* graph: values renamed by position (fed values
``i<k>``, outputs ``o<k>``, intermediates ``t<k>``), every weight above :data:`LIFT_BYTES` turned
into a graph input ``w<k>``, node names dropped. Two blocks of the same structure give the same
bytes, so one :class:`Sessions` entry (an onnxruntime session built from a graph of a few KB)
serves all of them, and each block only feeds its own arrays: weights are the memory-mapped bytes of
the saved files, read by onnxruntime without a copy, so no block model is ever serialised with
its weights and nothing of a block stays in memory after its run.

The same holds for the quantized (QDQ) check: :func:`mha2sha.verify.qdq.plan_encoding` says which
nodes each encoding inserts (the structure) and :func:`~mha2sha.verify.qdq.plan_numbers` the
arrays (scales, zero points, quantized weights); the QDQ graph is built once per (block structure,
plans) with those arrays as graph inputs, then each block feeds its own numbers. The numbers are
the ones the whole-model QDQ builder computes, by the same functions.

fp16/bf16 blocks are re-run in fp32 (:func:`upcast`) with the low-precision inputs kept and cast
inside the graph, so the fp32 run is fed the very same arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.encodings.axes import channel_axes, resolve_axes, tensor_shapes
from mha2sha.encodings.model import Encoding, EncodingSet
from mha2sha.errors import InternalError, UserError
from mha2sha.graph import name_of
from mha2sha.io.pieces import SlicedTensor
from mha2sha.verify.qdq import QPlan, _Builder, _emit, _inherit_through_copies, plan_encoding, plan_numbers
from mha2sha.verify.runner import Optimization, from_ort, one_line, session_options, to_ort

__all__ = ["LIFT_BYTES", "QdqSide", "Side", "Sessions", "canonical_side", "upcast"]

#: Initializers above this many bytes, and float ones of more than :data:`LIFT_FLOATS` elements,
#: are fed (graph inputs ``w<k>``) instead of embedded: weights and biases differ from block to
#: block, small constants (shapes, axes, scalars) are part of the structure.
LIFT_BYTES = 1024
LIFT_FLOATS = 16
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def _lifted(tensor: ir.TensorProtocol) -> bool:
    return tensor.nbytes > LIFT_BYTES or (tensor.dtype in _FLOAT_TYPES and tensor.size > LIFT_FLOATS)


_LOW = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class Side:
    """One side (original or converted) of one block as a canonical graph."""

    key: str  # hash of the canonical graph: equal for blocks of the same structure
    proto: onnx.ModelProto | None  # canonical model: feeds i<k>, weights w<k> as inputs, outputs o<k>
    feeds: list[str]  # real name fed as i<k>
    weights: list[ir.Value]  # value fed as w<k>
    outputs: list[str]  # real name of o<k>
    names: dict[str, str]  # real value name -> canonical name (every value of the block)
    consts: dict[str, ir.Value]  # canonical name -> small embedded initializer

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """``w<k>`` -> the weight's array: a view of the mapped file for a saved weight; a C-order
        copy for a head's piece still in memory, every piece of one weight cut from one mapping of
        it (a mapping per piece would map the whole weight once per head)."""
        out = {}
        sources: dict[int, np.ndarray] = {}
        for k, value in enumerate(self.weights):
            tensor = value.const_value
            assert tensor is not None  # _cone takes initializers and constants only
            if isinstance(tensor, SlicedTensor):
                whole = sources.get(id(tensor.source))
                if whole is None:
                    whole = sources[id(tensor.source)] = np.asarray(tensor.source.numpy())
                array = whole[tensor.index]
            else:
                array = np.asarray(tensor.numpy())
            out[f"w{k}"] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        return out

    def arrays(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input of the canonical graph: the block's fed values and its weights."""
        return {**{f"i{k}": feeds[n] for k, n in enumerate(self.feeds)}, **self.weight_arrays()}


def _value_info(name: str, value: ir.Value) -> onnx.ValueInfoProto | None:
    if value.dtype is None:
        return None
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else None for d in value.shape]
    return onnx.helper.make_tensor_value_info(name, value.dtype.value, shape)


def _embedded(name: str, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    """``tensor`` with its bytes in the proto (a block graph has no folder for external data)."""
    if isinstance(tensor, ir.ExternalTensor):
        proto = onnx.TensorProto(name=name, data_type=tensor.dtype.value)
        proto.dims.extend(tensor.shape.numpy())
        proto.raw_data = tensor.tobytes()
        return proto
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto


def _has_subgraphs(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def canonical_side(
    model: ir.Model,
    nodes: set[int],
    fed: Sequence[str],
    initializers: Mapping[str, ir.Value],
    outputs: Sequence[ir.Value],
    feeds: Mapping[str, np.ndarray],
    output_types: Mapping[str, ir.Value] | None = None,
) -> Side:
    """The nodes ``nodes`` (ids, of ``model.graph``) computing ``outputs`` from ``fed`` values and
    ``initializers``, as a canonical graph (see the module docstring)."""
    graph = model.graph
    members = [n for n in graph if id(n) in nodes]
    fed_set = set(fed)
    names: dict[str, str] = {name_of(v): f"o{k}" for k, v in enumerate(outputs)}
    feeds_order: list[str] = []
    weights: list[ir.Value] = []
    consts: dict[str, ir.Value] = {}
    inits: list[onnx.TensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    node_protos: list[onnx.NodeProto] = []
    subgraphs = any(_has_subgraphs(n) for n in members)
    counter = 0

    def input_name(value: ir.Value) -> str:
        name = name_of(value)
        if name in names:
            return names[name]
        if name in fed_set:
            names[name] = f"i{len(feeds_order)}"
            feeds_order.append(name)
        elif name in initializers:
            tensor = value.const_value
            assert tensor is not None
            if _lifted(tensor) and not subgraphs:
                names[name] = f"w{len(weights)}"
                weights.append(value)
            else:
                cname = name if subgraphs else f"c{len(consts)}"
                names[name] = cname
                consts[cname] = value
                inits.append(_embedded(cname, tensor))
        else:  # an outer-scope value of a subgraph: keep its name
            names[name] = name
        return names[name]

    for node in members:
        proto = ir.serde.serialize_node(node)
        if not subgraphs:
            proto.name = ""
            proto.doc_string = ""
            del proto.metadata_props[:]
        for i, value in enumerate(node.inputs):
            proto.input[i] = "" if value is None else input_name(value)
        for i, out in enumerate(node.outputs):
            if not out.name:
                continue
            if out.name in fed_set:  # a multi-output node computed for one output, fed for another
                proto.output[i] = f"t{counter}.fed_instead"
                counter += 1
                continue
            if out.name not in names:
                names[out.name] = out.name if subgraphs else f"t{counter}"
                counter += 1
            proto.output[i] = names[out.name]
            info = _value_info(names[out.name], out)
            if info is not None and not names[out.name].startswith("o"):
                infos.append(info)
        node_protos.append(proto)

    types = output_types or {}
    graph_inputs = [
        onnx.helper.make_tensor_value_info(
            names[n], onnx.helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape
        )
        for n in feeds_order
    ]
    for k, value in enumerate(weights):
        tensor = value.const_value
        assert tensor is not None
        graph_inputs.append(
            onnx.helper.make_tensor_value_info(f"w{k}", tensor.dtype.value, list(tensor.shape.numpy()))
        )
    graph_outputs = []
    for k, value in enumerate(outputs):
        dtype = value.dtype or (types[name_of(value)].dtype if name_of(value) in types else None)
        elem = dtype.value if dtype is not None else onnx.TensorProto.UNDEFINED
        graph_outputs.append(onnx.helper.make_tensor_value_info(f"o{k}", elem, None))
    proto_graph = onnx.helper.make_graph(
        node_protos, "block", graph_inputs, graph_outputs, inits, value_info=infos
    )
    proto_model = onnx.helper.make_model(
        proto_graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    proto_model.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    key = hashlib.sha1(proto_model.SerializeToString(deterministic=True)).hexdigest()
    if subgraphs:  # names are not canonical: never shared
        key = f"{key}:{id(model)}:{name_of(outputs[0])}"
    return Side(key, proto_model, feeds_order, weights, [name_of(v) for v in outputs], names, consts)


# ----------------------------------------------------------------------------- fp32 re-run


def upcast(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in fp32: fp16/bf16 inputs are cast right at the start (so the fp32
    run is fed the same arrays), Casts, constants, initializers and outputs upcast."""
    graph = proto.graph
    casts, renamed = [], {}
    for value in graph.input:
        if value.type.tensor_type.elem_type in _LOW:
            renamed[value.name] = f"{value.name}.fp32"
            casts.append(
                onnx.helper.make_node("Cast", [value.name], [renamed[value.name]], to=onnx.TensorProto.FLOAT)
            )
    nodes = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            if name in renamed:
                new.input[i] = renamed[name]
        for attr in new.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i in _LOW:
                attr.i = onnx.TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _LOW:
                attr.t.CopyFrom(_upcast_tensor(attr.t))
        nodes.append(new)
    inits = [_upcast_tensor(t) if t.data_type in _LOW else t for t in graph.initializer]
    outputs = []
    for value in graph.output:
        out = onnx.ValueInfoProto()
        out.CopyFrom(value)
        if out.type.tensor_type.elem_type in _LOW:
            out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        outputs.append(out)
    new_graph = onnx.helper.make_graph(casts + nodes, graph.name, list(graph.input), outputs, inits)
    model = onnx.helper.make_model(new_graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model


def _upcast_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
    return onnx.numpy_helper.from_array(array, tensor.name)


# ----------------------------------------------------------------------------- sessions


_SHARED_ARENA = False
_ARENA_LOCK = threading.Lock()


def _shared_arena() -> bool:
    """One CPU memory arena for every block session of this process (registered once).

    A session's own arena keeps its peak forever (six sessions per block structure: float, fp32,
    QDQ of both sides); without an arena every run maps and zeroes fresh pages (1 GB per 7B block:
    a third of the run in page faults). A shared arena holds the peak of the runs in flight, once.
    """
    global _SHARED_ARENA
    with _ARENA_LOCK:
        if not _SHARED_ARENA:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo(
                    "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
                )
                # extend by what is asked (not powers of two): the arena holds what runs in flight need
                cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})
                ort.create_and_register_allocator(info, cfg)
                _SHARED_ARENA = True
            except Exception:  # an onnxruntime without shared allocators: sessions allocate on their own
                return False
        return _SHARED_ARENA


class Sessions:
    """onnxruntime sessions by graph key, made once and shared by every block (and thread)."""

    def __init__(self, optimization: Optimization, threads: int):
        self._optimization = optimization
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.made = 0  # sessions created (the rest of the runs reused one)

    def get(self, key: str, make: Callable[[], onnx.ModelProto], *, optimization: Optimization | None = None):
        """The session of ``key``, made from ``make()`` the first time (one thread makes it)."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            sess = self._sessions.get(key)
            if sess is None:
                sess = self._make(make(), optimization or self._optimization)
                self._sessions[key] = sess
                self.made += 1
            return sess

    def _make(self, proto: onnx.ModelProto, optimization: Optimization):
        import onnxruntime as ort

        options = session_options(optimization)
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        if _shared_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        else:  # memory goes back after each run: sessions live for the whole verification
            options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_session(sess, arrays: Mapping[str, np.ndarray], what: str, *, ours: bool) -> list[np.ndarray]:
    """Outputs of ``sess`` in graph order; an onnxruntime failure is one line (ours: InternalError)."""
    names = [o.name for o in sess.get_outputs()]
    try:
        feeds = {i.name: to_ort(arrays[i.name]) for i in sess.get_inputs()}
        values = sess.run_with_ort_values(names, feeds)
        return [from_ort(v) for v in values]
    except Exception as exc:
        error = InternalError if ours else UserError
        raise error(f"onnxruntime failed on {what}: {one_line(exc)}") from None


# ----------------------------------------------------------------------------- QDQ


@dataclasses.dataclass
class QdqTemplate:
    """The QDQ graph of one (block structure, plans): which input takes which number."""

    key: str
    proto: onnx.ModelProto
    roles: dict[str, tuple[str, str]]  # graph input -> (encoded canonical tensor, number) or (w<k>, "raw")


@dataclasses.dataclass
class _Structure:
    """What planning needs of a block structure: canonical values (dtype, shape, const), axes."""

    model: ir.Model
    values: dict[str, ir.Value]
    axes: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    opset: int


class QdqSide:
    """Plans, numbers and QDQ graphs of the blocks of one side (original or converted)."""

    def __init__(self, encodings: EncodingSet):
        self._encodings = encodings
        self._structures: dict[str, _Structure] = {}
        self._templates: dict[tuple[str, int], QdqTemplate] = {}
        self._lock = threading.Lock()

    def _structure(self, side: Side) -> _Structure:
        with self._lock:
            found = self._structures.get(side.key)
        if found is not None:
            return found
        assert side.proto is not None
        model = _with_weights(ir.serde.deserialize_model(side.proto), side)
        values: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
        values.update(model.graph.initializers)
        for node in model.graph:
            values.update((o.name, o) for o in node.outputs if o.name)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        found = _Structure(model, values, dict(channel_axes(model)), tensor_shapes(model), opset)
        with self._lock:
            return self._structures.setdefault(side.key, found)

    def encodings(self, side: Side) -> EncodingSet:
        """This block's encodings under canonical names (copies; axes resolved, copies inherited)."""
        structure = self._structure(side)
        es = EncodingSet(self._encodings.version)
        for real, cname in side.names.items():
            if real in self._encodings.params:
                es.params[cname] = self._encodings.params[real].renamed(cname)
            elif real in self._encodings.activations:
                es.activations[cname] = self._encodings.activations[real].renamed(cname)
        resolve_axes(es, channel_axes=structure.axes, shapes=structure.shapes)
        _inherit_through_copies(structure.model, es)
        return es

    def plans(self, side: Side, es: EncodingSet) -> list[tuple[str, QPlan, Encoding]]:
        structure = self._structure(side)
        out = []
        for cname, enc in es.items():
            value = structure.values.get(cname)
            if value is None:
                continue
            out.append(
                (cname, plan_encoding(structure.opset, cname, enc, value, es.kind_of(cname) == "param"), enc)
            )
        return out

    def template(self, side: Side, plans: list[tuple[str, QPlan, Encoding]]) -> QdqTemplate:
        signature = hash(tuple((c, p) for c, p, _ in plans))
        key = (side.key, signature)
        with self._lock:
            found = self._templates.get(key)
        if found is not None:
            return found
        assert side.proto is not None
        model = _with_weights(ir.serde.deserialize_model(side.proto), side)
        b = _Builder(model)
        for cname, plan, enc in plans:
            value = b.values[cname]
            # the structure only: every number becomes a graph input, so no weight is read here
            # (a head's slice of a weight still in memory would map all of it)
            const = _placeholder(side, cname) if plan.kind in ("weight", "int32", "fold") else None
            b.plans[cname] = plan
            _emit(b, cname, value, plan, plan_numbers(plan, cname, enc, const))
        b.finish()
        roles = dict(b.roles)
        graph = model.graph
        for name in list(graph.initializers):
            value = graph.initializers[name]
            if not any(user.graph is not None for user, _ in value.uses()):
                del graph.initializers[name]  # a weight now read through its quantized copy
                continue
            if name in roles or (name.startswith("w") and name[1:].isdigit()):
                roles.setdefault(name, (name, "raw"))
                del graph.initializers[name]
                value.const_value = None
                graph.inputs.append(value)
        template = QdqTemplate(f"{side.key}:qdq:{signature}", ir.to_proto(model), roles)
        with self._lock:
            return self._templates.setdefault(key, template)

    def arrays(
        self,
        side: Side,
        plans: list[tuple[str, QPlan, Encoding]],
        template: QdqTemplate,
        feeds: Mapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Every input of ``template`` for this block: fed values, raw weights and numbers."""
        weights = side.weight_arrays()
        numbers: dict[str, dict[str, np.ndarray]] = {}
        for cname, plan, enc in plans:
            const = _const_array(side, cname, weights) if plan.kind in ("weight", "int32", "fold") else None
            numbers[cname] = plan_numbers(plan, cname, enc, const)
        out = {f"i{k}": feeds[n] for k, n in enumerate(side.feeds)}
        for name, (cname, role) in template.roles.items():
            out[name] = weights[cname] if role == "raw" else numbers[cname][role]
        return out


def _placeholder(side: Side, cname: str) -> np.ndarray:
    """Zeros of the shape and dtype of constant ``cname`` (numbers whose values do not matter)."""
    value = side.weights[int(cname[1:])] if cname in _weight_names(side) else side.consts[cname]
    tensor = value.const_value
    assert tensor is not None
    return np.zeros(tuple(tensor.shape.numpy()), tensor.dtype.numpy())


def _weight_names(side: Side) -> set[str]:
    return {f"w{k}" for k in range(len(side.weights))}


def _const_array(side: Side, cname: str, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    if cname in weights:
        return weights[cname]
    tensor = side.consts[cname].const_value
    assert tensor is not None
    return np.asarray(tensor.numpy())


def _with_weights(model: ir.Model, side: Side) -> ir.Model:
    """The canonical model with its fed weights ``w<k>`` as initializers again (lazy tensors)."""
    graph = model.graph
    for value in list(graph.inputs):
        name = value.name or ""
        if name.startswith("w") and name[1:].isdigit():
            graph.inputs.remove(value)
            tensor = side.weights[int(name[1:])].const_value
            assert tensor is not None
            value.const_value = tensor
            graph.register_initializer(value)
    return model
