"""Decoder graphs shaped like onnxruntime-genai's model builder writes them (CPU, fp32), built by hand.

What the builder (``src/python/py/models/builders/base.py``) writes for a Llama-style model:
``input_ids``, ``attention_mask [B, T]`` (int64), ``past_key_values.{i}.key/value [B, Hkv, P, D]``
inputs; ``logits``, ``present.{i}.key/value`` outputs; the attention-mask subgraph
(``ReduceSum - 1 -> Cast int32`` = ``seqlens_k``, ``Shape -> Gather -> Cast int32`` = total length);
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``; q/k/v MatMuls (or one packed
QKV MatMul) feeding ``GroupQueryAttention`` with ``do_rotary`` and cos/sin cache initializers; o_proj,
a SiLU MLP and the LM head. Weights are random, drawn so the softmax sees O(1) logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class GenaiSpec:
    layers: int = 2
    vocab: int = 64
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    batch: int = 1
    seq: int = 3  # new tokens per call (AR)
    past: int = 5
    max_pos: int = 64
    packed_qkv: bool = False
    qkv_bias: bool = False
    interleaved: bool = False
    window: int = -1
    softcap: float = 0.0
    ops: str = "contrib"  # "contrib": ORT's norms (as the builder writes); "standard": ONNX ops
    total: int = 0  # attention-mask length when the past is a longer (shared, max-length) buffer
    sliding_cache: bool = False  # genai's CPU window cache (sliding_window_cache=1, capacity = past)

    @property
    def total_len(self) -> int:
        return self.total or self.past + self.seq

    @property
    def present_len(self) -> int:
        return self.past if self.sliding_cache else max(self.past, self.total_len)

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


class _Graph:
    def __init__(self, spec: GenaiSpec, seed: int):
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, fan_in: int, fan_out: int) -> str:
        w = self.rng.standard_normal((fan_in, fan_out)) * fan_in**-0.5
        return self.init(name, w.astype(np.float32))

    def node(
        self, op: str, inputs: list[str], name: str, domain: str = "", outputs: int = 1, **attrs
    ) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, domain, **attrs)[0]


def genai_decoder(spec: GenaiSpec, seed: int = 0) -> onnx.ModelProto:
    g = _Graph(spec, seed)
    s = spec
    total = s.total_len
    d = s.head_size
    g.init("/model/constants/INT64/[1]", np.array([1], np.int64))
    g.init("/model/constants/INT64/1", np.array(1, np.int64))
    base = "/model/attn_mask_reformat/attn_mask_subgraph"
    red = g.one(
        "ReduceSum", ["attention_mask", "/model/constants/INT64/[1]"], f"{base}/ReduceSum", keepdims=0
    )
    sub = g.one("Sub", [red, "/model/constants/INT64/[1]"], f"{base}/Sub")
    seqlens = g.one("Cast", [sub], f"{base}/Sub/Cast", to=TensorProto.INT32)
    shape = g.one("Shape", ["attention_mask"], f"{base}/Shape")
    gather = g.one("Gather", [shape, "/model/constants/INT64/1"], f"{base}/Gather", axis=0)
    total_len = g.one("Cast", [gather], f"{base}/Gather/Cast", to=TensorProto.INT32)

    angles = np.outer(np.arange(s.max_pos), 10000.0 ** (-np.arange(0, d, 2) / d))
    g.init("cos_cache", np.cos(angles).astype(np.float32))
    g.init("sin_cache", np.sin(angles).astype(np.float32))
    emb = g.init("model.embed_tokens.weight", g.rng.standard_normal((s.vocab, s.hidden)).astype(np.float32))
    x = g.one("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather", axis=0)

    def norm(name: str, inp: str, skip: str | None) -> tuple[str, str | None]:
        w = g.init(f"{name}.weight", (1 + 0.1 * g.rng.standard_normal(s.hidden)).astype(np.float32))
        if skip is None:
            if s.ops == "standard":
                return g.one("RMSNormalization", [inp, w], f"/{name}/RMSNormalization", epsilon=1e-6), None
            return g.one(
                "SimplifiedLayerNormalization",
                [inp, w],
                f"/{name}/SimplifiedLayerNormalization",
                epsilon=1e-6,
                axis=-1,
                stash_type=1,
            ), None
        out, _, _, summed = g.node(
            "SkipSimplifiedLayerNormalization",
            [inp, skip, w],
            f"/{name}/SkipLayerNorm",
            MS,
            outputs=4,
            epsilon=1e-6,
        )
        return out, summed

    residual = None
    hidden_in = x
    outputs = []
    for i in range(s.layers):
        p = f"/model/layers.{i}"
        if i == 0:
            normed, _ = norm(f"model/layers.{i}/input_layernorm", hidden_in, None)
            residual = hidden_in
        else:
            normed, residual = norm(f"model/layers.{i}/input_layernorm", hidden_in, residual)
        if s.packed_qkv:
            width = (s.heads + 2 * s.kv_heads) * d
            qkv = g.one(
                "MatMul",
                [normed, g.weight(f"model.layers.{i}.attn.qkv_proj.weight", s.hidden, width)],
                f"{p}/attn/qkv_proj/MatMul",
            )
            if s.qkv_bias:
                qkv = g.one(
                    "Add",
                    [
                        qkv,
                        g.init(
                            f"model.layers.{i}.attn.qkv_proj.bias",
                            g.rng.standard_normal(width).astype(np.float32) * 0.1,
                        ),
                    ],
                    f"{p}/attn/qkv_proj/Add",
                )
            q, k, v = qkv, "", ""
        else:
            proj = []
            for n, heads in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
                t = g.one(
                    "MatMul",
                    [normed, g.weight(f"model.layers.{i}.attn.{n}_proj.weight", s.hidden, heads * d)],
                    f"{p}/attn/{n}_proj/MatMul",
                )
                if s.qkv_bias:
                    t = g.one(
                        "Add",
                        [
                            t,
                            g.init(
                                f"model.layers.{i}.attn.{n}_proj.bias",
                                g.rng.standard_normal(heads * d).astype(np.float32) * 0.1,
                            ),
                        ],
                        f"{p}/attn/{n}_proj/Add",
                    )
                proj.append(t)
            q, k, v = proj
        attrs = dict(
            num_heads=s.heads,
            kv_num_heads=s.kv_heads,
            scale=float(d**-0.5),
            local_window_size=s.window,
            softcap=s.softcap,
            do_rotary=1,
            rotary_interleaved=int(s.interleaved),
        )
        if s.sliding_cache:
            attrs["sliding_window_cache"] = 1
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        attn = f"{p}/attn/GroupQueryAttention"
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    seqlens,
                    total_len,
                    "cos_cache",
                    "sin_cache",
                ],
                [f"{attn}/output_0", present_k, present_v],
                name=attn,
                domain=MS,
                **attrs,
            )
        )
        outputs += [present_k, present_v]
        o = g.one(
            "MatMul",
            [f"{attn}/output_0", g.weight(f"model.layers.{i}.attn.o_proj.weight", s.hidden, s.hidden)],
            f"{p}/attn/o_proj/MatMul",
        )
        normed, residual = norm(f"model/layers.{i}/post_attention_layernorm", o, residual)
        gate = g.one(
            "MatMul",
            [normed, g.weight(f"model.layers.{i}.mlp.gate_proj.weight", s.hidden, s.intermediate)],
            f"{p}/mlp/gate_proj/MatMul",
        )
        up = g.one(
            "MatMul",
            [normed, g.weight(f"model.layers.{i}.mlp.up_proj.weight", s.hidden, s.intermediate)],
            f"{p}/mlp/up_proj/MatMul",
        )
        silu = g.one(
            "Mul", [gate, g.one("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul"
        )
        act = g.one("Mul", [silu, up], f"{p}/mlp/Mul")
        hidden_in = g.one(
            "MatMul",
            [act, g.weight(f"model.layers.{i}.mlp.down_proj.weight", s.intermediate, s.hidden)],
            f"{p}/mlp/down_proj/MatMul",
        )
    final, _ = norm("model/norm", hidden_in, residual)
    g.nodes.append(
        helper.make_node(
            "MatMul",
            [final, g.weight("lm_head.weight", s.hidden, s.vocab)],
            ["logits"],
            name="/lm_head/MatMul",
        )
    )

    kv_shape = [s.batch, s.kv_heads, s.past, d]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [s.batch, s.seq]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [s.batch, total]),
    ]
    for i in range(s.layers):
        inputs += [
            helper.make_tensor_value_info(f"past_key_values.{i}.key", TensorProto.FLOAT, kv_shape),
            helper.make_tensor_value_info(f"past_key_values.{i}.value", TensorProto.FLOAT, kv_shape),
        ]
    present_shape = [s.batch, s.kv_heads, s.present_len, d]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [s.batch, s.seq, s.vocab])]
    graph_outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, present_shape) for o in outputs]
    graph = helper.make_graph(g.nodes, "main_graph", inputs, graph_outputs, g.inits)
    return helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 23 if s.ops == "standard" else 21),
            helper.make_opsetid(MS, 1),
        ],
        ir_version=10,
        producer_name="genai-like",
    )


def genai_feeds(spec: GenaiSpec, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    total = spec.total_len
    feeds = {
        "input_ids": rng.integers(0, spec.vocab, (spec.batch, spec.seq)).astype(np.int64),
        "attention_mask": np.ones((spec.batch, total), np.int64),
    }
    for i in range(spec.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (spec.batch, spec.kv_heads, spec.past, spec.head_size)
            ).astype(np.float32)
    return feeds
