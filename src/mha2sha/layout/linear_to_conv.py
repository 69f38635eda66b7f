"""LinearToConvPass: projections as Conv 1x1 on the HTP's preferred ``[B, C, 1, S]`` (BD1L) layout.

Qualcomm's HTP runs a Conv 1x1 with per-output-channel weights best; a MatMul with a per-channel
weight is not supported there at all. Rules applied:

1. ``MatMul(x, W)`` with ``W`` an initializer ``[in, out]`` and ``x`` static ``[B, S, in]`` or
   ``[S, in]``, float/float16/double, becomes
   ``Reshape x -> [B,1,S,in] -> Transpose(0,3,1,2) -> [B,in,1,S] -> Conv(W'[out,in,1,1]) ->
   [B,out,1,S] -> Transpose(0,2,3,1) -> [B,1,S,out] -> Reshape -> [B,S,out]``.
2. ``Gemm(x, W, c)`` likewise (``transB`` respected; ``transA=1``, ``alpha != 1`` or ``beta != 1``
   would change the weight's values and its encodings, so those are left as they are).
3. A ``MatMul`` whose only consumer is ``Add`` of a constant bias of ``out`` elements (shape
   ``[out]`` or ``[1,..,1,out]``), and a Gemm's per-channel ``C``, become the Conv bias -- unless
   the MatMul output is quantized (named in ``quantized``): fusing would drop that quantization
   step and the QDQ model would no longer match (measured: 135 LSB on BERT with 16-bit activations).
4. The final value keeps the original output name (the Add's output when a bias was fused), so
   graph outputs and activation encodings still find it; every tensor the pass creates is recorded
   as an alias of the original it re-lays out (:class:`~mha2sha.layout.record.LayoutRecord`).
5. The Conv weight keeps the original weight's name when this pass replaces all of the weight's
   uses, else it is ``<name>.conv``; either way it is recorded with its axis move
   (``[in,out] -> [out,in,1,1]``: the output-channel axis goes 1 -> 0). Weights are transposed
   lazily (:class:`onnx_ir.LazyTensor` over the memory-mapped original) when the model is saved.
6. The input layout change of one activation is built once and shared (q/k/v, gate/up).
7. Anything else (weight computed at run time, batched ``[.., in, out]`` weight, activation of
   rank > 3 or unknown shape, integer types) is left unchanged and listed in ``skipped``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from mha2sha.graph import is_op, name_of, static_shape
from mha2sha.layout._graph import GENERATED, Editor
from mha2sha.layout.algebra import Step
from mha2sha.layout.record import LayoutRecord, Skipped, WeightRemap

__all__ = ["LinearToConvPass"]

logger = logging.getLogger(__name__)

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
_TO_BD1L = (0, 3, 1, 2)  # [B,1,S,C] -> [B,C,1,S]
_FROM_BD1L = (0, 2, 3, 1)  # [B,C,1,S] -> [B,1,S,C]


@dataclasses.dataclass
class _Plan:
    node: ir.Node
    x: ir.Value
    weight: ir.Value
    transposed: bool  # weight stored [out, in] (Gemm transB=1)
    bias: ir.Value | None
    bias_node: ir.Node | None  # the Add folded into the Conv
    out: ir.Value  # the value whose name the result keeps
    in_features: int
    out_features: int


class _LazyConvWeight:
    """``W [in,out]`` (or ``[out,in]``) as ``[out,in,1,1]``, computed only when saved."""

    def __init__(self, tensor: ir.TensorProtocol, transpose: bool, shape: tuple[int, ...]):
        self._tensor = tensor
        self._transpose = transpose
        self._shape = shape

    def __call__(self) -> ir.TensorProtocol:
        # A view of the (mapped) original: the saver writes it in chunks, never a whole copy.
        array = self._tensor.numpy()
        if self._transpose:
            array = array.T
        return ir.tensor(array.reshape(self._shape))


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _channel_bias(value: ir.Value | None, out_features: int, out_rank: int) -> bool:
    """A constant holding one value per output channel, broadcast along the last axis only."""
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    shape = static_shape(value)
    if shape is None or len(shape) == 0 or len(shape) > out_rank:
        return False
    return shape[-1] == out_features and all(d == 1 for d in shape[:-1])


class LinearToConvPass(ir.passes.InPlacePass):
    """Rewrite Linear projections (MatMul/Gemm with a constant weight) as Conv 1x1 in BD1L layout."""

    def __init__(
        self,
        record: LayoutRecord | None = None,
        *,
        fuse_bias: bool = True,
        quantized: Collection[str] = (),
    ):
        """``quantized``: names of tensors that carry a quantization encoding. A MatMul output
        among them keeps its bias Add (fusing would skip that quantization step)."""
        super().__init__()
        self.record = record if record is not None else LayoutRecord()
        self.fuse_bias = fuse_bias
        self.quantized = frozenset(quantized)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        plans = [p for p in (self._plan(n) for n in list(graph)) if p is not None]
        if not plans:
            return ir.passes.PassResult(model, modified=False)
        editor = Editor(graph)
        weights = self._conv_weights(graph, editor, plans)
        inputs: dict[int, ir.Value] = {}
        for plan in plans:
            self._rewrite(graph, editor, plan, weights, inputs)
        RemoveUnusedNodesPass()(model)
        for name in [n for n, v in graph.initializers.items() if not v.uses() and v.meta.get(GENERATED)]:
            del graph.initializers[name]
        self._finish_weights(graph, weights)
        TopologicalSortPass()(model)
        logger.info("LinearToConvPass: %d projections -> Conv", len(plans))
        return ir.passes.PassResult(model, modified=True)

    # -- planning -----------------------------------------------------------------------------
    def _skip(self, node: ir.Node, reason: str) -> None:
        self.record.skipped.append(Skipped(node.name or node.outputs[0].name or "", node.op_type, reason))
        logger.debug("not converting %s: %s", node.name, reason)

    def _plan(self, node: ir.Node) -> _Plan | None:
        if not is_op(node, "MatMul", "Gemm"):
            return None
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None:
            return None
        if w.const_value is None or w.is_graph_input():
            if w.const_value is None and x.const_value is None and node.op_type == "MatMul":
                self._skip(node, "both operands are computed at run time (attention, not a projection)")
            else:
                what = "computed at run time" if w.const_value is None else "a graph input"
                self._skip(node, f"weight {w.name} is {what}")
            return None
        w_shape, x_shape = static_shape(w), static_shape(x)
        if w_shape is None or len(w_shape) != 2:
            self._skip(node, f"weight {w.name} has shape {w_shape}, not [in, out]")
            return None
        if x_shape is None or len(x_shape) not in (2, 3):
            self._skip(node, f"activation {x.name} has shape {x_shape}: only [B,S,C] and [S,C] map to BD1L")
            return None
        if x.dtype not in _FLOATS or w.dtype != x.dtype:
            self._skip(node, f"element type {x.dtype} (Conv takes float, float16, double)")
            return None
        transposed, bias, bias_node = False, None, None
        out = node.outputs[0]
        if node.op_type == "Gemm":
            if _int_attr(node, "transA", 0):
                self._skip(node, "Gemm transA=1")
                return None
            if _float_attr(node, "alpha", 1.0) != 1.0:
                self._skip(node, "Gemm alpha != 1 would rescale the weight")
                return None
            transposed = bool(_int_attr(node, "transB", 0))
        in_features, out_features = w_shape[::-1] if transposed else w_shape
        if x_shape[-1] != in_features:
            self._skip(node, f"activation {list(x_shape)} does not match weight {list(w_shape)}")
            return None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if not _channel_bias(c, out_features, 2):
                self._skip(node, f"Gemm C {c.name} is not one value per output channel")
                return None
            if _float_attr(node, "beta", 1.0) != 1.0:
                self._skip(node, "Gemm beta != 1 would rescale the bias")
                return None
            bias = c
        elif node.op_type == "MatMul" and self.fuse_bias and out.name not in self.quantized:
            bias, bias_node = self._bias_add(node, out_features, len(x_shape))
            if bias_node is not None:
                out = bias_node.outputs[0]
        return _Plan(node, x, w, transposed, bias, bias_node, out, in_features, out_features)

    @staticmethod
    def _bias_add(node: ir.Node, out_features: int, rank: int) -> tuple[ir.Value | None, ir.Node | None]:
        mm_out = node.outputs[0]
        users = list(mm_out.uses())
        if len(users) != 1 or mm_out.is_graph_output():
            return None, None
        add, index = users[0]
        if not is_op(add, "Add") or len(add.inputs) != 2:
            return None, None
        other = add.inputs[1 - index]
        if other is None or not _channel_bias(other, out_features, rank) or other.dtype != mm_out.dtype:
            return None, None
        if static_shape(add.outputs[0]) != static_shape(mm_out):
            return None, None
        return other, add

    # -- weights ------------------------------------------------------------------------------
    def _conv_weights(
        self, graph: ir.Graph, editor: Editor, plans: list[_Plan]
    ) -> dict[tuple[int, bool], tuple[ir.Value, ir.Value]]:
        """One Conv weight per (weight, orientation); keyed -> (original, conv weight)."""
        users: dict[int, set[bool]] = {}
        converted_uses: dict[int, int] = {}
        for plan in plans:
            users.setdefault(id(plan.weight), set()).add(plan.transposed)
            converted_uses[id(plan.weight)] = converted_uses.get(id(plan.weight), 0) + 1
        out: dict[tuple[int, bool], tuple[ir.Value, ir.Value]] = {}
        for plan in plans:
            key = (id(plan.weight), plan.transposed)
            if key in out:
                continue
            w = plan.weight
            all_uses_here = (
                len(users[id(w)]) == 1
                and converted_uses[id(w)] == len(list(w.uses()))
                and not w.is_graph_output()
            )
            tensor = w.const_value
            assert tensor is not None and w.name is not None
            shape = (plan.out_features, plan.in_features, 1, 1)
            name = w.name if all_uses_here else editor.unique(w.name + ".conv")
            conv_w = ir.Value(name=name, shape=ir.Shape(list(shape)), type=w.type)
            conv_w.const_value = ir.LazyTensor(
                _LazyConvWeight(tensor, not plan.transposed, shape), tensor.dtype, ir.Shape(shape), name=name
            )
            if not all_uses_here:
                graph.register_initializer(conv_w)
            out[key] = (w, conv_w)
            axis_map = (0, 1) if plan.transposed else (1, 0)
            self.record.weights[w.name] = WeightRemap(name, tuple(static_shape(w) or ()), shape, axis_map)
        return out

    def _finish_weights(
        self, graph: ir.Graph, weights: dict[tuple[int, bool], tuple[ir.Value, ir.Value]]
    ) -> None:
        """Register Conv weights that take their original's name, now that it is unused."""
        for original, conv_w in weights.values():
            if conv_w.is_initializer():
                continue
            name = conv_w.name
            assert name is not None
            if graph.initializers.get(name) is original:
                del graph.initializers[name]
            graph.register_initializer(conv_w)

    def _bias_value(self, graph: ir.Graph, editor: Editor, plan: _Plan) -> ir.Value | None:
        bias = plan.bias
        if bias is None:
            return None
        shape = static_shape(bias)
        if shape == (plan.out_features,):
            return bias
        tensor = bias.const_value
        assert tensor is not None and bias.name is not None
        name = editor.unique(bias.name + ".conv")
        flat = ir.Value(name=name, shape=ir.Shape([plan.out_features]), type=bias.type)
        flat.const_value = ir.LazyTensor(
            _LazyConvWeight(tensor, False, (plan.out_features,)),
            tensor.dtype,
            ir.Shape([plan.out_features]),
            name=name,
        )
        graph.register_initializer(flat)
        rank = len(shape or ())
        axis_map = tuple([None] * (rank - 1) + [0])
        self.record.weights.setdefault(
            bias.name, WeightRemap(name, tuple(shape or ()), (plan.out_features,), axis_map)
        )
        return flat

    # -- rewrite ------------------------------------------------------------------------------
    def _input_bd1l(
        self, graph: ir.Graph, editor: Editor, plan: _Plan, memo: dict[int, ir.Value]
    ) -> ir.Value:
        """``x [B,S,C]`` (or ``[S,C]``) as ``[B,C,1,S]``, built once per activation."""
        x = plan.node.inputs[0]  # current input: a projection before this one may have replaced it
        assert x is not None
        if id(x) in memo:
            return memo[id(x)]
        shape = static_shape(x)
        assert shape is not None and x.name is not None
        b, s = (1, shape[0]) if len(shape) == 2 else (shape[0], shape[1])
        c = shape[-1]
        r_shape = (b, 1, s, c)
        r = editor.value(f"{x.name}.b1sc", r_shape, x)
        t = editor.value(f"{x.name}.bd1l", (b, c, 1, s), x)
        nodes = [
            editor.step_node(Step("reshape", r_shape), x, r, f"{x.name}.to_b1sc"),
            editor.step_node(Step("transpose", _TO_BD1L), r, t, f"{x.name}.to_bd1l"),
        ]
        graph.insert_before(plan.node, nodes)
        for v in (r, t):
            self.record.aliases[name_of(v)] = self.record.origin(x.name)
        memo[id(x)] = t
        return t

    def _rewrite(
        self,
        graph: ir.Graph,
        editor: Editor,
        plan: _Plan,
        weights: dict[tuple[int, bool], tuple[ir.Value, ir.Value]],
        inputs: dict[int, ir.Value],
    ) -> None:
        node, out = plan.node, plan.out
        out_shape = static_shape(out)
        assert out_shape is not None and out.name is not None
        xb = self._input_bd1l(graph, editor, plan, inputs)
        xb_shape = static_shape(xb)
        assert xb_shape is not None  # made by Editor.value with a static shape
        b, _, _, s = xb_shape
        _, conv_w = weights[(id(plan.weight), plan.transposed)]
        bias = self._bias_value(graph, editor, plan)
        base = node.name or out.name
        conv_out = editor.value(f"{out.name}.bd1l", (b, plan.out_features, 1, s), out)
        conv = ir.Node(
            "",
            "Conv",
            [xb, conv_w] + ([bias] if bias is not None else []),
            [ir.AttrInt64s("kernel_shape", [1, 1])],
            outputs=[conv_out],
            name=editor.unique(f"{base}.conv"),
        )
        back = editor.value(f"{out.name}.b1sc", (b, 1, s, plan.out_features), out)
        final = editor.value(f"{out.name}.new", out_shape, out)
        nodes = [
            conv,
            editor.step_node(Step("transpose", _FROM_BD1L), conv_out, back, f"{base}.from_bd1l"),
            editor.step_node(Step("reshape", out_shape), back, final, f"{base}.to_bsc"),
        ]
        graph.insert_before(node, nodes)
        if plan.bias_node is not None:
            mm_out = node.outputs[0]
            if mm_out.name and not mm_out.meta.get(GENERATED):
                self.record.fused[mm_out.name] = f"MatMul output before its bias Add, now inside {conv.name}"
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        original_name = out.name
        final.meta[GENERATED] = bool(out.meta.get(GENERATED))
        out.name = editor.unique(original_name + ".matmul")
        final.name = original_name
        origin = self.record.origin(original_name)
        for v in (conv_out, back):
            self.record.aliases[name_of(v)] = origin
        self.record.conv.append(node.name or original_name)  # the old nodes are dead now
