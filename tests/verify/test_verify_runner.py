"""run_model / compare_outputs / verify / verification_table."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from _verify_models import embedding_model  # noqa: E402

from mha2sha.errors import UserError  # noqa: E402
from mha2sha.report.tables import verification_table  # noqa: E402
from mha2sha.verify.inputs import make_inputs  # noqa: E402
from mha2sha.verify.runner import compare_outputs, run_model, verify  # noqa: E402


@pytest.fixture()
def models(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, np.ndarray]]:
    orig = embedding_model(tmp_path / "orig.onnx")
    same = embedding_model(tmp_path / "split.onnx", split=True)
    off = embedding_model(tmp_path / "off.onnx", split=True, bias=1e-3)
    return orig, same, off, make_inputs(ir.load(orig))


def test_equivalent_rewrite_passes(models) -> None:
    orig, same, _, inputs = models
    v = verify(orig, same, inputs)
    assert v.ok, v
    assert [r.name for r in v.rows] == ["logits", "token"]
    assert v.reference is not None and set(v.reference) == {"logits", "token"}
    assert v.rows[0].max_rel_err < 1e-6


def test_perturbed_output_fails(models) -> None:
    orig, _, off, inputs = models
    v = verify(orig, off, inputs)
    assert not v.ok
    logits = v.rows[0]
    assert not logits.ok and logits.max_abs_err == pytest.approx(1e-3, rel=1e-2)


def test_output_order_is_model_order(models) -> None:
    orig, _, _, inputs = models
    assert list(run_model(orig, inputs, optimization="disable")) == ["logits", "token"]
    assert list(run_model(orig, inputs, optimization="all")) == ["logits", "token"]


def test_external_data(tmp_path: Path) -> None:
    path = embedding_model(tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.data").exists()
    inputs = make_inputs(ir.load(path))
    ref = run_model(embedding_model(tmp_path / "inline.onnx"), inputs)
    out = run_model(path, inputs)
    np.testing.assert_array_equal(out["logits"], ref["logits"])


def test_load_failure_is_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load"):
        run_model(bad, {})
    with pytest.raises(UserError, match="does not exist"):
        run_model(tmp_path / "nope.onnx", {})


def test_missing_input_is_user_error(models) -> None:
    orig, *_ = models
    with pytest.raises(UserError, match="input_ids"):
        run_model(orig, {})


def test_relative_error_is_norm_relative() -> None:
    ref = {"y": np.array([100.0, 1e-6], np.float32)}
    cand = {"y": np.array([100.0, 2e-6], np.float32)}  # elementwise 100% off, 1e-8 of the scale
    v = compare_outputs(ref, cand)
    assert v.ok and v.rows[0].max_rel_err == pytest.approx(1e-8, rel=1e-3)
    v = compare_outputs(ref, {"y": np.array([100.01, 1e-6], np.float32)})
    assert not v.ok and v.rows[0].max_rel_err == pytest.approx(1e-4, rel=1e-2)


def test_nan_handling() -> None:
    a = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    assert compare_outputs({"y": a}, {"y": a.copy()}).ok
    row = compare_outputs({"y": a}, {"y": np.array([1.0, 0.0, np.inf, -np.inf], np.float32)}).rows[0]
    assert not row.ok and "NaN/Inf mismatch" in row.note
    row = compare_outputs({"y": a}, {"y": np.array([1.0, np.nan, -np.inf, -np.inf], np.float32)}).rows[0]
    assert not row.ok
    row = compare_outputs({"y": np.ones(2, np.float32)}, {"y": np.array([1.0, np.nan], np.float32)}).rows[0]
    assert not row.ok


def test_integers_exact_and_structure_mismatches() -> None:
    i = np.array([1, 2, 3], np.int64)
    assert compare_outputs({"t": i}, {"t": i.copy()}).ok
    row = compare_outputs({"t": i}, {"t": np.array([1, 2, 4], np.int64)}, rtol=1.0).rows[0]
    assert not row.ok and row.max_abs_err == 1
    f = np.zeros((2, 3), np.float32)
    assert not compare_outputs({"y": f}, {"y": np.zeros((3, 2), np.float32)}).ok
    assert not compare_outputs({"y": f}, {"y": f.astype(np.float16)}).ok
    v = compare_outputs({"y": f}, {"z": f})
    assert not v.ok and [r.note for r in v.rows] == ["missing from converted model", "not in original model"]
    assert math.isinf(v.rows[0].max_abs_err)
    assert compare_outputs({"y": f}, {"y": f.copy()}).ok  # all-zero reference, identical candidate


def test_table_renders(models) -> None:
    orig, _, off, inputs = models
    console = Console(width=160, record=True, color_system=None)
    console.print(verification_table(verify(orig, off, inputs)))
    text = console.export_text()
    assert "FAIL" in text and "logits" in text and "token" in text


def test_bfloat16_inputs_and_outputs(tmp_path: Path) -> None:
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("Cast", ["x"], ["z"], to=TensorProto.FLOAT),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
        ],
    )
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = make_inputs(ir.load(path))
    assert x["x"].dtype == ml_dtypes.bfloat16
    out = run_model(path, x)
    assert out["y"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["y"], x["x"])
    np.testing.assert_array_equal(out["z"], x["x"].astype(np.float32))
    assert verify(path, path, x).ok


def test_an_output_with_nothing_finite_fails() -> None:
    """A comparison where no element is finite proves nothing: it must not pass."""
    nan = np.full((2, 3), np.nan, np.float32)
    check = compare_outputs({"y": nan}, {"y": nan.copy()})
    assert not check.ok and "no finite value" in check.rows[0].note
