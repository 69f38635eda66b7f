"""Quantized equivalence tensor by tensor: each quantized SHA tensor, given MHA's quantized inputs.

Comparing the final outputs of the MHA-QDQ and SHA-QDQ models on ORT CPU is not a reliable test
at realistic width: float32 MatMul sums a per-head ``[1024, 64]`` weight slice in another order
than the full ``[1024, 1024]`` product (~2e-6 apart), which flips one 16-bit rounding, and that
flip grows through softmax and the next layers to ~100 LSB at the logits while the HTP, the
device's arithmetic, gives 0 (benchmarks/HTP_RESULTS.md, finding 4).

So the SHA-QDQ model is cut at every quantized tensor that has an MHA counterpart: its consumers
read a graph input fed with the MHA-QDQ model's value of that tensor (sliced to the head for a
per-head piece), and the tensor itself becomes a graph output. One run then evaluates every
*quantization unit* (the ops between quantized tensors, e.g. ``DQ -> MatMul -> Q``) of the SHA
model on exactly the quantized inputs the MHA model saw, and each unit's quantized result is
compared with the MHA one in LSBs of its encoding. A correct conversion differs by at most one
rounding step (float-order ties); a propagation bug (a wrong scale, a mis-sliced per-channel
weight) shows up as many LSB at the tensor where it happens, and that tensor is named.

Counterparts: the same name and shape in both models (unchanged tensors and re-joined heads),
or a per-head piece of an MHA tensor (``origin`` maps the piece to the MHA name and its
``(axis, start, stop)`` ranges); a projection output that ``--target htp`` made a Conv output
``[B, C, 1, S]`` (same name) is compared with MHA's ``[B, S, C]`` transposed. SHA tensors without a
counterpart are not cut: their unit just extends to the next cut tensor.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.graph import name_of, static_shape
from mha2sha.io.names import values_by_name
from mha2sha.io.prepare import infer_shapes
from mha2sha.layout.record import LayoutRecord
from mha2sha.split.record import SplitRecord
from mha2sha.verify.qdq import max_steps, output_lsb, run_qdq_model, to_qdq_ir

__all__ = ["Origin", "TensorDiff", "LocalCheck", "as_layout", "compare_quantized_tensors", "origins"]

#: SHA tensor -> (MHA tensor, ((axis, start, stop), ...)); empty ranges: the whole tensor.
Origin = Mapping[str, tuple[str, tuple[tuple[int, int, int], ...]]]

_REF_SUFFIX = "__mha_ref"


def origins(split: SplitRecord, layout: LayoutRecord | None) -> Origin:
    """SHA tensor -> (MHA tensor, ranges of its piece): per-head pieces, and layout copies of them."""
    found = {p.name: (t.original, p.ranges) for t in split.tensors.values() for p in t.pieces}
    for new, old in (layout.aliases if layout is not None else {}).items():
        found.setdefault(new, found.get(old, (old, ())))
    return found


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """One quantized SHA tensor against its MHA counterpart, both computed from MHA's inputs."""

    name: str
    origin: str
    lsb: float  # max |SHA - MHA| in LSBs of the tensor's encoding


@dataclasses.dataclass
class LocalCheck:
    """Per-tensor differences in the SHA model's topological order."""

    tensors: list[TensorDiff]

    @property
    def worst(self) -> TensorDiff | None:
        return max(self.tensors, key=lambda t: t.lsb, default=None)

    def first_above(self, max_lsb: float) -> TensorDiff | None:
        """The first tensor (in graph order) that differs by more than ``max_lsb``: where a bug is."""
        return next((t for t in self.tensors if t.lsb > max_lsb), None)

    def to_dict(self) -> dict[str, object]:
        worst = self.worst
        return {
            "tensors": len(self.tensors),
            "max_lsb": worst.lsb if worst else 0.0,
            "worst": worst.name if worst else None,
            "within_1_lsb": sum(t.lsb <= 1.0 for t in self.tensors),
            "exact": sum(t.lsb == 0.0 for t in self.tensors),
        }


def _qdq_value(model: ir.Model, values: Mapping[str, ir.Value], name: str) -> ir.Value | None:
    """The dequantized value of encoded tensor ``name`` in a model built by :func:`to_qdq_ir`."""
    for out in model.graph.outputs:
        if out.name == name:
            return out  # graph outputs keep their name on the DQ output
    return values.get(f"{name}_qdq")


