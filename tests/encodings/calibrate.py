"""Encodings for every float tensor of a model, from min/max over calibration runs.

AIMET's configs leave some activations (a projection's output before a Reshape) unquantized, and
QNN's HTP refuses the resulting half-quantized node units. Encoding every tensor gives QDQ models
that run on the HTP emulator end to end, so MHA and SHA can be compared there.

Weights: every 2-D float initializer gets an int8 symmetric encoding, per tensor by default. With
``per_channel=True`` the weights of MatMul / Gemm / Conv (also through one Transpose) are encoded
per output channel instead, on AIMET's axes (MatMul ``[.., in, out]`` -> last axis, Gemm -> 0 with
``transB`` else 1, Conv -> 0), as AIMET's HTP config (``htp_quantsim_config_*_per_channel``) does;
other 2-D initializers (embedding tables) stay per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def calibrate_all(
    model_path: str | Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    bits: int = 8,
    *,
    per_channel: bool = False,
    mask_floor: float | None = None,
    data_movement_inherits: bool = False,
) -> dict:
    """A 1.0.0 encodings dict: uint``bits`` asymmetric per-tensor activations, int8 symmetric weights
    (per output channel for MatMul / Gemm / Conv weights with ``per_channel``).

    ``mask_floor``: values below it (an additive mask's ``finfo.min``, as lowered fused attention
    writes it) count as ``mask_floor`` in the ranges, so masked scores saturate there instead of
    stretching the grid until every real score rounds to 0 (at -100, exp(-100 - max) is 0 in float32
    for any max >= -3).

    ``data_movement_inherits``: outputs of data movement (Reshape, Transpose, Slice, Split, ...) take
    their input's encoding, as AIMET's configs do (no output quantizer there), instead of their own
    min/max (which makes every Slice and Split a requantization).
    """
    model = onnx.load(str(model_path))
    axes = _weight_axes(model) if per_channel else {}
    names = [o for n in model.graph.node for o in n.output if o]
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in feeds:
        outs = session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})
        tensors = dict(zip(names, outs, strict=True)) | {k: np.asarray(v) for k, v in feed.items()}
        for name, array in tensors.items():
            if np.issubdtype(array.dtype, np.floating) and array.size:
                if mask_floor is not None:
                    array = np.maximum(array, mask_floor)
                lo[name] = min(lo.get(name, 0.0), float(array.min()))
                hi[name] = max(hi.get(name, 0.0), float(array.max()))
    if data_movement_inherits:
        for node in model.graph.node:
            if node.op_type in _DATA_MOVEMENT and node.input and node.input[0] in lo:
                for out in node.output:
                    if out in lo:
                        lo[out], hi[out] = lo[node.input[0]], hi[node.input[0]]
    activations = []
    levels = 2**bits - 1
    for name in lo:
        if not (np.isfinite(lo[name]) and np.isfinite(hi[name])):
            continue  # e.g. T5's log of relative positions (-inf before a clamp): not quantizable
        scale = max(hi[name] - lo[name], 1e-8) / levels
        offset = int(np.round(lo[name] / scale))
        activations.append(
            {
                "name": name,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "bw": bits,
                "is_sym": False,
                "scale": [scale],
                "offset": [offset],
            }
        )
    params = []
    for init in model.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.dtype != np.float32:
            continue
        if init.name in axes:
            axis = axes[init.name]
            others = tuple(a for a in range(array.ndim) if a != axis)
            scales = np.maximum(np.abs(array).max(axis=others), 1e-8) / 127
            params.append(
                {
                    "name": init.name,
                    "dtype": "INT",
                    "enc_type": "PER_CHANNEL",
                    "bw": 8,
                    "is_sym": True,
                    "scale": [float(x) for x in scales],
                    "offset": [-128] * len(scales),
                }
            )
        elif array.ndim == 2:
            scale = max(float(np.abs(array).max()), 1e-8) / 127
            params.append(
                {
                    "name": init.name,
                    "dtype": "INT",
                    "enc_type": "PER_TENSOR",
                    "bw": 8,
                    "is_sym": True,
                    "scale": [scale],
                    "offset": [-128],
                }
            )
    return {
        "version": "1.0.0",
        "activation_encodings": activations,
        "param_encodings": params,
        "quantizer_args": {},
    }


_DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Split", "Expand", "Tile"}


def _weight_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Output-channel axis of every initializer used as the weight of a MatMul / Gemm / Conv."""
    shapes = {i.name: len(i.dims) for i in model.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    def axis_of(node: onnx.NodeProto, index: int, rank: int) -> int | None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if index != 1 or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm":
            return 0 if attrs.get("transB", 0) else 1
        if node.op_type == "MatMul" and rank >= 2:
            return rank - 1
        return None

    out: dict[str, int] = {}
    for name, rank in shapes.items():
        found = set()
        for node, index in consumers.get(name, []):
            axis = axis_of(node, index, rank)
            if axis is None and node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                perm = perm or list(range(rank))[::-1]
                for inner_node, inner_index in consumers.get(node.output[0], []):
                    inner = axis_of(inner_node, inner_index, rank)
                    if inner is not None:
                        found.add(perm[inner])
            elif axis is not None:
                found.add(axis)
        if len(found) == 1:  # a weight read along two axes stays per tensor
            out[name] = found.pop()
    return out
