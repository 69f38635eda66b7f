"""The analysis job: what is in a model and what ``convert`` would do with it; nothing is written.

    load -> shapes -> lower -> prepare -> plan the split -> describe blocks -> extract the probe
         -> [with encodings: split in memory and propagate (dry run)] -> free the graph -> HTP probe

The stages are the conversion's own (``io/``, ``lower/``, ``split/``, ``encodings/``); the split is
planned and described; with encodings it is also applied to the in-memory model only, to
propagate them (weights stay lazy: nothing is read but the graph, a mask cone, and -- in the HTP
probe's child processes, after the graph is freed -- one block's weights per kind). A stage that cannot run on this model (dynamic shapes, shapes that do not fit) is reported
as a problem and the analysis goes on with what it has; only bad input (a missing or unreadable
model, a bad encodings file, contradictory ``--input-shape``) is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import onnx_ir as ir

from mha2sha.analyze.facts import encodings_summary, input_infos, model_facts, op_counts
from mha2sha.analyze.probe import op_support, prepare_probe, run_probe, select_components
from mha2sha.analyze.record import AnalysisRecord
from mha2sha.analyze.structure import describe_attention
from mha2sha.encodings import channel_axes, load_encodings, propagate
from mha2sha.errors import UserError
from mha2sha.graph import name_of
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.names import tensor_names
from mha2sha.io.prepare import prepare_for_split, remove_unused_initializers
from mha2sha.io.shapes import ShapeRoles, check_shapes, resolve_input_shapes, suggest_input_shapes
from mha2sha.layout.rank import high_rank_tensors
from mha2sha.lower import lower_fused_ops
from mha2sha.split.record import SplitRecord
from mha2sha.split.split_heads import SplitHeadsPass
from mha2sha.verify.htp import DEFAULT_SOC

__all__ = ["AnalyzeOptions", "analyze"]


@dataclasses.dataclass
class AnalyzeOptions:
    """What ``mha2sha analyze`` takes (the conversion's shape and encodings options, by the same names)."""

    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    shape_roles: ShapeRoles = dataclasses.field(default_factory=ShapeRoles)
    encodings: str | None = None
    soc: str = DEFAULT_SOC
    probe: bool = True  # ask the QNN EP (onnxruntime-qnn) which ops it takes


def _producer(model: ir.Model) -> str:
    return " ".join(p for p in (model.producer_name, model.producer_version) if p) or "-"


Phase = Callable[[str], AbstractContextManager[Any]]


def _no_phase(name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def analyze(
    model_path: str | os.PathLike, options: AnalyzeOptions | None = None, phase: Phase = _no_phase
) -> AnalysisRecord:
    """Analyse ``model_path`` (see the module docstring); raises UserError only for bad input.
    ``phase(name)`` wraps each stage (the CLI passes its timer's)."""
    options = options or AnalyzeOptions()
    path = Path(model_path)
    with phase("load"):
        model = load_model(path)
        record = AnalysisRecord(
            model=str(path),
            name=path.stem,
            opset=model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)),
            producer=_producer(model),
        )
        record.original_ops = op_counts(model)
        record.outputs = [(name_of(v), _shape(v)) for v in model.graph.outputs]
        shapes, shapes_fit = _choose_shapes(model, options, record)
        encodings = load_encodings(options.encodings, model=model) if options.encodings else None
    with phase("lower fused ops"):
        lowering = lower_fused_ops(model)
        for _, op, _ in lowering.lowered:
            record.lowered[op] = record.lowered.get(op, 0) + 1
        record.not_lowered = list(lowering.refused)
        for node, op, reason in lowering.refused:
            record.problems.append(f"{op} '{node}' cannot be lowered: {reason}")
    with phase("prepare (fold shapes, infer)"):
        prepare_for_split(model)
    with phase("find and describe attention"):
        split = SplitRecord()
        split_pass = SplitHeadsPass(split)
        plan = split_pass.plan(model)
        examples: list[tuple[str, list[ir.Node]]] = []
        record.structure = describe_attention(model, plan, lowering, examples=examples)
        record.structure.other_softmax = list(split.other_softmax)
        record.facts = model_facts(model)
        if not record.structure.blocks:
            record.notes.append("no attention found (no Softmax feeding a MatMul with V): convert would do nothing")
        not_split = [b for b in record.structure.blocks if not b.would_split and (b.heads or 2) > 1]
        if not_split:
            record.problems.append(
                f"{len(not_split)} attention block(s) would stay multi-head (convert exits 1 unless --allow-partial)"
            )
        cut = [name_of(s.value) for b in plan.blocks for s in b.region.steps.values() if s.kind in ("node", "param")]
        if encodings is not None:
            record.encodings = encodings_summary(model, encodings, str(options.encodings), cut)
            names, axes = tensor_names(model), dict(channel_axes(model))
    with tempfile.TemporaryDirectory(prefix="mha2sha-probe-") as folder:
        prepared = None
        if options.probe:
            with phase("HTP support probe: extract one block per kind"):
                components = select_components(model, examples)
                prepared = prepare_probe(model, components, Path(folder), soc=options.soc, encodings=options.encodings)
                del components
        examples.clear()
        in_blocks = {id(n) for b in plan.blocks for n in b.region.nodes()}
        record.rank_in_split_blocks = [
            name_of(v) for n in model.graph if id(n) in in_blocks for v in n.outputs if len(v.shape or ()) > 4
        ]
        if encodings is not None and plan.blocks:
            with phase("split in memory (dry run)"):
                split_pass.apply(model, plan)
                remove_unused_initializers(model)
                record.high_rank_after_split = [
                    (t.name, _shape_text(t.shape), t.producer) for t in high_rank_tensors(model)
                ]
            with phase("propagate encodings (dry run)"):
                try:
                    _, record.coverage = propagate(
                        encodings, split, model, channel_axes_map=axes, original_names=names
                    )
                except UserError as e:
                    record.problems.append(f"encodings cannot be propagated: {e}")
        # the graph is no longer needed: give its memory back before the probe's processes run
        del model, plan, split_pass, in_blocks
        _release_memory()
        if prepared is not None:
            with phase("HTP support probe (QNN EP)"):
                record.probe = run_probe(prepared)
    record.ops = op_support(record.original_ops, record.facts.ops, record.probe, record.lowered)
    if not shapes_fit:
        record.notes.append("shapes did not fit the model: blocks and ops were analysed as far as they could be")
    del shapes
    return record


