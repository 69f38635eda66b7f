"""Helpers for the lowering tests: one-node models, ORT runs before and after lowering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from mha2sha.lower import LowerRecord, lower_fused_ops
from mha2sha.verify.runner import compare_outputs

MS = "com.microsoft"
F32 = TensorProto.FLOAT

Input = tuple[str, int, Sequence[int] | None]


def node_model(
    op_type: str,
    inputs: Sequence[Input | None],
    outputs: Sequence[str | None],
    *,
    domain: str = "",
    opset: int = 17,
    initializers: Mapping[str, np.ndarray] | None = None,
    name: str = "fused",
    output_types: Mapping[str, int] | None = None,
    output_shapes: Mapping[str, Sequence[int]] | None = None,
    **attrs: object,
) -> onnx.ModelProto:
    """A model with one ``op_type`` node. ``inputs`` entries: (name, elem type, shape) or None
    (an omitted optional input); initializers are passed by name and left out of graph inputs."""
    initializers = dict(initializers or {})
    in_names = [i[0] if i is not None else "" for i in inputs]
    while in_names and in_names[-1] == "":
        in_names.pop()
    out_names = [o or "" for o in outputs]
    node = helper.make_node(op_type, in_names, out_names, domain=domain, name=name, **attrs)
    graph_inputs = [
        helper.make_tensor_value_info(n, t, s)
        for n, t, s in (i for i in inputs if i is not None)
        if n not in initializers
    ]
    types = dict(output_types or {})
    shapes = dict(output_shapes or {})
    graph_outputs = [
        helper.make_tensor_value_info(o, types.get(o, F32), shapes.get(o)) for o in out_names if o
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in initializers.items()]
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimization: str = "disable") -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[optimization]
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, LowerRecord]:
    ir_model = ir.from_proto(model)
    record = lower_fused_ops(ir_model)
    proto = ir.to_proto(ir_model)
    return proto, record


def assert_lowers_exactly(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    fused_left: int = 0,
    row_mask: Mapping[str, np.ndarray] | None = None,
) -> float:
    """Lower ``model``; the lowered model must pass the checker, contain no op of another domain
    and give ORT's outputs of the original (max rel err <= rtol). Returns the max rel err."""
    expected = run_ort(model, feeds)
    lowered, record = lower(model)
    assert not record.refused, record.refused
    assert record.lowered
    inferred = onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred)
    left = [n.op_type for n in lowered.graph.node if n.domain not in ("", "ai.onnx")]
    assert len(left) == fused_left, left
    got = run_ort(lowered, feeds)
    for name, keep in (row_mask or {}).items():  # outputs the op leaves unspecified there
        expected[name] = np.where(keep, expected[name], 0).astype(expected[name].dtype)
        got[name] = np.where(keep, got[name], 0).astype(got[name].dtype)
    verification = compare_outputs(expected, got, rtol)
    assert verification.ok, [r for r in verification.rows if not r.ok]
    return verification.max_rel_err


def refusal(model: onnx.ModelProto) -> str:
    """The reason the single fused node of ``model`` was refused (the model must be unchanged)."""
    lowered, record = lower(model)
    assert not record.lowered
    assert len(record.refused) == 1, record.refused
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in model.graph.node]
    return record.refused[0][2]


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_lowered_matches(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    rtol: float = 1e-5,
) -> float:
    """For ops onnxruntime's CPU provider does not run: the lowered model against ``expected``."""
    lowered, record = lower(model)
    assert not record.refused, record.refused
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True))
    assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node)
    verification = compare_outputs(dict(expected), run_ort(lowered, feeds), rtol)
    assert verification.ok, [r for r in verification.rows if not r.ok]
    return verification.max_rel_err
