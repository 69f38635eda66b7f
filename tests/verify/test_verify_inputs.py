"""make_inputs / load_inputs / parse_input_shapes on small models built in the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _verify_models import VOCAB, embedding_model, hf_model, llm_model  # noqa: E402

from mha2sha.errors import UserError  # noqa: E402
from mha2sha.verify.inputs import MASK_NEG, load_inputs, make_inputs, parse_input_shapes  # noqa: E402


def test_token_ids_follow_embedding_table_through_cast(tmp_path: Path) -> None:
    model = ir.load(embedding_model(tmp_path / "m.onnx", seq=64))
    x = make_inputs(model)
    ids = x["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (1, 64)
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert ids.max() >= VOCAB // 2  # spans the table


def test_token_ids_through_quantized_embedding(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((300, 4), np.uint8), "emb_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["emb_q", "scale"], ["emb"]),
            helper.make_node("Reshape", ["ids", "flat"], ["ids_flat"]),
            helper.make_node("Gather", ["emb", "ids_flat"], ["h"]),
            helper.make_node("Identity", ["other"], ["other_out"]),
        ],
        "q",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 512]),
            helper.make_tensor_value_info("other", TensorProto.INT32, [2, 7]),
        ],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("other_out", TensorProto.INT32, None),
        ],
        [table, scale, numpy_helper.from_array(np.array([-1], np.int64), "flat")],
    )
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = make_inputs(ir.load(path))
    assert 100 <= x["ids"].max() < 300 and x["ids"].min() >= 0
    assert x["other"].min() >= 0 and x["other"].max() < 7  # other ints: small, below the last dim


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    model = ir.load(embedding_model(tmp_path / "m.onnx"))
    a, b, c = make_inputs(model, 0), make_inputs(model, 0), make_inputs(model, 1)
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_prepared_llm_inputs(tmp_path: Path) -> None:
    ar, cl, head_dim = 4, 12, 16
    past = cl - ar
    x = make_inputs(ir.load(llm_model(tmp_path / "llm.onnx", ar=ar, cl=cl, head_dim=head_dim)))
    assert list(x) == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "position_ids_cos",
        "position_ids_sin",
        "past_key_0_in",
        "past_value_0_in",
    ]
    assert x["input_ids"].max() < VOCAB

    mask = x["attention_mask"][0, 0]
    assert mask.dtype == np.float32
    for i in range(ar):
        visible = mask[i] == 0
        assert visible[: past + i + 1].all(), f"row {i} must see past and new tokens <= {i}"
        assert (mask[i, past + i + 1 :] == MASK_NEG).all(), f"row {i} must not see the future"

    np.testing.assert_array_equal(x["position_ids"], [np.arange(past, past + ar)])
    assert x["position_ids"].dtype == np.int32

    freqs = head_dim // 2
    inv = 10000.0 ** (-np.arange(freqs) / freqs)
    angles = np.arange(past, past + ar)[:, None] * inv[None, :]
    np.testing.assert_allclose(x["position_ids_cos"][0, 0], np.cos(angles), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x["position_ids_sin"][0, 0], np.sin(angles), rtol=1e-6, atol=1e-7)

    kv = x["past_key_0_in"]
    assert kv.dtype == np.float32 and 0.5 < kv.std() < 1.5


def test_hf_past_length_from_2d_mask(tmp_path: Path) -> None:
    x = make_inputs(ir.load(hf_model(tmp_path / "hf.onnx", seq=3, past=7)))
    assert x["attention_mask"].dtype == np.int64 and (x["attention_mask"] == 1).all()
    assert x["attention_mask"].shape == (1, 10)
    np.testing.assert_array_equal(x["position_ids"], [[7, 8, 9]])
    np.testing.assert_array_equal(x["cache_position"], [7, 8, 9])
    assert x["past_key_values.0.key"].dtype == np.float16
    assert x["input_ids"].min() >= 0 and x["input_ids"].max() < 100  # no embedding: fallback range


def test_dynamic_dim_is_a_user_error_naming_the_input(tmp_path: Path) -> None:
    model = ir.load(hf_model(tmp_path / "hf.onnx", dynamic=True))
    with pytest.raises(UserError) as err:
        make_inputs(model)
    msg = str(err.value)
    assert "input_ids" in msg and "--input-shape input_ids=1,128" in msg and "\n" not in msg


def test_shape_overrides_fix_dynamic_dims(tmp_path: Path) -> None:
    model = ir.load(hf_model(tmp_path / "hf.onnx", dynamic=True))
    shapes = parse_input_shapes(
        [
            "input_ids=1,5",
            "attention_mask=1,9",
            "position_ids=1,5",
            "cache_position=5",
            "past_key_values.0.key=1,2,4,8",
            "past_key_values.0.value=1,2,4,8",
        ]
    )
    x = make_inputs(model, shapes=shapes)
    np.testing.assert_array_equal(x["position_ids"], [[4, 5, 6, 7, 8]])
    with pytest.raises(UserError, match="not a model input"):
        make_inputs(model, shapes={"nope": (1,)})
    with pytest.raises(UserError, match="rank"):
        make_inputs(model, shapes={**shapes, "input_ids": (5,)})


def test_parse_input_shapes_errors() -> None:
    assert parse_input_shapes(["a=1,128", "b.c=3"]) == {"a": (1, 128), "b.c": (3,)}
    for bad in (["a"], ["a=1,x"], ["=1"], ["a=-1"], ["a=1", "a=2"], ["a="]):
        with pytest.raises(UserError):
            parse_input_shapes(bad)


def test_load_inputs_npz(tmp_path: Path) -> None:
    model = ir.load(llm_model(tmp_path / "llm.onnx"))
    ids = np.arange(4, dtype=np.int32)[None]
    np.savez(tmp_path / "ok.npz", input_ids=ids)
    x = load_inputs(tmp_path / "ok.npz", model)
    np.testing.assert_array_equal(x["input_ids"], ids)
    assert set(x) == set(make_inputs(model))  # missing inputs are generated

    np.savez(tmp_path / "dtype.npz", input_ids=ids.astype(np.int64))
    with pytest.raises(UserError, match="input_ids.*dtype int64"):
        load_inputs(tmp_path / "dtype.npz", model)
    np.savez(tmp_path / "shape.npz", input_ids=np.zeros((1, 5), np.int32))
    with pytest.raises(UserError, match="input_ids.*shape"):
        load_inputs(tmp_path / "shape.npz", model)
    np.savez(tmp_path / "name.npz", bogus=ids)
    with pytest.raises(UserError, match="bogus"):
        load_inputs(tmp_path / "name.npz", model)
    with pytest.raises(UserError, match="does not exist"):
        load_inputs(tmp_path / "missing.npz", model)


def test_load_inputs_binds_symbolic_dims(tmp_path: Path) -> None:
    model = ir.load(embedding_model(tmp_path / "m.onnx", seq="sequence_length"))
    np.savez(tmp_path / "x.npz", input_ids=np.ones((1, 6), np.int32))
    assert load_inputs(tmp_path / "x.npz", model)["input_ids"].shape == (1, 6)
