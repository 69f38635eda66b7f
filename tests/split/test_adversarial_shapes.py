"""Sizes that coincide with the head count must not fool the split (it decides from dataflow)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.verify.runner import run_model
from tests.split._graphs import attention_model, causal_mask


def _softmax_inputs(path) -> list[tuple[int, ...]]:
    model = ir.load(path)
    return [tuple(n.inputs[0].shape) for n in model.graph if n.op_type == "Softmax"]


@pytest.mark.parametrize(
    ("heads", "seq", "head_dim", "mask_shape"),
    [
        (4, 4, 8, (1, 1, 4, 4)),  # seq == heads, 4-D mask shared by all heads
        (4, 4, 8, (1, 4, 4)),  # 3-D mask [B, S, T] whose S happens to equal H
        (4, 8, 4, (8, 8)),  # head_dim == heads, 2-D mask
        (4, 4, 4, (4, 4)),  # seq == head_dim == heads
        (4, 4, 8, (1, 4, 4, 4)),  # a real per-head mask [B, H, S, T]: cut per head
        (2, 6, 8, None),
    ],
)
def test_split_is_exact_whatever_the_sizes(tmp_path, heads, seq, head_dim, mask_shape):
    src = tmp_path / "attention.onnx"
    onnx.save(attention_model(heads, seq, head_dim, mask_shape), src)
    rng = np.random.default_rng(1)
    inputs = {"x": rng.normal(size=(1, seq, heads * head_dim)).astype(np.float32)}
    if mask_shape is not None:
        mask = causal_mask(mask_shape)
        if len(mask_shape) == 4 and mask_shape[1] == heads:
            mask = mask + rng.normal(size=mask_shape).astype(np.float32)  # distinct per head
        inputs["mask"] = mask
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = tmp_path / "out"
    result = convert(src, out, options=ConvertOptions(inputs=str(tmp_path / "inputs.npz")))
    assert result.verification is not None and result.verification.ok
    assert [(b.status, b.heads) for b in result.blocks] == [("split", heads)]
    converted = out / "attention.onnx"
    expected = run_model(src, inputs)["y"]
    got = run_model(converted, inputs)["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert _softmax_inputs(converted) == [(1, 1, seq, seq)] * heads
    if mask_shape is not None:
        per_head_mask = len(mask_shape) == 4 and mask_shape[1] == heads
        # a shared mask is used whole by every head (never sliced); a per-head mask is cut
        assert ("mask" in result.record.tensors) == per_head_mask
