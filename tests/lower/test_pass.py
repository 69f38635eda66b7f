"""The pass itself: subgraphs, unknown shapes, old opsets, names, refusals, the record."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from mha2sha.lower import LOWERINGS, LowerFusedOpsPass, LowerRecord, lower_fused_ops
from mha2sha.verify.runner import compare_outputs
from tests.lower._genai import GenaiSpec, genai_decoder
from tests.lower._util import (
    F32,
    MS,
    assert_lowered_matches,
    assert_lowers_exactly,
    lower,
    node_model,
    rand,
    refusal,
    run_ort,
)
from tests.lower.test_ms_attention import AttnCase, _attention_model


def _skip_ln(prefix: str, x: str, skip: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            "SkipLayerNormalization",
            [x, skip, "gamma", "beta"],
            [f"{prefix}_y"],
            domain=MS,
            name=f"{prefix}/sln",
        ),
        helper.make_node("FastGelu", [f"{prefix}_y"], [f"{prefix}_out"], domain=MS, name=f"{prefix}/gelu"),
    ]


def test_lowers_inside_if_branches():
    then_nodes = _skip_ln("then", "x", "skip")
    else_nodes = _skip_ln("else", "skip", "x")

    def branch(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F32, None)])

    node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        then_branch=branch("then", then_nodes, "then_out"),
        else_branch=branch("else", else_nodes, "else_out"),
        name="if",
    )
    main = _skip_ln("main", "y", "x")
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [node, *main],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", F32, (2, 3, 8)),
            helper.make_tensor_value_info("skip", F32, (2, 3, 8)),
        ],
        [helper.make_tensor_value_info("main_out", F32, None)],
        [numpy_helper.from_array(rand(rng, 8), "gamma"), numpy_helper.from_array(rand(rng, 8), "beta")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    lowered, record = lower(model)
    assert len(record.lowered) == 6 and not record.refused
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rand(rng, 2, 3, 8), "skip": rand(rng, 2, 3, 8)}
        verification = compare_outputs(run_ort(model, feeds), run_ort(lowered, feeds))
        assert verification.ok, verification.rows
    subgraph_ops = {n.op_type for a in lowered.graph.node[0].attribute for n in a.g.node}
    assert "LayerNormalization" in subgraph_ops and not subgraph_ops & {"SkipLayerNormalization", "FastGelu"}


def test_symbolic_shapes_are_not_baked_in():
    """Without static shapes the Reshape 0/-1 forms still lower; the model runs at any B, S."""
    rng = np.random.default_rng(1)
    hidden, heads = 32, 4
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["normed"], domain=MS, name="sln"),
        helper.make_node("MatMul", ["normed", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["normed", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["normed", "wv"], ["v"], name="v_proj"),
        helper.make_node(
            "Attention",
            ["q", "k", "v"],
            ["attn"],
            q_num_heads=heads,
            kv_num_heads=2,
            scale=0.3,
            name="attention",
        ),
        helper.make_node("FastGelu", ["attn"], ["y"], domain=MS, name="gelu"),
    ]
    inits = {
        "gamma": rand(rng, hidden),
        "wq": rand(rng, hidden, hidden, scale=hidden**-0.5),
        "wk": rand(rng, hidden, hidden // 2, scale=hidden**-0.5),
        "wv": rand(rng, hidden, hidden // 2, scale=hidden**-0.5),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F32, ["batch", "seq", hidden]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", F32, ["batch", "seq", hidden])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)])
    for batch, seq in ((1, 3), (2, 7)):
        feeds = {"x": rand(rng, batch, seq, hidden), "skip": rand(rng, batch, seq, hidden)}
        assert_lowers_exactly(model, feeds)


def test_old_opsets_use_attribute_forms():
    """Opset 11/12: Split/Unsqueeze/Squeeze/ReduceMax axes as attributes, no GreaterOrEqual."""
    for opset in (11, 12):
        model, feeds = _attention_model(AttnCase("old", past=2, mask="start_end", unidirectional=1))
        model.opset_import[0].version = opset
        assert_lowers_exactly(model, feeds)


def test_ms_layer_norm_domain():
    """com.microsoft.LayerNormalization (no CPU kernel): against the LayerNorm formula."""
    rng = np.random.default_rng(2)
    x, g, b = rand(rng, 2, 3, 8), rand(rng, 8), rand(rng, 8)
    model = node_model(
        "LayerNormalization",
        [("x", F32, x.shape), ("g", F32, None), ("b", F32, None)],
        ["y"],
        domain=MS,
        initializers={"g": g, "b": b},
        epsilon=1e-5,
    )
    mean = x.mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b
    assert_lowered_matches(model, {"x": x}, {"y": expected.astype(np.float32)})


def test_onnx_attention_present_without_past():
    rng = np.random.default_rng(3)
    shapes = {"Q": (1, 4, 3, 8), "K": (1, 2, 5, 8), "V": (1, 2, 5, 8)}
    model = node_model(
        "Attention", [(n, F32, s) for n, s in shapes.items()], ["Y", "present_key", "present_value"], opset=23
    )
    assert_lowers_exactly(model, {n: rand(rng, *s) for n, s in shapes.items()})


def test_names_follow_the_fused_node_and_outputs_keep_theirs():
    model = genai_decoder(GenaiSpec())
    lowered, _ = lower(model)
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    produced = {o for n in lowered.graph.node for o in n.output}
    assert "/model/layers.0/attn/GroupQueryAttention/output_0" in produced  # downstream name kept
    prefix = "/model/layers.0/attn/GroupQueryAttention/"
    ours = [n.name for n in lowered.graph.node if n.name.startswith(prefix)]
    assert {f"{prefix}probs", f"{prefix}qk", f"{prefix}key_cache"} <= set(ours)
    assert len(set(n.name for n in lowered.graph.node)) == len(lowered.graph.node)
    inits = {i.name for i in lowered.graph.initializer}
    assert "cos_cache" not in inits  # read only by the fused nodes, now widened and shared:
    assert sum("cos_cache" in name for name in inits) == 1


def test_refused_node_is_left_alone_and_reported():
    model, _ = _attention_model(AttnCase("r"))
    model.graph.node[0].attribute.append(helper.make_attribute("do_rotary", 1))
    assert "do_rotary" in refusal(model)
    ir_model = ir.from_proto(model)
    record = LowerRecord()
    result = LowerFusedOpsPass(record)(ir_model)
    assert not result.modified
    assert record.to_dict()["refused"][0]["op"] == "com.microsoft.Attention"
    assert not record.ok


def test_record_counts_and_notes():
    rng = np.random.default_rng(4)
    model = node_model(
        "Attention",
        [("Q", F32, (1, 2, 3, 8)), ("K", F32, (1, 2, 3, 8)), ("V", F32, (1, 2, 3, 8))],
        ["Y"],
        opset=23,
        softmax_precision=1,
    )
    ir_model = ir.from_proto(model)
    record = lower_fused_ops(ir_model)
    ((name, op, count),) = record.lowered
    assert (name, op) == ("fused", "Attention") and count == len(list(ir_model.graph))
    assert "softmax_precision" in record.notes[0][2]
    assert run_ort(ir.to_proto(ir_model), {n: rand(rng, 1, 2, 3, 8) for n in "QKV"})


def test_table_covers_the_brief():
    expected = {
        ("", "Attention"),
        ("", "RotaryEmbedding"),
        ("", "RMSNormalization"),
        ("", "SimplifiedLayerNormalization"),
        ("", "LayerNormalization"),
        (MS, "Attention"),
        (MS, "MultiHeadAttention"),
        (MS, "GroupQueryAttention"),
        (MS, "RotaryEmbedding"),
        (MS, "SkipLayerNormalization"),
        (MS, "SkipSimplifiedLayerNormalization"),
        (MS, "EmbedLayerNormalization"),
        (MS, "LayerNormalization"),
        (MS, "BiasGelu"),
        (MS, "FastGelu"),
        (MS, "Gelu"),
        (MS, "QuickGelu"),
        (MS, "BiasAdd"),
        (MS, "BiasSplitGelu"),
    }
    assert expected <= set(LOWERINGS)


def test_unknown_input_shapes_use_in_graph_head_size():
    """Q/K/V of unknown shape: heads from the attributes, the default scale computed in the graph."""
    rng = np.random.default_rng(5)
    model = node_model(
        "Attention",
        [(n, F32, ["batch", f"seq_{n}", f"hidden_{n}"]) for n in "QKV"],
        ["Y"],
        opset=23,
        output_shapes={"Y": ["batch", "seq_Q", "hidden_Q"]},
        q_num_heads=4,
        kv_num_heads=2,
    )
    feeds = {"Q": rand(rng, 2, 3, 32), "K": rand(rng, 2, 5, 16), "V": rand(rng, 2, 5, 16)}
    assert_lowers_exactly(model, feeds)
    lowered, _ = lower(model)
    assert "Sqrt" in {n.op_type for n in lowered.graph.node}
