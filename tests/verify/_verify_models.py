"""Tiny ONNX models shared by the verify tests (built with onnx.helper, saved to tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, OUT = 50, 16, 4


def _save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)
    return path


def embedding_model(
    path: Path, *, split: bool = False, bias: float = 0.0, external: bool = False, seq: int | str = 8
) -> Path:
    """input_ids -> Cast -> Gather(embedding) -> MatMul -> logits.

    ``split=True`` computes the same MatMul as two column halves + Concat (a stand-in for a
    rewrite that must be equivalent); ``bias`` adds a constant to perturb the result.
    """
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w = rng.standard_normal((HIDDEN, OUT)).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "emb")]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["ids64", "axes0"], ["ids_u"]),
        helper.make_node("Squeeze", ["ids_u", "axes0"], ["ids_s"]),
        helper.make_node("Gather", ["emb", "ids_s"], ["h"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    if split:
        inits += [
            numpy_helper.from_array(w[:, :2].copy(), "w0"),
            numpy_helper.from_array(w[:, 2:].copy(), "w1"),
        ]
        nodes += [
            helper.make_node("MatMul", ["h", "w0"], ["y0"]),
            helper.make_node("MatMul", ["h", "w1"], ["y1"]),
            helper.make_node("Concat", ["y0", "y1"], ["y"], axis=-1),
        ]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("MatMul", ["h", "w"], ["y"]))
    inits.append(numpy_helper.from_array(np.array(bias, np.float32), "bias"))
    nodes.append(helper.make_node("Add", ["y", "bias"], ["logits"]))
    nodes.append(helper.make_node("ArgMax", ["logits"], ["token"], axis=-1, keepdims=0))
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, seq])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("token", TensorProto.INT64, None),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(model, path, external)


def llm_model(path: Path, ar: int = 4, cl: int = 12, heads: int = 2, head_dim: int = 16) -> Path:
    """Qualcomm prepared-LLM style I/O: ids, 4-D float mask, positions, RoPE tables, past KV."""
    past = cl - ar
    f = TensorProto.FLOAT
    ins = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, ar]),
        helper.make_tensor_value_info("attention_mask", f, [1, 1, ar, cl]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT32, [1, ar]),
        helper.make_tensor_value_info("position_ids_cos", f, [1, 1, ar, head_dim // 2]),
        helper.make_tensor_value_info("position_ids_sin", f, [1, 1, ar, head_dim // 2]),
        helper.make_tensor_value_info("past_key_0_in", f, [1, heads, head_dim, past]),
        helper.make_tensor_value_info("past_value_0_in", f, [1, heads, past, head_dim]),
    ]
    emb = numpy_helper.from_array(np.zeros((VOCAB, 8), np.float32), "embed_tokens")
    nodes = [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["h"])]
    outs = [helper.make_tensor_value_info("h", f, None)]
    for i in ins[1:]:
        nodes.append(helper.make_node("Identity", [i.name], [i.name + "_out"]))
        outs.append(helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None))
    graph = helper.make_graph(nodes, "llm", ins, outs, [emb])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def hf_model(path: Path, seq: int = 3, past: int = 7, dynamic: bool = False) -> Path:
    """HF-style decoder I/O: ids, 2-D int mask of past+seq, position_ids, past_key_values.0.*."""
    s = "sequence_length" if dynamic else seq
    total = "total_length" if dynamic else past + seq
    p = "past_length" if dynamic else past
    ins = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch" if dynamic else 1, s]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, total]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, s]),
        helper.make_tensor_value_info("cache_position", TensorProto.INT64, [s]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, [1, 2, p, 8]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT16, [1, 2, p, 8]),
    ]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in ins]
    outs = [helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None) for i in ins]
    graph = helper.make_graph(nodes, "hf", ins, outs)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
