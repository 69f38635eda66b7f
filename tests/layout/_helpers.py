"""Shared helpers for the layout tests: tiny graph builders and an ORT comparison."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RTOL = 1e-5


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run on ORT CPU with graph optimisations off (the graph as written)."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.abs(ref64 - got64).max() / max(np.abs(ref64).max(), 1e-30))


def assert_same_outputs(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert list(after) == list(before), "graph outputs (names/order) changed"
    for name, ref in before.items():
        assert after[name].shape == ref.shape, name
        assert after[name].dtype == ref.dtype, name
        err = rel_err(ref, after[name])
        assert err <= RTOL, f"{name}: max rel err {err:.3g}"


def check_pass(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], *passes) -> ir.Model:
    """Apply ``passes`` to a copy of ``proto`` and assert the outputs did not change."""
    before = run(proto, feeds)
    model = ir.from_proto(copy.deepcopy(proto))
    for p in passes:
        p(model)
    assert_same_outputs(before, run(model, feeds))
    return model


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def weight(rng: np.random.Generator, shape: tuple[int, ...], name: str) -> TensorProto:
    fan_in = shape[0] if len(shape) >= 2 else 1
    return numpy_helper.from_array(rng.normal(0, fan_in**-0.5, shape).astype(np.float32), name)


def vi(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def feed(rng: np.random.Generator, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for i in proto.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out
