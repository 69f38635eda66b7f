"""Per-node type and shape inference, so lowerings further down the graph see static shapes.

Contrib ops stop ONNX shape inference: everything after the first ``SkipLayerNormalization`` or
``GroupQueryAttention`` has no type or shape in exported graphs. The pass walks the graph in order
and, for every standard-domain node whose outputs are unknown, asks ONNX's own inference for that
one node. Like ONNX's data propagation, the values of small integer tensors (``Shape`` of a static
tensor, constants, and shape arithmetic on them) are tracked on the side, never written into the
graph, so Reshape targets computed from ``Shape`` still give static shapes. Lowered nodes are
standard, so a lowering's own outputs get their shapes the same way as it builds them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from mha2sha.graph import is_onnx_domain

__all__ = ["Inference"]

logger = logging.getLogger(__name__)

_MAX_DATA = 1024  # integer tensors up to this size are tracked as data (shape arithmetic)
_INT_TYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL}
_DATA_OPS = {
    "Add", "Cast", "Concat", "ConstantOfShape", "Div", "Equal", "Expand", "Gather", "Identity", "Max", "Min",
    "Mul", "Range", "ReduceProd", "Reshape", "Slice", "Squeeze", "Sub", "Unsqueeze", "Where",
}  # fmt: skip


def _static(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(d, int) for d in value.shape)


def _known(value: ir.Value) -> bool:
    return value.type is not None and _static(value)


class Inference:
    """Fills in unknown output types/shapes of standard nodes, one node at a time (best effort)."""

    def __init__(self, opset: int):
        self.opset = opset
        self._data: dict[int, np.ndarray] = {}

    def data(self, value: ir.Value | None) -> np.ndarray | None:
        """The value of a small integer tensor, when known."""
        if value is None:
            return None
        if id(value) in self._data:
            return self._data[id(value)]
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None or tensor.dtype not in _INT_TYPES or tensor.size > _MAX_DATA:
            return None
        array = tensor.numpy()
        self._data[id(value)] = array
        return array

    def __call__(self, node: ir.Node) -> None:
        if not is_onnx_domain(node.domain):
            return
        if not all(_known(o) for o in node.outputs):
            self._infer_types(node)
        self._propagate(node)

    def _infer_types(self, node: ir.Node) -> None:
        if any(v is not None and v.type is None for v in node.inputs):
            return
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return
        version = node.version or self.opset
        try:
            schema = onnx.defs.get_schema(node.op_type, version, "")
        except onnx.defs.SchemaError:
            return
        in_names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
        out_names = [f"out{i}" for i in range(len(node.outputs))]
        proto = onnx.helper.make_node(node.op_type, in_names, out_names)
        proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
        types: dict[str, onnx.TypeProto] = {}
        data: dict[str, onnx.TensorProto] = {}
        for name, value in zip(in_names, node.inputs, strict=True):
            if value is None:
                continue
            types[name] = ir.serde.serialize_value(value).type
            array = self.data(value)
            if array is not None:
                data[name] = onnx.numpy_helper.from_array(array, name)
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=[onnx.helper.make_opsetid("", version)]
            )
        except Exception as e:  # inference is a help, never a requirement
            logger.debug("no inference for %s: %s", node.name, e)
            return
        for name, out in zip(out_names, node.outputs, strict=True):
            proto_type = inferred.get(name)
            if proto_type is None:
                continue
            if out.type is None:
                out.type = ir.serde.deserialize_type_proto_for_type(proto_type)
            shape = ir.serde.deserialize_type_proto_for_shape(proto_type)
            if shape is not None and not _static(out):
                out.shape = shape

    def _propagate(self, node: ir.Node) -> None:
        """Track the values of small integer outputs (Shape of static tensors, constant arithmetic)."""
        if len(node.outputs) != 1 or node.outputs[0].dtype not in _INT_TYPES:
            return
        out = node.outputs[0]
        if node.op_type == "Shape":
            source = node.inputs[0]
            if source is None or not _static(source):
                return
            assert source.shape is not None  # _static
            shape = list(source.shape.numpy())
            start = node.attributes["start"].as_int() if "start" in node.attributes else 0
            end = node.attributes["end"].as_int() if "end" in node.attributes else len(shape)
            self._data[id(out)] = np.asarray(shape[slice(start, end)], dtype=np.int64)
            return
        if node.op_type not in _DATA_OPS or not node.inputs:
            return
        arrays = [self.data(v) if v is not None else None for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs, strict=True)):
            return
        result = self._evaluate(node, arrays)
        if result is not None and result.size <= _MAX_DATA:
            self._data[id(out)] = result

    def _evaluate(self, node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
        names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
        proto = onnx.helper.make_node(node.op_type, names, ["out"])
        proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
        feeds = {n: a for n, a in zip(names, arrays, strict=True) if a is not None}
        graph = onnx.helper.make_graph(
            [proto],
            "data",
            [
                onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in feeds.items()
            ],
            [onnx.helper.make_tensor_value_info("out", 0, None)],
        )
        opset = max(node.version or self.opset, 13)
        try:
            model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
            return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])  # type: ignore[index]
        except Exception as e:
            logger.debug("no data for %s: %s", node.name, e)
            return None
