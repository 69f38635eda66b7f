"""Synthetic AIMET 1.0.0 encodings for a generated full-size model, without reading a weight.

Calibrating a 1.5B-8B model is not what the benchmark measures; what costs time and memory in a
conversion with ``--encodings`` is the file's size and shape: one encoding per activation, one
scale per output channel of every projection. So the ranges are derived from how ``generate.py``
draws the weights instead of from data:
- every float activation (node output, graph input): uint16 asymmetric over [-16, 16];
- every 2-D ``MatMul`` weight (``[in, out]``) and ``Conv`` weight (``[out, in, kh, kw]``): int8
  symmetric per output channel, scale 4 / sqrt(fan in) / 127 (the weights are N(0, 1/fan in): 4 sigma);
- the embedding table (``Gather`` data): int8 symmetric per tensor, 4 / 127 (N(0, 1)).

    python benchmarks/encodings_gen.py <model.onnx> [-o model.encodings]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import onnx_ir as ir

__all__ = ["synthetic_encodings"]

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_ACT_BITS = 16
_ACT_RANGE = 16.0


def _activation(name: str) -> dict:
    scale = 2 * _ACT_RANGE / (2**_ACT_BITS - 1)
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_TENSOR",
        "bw": _ACT_BITS,
        "is_sym": False,
        "scale": [scale],
        "offset": [round(-_ACT_RANGE / scale)],
    }


def _weight(name: str, scales: list[float]) -> dict:
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if len(scales) > 1 else "PER_TENSOR",
        "bw": 8,
        "is_sym": True,
        "scale": scales,
        "offset": [-128] * len(scales),
    }


def synthetic_encodings(model_path: str | Path) -> dict:
    """The 1.0.0 encodings dict described in the module docstring (weights are never loaded)."""
    model = ir.load(model_path)  # external tensors stay on disk
    activations = [_activation(v.name) for v in model.graph.inputs if v.dtype in _FLOATS and v.name]
    params: list[dict] = []
    seen: set[str] = set()
    for node in model.graph:
        activations += [_activation(v.name) for v in node.outputs if v.name and v.dtype in _FLOATS]
        if node.op_type not in ("MatMul", "Gather", "Conv") or len(node.inputs) < 2:
            continue
        weight = node.inputs[0] if node.op_type == "Gather" else node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.name in seen:
            continue
        shape = weight.const_value.shape  # type: ignore[union-attr]
        if weight.dtype not in _FLOATS or len(shape) != (4 if node.op_type == "Conv" else 2):
            continue
        seen.add(weight.name)  # type: ignore[arg-type]
        if node.op_type == "Gather":
            params.append(_weight(weight.name, [4 / 127]))  # type: ignore[arg-type]
            continue
        if node.op_type == "MatMul":
            fan_in, channels = shape[0], shape[1]
        else:
            fan_in, channels = shape[1] * shape[2] * shape[3], shape[0]
        params.append(_weight(weight.name, [4 / math.sqrt(fan_in) / 127] * channels))  # type: ignore[arg-type]
    return {
        "version": "1.0.0",
        "activation_encodings": activations,
        "param_encodings": params,
        "quantizer_args": {
            "activation_bitwidth": _ACT_BITS,
            "param_bitwidth": 8,
            "per_channel_quantization": True,
        },
        "excluded_layers": [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", help="default: <model dir>/model.encodings")
    args = p.parse_args(argv)
    out = Path(args.output or Path(args.model).with_suffix(".encodings"))
    out.write_text(json.dumps(synthetic_encodings(args.model)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
