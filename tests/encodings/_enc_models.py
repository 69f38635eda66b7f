"""A tiny 2-head attention block (MHA) and its hand-made per-head split (SHA) with the SplitRecord.

Built with onnx.helper so the encodings tests do not depend on the split under development.
Shapes: x [1, S, D], H heads of hd = D / H; S = 4, D = 16, H = 2 unless told otherwise.
Every weight is distinct; the SHA model concatenates the heads before ``o_proj`` so the
quantized MHA and SHA models compute exactly the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from mha2sha.split.record import Piece, SplitRecord, TensorSplit

S, D, H = 4, 16, 2
HD = D // H


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return {
        "q_w": w((D, D)),
        "k_w": w((D, D)),
        "v_w": w((D, D)),
        "o_w": w((D, D)),
        "q_b": (rng.standard_normal(D) * 0.1).astype(np.float32),
    }


def _common_inits() -> list[onnx.TensorProto]:
    return [
        nh.from_array(np.array([1, S, H, HD], np.int64), "shp"),
        nh.from_array(np.array([1, S, 1, HD], np.int64), "shp_h"),
        nh.from_array(np.array([1, S, D], np.int64), "shp2"),
        nh.from_array(np.array(1 / np.sqrt(HD), np.float32), "scale_c"),
    ]


def _finish(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], path: Path | None, opset: int
) -> onnx.ModelProto:
    g = h.make_graph(
        nodes,
        "attn",
        [h.make_tensor_value_info("x", T.FLOAT, [1, S, D])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, S, D])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save(m, str(path))
    return m


def mha_model(path: Path | None = None, *, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """The original multi-head attention block."""
    w = _weights(seed)
    inits = [nh.from_array(v, k) for k, v in w.items()] + _common_inits()
    nodes = [
        h.make_node("MatMul", ["x", "q_w"], ["q_mm"], name="q_proj"),
        h.make_node("Add", ["q_mm", "q_b"], ["q"], name="q_add"),
        h.make_node("MatMul", ["x", "k_w"], ["k"], name="k_proj"),
        h.make_node("MatMul", ["x", "v_w"], ["v"], name="v_proj"),
        h.make_node("Reshape", ["q", "shp"], ["q4"], name="q_rs"),
        h.make_node("Reshape", ["k", "shp"], ["k4"], name="k_rs"),
        h.make_node("Reshape", ["v", "shp"], ["v4"], name="v_rs"),
        h.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3], name="q_t"),
        h.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1], name="k_t"),
        h.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3], name="v_t"),
        h.make_node("MatMul", ["qt", "kt"], ["s"], name="qk"),
        h.make_node("Mul", ["s", "scale_c"], ["ss"], name="scale"),
        h.make_node("Softmax", ["ss"], ["p"], axis=-1, name="softmax"),
        h.make_node("MatMul", ["p", "vt"], ["ctx"], name="pv"),
        h.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3], name="ctx_t"),
        h.make_node("Reshape", ["ctxt", "shp2"], ["ctx2"], name="ctx_rs"),
        h.make_node("MatMul", ["ctx2", "o_w"], ["y"], name="o_proj"),
    ]
    return _finish(nodes, inits, path, opset)


#: (original name, kind, original shape, axis of the head cut, piece extent along it per head)
_SPLITS: list[tuple[str, str, tuple[int, ...], int, int]] = [
    ("q_w", "param", (D, D), 1, HD),
    ("k_w", "param", (D, D), 1, HD),
    ("v_w", "param", (D, D), 1, HD),
    ("q_b", "param", (D,), 0, HD),
    ("q_mm", "activation", (1, S, D), 2, HD),
    ("q", "activation", (1, S, D), 2, HD),
    ("k", "activation", (1, S, D), 2, HD),
    ("v", "activation", (1, S, D), 2, HD),
    ("q4", "activation", (1, S, H, HD), 2, 1),
    ("k4", "activation", (1, S, H, HD), 2, 1),
    ("v4", "activation", (1, S, H, HD), 2, 1),
    ("qt", "activation", (1, H, S, HD), 1, 1),
    ("kt", "activation", (1, H, HD, S), 1, 1),
    ("vt", "activation", (1, H, S, HD), 1, 1),
    ("s", "activation", (1, H, S, S), 1, 1),
    ("ss", "activation", (1, H, S, S), 1, 1),
    ("p", "activation", (1, H, S, S), 1, 1),
    ("ctx", "activation", (1, H, S, HD), 1, 1),
]


def split_record() -> SplitRecord:
    """What the split of :func:`mha_model` into :func:`sha_model` did."""
    rec = SplitRecord()
    for name, kind, shape, axis, ext in _SPLITS:
        pieces = [Piece(f"{name}.h{i}", ((axis, i * ext, (i + 1) * ext),), (i,)) for i in range(H)]
        rec.tensors[name] = TensorSplit(name, kind, shape, pieces)  # type: ignore[arg-type]
    return rec


def sha_model(path: Path | None = None, *, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """The per-head version: every head computed alone, heads concatenated before ``o_proj``."""
    w = _weights(seed)
    inits = [nh.from_array(w["o_w"], "o_w"), *_common_inits()]
    nodes: list[onnx.NodeProto] = []
    for i in range(H):
        sl = slice(i * HD, (i + 1) * HD)
        for p in ("q", "k", "v"):
            inits.append(nh.from_array(np.ascontiguousarray(w[f"{p}_w"][:, sl]), f"{p}_w.h{i}"))
        inits.append(nh.from_array(np.ascontiguousarray(w["q_b"][sl]), f"q_b.h{i}"))
        n = f".h{i}"
        nodes += [
            h.make_node("MatMul", ["x", "q_w" + n], ["q_mm" + n], name="q_proj" + n),
            h.make_node("Add", ["q_mm" + n, "q_b" + n], ["q" + n], name="q_add" + n),
            h.make_node("MatMul", ["x", "k_w" + n], ["k" + n], name="k_proj" + n),
            h.make_node("MatMul", ["x", "v_w" + n], ["v" + n], name="v_proj" + n),
            h.make_node("Reshape", ["q" + n, "shp_h"], ["q4" + n], name="q_rs" + n),
            h.make_node("Reshape", ["k" + n, "shp_h"], ["k4" + n], name="k_rs" + n),
            h.make_node("Reshape", ["v" + n, "shp_h"], ["v4" + n], name="v_rs" + n),
            h.make_node("Transpose", ["q4" + n], ["qt" + n], perm=[0, 2, 1, 3], name="q_t" + n),
            h.make_node("Transpose", ["k4" + n], ["kt" + n], perm=[0, 2, 3, 1], name="k_t" + n),
            h.make_node("Transpose", ["v4" + n], ["vt" + n], perm=[0, 2, 1, 3], name="v_t" + n),
            h.make_node("MatMul", ["qt" + n, "kt" + n], ["s" + n], name="qk" + n),
            h.make_node("Mul", ["s" + n, "scale_c"], ["ss" + n], name="scale" + n),
            h.make_node("Softmax", ["ss" + n], ["p" + n], axis=-1, name="softmax" + n),
            h.make_node("MatMul", ["p" + n, "vt" + n], ["ctx" + n], name="pv" + n),
            h.make_node("Transpose", ["ctx" + n], ["ctxt" + n], perm=[0, 2, 1, 3], name="ctx_t" + n),
        ]
    nodes += [
        h.make_node("Concat", [f"ctxt.h{i}" for i in range(H)], ["ctxt"], axis=2, name="ctx_concat"),
        h.make_node("Reshape", ["ctxt", "shp2"], ["ctx2"], name="ctx_rs"),
        h.make_node("MatMul", ["ctx2", "o_w"], ["y"], name="o_proj"),
    ]
    return _finish(nodes, inits, path, opset)


def inputs(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, S, D)).astype(np.float32)}
