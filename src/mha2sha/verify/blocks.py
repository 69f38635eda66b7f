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

import builtins
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.errors import InternalError, UserError
from mha2sha.find.anchors import find_attention_cores
from mha2sha.graph import FUSED_ATTENTION_OPS, name_of
from mha2sha.io.names import values_by_name
from mha2sha.io.prepare import infer_shapes
from mha2sha.verify.block_graphs import QdqSide, Sessions, Side, canonical_side, run_session, upcast
from mha2sha.verify.qdq import max_steps, output_lsb
from mha2sha.verify.qdq_local import LocalCheck, Origin, compare_quantized_tensors
from mha2sha.verify.runner import (
    Optimization,
    OutputCheck,
    Verification,
    compare_outputs,
    from_ort,
    one_line,
    session_options,
    to_ort,
)

__all__ = [
    "Block",
    "BlockCheck",
    "BlockQuantized",
    "BlockResults",
    "check_blocks",
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
_LOW_DTYPES = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}


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


def _value_info(
    name: str, dtype: ir.DataType | None, shape: Sequence[int | None] | None
) -> onnx.ValueInfoProto:
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
    known = {o.name for o in outs} | set(cone.inputs)
    infos = [
        _value_info(
            name_of(o),
            o.dtype,
            None if o.shape is None else [d if isinstance(d, int) else None for d in o.shape],
        )
        for n in graph
        if id(n) in cone.nodes
        for o in n.outputs
        if o.name and o.dtype is not None and o.name not in known
    ]
    proto_graph = onnx.helper.make_graph(
        nodes, f"{graph.name or 'graph'}_block", inputs, outs, inits, value_info=infos
    )
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


def _draw(key: str, dims: tuple[int, ...], np_dtype: np.dtype, seed: int) -> np.ndarray:
    if np_dtype.kind in "fc" or np_dtype.name == "bfloat16":
        return _rng(seed, key).standard_normal(size=dims, dtype=np.float32).astype(np_dtype)
    if np_dtype == np.bool_:
        return np.ones(dims, dtype=np.bool_)
    return np.zeros(dims, dtype=np_dtype)


class _Feeds:
    """Values for block inputs: shared graph inputs and cheap computed values once for all blocks;
    graph inputs read by one block (a layer's past KV) from ``inputs`` when that block runs; the
    rest (hidden states, KV behind big weights) drawn normal(0, 1) **once per (shape, dtype, position
    in the block's inputs)**: the blocks of a model are alike, and drawing a CL-4096 KV cache for
    every layer cost more than running the layer. Made arrays are shared (never written)."""

    def __init__(
        self,
        original: ir.Model,
        converted: ir.Model,
        blocks: Sequence[Block],
        inputs: Mapping[str, np.ndarray],
        seed: int,
        optimization: Optimization,
    ):
        self._inputs = inputs
        self._seed = seed
        self._drawn: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()
        o_values = values_by_name(original.graph)
        c_values = values_by_name(converted.graph)
        self.shared: dict[str, np.ndarray] = {}
        self._per_block: set[str] = set()
        self._specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        cheap: list[ir.Value] = []
        uses = collections.Counter(n for b in blocks for n in b.inputs)
        generic = getattr(inputs, "generic", lambda name: False)
        for name in uses:
            value = o_values[name]
            if value.is_graph_input():
                if name not in inputs:
                    raise UserError(f"blockwise verification: no value for graph input '{name}'")
                if uses[name] > 1:
                    self.shared[name] = inputs[name]
                elif generic(name):
                    shape, dtype = _draw_spec(name, value, c_values.get(name))
                    self._specs[name] = (tuple(shape.numpy()), np.dtype(dtype.numpy()))
                else:
                    self._per_block.add(name)
                continue
            cone = _cone([value], lambda v: False)
            if cone.weight_bytes() <= CHEAP_CONE_BYTES and all(n in inputs for n in cone.inputs):
                cheap.append(value)
            else:
                shape, dtype = _draw_spec(name, value, c_values.get(name))  # fail now, not in a block
                self._specs[name] = (tuple(shape.numpy()), np.dtype(dtype.numpy()))
        if cheap:
            cone = _cone(cheap, lambda v: False)
            cone_feeds = {n: self.shared[n] if n in self.shared else inputs[n] for n in cone.inputs}
            proto = _sub_model(original, cone, cone_feeds, cheap, c_values)
            self.shared.update(
                _run(proto, cone_feeds, optimization, "the shared inputs of the attention blocks")
            )

    def __call__(self, block: Block) -> dict[str, np.ndarray]:
        feeds = {}
        for slot, name in enumerate(block.inputs):
            if name in self.shared:
                feeds[name] = self.shared[name]
            elif name in self._per_block:
                feeds[name] = self._inputs[name]
            else:
                dims, dtype = self._specs[name]
                key = (dims, dtype.str, slot)
                with self._lock:
                    array = self._drawn.get(key)
                if array is None:
                    array = _draw(f"block input {slot} {dims} {dtype.str}", dims, dtype, self._seed)
                    array.setflags(write=False)
                    with self._lock:
                        array = self._drawn.setdefault(key, array)
                feeds[name] = array
        return feeds


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


