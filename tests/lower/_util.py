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

#: (op, "node" | "model", test id, max rel err) of every exactness check, summarised at the end
ERRORS: list[tuple[str, str, str, float]] = []


def _record(model: onnx.ModelProto, err: float) -> None:
    import os

    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    fused = [n for n in model.graph.node if _fused(n, opset)]
    kind = "node" if len(model.graph.node) == 1 else "model"
    for op in sorted({f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in fused}):
        ERRORS.append((op, kind, test, err))


def _fused(node: onnx.NodeProto, opset: int) -> bool:
    from mha2sha.lower import LOWERINGS

    lowering = LOWERINGS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    return lowering is not None and lowering.applies(ir.serde.deserialize_node(node), opset)


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
    if rtol <= 1e-5:  # the float32 checks (fp16 ones are looser by design)
        _record(model, verification.max_rel_err)
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
    if rtol <= 1e-5:  # the float32 checks (fp16 ones are looser by design)
        _record(model, verification.max_rel_err)
    return verification.max_rel_err


def convert_and_check(
    lowered: onnx.ModelProto, tmp_path, name: str = "lowered", blocks: int | None = None
) -> dict:
    """Run mha2sha's normal conversion on a lowered model: every attention block must be split and
    the conversion verified (ORT, original vs converted). Returns the report."""
    import contextlib
    import io
    import json

    from mha2sha.cli import main

    src = tmp_path / f"{name}.onnx"
    onnx.save(lowered, src)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["convert", str(src), "-o", str(out)])
    report = json.loads((out / f"{name}.report.json").read_text())
    statuses = [(b["block"], b["status"], b["reason"]) for b in report["blocks"]]
    assert rc == 0, statuses
    assert statuses and all(s == "split" for _, s, _ in statuses), statuses
    if blocks is not None:
        assert len(statuses) == blocks, statuses
    assert report["verification"]["ok"], report["verification"]
    return report


def assert_same(
    fused: onnx.ModelProto,
    expected: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    rtol: float = 1e-5,
) -> float:
    """Outputs of the lowered model against a reference run; recorded under ``fused``'s ops."""
    verification = compare_outputs(dict(expected), dict(got), rtol)
    assert verification.ok, [r for r in verification.rows if not r.ok]
    _record(fused, verification.max_rel_err)
    return verification.max_rel_err
