"""Make every shape static and visible before the split.

Exporters compute reshape targets at run time from ``Shape`` ops. With static input shapes those
computations are constants: fold the small integer ones (never a weight, never a float tensor that
could carry a quantization encoding), then run ONNX shape inference, and repeat until nothing
changes. Constants become initializers so every
rule sees one kind of constant.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass, ShapeInferencePass

from mha2sha.graph import NONDETERMINISTIC_OPS, is_onnx_domain, name_of, static_shape

__all__ = ["FoldSmallConstantsPass", "infer_shapes", "prepare_for_split", "remove_unused_initializers"]

logger = logging.getLogger(__name__)

_MAX_ELEMENTS = 1 << 16  # constants larger than this are never created by folding
#: Ops whose output size comes from input *values*: folded only when inference knows it is small.
_SIZED_BY_VALUES = frozenset(
    {"ConstantOfShape", "Range", "Expand", "Tile", "Pad", "Resize", "Upsample", "OneHot", "EyeLike"}
)


def _small(value: ir.Value | None) -> bool:
    if value is None:
        return True
    tensor = value.const_value
    return tensor is not None and tensor.size <= _MAX_ELEMENTS


def _evaluate(node: ir.Node) -> list[np.ndarray] | None:
    """Run one node with the ONNX reference evaluator; None when it cannot."""
    inputs = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    proto_node = onnx.helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
    proto_node.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    feeds: dict[str, np.ndarray] = {}
    for name, v in zip(inputs, node.inputs, strict=True):
        if v is not None:
            assert v.const_value is not None  # folded only when every input is a small constant
            feeds[name] = v.const_value.numpy()
    try:
        opset = 21 if node.version is None else node.version
        graph = onnx.helper.make_graph(
            [proto_node],
            "fold",
            [
                onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in feeds.items()
            ],
            [onnx.helper.make_tensor_value_info(n, 0, None) for n in outputs],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", max(opset, 13))])
        return list(ReferenceEvaluator(model).run(None, feeds))
    except Exception as e:  # the reference evaluator cannot run it: keep the node
        logger.debug("not folding %s: %s", node.op_type, e)
        return None


class FoldSmallConstantsPass(ir.passes.InPlacePass):
    """Fold nodes whose inputs are small constants, and ``Shape`` of statically shaped tensors."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        opset = model.opset_imports.get("", 17)
        for node in list(model.graph):
            if not is_onnx_domain(node.domain) or node.op_type in NONDETERMINISTIC_OPS | {"Constant"}:
                continue
            if node.op_type == "Shape":
                results = _fold_shape(node)
            elif not _small_outputs(node):
                continue
            elif all(_small(v) for v in node.inputs) and node.inputs:
                if node.version is None:
                    node.version = opset
                results = _evaluate(node)
            else:
                continue
            if results is None or any(np.asarray(r).size > _MAX_ELEMENTS for r in results):
                continue
            if any(np.issubdtype(np.asarray(r).dtype, np.floating) for r in results):
                # Float tensors may carry activation encodings (a quantized model's QDQ would then
                # change); only index and shape arithmetic is folded.
                continue
            for out, array in zip(node.outputs, results, strict=True):
                array = np.asarray(array)
                out.const_value = ir.tensor(array, name=out.name)
                out.shape = ir.Shape(array.shape)
            _detach_into_initializers(model.graph, node)
            modified = True
        return ir.passes.PassResult(model, modified)


def _small_outputs(node: ir.Node) -> bool:
    """Outputs known to be small, or of an op whose output is no larger than its (small) inputs."""
    for out in node.outputs:
        shape = static_shape(out)
        if shape is not None:
            if math.prod(shape) > _MAX_ELEMENTS:
                return False
        elif node.op_type in _SIZED_BY_VALUES:
            return False  # a 1e8-token mask would be allocated before its size could be checked
    return True


def _fold_shape(node: ir.Node) -> list[np.ndarray] | None:
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None or not shape.is_static():
        return None
    dims = list(shape.numpy())
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else len(dims)
    return [np.asarray(dims[slice(start, end)], dtype=np.int64)]


def _detach_into_initializers(graph: ir.Graph, node: ir.Node) -> None:
    """Replace a folded node by initializers that keep its output names (encodings refer to them)."""
    outputs = list(node.outputs)
    graph.remove(node, safe=False)
    for out in outputs:
        if out.uses() or out.is_graph_output():
            replacement = ir.Value(name=out.name, shape=out.shape, type=out.type, const_value=out.const_value)
            out.name = name_of(out) + ".folded"
            out.replace_all_uses_with(replacement, replace_graph_outputs=True)
            graph.register_initializer(replacement)


def prepare_for_split(model: ir.Model, max_rounds: int = 4) -> None:
    """Fold shape computations and infer static shapes, in place."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    for _ in range(max_rounds):
        infer_shapes(model)
        if not FoldSmallConstantsPass()(model).modified:
            break
    RemoveUnusedNodesPass()(model)
    remove_unused_initializers(model)
    infer_shapes(model)


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference, node by node (a node it cannot infer keeps its shapes unknown and the
    walk reports the block; the model's consistency was checked once at load by
    :func:`mha2sha.io.shapes.check_shapes`). Quiet: no traceback reaches the terminal."""
    quiet = logging.getLogger(ShapeInferencePass.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ShapeInferencePass(strict_mode=False)(model)
    finally:
        quiet.setLevel(level)


def remove_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    graph_inputs = {id(v) for v in graph.inputs}
    for name, value in list(graph.initializers.items()):
        # a node removed without detaching its inputs still counts as a use: ignore nodes of no graph
        used = any(user.graph is not None for user, _ in value.uses())
        if not used and not value.is_graph_output() and id(value) not in graph_inputs:
            del graph.initializers[name]
