"""Encodings for every float tensor of a model, from min/max over calibration runs.

AIMET's configs leave some activations (a projection's output before a Reshape) unquantized, and
QNN's HTP refuses the resulting half-quantized node units. Encoding every tensor gives QDQ models
that run on the HTP emulator end to end, so MHA and SHA can be compared there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def calibrate_all(model_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], bits: int = 8) -> dict:
    """A 1.0.0 encodings dict: uint``bits`` asymmetric per-tensor activations, int8 symmetric weights."""
    model = onnx.load(str(model_path))
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
                lo[name] = min(lo.get(name, 0.0), float(array.min()))
                hi[name] = max(hi.get(name, 0.0), float(array.max()))
    activations = []
    levels = 2**bits - 1
    for name in lo:
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
        if array.dtype == np.float32 and array.ndim == 2:
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