# ----------------------------------------------------------------------------- checking

#: Outputs of original blocks computed ahead (while the conversion is saved) are kept up to this
#: many bytes; blocks beyond it compute their original side when they are checked.
REFERENCE_BYTES = 256 << 20


@dataclasses.dataclass
class BlockQuantized:
    """Encodings of both models, for the quantized (QDQ) comparison of every block pair."""

    original: EncodingSet
    converted: EncodingSet
    origins: Origin = dataclasses.field(default_factory=dict)  # per-head tensor -> MHA tensor, ranges
    max_lsb: float = 1.0


@dataclasses.dataclass
class BlockResults:
    """What blockwise verification proved: float rows, and with encodings the quantized check."""

    float: Verification
    qdq_lsb: dict[str, builtins.float] | None = None  # "<block>/<output>" -> max |MHA - SHA| in LSBs
    # blocks whose quantized outputs differed: every quantized tensor given the MHA's quantized inputs
    qdq_local: LocalCheck | None = None
    qdq_blocks_local: list[str] = dataclasses.field(default_factory=list)  # blocks decided that way
    qdq_failure: str | None = None  # the first block (and tensor) off by more than max_lsb
    workers: int = 1
    sessions: int = 0  # onnxruntime sessions made (every other block run reused one)
    ahead: int = 0  # blocks whose original side was computed ahead (while the conversion was saved)
    # blocks checked whole ahead, on the converted model in memory, and matched to the saved one
    checked_ahead: int = 0


@dataclasses.dataclass
class _BlockResult:
    rows: list[OutputCheck]
    qdq: dict[str, builtins.float] | None = None
    local: LocalCheck | None = None
    failure: str | None = None


@dataclasses.dataclass
class _Reference:
    """The original side of one block: its feeds, graph and outputs (float as-is, QDQ)."""

    feeds: dict[str, np.ndarray]  # the block's inputs, per-head pieces included (shared arrays)
    side: Side
    cone: _Cone
    outputs: dict[str, np.ndarray]
    qdq: dict[str, np.ndarray] | None
    ahead: bool = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.outputs.values()) + sum(a.nbytes for a in (self.qdq or {}).values())


@dataclasses.dataclass
class _CheckedAhead:
    """A block checked (and passed) ahead, on the converted model still in memory."""

    fingerprint: str  # of the converted side that was run (:func:`_fingerprint`)
    result: _BlockResult


def _fingerprint(side: Side) -> str:
    """What onnxruntime is given for one converted block besides its feeds: the canonical graph,
    the real names (encodings are looked up by them) and every weight's bytes (sha256). Two sides
    with the same fingerprint, fed the same arrays, compute the same outputs, float and QDQ."""
    digest = hashlib.sha256(side.key.encode())
    digest.update(repr((side.feeds, side.outputs, sorted(side.names.items()))).encode())
    for name, array in side.weight_arrays().items():
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)  # C order: weight_arrays copies strided ones
    return digest.hexdigest()


def _passed(result: _BlockResult) -> bool:
    return all(r.ok for r in result.rows) and result.failure is None and result.local is None


