"""Run a QDQ model's float arithmetic in float64, so the order of a sum cannot flip a rounding.

Two graphs that compute the same quantized function but with other shapes (another AR: a
``[1, 1, K] x [K, N]`` instead of a ``[1, 128, K] x [K, N]`` MatMul; another CL: a longer softmax
row) make onnxruntime's float32 kernels sum in another order. Right at a rounding boundary of the
next QuantizeLinear that flips one step, and the flip grows downstream (HTP itself accumulates in
integers and is exact). In float64 the sums of both graphs agree to ~1e-16 relative, and the values
go back to float32 right before each QuantizeLinear, so both graphs quantize the same numbers and
a quantized comparison measures the graphs, not the kernels.

Rules (:class:`Float64Pass`): element types are propagated in graph order (exporters often leave
intermediate tensors untyped); every float32 tensor computed by an op other than
DequantizeLinear becomes float64, float constants feeding such ops too, ``Cast(to=FLOAT)`` and float
``ConstantOfShape`` fills become DOUBLE; a ``Cast`` is inserted where float32 meets an op
(DequantizeLinear outputs, float graph inputs) and where float64 meets a QuantizeLinear; float
graph outputs keep their name and float32 type. Scales and zero points are not touched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mha2sha.io.names import UniqueNames

__all__ = ["Float64Pass"]

_F32 = ir.DataType.FLOAT
_F64 = ir.DataType.DOUBLE
_BOOL_OUT = frozenset("Equal Less LessOrEqual Greater GreaterOrEqual Not And Or Xor IsNaN IsInf".split())
_INT64_OUT = frozenset("Shape Size NonZero ArgMax ArgMin".split())


def _const_dtype(value: ir.Value) -> ir.DataType | None:
    if value.const_value is not None:
        return value.const_value.dtype
    return value.dtype


def _out_dtypes(node: ir.Node, ins: list[ir.DataType | None]) -> list[ir.DataType | None]:
    op, n = node.op_type, len(node.outputs)
    first = next((d for d in ins if d is not None), None)
    if op == "Cast":
        return [ir.DataType(node.attributes.get_int("to"))]
    if op == "CastLike":
        return [ins[1] if len(ins) > 1 else None]
    if op in _BOOL_OUT:
        return [ir.DataType.BOOL]
    if op in _INT64_OUT:
        return [ir.DataType.INT64]
    if op == "ConstantOfShape":
        attr = node.attributes.get("value")
        return [attr.value.dtype if attr is not None else _F32]
    if op == "Constant":
        attr = next(iter(node.attributes.values()), None)
        return [attr.value.dtype if attr is not None and attr.name == "value" else None]
    if op == "QuantizeLinear":
        return [ins[2] if len(ins) > 2 and ins[2] is not None else ir.DataType.UINT8]
    if op == "DequantizeLinear":
        return [ins[1] if len(ins) > 1 else _F32]
    if op == "Where":
        return [ins[1] if len(ins) > 1 else None]
    if op in ("TopK",):
        return [ins[0], ir.DataType.INT64]
    if op == "Dropout":
        return [ins[0]] + [ir.DataType.BOOL] * (n - 1)
    return [ins[0] if ins and ins[0] is not None else first] * n


class Float64Pass(ir.passes.InPlacePass):
    """See the module docstring."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        dtype: dict[int, ir.DataType | None] = {}
        for v in graph.inputs:
            dtype[id(v)] = v.dtype
        qdq_params: set[int] = set()
        for node in graph:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                qdq_params.update(id(v) for v in node.inputs[1:] if v is not None)
        for value in graph.initializers.values():
            dt = _const_dtype(value)
            users = value.uses()
            computes = any(
                u.node.op_type not in ("QuantizeLinear", "DequantizeLinear") or u.idx == 0 for u in users
            )
            if (
                dt == _F32
                and id(value) not in qdq_params
                and computes
                and not any(u.node.op_type in ("QuantizeLinear", "DequantizeLinear") for u in users)
            ):
                assert value.const_value is not None
                value.const_value = ir.tensor(np.asarray(value.const_value.numpy(), np.float64), name=value.name)
                value.type = ir.TensorType(_F64)
                dt = _F64
            dtype[id(value)] = dt

        crossings: list[tuple[ir.Node, int, ir.DataType]] = []
        for node in graph:
            op = node.op_type
            if op == "Cast" and node.attributes.get_int("to") == _F32.value:
                node.attributes["to"] = ir.AttrInt64("to", _F64.value)
            elif op == "ConstantOfShape":
                attr = node.attributes.get("value")
                if attr is not None and attr.value.dtype == _F32:
                    fill = np.asarray(attr.value.numpy(), np.float64)
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(fill))
            elif op == "Constant":
                attr = node.attributes.get("value")
                if attr is not None and attr.value.dtype == _F32:
                    node.attributes["value"] = ir.AttrTensor(
                        "value", ir.tensor(np.asarray(attr.value.numpy(), np.float64))
                    )
            ins: list[ir.DataType | None] = []
            for i, inp in enumerate(node.inputs):
                dt = None if inp is None else dtype.get(id(inp), _const_dtype(inp))
                if op == "QuantizeLinear" and i == 0 and dt == _F64:
                    crossings.append((node, i, _F32))
                    dt = _F32
                elif op not in ("QuantizeLinear", "DequantizeLinear") and dt == _F32:
                    crossings.append((node, i, _F64))
                    dt = _F64
                ins.append(dt)
            for out, dt in zip(node.outputs, _out_dtypes(node, ins), strict=False):
                dtype[id(out)] = dt
                if dt is not None and (out.dtype is not None or dt == _F64):
                    out.type = ir.TensorType(dt)

        cast_of: dict[tuple[int, int], ir.Value] = {}
        for node, i, to in crossings:
            source = node.inputs[i]
            assert source is not None
            key = (id(source), to.value)
            if key not in cast_of:
                out = ir.Value(name=names(f"{source.name}.f{64 if to == _F64 else 32}"), type=ir.TensorType(to),
                               shape=source.shape)  # fmt: skip
                cast = ir.Node("", "Cast", [source], [ir.AttrInt64("to", to.value)], outputs=[out],
                               name=names(f"{source.name}.cast"))  # fmt: skip
                producer = source.producer()
                if producer is not None:
                    graph.insert_after(producer, [cast])
                else:
                    graph.insert_before(next(iter(graph)), [cast])
                cast_of[key] = out
            node.replace_input_with(i, cast_of[key])
        for k, out in enumerate(list(graph.outputs)):
            if dtype.get(id(out)) == _F64:
                name = out.name
                out.name = names(f"{name}.f64")
                back = ir.Value(name=name, type=ir.TensorType(_F32), shape=out.shape)
                graph.append(ir.Node("", "Cast", [out], [ir.AttrInt64("to", _F32.value)], outputs=[back],
                                     name=names(f"{name}.cast")))  # fmt: skip
                graph.outputs[k] = back
        graph.sort()
        return ir.passes.PassResult(model, True)
