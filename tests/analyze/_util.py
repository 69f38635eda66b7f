"""Shared by the analysis tests: the conversion's front stages on a model, then the split's plan."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from mha2sha.analyze import StructureRecord, describe_attention
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.prepare import prepare_for_split
from mha2sha.lower import lower_fused_ops
from mha2sha.split.split_heads import SplitHeadsPass


def structure_of(path: str | Path | ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None) -> StructureRecord:
    model = path if isinstance(path, ir.Model) else load_model(path)
    if shapes:
        fix_input_shapes(model, shapes)
    lowering = lower_fused_ops(model)
    prepare_for_split(model)
    return describe_attention(model, SplitHeadsPass().plan(model), lowering)
