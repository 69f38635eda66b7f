"""Min/max calibration for tests: AIMET-style encodings for every float activation and weight."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from mha2sha.encodings.model import Encoding, EncodingSet


def _all_float_outputs(model: ir.Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model)
    known = {o.name for o in proto.graph.output}
    for node in model.graph:
        for v in node.outputs:
            if v.name and v.name not in known and v.dtype == ir.DataType.FLOAT:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(v.name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feeds), strict=True))


def calibrate(model: ir.Model, inputs: dict[str, np.ndarray], act_bits: int = 16) -> EncodingSet:
    """uint``act_bits`` per-tensor activations (graph inputs too), int8 symmetric per-channel
    weights of MatMul / Gemm / Conv."""
    es = EncodingSet(version="1.0.0")
    arrays = {v.name: inputs[v.name] for v in model.graph.inputs if v.name in inputs}
    arrays.update(_all_float_outputs(model, inputs))
    for name, array in arrays.items():
        if array.dtype != np.float32 or array.size == 0 or not np.isfinite(array).all():
            continue
        lo, hi = min(float(array.min()), 0.0), max(float(array.max()), 0.0)
        scale = max(hi - lo, 1e-8) / (2**act_bits - 1)
        es.activations[name] = Encoding(
            name,
            bitwidth=act_bits,
            is_symmetric=False,
            scale=np.asarray(scale),
            offset=np.asarray(float(np.round(lo / scale))),
        )
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or w.name in es.params:
            continue
        rank = len(w.const_value.shape)
        if node.op_type == "Conv":
            axis = 0
        elif rank == 2:
            trans_b = (
                node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
            )
            axis = 0 if trans_b else 1
        else:
            continue
        array = w.const_value.numpy().astype(np.float32)
        others = tuple(a for a in range(rank) if a != axis)
        scale = np.maximum(np.abs(array).max(axis=others), 1e-8) / 127.0
        es.params[w.name] = Encoding(
            w.name,
            bitwidth=8,
            is_symmetric=True,
            scale=scale.astype(np.float64),
            offset=np.full(scale.shape, -128.0),
            enc_type="PER_CHANNEL",
            axis=axis,
        )
    return es