class _Lazy:
    """A reference made once, by whichever thread asks first; others wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: _Reference | None = None

    def get(self, make: Callable[[], _Reference]) -> _Reference:
        with self.lock:
            if self.value is None:
                self.value = make()
            return self.value

    def make_ahead(self, make: Callable[[], _Reference]) -> None:
        """Make it now unless another thread is on it (never waits)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.value is None:
                self.value = make()
                self.value.ahead = True
        finally:
            self.lock.release()


class _Context:
    """Everything the block checks share (read-only but for the session and plan caches)."""

    def __init__(
        self,
        original: ir.Model,
        converted: ir.Model,
        rtol: float,
        optimization: Optimization,
        input_pieces: Mapping[str, tuple[int, Sequence[str]]],
        output_pieces: Mapping[str, tuple[int, Sequence[str]]],
        quantized: BlockQuantized | None,
        threads: int,
        inputs: Mapping[str, np.ndarray],
    ):
        self.original = original
        self.inputs = inputs
        self.o_values = values_by_name(original.graph)
        self.use_converted(converted)
        self.rtol = rtol
        self.input_pieces, self.output_pieces = input_pieces, output_pieces
        self.quantized = quantized
        self.sessions = Sessions(optimization, threads)
        self.qdq_sessions = Sessions("disable", threads)
        self.q_original = QdqSide(quantized.original) if quantized is not None else None
        self.q_converted = QdqSide(quantized.converted) if quantized is not None else None
        self.cpu_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._cpu_lock = threading.Lock()

    def use_converted(self, converted: ir.Model) -> None:
        self.converted = converted
        self.c_values = values_by_name(converted.graph)

    @contextlib.contextmanager
    def cpu(self, what: str) -> Iterator[None]:
        """Account this thread's CPU time to ``what`` (reported at debug level)."""
        start = time.thread_time()
        try:
            yield
        finally:
            with self._cpu_lock:
                self.cpu_seconds[what] += time.thread_time() - start


def _block_feeds(ctx: _Context, feeds: _Feeds, block: Block) -> dict[str, np.ndarray]:
    made = feeds(block)
    for name, (axis, names) in ctx.input_pieces.items():
        if name in made:
            made.update(zip(names, np.split(made[name], len(names), axis=axis), strict=True))
    return made


def _original_side(ctx: _Context, block: Block, feeds: Mapping[str, np.ndarray]) -> tuple[Side, _Cone]:
    o_out = [ctx.o_values[n] for n in block.outputs]
    o_cone = _cone(o_out, _named_in(set(block.inputs)))
    side = canonical_side(
        ctx.original, o_cone.nodes, list(o_cone.inputs), o_cone.initializers, o_out, feeds, ctx.c_values
    )
    return side, o_cone


def _converted_side(ctx: _Context, block: Block, feeds: dict[str, np.ndarray]) -> tuple[Side, _Cone]:
    """The converted block; inputs only the converted model has (e.g. --lora-alpha-from-input's
    lora_alpha) are added to ``feeds`` from the verification inputs."""
    c_names = [p for n in block.outputs for p in (ctx.output_pieces[n][1] if n in ctx.output_pieces else [n])]
    missing = [n for n in c_names if n not in ctx.c_values]
    if missing:
        raise UserError(f"blockwise verification: converted model has no value {missing[0]!r}")
    c_out = [ctx.c_values[n] for n in c_names]
    pieces = {p for n in block.inputs if n in ctx.input_pieces for p in ctx.input_pieces[n][1]}
    c_cone = _cone(c_out, _named_in(set(block.inputs) | pieces))
    feeds.update({n: ctx.inputs[n] for n in c_cone.inputs if n not in feeds and n in ctx.inputs})
    absent = [n for n in c_cone.inputs if n not in feeds]
    if absent:
        raise UserError(
            f"blockwise verification: converted block {block.name} needs '{absent[0]}', "
            "which the original block does not take"
        )
    side = canonical_side(ctx.converted, c_cone.nodes, list(c_cone.inputs), c_cone.initializers, c_out, feeds)
    return side, c_cone


