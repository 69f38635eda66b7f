"""The HTP layout stage on the model zoo, before and after the head split.

Each model is compared with the original export on the zoo's inputs (max rel err <= 1e-5), and
the structure is checked: no projection left as MatMul/Gemm, Convs in BD1L, no layout op between
two Convs that only elementwise ops separate, graph I/O untouched, every vanished tensor name
accounted for in the layout record, and, after the split, no tensor of rank > 4 at all.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.graph import ELEMENTWISE_OPS
from mha2sha.io.prepare import prepare_for_split
from mha2sha.layout import apply_htp_layout, high_rank_tensors, split_o_proj_per_head
from mha2sha.layout._graph import is_generated

from ._helpers import RTOL, rel_err, run

TORCHSCRIPT = [c for c in zoo.available_cases() if "torchscript" in zoo.CASES[c].exporters]
FOCUS = ["llama_gqa_step", "qwen2_prefill", "phi3_step", "bert", "clip_vision", "prepared_llama_gqa_step",
         "gpt2_prefill", "llama_lora_step", "t5"]  # fmt: skip
SHA_PAIRS = [(c, "torchscript") for c in TORCHSCRIPT] + [
    (c, "dynamo") for c in FOCUS if "dynamo" in zoo.CASES[c].exporters
]
FOCUS_PAIRS = [(c, e) for c in FOCUS for e in ("torchscript", "dynamo") if e in zoo.CASES[c].exporters]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo_layout")


@functools.cache
def _inputs(case: str) -> dict[str, np.ndarray]:
    return zoo.example_inputs(case)  # the zoo keeps only a few built models; keep every case's inputs


def _reference(case: str, exporter: str) -> dict[str, np.ndarray]:
    return run(ir.load(zoo.build(case, exporter)), _inputs(case))


_PREPARED: dict[tuple[str, str, bool], bytes] = {}


def _prepared(case: str, exporter: str, split: bool, workdir: Path) -> ir.Model:
    """A fresh copy of the (split) model with static shapes; each variant is prepared once."""
    key = (case, exporter, split)
    if key not in _PREPARED:
        source = zoo.build(case, exporter)
        if split:
            logging.disable(logging.WARNING)
            try:
                model = convert(
                    source, workdir / f"{case}-{exporter}", options=ConvertOptions(verify=False)
                ).model
            finally:
                logging.disable(logging.NOTSET)
        else:
            model = ir.load(source)
            prepare_for_split(model)
        _PREPARED[key] = ir.serde.serialize_model(model).SerializeToString()
    return ir.from_proto(onnx.load_from_string(_PREPARED[key]))


def _check(case: str, exporter: str, model: ir.Model, before: ir.Model, result) -> None:
    # numerics against the original export
    ref = _reference(case, exporter)
    got = run(model, _inputs(case))
    assert list(got) == list(ref)
    for name, array in ref.items():
        assert got[name].shape == array.shape
        err = rel_err(array, got[name])
        assert err <= RTOL, f"{name}: max rel err {err:.3g}"
    graph = model.graph
    # graph I/O untouched
    io = [(v.name, tuple(v.shape)) for v in (*graph.inputs, *graph.outputs)]
    assert io == [(v.name, tuple(v.shape)) for v in (*before.graph.inputs, *before.graph.outputs)]
    # every projection is a Conv 1x1 on [B, C, 1, S]
    left = [n.name for n in graph if n.op_type in ("MatMul", "Gemm") and n.inputs[1].const_value is not None]
    assert not left, left
    for conv in (n for n in graph if n.op_type == "Conv" and n.inputs[1].name in _new_weights(result)):
        b, c, one, s = conv.inputs[0].shape
        assert one == 1 and conv.inputs[1].shape[2:] == ir.Shape([1, 1])
    # no layout op between two Convs separated only by elementwise ops
    assert not _layout_between_convs(graph), _layout_between_convs(graph)[:3]
    # names: every vanished original tensor is accounted for, every recorded name exists
    names = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    names |= set(graph.initializers)
    record = result
    vanished = {
        v.name
        for n in before.graph
        for v in n.outputs
        if v.name and v.name not in names and not is_generated(v)
    }
    unexplained = vanished - set(record.moved) - set(record.fused)
    # the original MatMul/Gemm outputs fused with their bias Add, the o_proj Concat, are expected
    assert not {n for n in unexplained if not _expected_gone(n, before)}, sorted(unexplained)[:5]
    assert set(record.aliases) <= names
    assert set(record.moved.values()) <= names
    assert {w.new_name for w in record.weights.values()} <= set(graph.initializers)
    assert set(record.new_activations) <= names
    # rank: the layout passes never add a tensor of rank > 4
    assert len(result.high_rank) <= len(high_rank_tensors(before))


def _new_weights(result) -> set[str]:
    return {w.new_name for w in result.weights.values()}


def _expected_gone(name: str, before: ir.Model) -> bool:
    """Tensors the o_proj pass replaces (the heads' Concat) leave no same-valued survivor."""
    for node in before.graph:
        if any(o.name == name for o in node.outputs):
            return node.op_type in ("Concat", "MatMul", "Gemm", "Reshape")
    return False


def _layout_between_convs(graph: ir.Graph) -> list[str]:
    bad = []
    for conv in (n for n in graph if n.op_type == "Conv"):
        value, hops = conv.inputs[0], 0
        while (p := value.producer()) is not None and p.op_type in ("Transpose", "Reshape"):
            value, hops = p.inputs[0], hops + 1
        if hops == 0:
            continue
        frontier, seen = [value], set()
        while frontier:
            v = frontier.pop()
            p = v.producer()
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.op_type == "Conv":
                bad.append(conv.name)
                break
            if p.op_type in ELEMENTWISE_OPS:
                frontier += [i for i in p.inputs if i is not None and i.const_value is None]
    return bad


@pytest.mark.parametrize(("case", "exporter"), SHA_PAIRS, ids=[f"{c}-{e}" for c, e in SHA_PAIRS])
def test_layout_after_split(case: str, exporter: str, workdir: Path) -> None:
    before = _prepared(case, exporter, True, workdir)
    model = _prepared(case, exporter, True, workdir)
    result = apply_htp_layout(model)
    assert result.conv and result.nodes_removed > 0
    _check(case, exporter, model, before, result)
    assert result.high_rank == []  # HTP: every tensor of rank <= 4 (mask views, packed q|k|v lowered)


@pytest.mark.parametrize(("case", "exporter"), FOCUS_PAIRS, ids=[f"{c}-{e}" for c, e in FOCUS_PAIRS])
def test_layout_without_split(case: str, exporter: str, workdir: Path) -> None:
    before = _prepared(case, exporter, False, workdir)
    model = _prepared(case, exporter, False, workdir)
    result = apply_htp_layout(model)
    _check(case, exporter, model, before, result)


@pytest.mark.parametrize(("case", "exporter"), FOCUS_PAIRS, ids=[f"{c}-{e}" for c, e in FOCUS_PAIRS])
def test_per_head_o_proj(case: str, exporter: str, workdir: Path) -> None:
    before = _prepared(case, exporter, True, workdir)
    model = _prepared(case, exporter, True, workdir)
    record = split_o_proj_per_head(model)
    result = apply_htp_layout(model, record)
    assert result.o_proj
    _check(case, exporter, model, before, result)
    # heads are never joined before the output projection any more
    for node in model.graph:
        if node.op_type == "Conv" and node.inputs[1].name in _new_weights(result):
            assert node.inputs[0].producer() is None or node.inputs[0].producer().op_type != "Concat"
