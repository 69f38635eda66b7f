"""Dynamic input dims resolved in one run from the exporter's dim names."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.errors import UserError
from mha2sha.io.shapes import ShapeRoles, resolve_input_shapes


def _dynamic(case: str, tmp_path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The zoo's HF KV step with optimum's dim names: batch_size, sequence_length,
    past_sequence_length, and ``past_sequence_length + sequence_length`` for the mask."""
    proto = onnx.load(zoo.build(case, "torchscript"))
    static = {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        static[value.name] = tuple(d.dim_value for d in dims)
        names = ["batch_size"] + [None] * (len(dims) - 1)
        if value.name == "input_ids":
            names[1] = "sequence_length"
        elif value.name == "attention_mask":
            names[1] = "past_sequence_length + sequence_length"
        elif value.name.startswith("past"):
            names[2] = "past_sequence_length"
        for dim, name in zip(dims, names, strict=True):
            if name:
                dim.dim_param = name
    path = tmp_path / "dynamic.onnx"
    onnx.save(proto, path)
    return str(path), static


def test_roles_resolve_every_input_consistently(tmp_path) -> None:
    path, static = _dynamic("llama_gqa_step", tmp_path)
    info = zoo.CASES["llama_gqa_step"]
    model = ir.load(path)
    shapes = resolve_input_shapes(model, {}, ShapeRoles(seq=info.seq_len, past=info.past_len))
    assert {k: v for k, v in shapes.items()} == {k: v for k, v in static.items() if k in shapes}
    assert shapes["attention_mask"][1] == info.seq_len + info.past_len


def test_one_error_lists_every_dynamic_input_with_a_command_line(tmp_path) -> None:
    path, _ = _dynamic("llama_gqa_step", tmp_path)
    with pytest.raises(UserError) as e:
        resolve_input_shapes(ir.load(path), {}, ShapeRoles())
    text = str(e.value)
    for name in ("input_ids", "attention_mask", "past_key_0", "past_value_1"):
        assert name in text
    assert "--seq-len 128 --past-len 128" in text and "\n" not in text


def test_explicit_shapes_name_their_dims(tmp_path) -> None:
    """--input-shape of one input fixes its named dims for every other input."""
    path, static = _dynamic("llama_gqa_step", tmp_path)
    info = zoo.CASES["llama_gqa_step"]
    shapes = resolve_input_shapes(
        ir.load(path), {"input_ids": static["input_ids"]}, ShapeRoles(past=info.past_len)
    )
    assert shapes["attention_mask"] == static["attention_mask"]


def test_convert_in_one_run(tmp_path) -> None:
    path, _ = _dynamic("llama_gqa_step", tmp_path)
    info = zoo.CASES["llama_gqa_step"]
    roles = ShapeRoles(seq=info.seq_len, past=info.past_len)
    result = convert(path, tmp_path / "out", options=ConvertOptions(shape_roles=roles))
    assert result.verification is not None and result.verification.ok
    assert len(result.split_blocks) == info.layers


@pytest.mark.parametrize("size", [0, -1])
def test_sizes_below_one_are_refused(size: int) -> None:
    with pytest.raises(UserError, match="at least 1"):
        ShapeRoles(seq=size)


def test_sizes_the_graph_cannot_take_are_bad_input(tmp_path) -> None:
    """The zoo step was traced at fixed sizes (reshape targets baked in): other sizes conflict."""
    path, _ = _dynamic("llama_gqa_step", tmp_path)
    with pytest.raises(UserError, match="do not fit the model.*node name"):
        convert(path, tmp_path / "out", options=ConvertOptions(shape_roles=ShapeRoles(seq=4, past=9)))
    assert not (tmp_path / "out").exists()