def _with_shapes(model: ir.Model | str | os.PathLike) -> ir.Model:
    model = model.clone() if isinstance(model, ir.Model) else ir.load(model)
    infer_shapes(model)
    return model


def _expose(model: ir.Model, values: list[ir.Value]) -> list[str]:
    present = {id(v) for v in model.graph.outputs}
    for v in values:
        if id(v) not in present:
            model.graph.outputs.append(v)
    return [name_of(v) for v in values]


def _piece(array: np.ndarray, ranges: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    index = [slice(None)] * array.ndim
    for axis, start, stop in ranges:
        index[axis] = slice(start, stop)
    return array[tuple(index)]


def as_layout(ref: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """An MHA tensor in the layout of its SHA counterpart: as it is, or ``[B, S, C]`` as the HTP
    layout's Conv output ``[B, C, 1, S]`` (``--target htp`` keeps the name); None when neither."""
    if ref.shape == tuple(shape):
        return ref
    if ref.ndim == 3 and tuple(shape) == (ref.shape[0], ref.shape[2], 1, ref.shape[1]):
        return ref.transpose(0, 2, 1)[:, :, None, :]
    return None


def _cut(model: ir.Model, value: ir.Value) -> ir.Value:
    """Make every node reading ``value`` read a new graph input instead; return that input."""
    ref = ir.Value(name=f"{value.name}{_REF_SUFFIX}", shape=value.shape, type=value.type)
    for user, idx in list(value.uses()):
        user.replace_input_with(idx, ref)
    model.graph.inputs.append(ref)
    return ref


def compare_quantized_tensors(
    mha: ir.Model | str | os.PathLike,
    mha_encodings: EncodingSet,
    sha: ir.Model | str | os.PathLike,
    sha_encodings: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    origin: Origin,
) -> LocalCheck:
    """Every quantized SHA activation with an MHA counterpart, computed from MHA's quantized inputs.

    ``origin`` names the MHA tensor (and ranges) of each per-head SHA tensor; tensors of the same
    name and shape in both models are matched without it.
    """
    mha_q = to_qdq_ir(mha, mha_encodings)
    sha_q = to_qdq_ir(_with_shapes(sha), sha_encodings)  # DQ outputs take their tensor's shape
    mha_names = set(mha_encodings.activations)
    mha_by_name, sha_by_name = values_by_name(mha_q.graph), values_by_name(sha_q.graph)
    mha_values = {n: v for n in mha_names if (v := _qdq_value(mha_q, mha_by_name, n)) is not None}

    candidates: list[tuple[ir.Value, str, tuple[tuple[int, int, int], ...]]] = []
    for name in sha_encodings.activations:
        source, ranges = origin.get(name, (name, ()))
        value = _qdq_value(sha_q, sha_by_name, name)
        if value is None or source not in mha_values or value.producer() is None or value.shape is None:
            continue  # graph inputs are fed identically to both models: nothing to compare
        candidates.append((value, source, ranges))
    sources = sorted({source for _, source, _ in candidates})
    exposed = _expose(mha_q, [mha_values[s] for s in sources])
    reference = (
        dict(zip(sources, run_qdq_model(mha_q, inputs, exposed).values(), strict=True)) if sources else {}
    )

    matched = []
    for value, source, ranges in candidates:
        shape = static_shape(value)
        expected = as_layout(_piece(reference[source], ranges), shape) if shape is not None else None
        if expected is not None:  # else the same name in a layout that is not comparable
            matched.append((value, source, np.ascontiguousarray(expected)))
    if not matched:
        return LocalCheck([])

    feeds = dict(inputs)
    for value, _, expected in matched:
        feeds[name_of(_cut(sha_q, value))] = expected
    got = run_qdq_model(sha_q, feeds, _expose(sha_q, [v for v, _, _ in matched]))

    order = {id(o): i for i, node in enumerate(sha_q.graph) for o in node.outputs}
    diffs = []
    for value, source, expected in sorted(matched, key=lambda m: order.get(id(m[0]), -1)):
        name = name_of(value).removesuffix("_qdq")
        unit = output_lsb(sha_encodings.get(name), expected.shape)
        diffs.append(TensorDiff(name, source, max_steps(got[name_of(value)], expected, unit)))
    return LocalCheck(diffs)