def _run_side(
    ctx: _Context, block: Block, side: Side, feeds: Mapping[str, np.ndarray], *, fp32: bool, ours: bool
) -> dict[str, np.ndarray]:
    """One side on ``feeds`` (in fp32 when asked): outputs by name."""
    proto = side.proto
    assert proto is not None
    sess = ctx.sessions.get(
        side.key + (":fp32" if fp32 else ""), (lambda: upcast(proto)) if fp32 else (lambda: proto)
    )
    what = f"{'converted' if ours else 'original'} block {block.name}"
    return dict(zip(side.outputs, run_session(sess, side.arrays(feeds), what, ours=ours), strict=True))


def _joined(
    ctx: _Context, got: dict[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The converted side's outputs by original name (per-head outputs joined)."""
    for out, (axis, names) in ctx.output_pieces.items():
        if out in reference:
            got[out] = np.concatenate([got.pop(n) for n in names], axis=axis)
    return got


def _check_float(ctx: _Context, block: Block, ref: _Reference, c_side: Side, c_feeds) -> list[OutputCheck]:
    """fp16/bf16 outputs beyond rtol are re-checked in fp32 (see the module docstring)."""
    candidate = _joined(ctx, _run_side(ctx, block, c_side, c_feeds, fp32=False, ours=True), ref.outputs)
    check = compare_outputs(ref.outputs, candidate, ctx.rtol)
    low = {name: _LOW_DTYPES[a.dtype.name] for name, a in ref.outputs.items() if a.dtype.name in _LOW_DTYPES}
    retry = [r for r in check.rows if not r.ok and r.name in low and math.isfinite(r.max_rel_err)]
    if not retry:
        return list(check.rows)
    reference32 = _run_side(ctx, block, ref.side, ref.feeds, fp32=True, ours=False)
    candidate32 = _joined(ctx, _run_side(ctx, block, c_side, c_feeds, fp32=True, ours=True), reference32)
    fp32 = {r.name: r for r in compare_outputs(reference32, candidate32, ctx.rtol).rows}
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
    return rows


def _run_qdq(ctx: _Context, q: QdqSide, side: Side, feeds, what: str, ours: bool) -> dict[str, np.ndarray]:
    with ctx.cpu("QDQ plans"):
        es = q.encodings(side)
        plans = q.plans(side, es)
        template = q.template(side, plans)
        sess = ctx.qdq_sessions.get(template.key, lambda: template.proto)
    with ctx.cpu("QDQ numbers"):
        arrays = q.arrays(side, plans, template, feeds)
    with ctx.cpu("QDQ runs"):
        outputs = run_session(sess, arrays, what, ours=ours)
    return dict(zip(side.outputs, outputs, strict=True))


def _block_encodings(es: EncodingSet, names: Iterable[str]) -> EncodingSet:
    sub = EncodingSet(es.version)
    for name in names:
        if name in es.params:
            sub.params[name] = es.params[name]
        elif name in es.activations:
            sub.activations[name] = es.activations[name]
    return sub


def _check_quantized(
    ctx: _Context, block: Block, ref: _Reference, c_side: Side, c_cone: _Cone, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, builtins.float], LocalCheck | None, str | None]:
    """The QDQ block pair on the same feeds, in LSBs of each output's encoding; when an output is
    off by more than ``max_lsb``, every quantized tensor of the block given the MHA block's quantized
    values (:func:`~mha2sha.verify.qdq_local.compare_quantized_tensors`), as the whole-model check."""
    q = ctx.quantized
    assert q is not None and ctx.q_converted is not None and ref.qdq is not None
    got = _run_qdq(ctx, ctx.q_converted, c_side, feeds, f"converted QDQ block {block.name}", True)
    got = _joined(ctx, got, ref.qdq)
    lsb = {}
    for name, expected in ref.qdq.items():
        cand = got[name]
        if expected.shape != cand.shape:
            raise InternalError(f"QDQ block {block.name}: output {name} shapes differ")
        lsb[f"{block.name}/{name}"] = max_steps(
            expected, cand, output_lsb(q.original.get(name), expected.shape)
        )
    worst_name, worst = max(lsb.items(), key=lambda kv: kv[1], default=("", 0.0))
    if worst <= q.max_lsb:
        return lsb, None, None
    o_out = [ctx.o_values[n] for n in block.outputs]
    c_out = [ctx.c_values[n] for n in c_side.outputs]
    with ctx.cpu("QDQ tensor by tensor"):
        mha = ir.from_proto(_sub_model(ctx.original, ref.cone, feeds, o_out, ctx.c_values))
        sha = ir.from_proto(_sub_model(ctx.converted, c_cone, feeds, c_out))
        local = compare_quantized_tensors(
            mha,
            _block_encodings(q.original, ref.side.names),
            sha,
            _block_encodings(q.converted, c_side.names),
            feeds,
            q.origins,
        )
    bad = local.first_above(q.max_lsb)
    failure = None
    if bad is not None:
        piece = f" (head piece of '{bad.origin}')" if bad.origin != bad.name else ""
        failure = (
            f"quantized verification failed in block {block.name}: '{bad.name}'{piece} differs from the MHA"
            f" model by {bad.lsb:.3g} LSB (> {q.max_lsb:g}) given the same quantized inputs"
        )
    elif not local.tensors:
        failure = (
            f"quantized verification failed: block output '{worst_name}' differs by {worst:.3g} LSB"
            f" (> {q.max_lsb:g}) and no quantized tensor could be compared on its own"
        )
    return lsb, local, failure


def _lower_priority() -> None:
    """This thread yields the CPU to the save running meanwhile (Linux: nice applies per thread);
    measured on 7B: the save took 64 s next to two full-priority threads, against 33 s alone."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class BlockCheck:
    """Blockwise verification of one conversion, float and (with ``quantized``) QDQ.

    ``check.start()`` checks the blocks in the background (one thread fewer than ``workers``, at the
    lowest priority, so the save keeps a core), both sides, the converted one on the model still in
    memory: the job calls it before saving the converted model, so this CPU work overlaps the save's
    disk work. ``check.run(saved)`` then checks every block against the saved converted model
    (boundaries found again on it; if they differ from the ones used ahead, everything is made
    again). A block checked ahead counts for the saved model when the saved block gives onnxruntime
    the same graph and the same weight bytes (:func:`_fingerprint`: the saved weights are read and
    hashed, which costs far less than running the block); else, and for a block that failed ahead,
    it is checked again on the saved model. Original sides computed ahead but not yet checked are
    kept up to :data:`REFERENCE_BYTES`. Blocks run on ``workers`` threads
    (default one per CPU, at most one per block), each holding one block; the result does not depend
    on ``workers`` or on what was computed ahead. Use as a context manager (stops the background).
    """

    def __init__(
        self,
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
        workers: int | None = None,
        quantized: BlockQuantized | None = None,
    ):
        if inputs is None:
            from mha2sha.verify.inputs import plan_inputs

            inputs = plan_inputs(original, seed)
        self._inputs, self._seed, self._optimization = inputs, seed, optimization
        self._fixed = boundaries is not None
        self.blocks = list(boundaries) if boundaries is not None else find_blocks(original, converted)
        if input_pieces is None:
            input_pieces = infer_pieces(list(original.graph.inputs), list(converted.graph.inputs))
        if output_pieces is None:
            output_pieces = infer_pieces(list(original.graph.outputs), list(converted.graph.outputs))
        cpus = _cpus()
        self.workers = max(1, min(workers or cpus, len(self.blocks) or 1))
        self.rtol = rtol
        self.ctx = _Context(
            original, converted, rtol, optimization, input_pieces, output_pieces, quantized,
            threads=max(1, cpus // self.workers), inputs=inputs,
        )  # fmt: skip
        self._feeds = _Feeds(original, converted, self.blocks, inputs, seed, optimization)
        self._refs = [_Lazy() for _ in self.blocks]
        self._checked: list[_CheckedAhead | None] = [None] * len(self.blocks)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._ahead_bytes = 0
        self._bytes_lock = threading.Lock()

    # -- references (the original side) ---------------------------------------------------------
    def _reference(self, index: int) -> _Reference:
        ctx, block = self.ctx, self.blocks[index]
        with ctx.cpu("feeds"):
            feeds = _block_feeds(ctx, self._feeds, block)
        with ctx.cpu("block graphs"):
            side, cone = _original_side(ctx, block, feeds)
        with ctx.cpu("float runs"):
            outputs = _run_side(ctx, block, side, feeds, fp32=False, ours=False)
        qdq = None
        if ctx.q_original is not None:
            qdq = _run_qdq(ctx, ctx.q_original, side, feeds, f"original QDQ block {block.name}", False)
        return _Reference(feeds, side, cone, outputs, qdq)

    def _ahead(self, index: int) -> None:
        if self._stop.is_set():
            return
        _lower_priority()
        with self._bytes_lock:
            if self._ahead_bytes >= REFERENCE_BYTES:
                return
        try:
            self._refs[index].make_ahead(lambda: self._reference(index))
            if not self._stop.is_set():
                self._check_ahead(index)
        except Exception:  # made again (and reported) when the block is checked
            logger.debug("block %s: checking ahead failed", self.blocks[index].name, exc_info=True)
        value = self._refs[index].value
        if value is not None:  # not checked yet: its outputs wait for the check
            with self._bytes_lock:
                self._ahead_bytes += value.nbytes

    def _check_ahead(self, index: int) -> None:
        """Check the block on the converted model in memory; keep the result when it passed (a
        failure is checked again on the saved model, which is what the report must show)."""
        ref = self._refs[index].value
        if ref is None:
            return
        result, side = self._check_with(index, ref)
        if _passed(result):
            with self.ctx.cpu("fingerprints"):
                self._checked[index] = _CheckedAhead(_fingerprint(side), result)
            self._refs[index].value = None

    def start(self) -> None:
        """Check the blocks in the background, both sides (see the class docstring)."""
        if self._pool is None and self.blocks:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max(1, self.workers - 1), thread_name_prefix="mha2sha-ahead"
            )
            for i in range(len(self.blocks)):
                self._pool.submit(self._ahead, i)

    def wait(self) -> None:
        """Wait until every block queued ahead is done (the job never waits: it saves meanwhile)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        """Stop computing ahead (what runs finishes; what waits is dropped)."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> BlockCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checking --------------------------------------------------------------------------------
    def _check(self, index: int) -> _BlockResult:
        ctx, block = self.ctx, self.blocks[index]
        ahead = self._checked[index]
        if ahead is not None:
            with ctx.cpu("fingerprints"):
                side, _ = _converted_side(ctx, block, _block_feeds(ctx, self._feeds, block))
                same = _fingerprint(side) == ahead.fingerprint
            if same:
                return ahead.result
            logger.info("block %s: the saved block differs from the one checked ahead: checked again", block.name)
            self._checked[index] = None
        ref = self._refs[index].get(lambda: self._reference(index))
        result, _ = self._check_with(index, ref)
        self._refs[index].value = None  # its outputs are no longer needed
        return result

    def _check_with(self, index: int, ref: _Reference) -> tuple[_BlockResult, Side]:
        """The converted block (of ``ctx.converted``) against its original side ``ref``."""
        ctx, block = self.ctx, self.blocks[index]
        with ctx.cpu("block graphs"):
            c_feeds = dict(ref.feeds)
            c_side, c_cone = _converted_side(ctx, block, c_feeds)
        with ctx.cpu("float runs"):
            rows = [
                dataclasses.replace(r, name=f"{block.name}/{r.name}")
                for r in _check_float(ctx, block, ref, c_side, c_feeds)
            ]
        result = _BlockResult(rows)
        if ctx.quantized is not None and all(r.ok for r in rows):
            result.qdq, result.local, result.failure = _check_quantized(ctx, block, ref, c_side, c_cone, c_feeds)
        return result, c_side

    def run(
        self, converted: ir.Model | None = None, on_block: Callable[[int], None] | None = None
    ) -> BlockResults:
        """Check every block (against ``converted`` when given: the saved model)."""
        self.close()
        ctx = self.ctx
        if converted is not None and converted is not ctx.converted:
            ahead = self.blocks
            ctx.use_converted(converted)
            if not self._fixed:
                self.blocks = find_blocks(ctx.original, converted)
            if self.blocks != ahead:  # not the boundaries computed ahead: start over
                logger.info("blockwise verification: block boundaries differ on the saved model")
                self._feeds = _Feeds(
                    ctx.original, converted, self.blocks, self._inputs, self._seed, self._optimization
                )
                self._refs = [_Lazy() for _ in self.blocks]
                self._checked = [None] * len(self.blocks)
        checked_ahead = sum(c is not None for c in self._checked)
        ahead_count = checked_ahead + sum(r.value is not None for r in self._refs)
        # last blocks first: their pages are the ones the save wrote (and read) last, still cached
        order = list(reversed(range(len(self.blocks))))
        results: list[_BlockResult | None] = [None] * len(self.blocks)
        if self.workers == 1:
            for i in order:
                results[i] = self._check(i)
                if on_block is not None:
                    on_block(1)
        else:
            with concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="mha2sha-block"
            ) as pool:
                futures = {pool.submit(self._check, i): i for i in order}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        results[futures[future]] = future.result()
                        if on_block is not None:
                            on_block(1)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        done = [r for r in results if r is not None]
        rows = tuple(row for r in done for row in r.rows)
        out = BlockResults(Verification(rows=rows, rtol=self.rtol, reference=None), workers=self.workers)
        out.sessions = ctx.sessions.made + ctx.qdq_sessions.made
        out.ahead = ahead_count
        out.checked_ahead = sum(c is not None for c in self._checked)  # those still matching
        if ctx.quantized is not None and all(r.ok for r in rows):
            out.qdq_lsb = {k: v for r in done for k, v in (r.qdq or {}).items()}
            local = [(b.name, r.local) for b, r in zip(self.blocks, done, strict=True) if r.local is not None]
            if local:
                out.qdq_local = LocalCheck([t for _, check in local for t in check.tensors])
                out.qdq_blocks_local = [name for name, _ in local]
            out.qdq_failure = next((r.failure for r in done if r.failure), None)
        logger.debug(
            "blockwise verification: %d blocks (%d computed ahead, %d checked ahead), %d workers, %d sessions;"
            " CPU seconds %s",
            len(self.blocks), ahead_count, out.checked_ahead, self.workers, out.sessions,
            {k: round(v, 2) for k, v in ctx.cpu_seconds.items()},
        )  # fmt: skip
        return out


def check_blocks(
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
    workers: int | None = None,
    quantized: BlockQuantized | None = None,
) -> BlockResults:
    """Compare every attention block of ``original`` and ``converted`` on the same block inputs, in
    float and, with ``quantized``, as QDQ block pairs (:class:`BlockCheck` in one call)."""
    with BlockCheck(
        original, converted, boundaries, inputs, rtol, seed=seed, input_pieces=input_pieces,
        output_pieces=output_pieces, optimization=optimization, workers=workers, quantized=quantized,
    ) as check:  # fmt: skip
        return check.run(on_block=on_block)


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
    workers: int | None = None,
) -> Verification:
    """The float part of :func:`check_blocks`: every attention block compared on the same inputs.

    ``boundaries`` defaults to :func:`find_blocks`; ``inputs`` (graph inputs of the original, any
    mapping: a lazy :class:`~mha2sha.verify.inputs.ModelInputs` is read one block at a time)
    default to :func:`mha2sha.verify.inputs.plan_inputs` of ``original`` with ``seed``. ``input_pieces`` / ``output_pieces``
    (``SplitHeadsPass.input_pieces`` / ``output_pieces``: original name -> (axis, per-head names))
    describe per-head KV I/O of the converted model; when not given they are inferred from the
    ``<name>.h<k>`` inputs/outputs that replace an original one. Weights are read lazily, one
    block at a time.
    """
    return check_blocks(
        original, converted, boundaries, inputs, rtol, seed=seed, input_pieces=input_pieces,
        output_pieces=output_pieces, optimization=optimization, on_block=on_block, workers=workers,
    ).float  # fmt: skip
