"""Requantise each head where the MHA model requantised: one per-head tensor per encoded original.

One per-head tensor can stand for several original tensors (``SplitRecord.originals``): the
per-head MatMul output of a packed QKV projection *is* the head's rows of the projection output and
of the q ``Slice`` that takes them; a GQA key piece is the head's part of the KV cache and of the
``repeat_kv`` Expand/Reshape of it. When those originals carry different encodings (AIMET W8A8 with
data movement quantized: the projection output and the Slice output each have their own), the MHA
model quantised the values twice, in data-flow order, and the SHA model must as well. For every
per-head node input that stands for such a vanished copy (``SplitRecord.reads``), the encodings on
the copy chain from the per-head tensor's own original to the copy (``SplitRecord.copy_of``) are
applied in order, each by a node whose output carries that encoding:

- the node is a full-range ``Slice`` (a no-op) whose output carries the encoding. Why a Slice:
  AIMET's QuantizationSimModel places an output quantizer by op type; ``Identity``, ``Reshape``,
  ``Transpose``, ``Split`` never get one, and grid-preserving ops (Slice, Expand, ...) get one when
  the config quantizes data movement, which is when these encodings exist (measured with
  aimet-onnx 2.42: loading a 2.0.0 file whose requantisations sit on Identities fails with
  "Encodings were provided for missing quantizers"; on Slices the SHA QuantSim equals the MHA one).
  On the HTP (onnxruntime-qnn, whose QDQ graph the verification runs) a full-range Slice stays a
  QNN StridedSlice with its own output quantization, i.e. a requantisation; onnxruntime removes an
  Identity or a same-shape Expand and merges the Q/DQ pairs around it into one pair on the
  intersection of both ranges, which is neither encoding (measured on the Phi-3 step: the key
  piece came out with scale 0.025874 where the MHA applies 0.025921 then 0.027867). Without a
  static shape (or below opset 10) the node is an Identity;
- consecutive equal encodings are applied once (requantising on the same grid is the identity), so
  nothing is emitted where the encodings agree (AIMET's HTP config does not quantize data movement);
- the requantised originals get the new tensors as their per-head pieces in the split record
  (``TensorSplit.pieces``, or ``SplitRecord.requantized`` for originals without pieces), so the name
  map, the propagation and the tensor-by-tensor check see them like any other per-head tensor.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from mha2sha.encodings.model import Encoding, EncodingSet
from mha2sha.graph import static_shape
from mha2sha.io.names import UniqueNames
from mha2sha.split.record import Piece, SplitRecord

__all__ = ["RequantRecord", "requantize"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RequantRecord:
    """What :func:`requantize` added: new per-head tensor -> the original whose encoding it carries."""

    tensors: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


def _chain(target: str, owner: str, copy_of: dict[str, str]) -> list[str] | None:
    """Originals from just after ``owner`` to ``target`` in data-flow order (None: not a copy of it)."""
    path: list[str] = []
    name = target
    while name != owner:
        if name in path or name not in copy_of:
            return None
        path.append(name)
        name = copy_of[name]
    return path[::-1]


def _steps(owner_enc: Encoding | None, chain: list[str], encodings: EncodingSet) -> list[str]:
    """The originals of ``chain`` whose encoding requantises (differs from the one applied before)."""
    steps: list[str] = []
    current = owner_enc
    for name in chain:
        enc = encodings.activations.get(name)
        if enc is None or (current is not None and enc.same_numbers(current)):
            continue
        steps.append(name)
        current = enc
    return steps


class _Builder:
    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.unique = UniqueNames(self.graph)
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.front: list[ir.Node] = []

    def const(self, values: list[int], name: str) -> ir.Value:
        value = ir.Value(name=self.unique(name), const_value=ir.tensor(np.asarray(values, dtype=np.int64)))
        value.const_value.name = value.name  # type: ignore[union-attr]
        value.shape = ir.Shape([len(values)])
        value.type = ir.TensorType(ir.DataType.INT64)
        self.graph.register_initializer(value)
        return value

    def node(self, source: ir.Value, name: str) -> ir.Value:
        """A full-range Slice of ``source`` (else an Identity) whose output is named ``name``.

        ``ends`` is the axis length, not INT64_MAX: onnxruntime's EliminateSlice removes a Slice
        whose ends are INT64_MAX, and then merges the Q/DQ pairs around it into one.
        """
        out = ir.Value(name=self.unique(name), shape=source.shape, type=source.type)
        shape = static_shape(source)
        op_type = "Identity"
        inputs = [source]
        if shape and self.opset >= 10:
            op_type = "Slice"
            inputs = [
                source,
                self.const([0], f"{out.name}.starts"),
                self.const([shape[0]], f"{out.name}.ends"),
                self.const([0], f"{out.name}.axes"),
            ]
        node = ir.Node("", op_type, inputs, outputs=[out], name=self.unique(f"{out.name}.requant"))
        producer = source.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        else:
            self.front.append(node)
        return out

    def finish(self) -> None:
        if self.front:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.extend(self.front)
            else:
                self.graph.insert_before(first, self.front)
        self.graph.sort()


def requantize(model: ir.Model, record: SplitRecord, encodings: EncodingSet) -> RequantRecord:
    """Insert the per-head requantisations the MHA model's ``encodings`` call for (module docstring).

    Changes ``model`` and ``record`` in place; returns the new tensors. Nothing changes when every
    per-head tensor's originals agree on their encoding.
    """
    result = RequantRecord()
    if not record.reads:
        return result
    nodes = {node.name: node for node in model.graph if node.name}
    # per-head value -> [(reader, input index, chain, steps)]
    plans: dict[int, list[tuple[ir.Node, int, list[str], list[str]]]] = {}
    values: dict[int, ir.Value] = {}
    for node_name, inputs in record.reads.items():
        node = nodes.get(node_name)
        if node is None:
            continue  # removed as dead after the split
        for index, target in inputs.items():
            value = node.inputs[index] if index < len(node.inputs) else None
            originals = record.originals.get(value.name or "") if value is not None else None
            if value is None or not originals:
                continue
            owner = originals[0]
            chain = _chain(target, owner, record.copy_of)
            if chain is None:
                result.warnings.append(
                    f"{node_name}: {target} is not a recorded copy of {owner}; not requantised"
                )
                continue
            steps = _steps(encodings.activations.get(owner), chain, encodings)
            if any(encodings.activations[n].enc_type != "PER_TENSOR" for n in steps):
                # a per-tensor requantisation commutes with the data movement between the per-head
                # tensor and its reader; a per-channel one on a moved axis would not
                result.warnings.append(f"{node_name}: {target} has a per-channel encoding; not requantised")
                continue
            plans.setdefault(id(value), []).append((node, index, chain, steps))
            values[id(value)] = value

    builder = _Builder(model)
    changed = False
    for key, plan in plans.items():
        value = values[key]
        owner = record.originals[value.name or ""][0]
        _share_first_step(value, owner, plan, record, encodings)
        if not any(steps for _, _, _, steps in plan):
            continue
        suffix = _head_suffix(value, owner, record)
        made: dict[tuple[str, ...], ir.Value] = {}
        tensor_of: dict[str, ir.Value] = {}  # chain member -> its per-head tensor now
        for node, index, chain, steps in plan:
            current = value
            for k, name in enumerate(steps):
                prefix = tuple(steps[: k + 1])
                if prefix not in made:
                    made[prefix] = builder.node(current, name + suffix)
                    result.tensors[made[prefix].name or ""] = name
                current = made[prefix]
            node.replace_input_with(index, current)
            changed = True
            current = value
            for name in chain:
                if name in steps:
                    current = made[tuple(steps[: steps.index(name) + 1])]
                tensor_of.setdefault(name, current)
        _record_pieces(value, owner, tensor_of, record)
    if changed:
        builder.finish()
    for w in result.warnings:
        logger.warning("%s", w)
    return result


def _head_suffix(value: ir.Value, owner: str, record: SplitRecord) -> str:
    """``.h3`` (``.h1_0`` for a 2-level cut): the head suffix of the piece ``value`` of ``owner``."""
    split = record.tensors.get(owner)
    piece = next((p for p in split.pieces if p.name == value.name), None) if split is not None else None
    if piece is not None and piece.head:
        return ".h" + "_".join(str(k) for k in piece.head)
    return ".requant"


def _share_first_step(
    value: ir.Value,
    owner: str,
    plan: list[tuple[ir.Node, int, list[str], list[str]]],
    record: SplitRecord,
    encodings: EncodingSet,
) -> None:
    """An unencoded per-head tensor whose every reader first applies the same encoding carries that
    encoding itself (no node): the piece of that original already is ``value`` in the record."""
    if encodings.activations.get(owner) is not None or value.is_graph_output():
        return
    firsts = [steps[0] if steps else None for _, _, _, steps in plan]
    if None in firsts or len(plan) != len(list(value.uses())):
        return
    first_enc = [encodings.activations[f] for f in firsts]  # type: ignore[index]
    if not all(e.same_numbers(first_enc[0]) for e in first_enc[1:]):
        return
    split = record.tensors.get(firsts[0])  # type: ignore[arg-type]
    if split is None or all(p.name != value.name for p in split.pieces):
        return
    for _, _, _, steps in plan:
        del steps[0]


def _record_pieces(value: ir.Value, owner: str, tensor_of: dict[str, ir.Value], record: SplitRecord) -> None:
    """Originals now computed by a requantisation node get it as their per-head piece."""
    originals = record.originals.get(value.name or "", [])
    for name, tensor in tensor_of.items():
        if tensor is value:
            continue
        new = tensor.name or ""
        record.originals.setdefault(new, [])
        if name not in record.originals[new]:
            record.originals[new].append(name)
        if name in originals:
            originals.remove(name)
        split = record.tensors.get(name)
        replaced = False
        if split is not None:
            for i, p in enumerate(split.pieces):
                if p.name == value.name:
                    split.pieces[i] = Piece(new, p.ranges, p.head)
                    replaced = True
        if not replaced:
            names = record.requantized.setdefault(name, [])
            if new not in names:
                names.append(new)
        elif new not in record.requantized.setdefault(name, []):
            record.requantized[name].append(new)