def _release_memory() -> None:
    """Collect and hand freed heap pages back to the system (glibc), so the analysed graph's
    memory is not held while the probe's child processes run."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _shape(value: ir.Value) -> str:
    return _shape_text(value.shape)


def _shape_text(shape: object) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in shape) + "]"  # type: ignore[attr-defined]


def _choose_shapes(
    model: ir.Model, options: AnalyzeOptions, record: AnalysisRecord
) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Static input shapes: the user's (roles, ``--input-shape``), else the consistent suggestion
    ``convert`` would print; records the inputs, the suggestion and any problem. Returns the
    shapes and whether they fit the model (strict ONNX shape inference)."""
    explicit = dict(options.input_shapes)
    try:
        shapes = resolve_input_shapes(model, explicit, options.shape_roles)
    except UserError:
        suggestion = suggest_input_shapes(model, explicit, options.shape_roles)
        shapes = {**suggestion.shapes, **explicit}
        record.shape_suggestion = " ".join(suggestion.flags)
        listing = ", ".join(f"{n} {s}" for n, s in suggestion.dynamic)
        record.problems.append(
            f"convert needs static shapes; dynamic inputs: {listing}. Pass: {record.shape_suggestion}"
        )
        record.shapes_note = "analysed with the suggested shapes (" + record.shape_suggestion + ")"
        if suggestion.unknown:
            record.notes.append(
                "no role known for dims " + ", ".join(suggestion.unknown) + ": set them with --input-shape"
                " (the analysis used 1)"
            )
    else:
        dynamic = [v.name for v in model.graph.inputs if v.shape is None or not v.shape.is_static()]
        if dynamic and not explicit and options.shape_roles == ShapeRoles():
            suggestion = suggest_input_shapes(model, {}, ShapeRoles())
            record.shape_suggestion = " ".join(suggestion.flags)
            record.shapes_note = "dynamic dims named by role: analysed with the default sizes (" + record.shape_suggestion + ")"
    record.inputs = input_infos(model, shapes)
    fix_input_shapes(model, shapes)
    try:
        check_shapes(model)
    except UserError as e:
        record.problems.append(str(e))
        return shapes, False
    return shapes, True
