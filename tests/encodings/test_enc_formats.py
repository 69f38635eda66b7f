"""AIMET encodings files: exact round trips, conversions between versions, and bad input."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _enc_docs as docs  # noqa: E402
import _enc_models as em  # noqa: E402

from mha2sha.encodings import (  # noqa: E402
    convert_encodings,
    dump_encodings,
    load_encodings,
    parse_encodings,
    save_encodings,
)
from mha2sha.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def model() -> ir.Model:
    return ir.from_proto(em.mha_model())


@pytest.mark.parametrize("version", sorted(docs.ALL))
def test_round_trip_in_memory(version: str) -> None:
    doc = docs.ALL[version]()
    es = parse_encodings(copy.deepcopy(doc))
    assert es.version == version
    assert dump_encodings(es) == doc


@pytest.mark.parametrize("version", sorted(docs.ALL))
def test_round_trip_file(tmp_path: Path, version: str) -> None:
    src = tmp_path / "in.encodings"
    src.write_text(json.dumps(docs.ALL[version]()))
    es = load_encodings(src)
    dst = tmp_path / "out.encodings"
    save_encodings(es, dst)
    assert json.loads(dst.read_text()) == json.loads(src.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("version", sorted(docs.ALL))
def test_round_trip_with_model(tmp_path: Path, version: str, model: ir.Model) -> None:
    """Resolving axes from the model must not change what is written back."""
    src = tmp_path / "in.encodings"
    src.write_text(json.dumps(docs.ALL[version]()))
    es = load_encodings(src, model=model)
    assert dump_encodings(es) == docs.ALL[version]()


def test_parsed_values_1_0_0() -> None:
    es = parse_encodings(docs.doc_100())
    assert set(es.params) == {"q_w", "k_w", "v_w", "o_w"}
    q_w = es.params["q_w"]
    assert q_w.enc_type == "PER_CHANNEL" and q_w.scale.shape == (16,) and q_w.axis is None
    assert q_w.extra == {"custom": {"keep": True}}
    v_w = es.params["v_w"]
    assert v_w.enc_type == "LPBQ" and v_w.per_block_int_scale.shape == (16, 2) and v_w.compressed_bw == 4
    assert es.activations["k"].zero_point("int16") == 0  # symmetric int16: offset -32768
    assert es.activations["k"].zero_point("uint16") == 32768
    assert es.activations["s"].offset == -1.5  # offset + zero_point_shift
    assert es.activations["v"].is_float and not es.activations["v"].has_scale


def test_2x_classification_and_axes() -> None:
    es = parse_encodings(docs.doc_200())
    assert set(es.params) == {"q_w", "k_w", "v_w", "q_b"}  # heuristic: per-channel/blocked/int32
    es2 = parse_encodings(docs.doc_200(), param_names={"q_w", "k_w", "v_w", "o_w", "q_b"})
    assert "o_w" in es2.params
    k_w = es.params["k_w"]
    assert (k_w.axis, k_w.block_axis, k_w.rank, k_w.scale.shape) == (1, 0, 2, (16, 2))
    # 2.0.0 and 1.0.0 blocked layouts are the same numbers
    np.testing.assert_array_equal(
        k_w.scale, parse_encodings(docs.doc_100()).params["k_w"].scale.reshape(16, 2)
    )
    v_w = es.params["v_w"]
    np.testing.assert_array_equal(
        v_w.per_block_int_scale, parse_encodings(docs.doc_100()).params["v_w"].per_block_int_scale
    )
    assert es.activations["x"].offset == -36794 and not es.activations["x"].is_symmetric


def _numbers(es):  # name -> (scale, zero point as uint grid, block info)
    out = {}
    for name, e in es.items():
        if e.is_float:
            out[name] = ("float", e.bitwidth)
            continue
        scale = np.asarray(e.effective_scale(), np.float64)
        if e.enc_type == "PER_BLOCK" and scale.ndim == 1:
            scale = scale.reshape(16, -1)
        out[name] = (
            scale.round(15).tolist(),
            np.asarray(e.offset).ravel().tolist() if e.enc_type != "LPBQ" else None,
        )
    return out


@pytest.mark.parametrize("src", ["1.0.0", "2.0.0"])
@pytest.mark.parametrize("dst", ["1.0.0", "2.0.0", "2.1.0"])
def test_conversion_keeps_numbers(src: str, dst: str, model: ir.Model) -> None:
    doc = docs.ALL[src]()
    if src == "2.0.0" and dst == "1.0.0":  # float8 has no 1.0.0 form
        doc["encodings"] = [e for e in doc["encodings"] if e["output_dtype"] != "float8e4m3fn"]
    if src == "1.0.0" and dst.startswith("2."):  # the 2-bit fractional grid converts, fp16 is omitted
        doc["activation_encodings"] = [e for e in doc["activation_encodings"] if e["dtype"] == "INT"]
    es = parse_encodings(doc)
    conv = convert_encodings(es, dst, model=model)
    assert conv.version == dst
    again = parse_encodings(dump_encodings(conv))
    assert _numbers(again) == _numbers(es)
    back = convert_encodings(conv, src, model=model)
    assert _numbers(back) == _numbers(es)


def test_1_0_0_to_2_0_0_spelling(model: ir.Model) -> None:
    es = parse_encodings(docs.doc_100())
    doc = dump_encodings(convert_encodings(es, "2.0.0", model=model))
    by = {e["name"]: e for e in doc["encodings"]}
    assert by["q_w"]["axis"] == 1 and by["q_w"]["output_dtype"] == "int8" and "y_zero_point" not in by["q_w"]
    assert by["x"] == {"name": "x", "output_dtype": "uint16", "y_scale": 7.3e-05, "y_zero_point": 36794}
    # a symmetric activation becomes unsigned with the zero point in the middle (AIMET's 2.x export)
    assert by["k"]["output_dtype"] == "uint16" and by["k"]["y_zero_point"] == 32768
    assert by["k_w"]["axis"] == 0 and np.shape(by["k_w"]["y_scale"]) == (2, 16)
    assert np.shape(by["v_w"]["per_block_int_scale"]) == (2, 16) and by["v_w"]["axis"] == 0
    assert "v" not in by  # fp16 plain cast has no 2.x entry
    assert doc["quantizer_args"] == docs.QARGS


def test_0_6_1_and_1_0_0_convert_both_ways() -> None:
    es = parse_encodings(docs.doc_061())
    doc100 = dump_encodings(convert_encodings(es, "1.0.0"))
    q_w = next(e for e in doc100["param_encodings"] if e["name"] == "q_w")
    assert q_w["enc_type"] == "PER_CHANNEL" and q_w["is_sym"] is True and len(q_w["scale"]) == 16
    back = dump_encodings(convert_encodings(parse_encodings(doc100), "0.6.1"))
    orig = docs.doc_061()
    assert back["activation_encodings"]["x"] == orig["activation_encodings"]["x"]
    assert back["activation_encodings"]["k"] == orig["activation_encodings"]["k"]
    assert [e["scale"] for e in back["param_encodings"]["q_w"]] == [
        e["scale"] for e in orig["param_encodings"]["q_w"]
    ]


def test_conversion_refusals(model: ir.Model) -> None:
    with pytest.raises(UserError, match="cannot be written as 0.6.1"):
        convert_encodings(parse_encodings(docs.doc_100()), "0.6.1")
    with pytest.raises(UserError, match="scaled float"):
        convert_encodings(parse_encodings(docs.doc_200()), "1.0.0")
    with pytest.raises(UserError, match="channel axis"):  # no model: per-channel axis unknown
        convert_encodings(parse_encodings(docs.doc_100()), "2.0.0")


def test_channel_axes_from_caller() -> None:
    es = parse_encodings(
        {
            "version": "1.0.0",
            "activation_encodings": [],
            "param_encodings": [
                {
                    "bw": 8,
                    "dtype": "INT",
                    "enc_type": "PER_CHANNEL",
                    "is_sym": True,
                    "name": "w",
                    "offset": [-128.0] * 4,
                    "scale": [0.1, 0.2, 0.3, 0.4],
                }
            ],
        }
    )
    doc = dump_encodings(convert_encodings(es, "2.0.0", channel_axes={"w": 0}))
    assert doc["encodings"][0]["axis"] == 0


def test_version_inferred_when_missing() -> None:
    doc = docs.doc_100()
    del doc["version"]
    es = parse_encodings(copy.deepcopy(doc))
    assert es.version == "1.0.0"
    assert dump_encodings(es) == doc


# ------------------------------------------------------------------------------------------
# bad input: one-line UserErrors
# ------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.encodings"
    p.write_text(text)
    return p


def one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_encodings(_write(tmp_path, '{"version": "1.0.0", '))
    assert "malformed JSON" in one_line(exc)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        load_encodings(tmp_path / "nope.encodings")


def test_unknown_version(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_encodings(_write(tmp_path, json.dumps({"version": "3.0.0", "encodings": []})))
    assert "unsupported version '3.0.0'" in one_line(exc)


@pytest.mark.parametrize(
    "doc, match",
    [
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    },
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    },
                ],
                "param_encodings": [],
            },
            "duplicate encoding name",
        ),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    }
                ],
                "param_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    }
                ],
            },
            "duplicate encoding name",
        ),
        (
            {
                "version": "2.0.0",
                "encodings": [
                    {"name": "a", "output_dtype": "uint8", "y_scale": 1.0},
                    {"name": "a", "output_dtype": "uint8", "y_scale": 1.0},
                ],
            },
            "duplicate",
        ),
        ({"version": "1.0.0", "activation_encodings": {}, "param_encodings": []}, "must be a list"),
        ({"version": "0.6.1", "activation_encodings": [], "param_encodings": {}}, "must be an object"),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": "8",
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    }
                ],
            },
            "'bw' must be an integer",
        ),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": "False",
                        "scale": [1.0],
                        "offset": [0],
                    }
                ],
            },
            "'is_sym' must be true or false",
        ),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_TENSOR",
                        "bw": 8,
                        "is_sym": False,
                        "scale": ["x"],
                        "offset": [0],
                    }
                ],
            },
            "'scale' must be a number",
        ),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "PER_CHANNEL",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0, 2.0],
                        "offset": [0],
                    }
                ],
            },
            "'scale' has 2 entries, 'offset' 1",
        ),
        (
            {
                "version": "1.0.0",
                "activation_encodings": [
                    {
                        "name": "a",
                        "dtype": "INT",
                        "enc_type": "WEIRD",
                        "bw": 8,
                        "is_sym": False,
                        "scale": [1.0],
                        "offset": [0],
                    }
                ],
            },
            "unknown 'enc_type'",
        ),
        ({"version": "1.0.0", "activation_encodings": [{"dtype": "INT"}]}, "without a string 'name'"),
        (
            {
                "version": "0.6.1",
                "activation_encodings": {
                    "a": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "yes", "scale": 1.0, "offset": 0}]
                },
            },
            "'is_symmetric' must be",
        ),
        ({"version": "0.6.1", "activation_encodings": {"a": {"bitwidth": 8}}}, "non-empty list"),
        (
            {"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "uint7x", "y_scale": 1.0}]},
            "unknown 'output_dtype'",
        ),
        (
            {"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "int8", "y_scale": [1.0, 2.0]}]},
            "no 'axis'",
        ),
        (
            {
                "version": "2.0.0",
                "encodings": [{"name": "a", "bw": 8, "output_dtype": "int8", "y_scale": 1.0}],
            },
            "1.0.0 'bw'",
        ),
        ({"version": "2.0.0", "encodings": {"a": 1}}, "must be a list"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_documents(tmp_path: Path, doc: object, match: str) -> None:
    with pytest.raises(UserError) as exc:
        load_encodings(_write(tmp_path, json.dumps(doc)))
    assert match in one_line(exc)


def test_duplicate_json_keys(tmp_path: Path) -> None:
    text = '{"version": "0.6.1", "activation_encodings": {"a": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "scale": 1.0, "offset": 0}], "a": []}, "param_encodings": {}}'
    with pytest.raises(UserError) as exc:
        load_encodings(_write(tmp_path, text))
    assert "duplicate key 'a'" in one_line(exc)


def test_axis_shape_mismatch_with_model(tmp_path: Path, model: ir.Model) -> None:
    doc = docs.doc_100()
    doc["param_encodings"][0]["scale"] = doc["param_encodings"][0]["scale"][:8]
    doc["param_encodings"][0]["offset"] = doc["param_encodings"][0]["offset"][:8]
    with pytest.raises(UserError, match="8 channels but axis 1"):
        load_encodings(_write(tmp_path, json.dumps(doc)), model=model)


def test_save_is_atomic_on_error(tmp_path: Path) -> None:
    dst = tmp_path / "out.encodings"
    dst.write_text("previous")
    es = parse_encodings(docs.doc_100())
    with pytest.raises(UserError):
        save_encodings(es, dst, version="0.6.1")  # per-block cannot be 0.6.1
    assert dst.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.encodings"]


def test_with_axes_for_a_conv_layout() -> None:
    """A MatMul weight [in, out] rewritten as Conv [out, in, 1, 1]: same numbers, new axes."""
    es = parse_encodings(docs.doc_200())
    conv = {n: es.params[n].with_axes({1: 0, 0: 1}, rank=4) for n in ("q_w", "k_w", "v_w")}
    es.params.update(conv)
    by = {e["name"]: e for e in dump_encodings(es)["encodings"]}
    assert by["q_w"]["axis"] == 0
    assert np.shape(by["k_w"]["y_scale"]) == (16, 2, 1, 1) and by["k_w"]["axis"] == 1
    assert np.shape(by["v_w"]["per_block_int_scale"]) == (16, 2, 1, 1)
    np.testing.assert_array_equal(parse_encodings(dump_encodings(es)).params["k_w"].scale, conv["k_w"].scale)
