"""Hand-built attention graphs for shapes exporters rarely produce (adversarial sizes, odd masks)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def attention_model(
    heads: int,
    seq: int,
    head_dim: int,
    mask_shape: tuple[int, ...] | None,
    seed: int = 0,
    softmax_axis: int = -1,
) -> onnx.ModelProto:
    """x[1,S,C] -> q/k/v MatMul -> [1,H,S,D] -> softmax(q k^T / sqrt(D) + mask) v -> o_proj."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    inits = [
        numpy_helper.from_array(rng.normal(0, hidden**-0.5, (hidden, hidden)).astype(np.float32), n)
        for n in ("wq", "wk", "wv", "wo")
    ]
    inits += [
        numpy_helper.from_array(np.array([1, seq, heads, head_dim], np.int64), "split_shape"),
        numpy_helper.from_array(np.array([1, seq, hidden], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(head_dim**-0.5, np.float32), "scale"),
    ]
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_proj"], name=f"{name}_proj"),
            helper.make_node(
                "Reshape", [f"{name}_proj", "split_shape"], [f"{name}_4d"], name=f"{name}_reshape"
            ),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_4d"], ["q"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["k_4d"], ["kt"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["v_4d"], ["v"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_mul"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])]
    logits = "scaled"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, list(mask_shape)))
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"], name="mask_add"))
        logits = "masked"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=softmax_axis, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["attn"], name="pv"),
        helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3], name="attn_t"),
        helper.make_node("Reshape", ["attn_t", "merge_shape"], ["attn_merged"], name="merge"),
        helper.make_node("MatMul", ["attn_merged", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def causal_mask(shape: tuple[int, ...]) -> np.ndarray:
    """Additive causal mask broadcast to ``shape`` (last two axes are query, key)."""
    s, t = shape[-2], shape[-1]
    mask = np.where(np.tril(np.ones((s, t), bool), t - s), 0.0, -100.0).astype(np.float32)
    return np.broadcast_to(mask, shape).copy()
