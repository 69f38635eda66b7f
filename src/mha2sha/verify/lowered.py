"""The proof for models whose fused ops were lowered, when end-to-end rounding grows past ``rtol``.

The lowering replaces a fused kernel (``SkipLayerNormalization``, ``com.microsoft.Attention``, ...)
by primitives with the same math; onnxruntime's fused kernel sums in another order, so each lowered
op differs from it by float rounding (~1e-7), and over a model with a logit scale of 100 (CLIP)
that grows to ~1e-5 at the outputs. Then the conversion is proven in two parts, neither loosened:

1. **the split**: the lowered model (before the split) and the converted model, whole, on the same
   inputs, within ``rtol`` (the split itself is exact);
2. **each lowered op**: the fused op in the original and its lowering, fed the *same* input values
   (the original's, from one run of it), within ``rtol`` per output, so rounding cannot compound.

Both run in memory on models re-read from the original file (graphs only when weights are external).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.graph import name_of
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.names import values_by_name
from mha2sha.io.prepare import infer_shapes
from mha2sha.lower import lower_fused_ops
from mha2sha.verify.blocks import _cone, _run, _sub_model
from mha2sha.verify.runner import Verification, compare_outputs, run_model

__all__ = ["prove_through_lowering"]


def _whole(
    model: ir.Model, outputs: Sequence[ir.Value], inputs: Mapping[str, np.ndarray], types: Mapping[str, ir.Value]
) -> onnx.ModelProto:
    """Everything computing ``outputs`` from the graph inputs, as a model of its own."""
    return _sub_model(model, _cone(outputs, lambda v: False), inputs, outputs, types)


def _named_in(names: set[str], value: ir.Value) -> bool:
    return value.name in names


def prove_through_lowering(
    original: Path,
    converted: Path,
    fused: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    input_shapes: Mapping[str, tuple[int, ...]],
    rtol: float,
) -> tuple[Verification, Verification]:
    """(the split: lowered vs converted model; the lowering: each fused op vs its primitives)."""
    source = load_model(original)
    fix_input_shapes(source, input_shapes)
    lowered = load_model(original)
    fix_input_shapes(lowered, input_shapes)
    lower_fused_ops(lowered)
    infer_shapes(lowered)
    low_values = values_by_name(lowered.graph)

    # 1. the split: lowered whole model vs the converted one
    proto = _whole(lowered, list(lowered.graph.outputs), inputs, low_values)
    reference = _run(proto, inputs, "basic", "the lowered original")
    split = compare_outputs(reference, run_model(converted, inputs, ours=True), rtol)

    # 2. each lowered op on the original's own input values
    nodes = {n.name: n for n in source.graph if n.name in set(fused)}
    wanted: dict[str, ir.Value] = {}
    for node in nodes.values():
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.name and (value.uses() or value.is_graph_output()):
                wanted[value.name] = value
    targets = [v for v in wanted.values() if not v.is_initializer() and not v.is_graph_input()]
    values = dict(inputs)
    if targets:
        proto = _whole(source, targets, inputs, low_values)
        values.update(_run(proto, inputs, "basic", "the original"))
    rows = []
    for name, node in nodes.items():
        outs = [low_values[name_of(o)] for o in node.outputs if o.name in wanted and o.name in low_values]
        stops = {name_of(v) for v in node.inputs if v is not None}
        cone = _cone(outs, functools.partial(_named_in, stops))
        feeds = {n: values[n] for n in cone.inputs}
        got = _run(_sub_model(lowered, cone, feeds, outs, low_values), feeds, "basic", f"the lowering of {name}")
        check = compare_outputs({name_of(o): values[name_of(o)] for o in outs}, got, rtol)
        rows += [dataclasses.replace(r, name=f"{name}/{r.name}") for r in check.rows]
    return split, Verification(rows=tuple(rows), rtol=rtol)
