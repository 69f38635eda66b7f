"""Where MHA and SHA part on the HTP emulator, and whose the difference is.

When the two QDQ models' outputs differ on HTP, the outputs alone do not say where: a one-step
rounding flip at a projection grows through softmax and the next layers to several LSB at the
logits. So both QDQ models are run again on HTP with every quantized tensor exposed as a graph
output (the ``QuantizeLinear`` output, the integers HTP computed), and each quantized SHA tensor is
compared with its MHA counterpart (the same name, or the per-head piece of an MHA tensor), in LSBs
of its encoding and in the SHA model's topological order. The first tensor that differs is where
the two computations part; every quantized tensor its unit reads is checked equal, so the unit
(the ops between quantized tensors, e.g. ``DQ -> MatMul -> Add(bias) -> Q``) computed a different
result from identical quantized inputs.

Whose it is: the same unit on onnxruntime CPU, fed MHA's quantized inputs (the tensor-by-tensor
check of :mod:`.qdq_local`), computes what the MHA unit computes when the conversion is right. If
the CPU agrees exactly and HTP does not (from identical quantized inputs), the difference is HTP's
own arithmetic for that op shape (e.g. its per-channel FullyConnected/Conv with a bias rounds an
output channel by the other channels of the op: a per-head slice rounds some outputs one step
apart); if the CPU differs by more than ``max_lsb`` too, the conversion computes something else
there: a bug of ours; anything between is left undetermined and says why.

Exposure: tensors made by layout ops (Transpose/Reshape/Squeeze/Unsqueeze/Identity, and Slice) are
not exposed: ORT moves Q/DQ through them for QNN and an exposed one leaves a float Transpose that
HTP rejects; their values are their input's. Exposing outputs can keep QNN from fusing ops, so the
final outputs of the exposed runs are compared with the plain runs and the result says whether
they changed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.graph import LAYOUT_OPS, is_op, name_of
from mha2sha.io.names import values_by_name
from mha2sha.io.save import save_model
from mha2sha.verify.htp import run_on_htp
from mha2sha.verify.qdq import max_steps, output_lsb
from mha2sha.verify.qdq_local import LocalCheck, Origin, as_layout

__all__ = ["HtpDivergence", "locate_divergence"]

#: Ops whose exposed output makes ORT leave a float op that QNN rejects (Q/DQ are moved through them).
_NOT_EXPOSED = LAYOUT_OPS | {"Slice"}
#: Second attempt when the first exposure makes HTP reject nodes: compute ops only.
_NOT_EXPOSED_RETRY = _NOT_EXPOSED | {"Concat", "Split", "Gather", "Expand", "Tile", "Pad"}

HTP, CONVERSION, UNDETERMINED = "htp", "conversion", "undetermined"

#: Measured (benchmarks/HTP_RESULTS.md): why a per-head projection with a bias rounds apart on HTP.
_PER_CHANNEL_BIAS = (
    "known: HTP's FullyConnected/Conv with per-channel weights and a bias rounds an output channel by"
    " the weight scales of the op's other channels, see benchmarks/HTP_RESULTS.md"
)


@dataclasses.dataclass
class HtpDivergence:
    """The first quantized tensor where MHA and SHA differ on HTP, and the verdict on it."""

    tensor: str  # SHA tensor (its encoding name)
    origin: str  # MHA tensor it is (a piece of)
    lsb: float  # max |SHA - MHA| on HTP, in LSBs of its encoding
    differing: int  # elements that differ
    size: int
    unit: list[str]  # op types between the unit's quantized inputs and this tensor (graph order)
    inputs_equal: bool  # every quantized tensor the unit reads is equal on HTP (or a graph input)
    cpu_lsb: float | None  # the same unit on onnxruntime CPU given MHA's quantized inputs
    whose: str  # "htp" (HTP's own arithmetic), "conversion" (ours), "undetermined"
    compared: int  # quantized tensors compared on HTP
    differ: int  # ... of which differ
    worst: str  # the tensor that differs most
    worst_lsb: float
    exposure_changed_outputs: bool  # exposing tensors changed HTP's final outputs (fusion undone)
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def explain(self) -> str:
        """One sentence: where, by how much, whose."""
        piece = f" (head piece of '{self.origin}')" if self.origin != self.tensor else ""
        where = (
            f"first diverging tensor on HTP: '{self.tensor}'{piece}, {self.lsb:g} LSB on "
            f"{self.differing}/{self.size} values, unit {' -> '.join(self.unit) or '?'}"
        )
        cpu = f"{self.cpu_lsb:g} LSB" if self.cpu_lsb is not None else "not compared"
        if self.whose == HTP:
            verdict = (
                "HTP's own arithmetic, not the conversion: the unit's quantized inputs are identical on HTP, and"
                f" onnxruntime CPU computes the same unit for MHA and SHA alike ({cpu} given MHA's inputs)"
            )
            if self.note:
                verdict += f"; {self.note}"
        elif self.whose == CONVERSION:
            verdict = f"the conversion's: the SHA unit computes something else than MHA's also on onnxruntime CPU ({cpu})"
        else:
            verdict = f"whose is undetermined ({self.note or 'inputs not all compared'}; CPU {cpu})"
        if self.exposure_changed_outputs:
            verdict += " (exposing the tensors changed HTP's outputs: QNN fused ops differently, so this is indicative)"
        return f"{where}; {verdict}"


def _q_outputs(model: ir.Model, names: list[str], skip: frozenset[str] | set[str]) -> dict[str, ir.Value]:
    """Encoding name -> its QuantizeLinear output (built by :func:`~.qdq.to_qdq_ir`), except those
    whose tensor a ``skip`` op produces."""
    values = values_by_name(model.graph)
    found: dict[str, ir.Value] = {}
    for name in names:
        q = values.get(f"{name}_q")
        producer = q.producer() if q is not None else None
        if q is None or producer is None or producer.op_type != "QuantizeLinear":
            continue
        source = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if source is None or is_op(source, skip):
            continue  # graph inputs are fed identically; layout ops hold their input's values
        found[name] = q
    return found


def _expose(path: Path, qs: Mapping[str, ir.Value], target: Path) -> None:
    model = ir.load(path)
    values = values_by_name(model.graph)
    present = {v.name for v in model.graph.outputs}
    for q in qs.values():
        if q.name not in present:
            model.graph.outputs.append(values[name_of(q)])
    save_model(model, target)


def _dequantized(q: np.ndarray, enc) -> np.ndarray:  # noqa: ANN001 - Encoding
    scale = np.asarray(enc.effective_scale(), np.float64).reshape(-1)
    zp = np.asarray(enc.zero_point(str(np.dtype(q.dtype))), np.float64).reshape(-1)
    if scale.size != 1:
        return q.astype(np.float64)  # per-channel activations are not compared (never written)
    return (q.astype(np.float64) - zp[0]) * scale[0]


def _piece(array: np.ndarray, ranges: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    index = [slice(None)] * array.ndim
    for axis, start, stop in ranges:
        index[axis] = slice(start, stop)
    return array[tuple(index)]


def _unit_inputs(q: ir.Value, exposed: Mapping[str, ir.Value]) -> tuple[list[str], list[str], set[str]]:
    """The exposed quantized tensors the unit ending at ``q`` reads (walking back through float ops
    and unexposed quantized tensors; graph inputs and weights are fed identically), its op types, and
    what its constants are ("per-channel weight", "bias": an int32 constant, a Conv's third input)."""
    by_q = {id(v): name for name, v in exposed.items()}
    inputs: list[str] = []
    ops: list[str] = []
    constants: set[str] = set()
    seen: set[int] = set()
    quantize = q.producer()
    stack: list[ir.Value | None] = [quantize.inputs[0]] if quantize is not None else []
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None:
            continue
        if node.op_type == "DequantizeLinear":
            source = node.inputs[0]
            if source is None or source.const_value is not None or source.is_initializer():
                constants |= _constant_kind(node)
                continue
            if id(source) in by_q:
                inputs.append(by_q[id(source)])
                continue
            qnode = source.producer()
            if qnode is not None:
                stack.append(qnode.inputs[0])  # an unexposed quantized tensor: its unit is part of this one
            continue
        if node.op_type != "QuantizeLinear":
            ops.append(node.op_type)
            if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
                constants.add("bias")
            if node.op_type == "Add" and any(_is_constant(v) for v in node.inputs):
                constants.add("bias")
        stack.extend(node.inputs)
    return inputs, ops[::-1], constants


def _is_constant(value: ir.Value | None) -> bool:
    """A constant, or the DequantizeLinear of one (a quantized weight or bias)."""
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    node = value.producer()
    return node is not None and node.op_type == "DequantizeLinear" and _is_constant(node.inputs[0])


def _constant_kind(dq: ir.Node) -> set[str]:
    source = dq.inputs[0]
    scale = dq.inputs[1] if len(dq.inputs) > 1 else None
    kinds = set()
    if (
        source is not None
        and source.const_value is not None
        and source.const_value.dtype == ir.DataType.INT32
    ):
        kinds.add("bias")
    elif scale is not None and scale.const_value is not None and scale.const_value.size > 1:
        kinds.add("per-channel weight")
    return kinds


def _run_exposed(
    mha_qdq: Path,
    sha_qdq: Path,
    mha_names: list[str],
    sha_names: list[str],
    inputs,
    soc: str,
    skip,
    tmp: Path,
):  # noqa: ANN001, ANN202
    mha_qs = _q_outputs(ir.load(mha_qdq), mha_names, skip)
    sha_qs = _q_outputs(ir.load(sha_qdq), sha_names, skip)
    _expose(mha_qdq, mha_qs, tmp / "mha_exposed.onnx")
    _expose(sha_qdq, sha_qs, tmp / "sha_exposed.onnx")
    mha_run = run_on_htp(tmp / "mha_exposed.onnx", inputs, soc)
    sha_run = run_on_htp(tmp / "sha_exposed.onnx", inputs, soc) if mha_run.ran else None
    return mha_qs, sha_qs, mha_run, sha_run


def locate_divergence(
    mha_qdq: str | os.PathLike,
    sha_qdq: str | os.PathLike,
    mha_encodings: EncodingSet,
    sha_encodings: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    origin: Origin,
    soc: str,
    *,
    outputs: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    cpu: LocalCheck | None,
    max_lsb: float,
) -> HtpDivergence | None:
    """Run both QDQ models (built by :func:`~.qdq.to_qdq_ir`) on HTP with their quantized tensors
    exposed and name the first SHA tensor that differs from its MHA counterpart (None if none does).

    ``outputs``: the (MHA, SHA) outputs of the plain HTP runs; ``cpu``: the tensor-by-tensor check
    on onnxruntime CPU (the verdict on whose the difference is).
    """
    mha_qdq, sha_qdq = Path(mha_qdq), Path(sha_qdq)
    pairs = []  # (SHA name, MHA name, ranges)
    for name, enc in sha_encodings.activations.items():
        source, ranges = origin.get(name, (name, ()))
        reference = mha_encodings.activations.get(source)
        # a piece standing for two MHA tensors of different grids (a removed Split that requantized)
        # is not the same quantization point as the one it is mapped to: not comparable
        if reference is not None and enc.same_numbers(reference):
            pairs.append((name, source, ranges))
    sha_names = [s for s, _, _ in pairs]
    mha_names = sorted({m for _, m, _ in pairs})
    with tempfile.TemporaryDirectory(prefix="mha2sha-htp-local-") as tmp:
        note = ""
        for skip in (_NOT_EXPOSED, _NOT_EXPOSED_RETRY):
            mha_qs, sha_qs, mha_run, sha_run = _run_exposed(
                mha_qdq, sha_qdq, mha_names, sha_names, inputs, soc, skip, Path(tmp)
            )
            if mha_run.ran and sha_run is not None and sha_run.ran:
                break
            rejected = sorted(
                {op for _, op in mha_run.unsupported + (sha_run.unsupported if sha_run else [])}
            )
            note = f"exposing tensors made HTP reject {', '.join(rejected) or 'nodes'}"
        else:
            return HtpDivergence("", "", 0.0, 0, 0, [], False, None, UNDETERMINED, 0, 0, "", 0.0, False, note)
        assert sha_run is not None
        sha_model = ir.load(sha_qdq)

    changed = any(
        not np.array_equal(np.asarray(ref), np.asarray(run.outputs[name]), equal_nan=True)
        for plain, run in zip(outputs, (mha_run, sha_run), strict=True)
        for name, ref in plain.items()
        if name in run.outputs
    )
    order = {o.name: i for i, node in enumerate(sha_model.graph) for o in node.outputs}
    diffs: dict[str, tuple[float, int, int]] = {}
    origin_of: dict[str, str] = {}
    for name, source, ranges in pairs:
        if name not in sha_qs or source not in mha_qs:
            continue
        got = sha_run.outputs.get(sha_qs[name].name)
        ref = mha_run.outputs.get(mha_qs[source].name)
        if got is None or ref is None:
            continue
        ref = as_layout(_piece(ref, ranges), got.shape)
        if ref is None:
            continue
        a = _dequantized(ref, mha_encodings.activations[source])
        b = _dequantized(got, sha_encodings.activations[name])
        unit = output_lsb(sha_encodings.activations[name], got.shape)
        diffs[name] = (max_steps(a, b, unit), int(np.count_nonzero(ref != got)), int(got.size))
        origin_of[name] = source
    if not diffs:
        return None
    ranked = sorted(diffs, key=lambda n: order.get(f"{n}_q", -1))
    first = next((n for n in ranked if diffs[n][0] > 0), None)
    if first is None:
        return None
    worst = max(diffs, key=lambda n: diffs[n][0])
    exposed_sha = {n: sha_qs[n] for n in diffs}
    unit_inputs, ops, constants = _unit_inputs(sha_qs[first], exposed_sha)
    inputs_equal = all(diffs[n][0] == 0 for n in unit_inputs)
    cpu_lsb = None
    if cpu is not None:
        cpu_lsb = next((t.lsb for t in cpu.tensors if t.name == first), None)
    if cpu_lsb is not None and cpu_lsb > max_lsb:
        whose = CONVERSION
    elif cpu_lsb == 0 and inputs_equal:
        whose = HTP
        if {"per-channel weight", "bias"} <= constants:
            note = _PER_CHANNEL_BIAS
    else:
        whose = UNDETERMINED
        if not inputs_equal:
            note = note or "a quantized input of the unit differs too"
        elif cpu_lsb is None:
            note = note or "the CPU check has no counterpart"
        else:
            note = note or f"the unit differs by {cpu_lsb:g} LSB on onnxruntime CPU too (float summation order)"
    lsb, count, size = diffs[first]
    return HtpDivergence(
        first, origin_of[first], lsb, count, size, ops, inputs_equal, cpu_lsb, whose, len(diffs),
        sum(d[0] > 0 for d in diffs.values()), worst, diffs[worst][0], changed, note,
    )  # fmt: skip
