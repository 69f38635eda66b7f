"""Run the original and the converted model on the same inputs and compare every output.

This is the proof a conversion ships with: both models go through onnxruntime's CPU provider
(the reference implementation of ONNX semantics available everywhere) and each output is
compared with a norm-relative error, see :func:`compare_outputs`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from mha2sha.errors import InternalError, UserError

__all__ = [
    "DEFAULT_RTOL",
    "OutputCheck",
    "Verification",
    "compare_outputs",
    "estimate_ort_bytes",
    "estimate_qdq_bytes",
    "run_model",
    "verify",
]

Optimization = Literal["disable", "basic", "extended", "all"]

#: Max relative error per output (relative to the output's largest magnitude), ``--rtol``.
DEFAULT_RTOL = 1e-5

#: Denominator floor of the relative error, so an all-zero reference does not divide by zero.
_TINY = float(np.finfo(np.float64).tiny)

#: Peak memory of a whole-model onnxruntime CPU run per byte of weights, measured (VmHWM of
#: ``python -m mha2sha.verify.blocks --full``, "verify full" in benchmarks/RESULTS.md): fp16 weights
#: cost 3.4x (Llama-2-7B 2 layers, 1.33 GB: 4318 MiB), 3.5x (Llama-3.2-1B, 2.93 GB: 9746 MiB) and
#: 3.55x (Qwen2.5-1.5B, 3.51 GB: 11892 MiB): the CPU provider runs fp16 MatMuls through inserted
#: Casts, i.e. fp32 copies of the weights next to the fp16 ones. fp32 weights cost 1.13x (Llama-2-7B
#: 2 layers, 2.67 GB: 2867 MiB): external data is memory-mapped, the rest is activations.
ORT_BYTES_PER_WEIGHT_BYTE = {"low": 3.6, "other": 1.15}
_LOW_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def session_options(optimization: Optimization):  # -> ort.SessionOptions
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, not {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3  # errors only: ORT warnings are noise in a CLI report
    return opts


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def run_model(
    path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    optimization: Optimization = "basic",
    ours: bool = False,
) -> dict[str, np.ndarray]:
    """Run the model at ``path`` on ``inputs`` with onnxruntime (CPU); outputs in model order.

    The model is loaded from its path so external data files next to it are found.  Inputs the
    session does not take are ignored (e.g. extra keys); a missing input, a model ORT cannot load
    or a failed run raises UserError with ORT's message on one line -- or InternalError when
    ``ours`` (the converted model: its failure is our bug).  ``optimization`` defaults to "basic":
    constant folding and redundant-node removal only, so the comparison tests the graphs as
    written, not ORT's fused kernels.
    """
    import onnxruntime as ort

    error = InternalError if ours else UserError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"model {path!r} does not exist")
    try:
        sess = ort.InferenceSession(path, session_options(optimization), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise error(f"onnxruntime cannot load {path!r}: {one_line(exc)}") from None
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in inputs]
    if missing:
        raise error(f"no value for input(s) {', '.join(map(repr, missing))} of {path!r}")
    names = [o.name for o in sess.get_outputs()]
    try:
        feeds = {n: to_ort(inputs[n]) for n in wanted}
        values = sess.run_with_ort_values(names, feeds)
        return {n: from_ort(v) for n, v in zip(names, values, strict=True)}
    except Exception as exc:
        raise error(f"onnxruntime failed to run {path!r}: {one_line(exc)}") from None


# numpy (ml_dtypes) types onnxruntime's numpy bridge does not know: passed as same-size ints.
_ML_DTYPES = {
    # numpy dtype name: (ONNX element type, ORT type string)
    "bfloat16": (16, "tensor(bfloat16)"),
    "float8_e4m3fn": (17, "tensor(float8e4m3fn)"),
    "float8_e4m3fnuz": (18, "tensor(float8e4m3fnuz)"),
    "float8_e5m2": (19, "tensor(float8e5m2)"),
    "float8_e5m2fnuz": (20, "tensor(float8e5m2fnuz)"),
}
_BY_ORT_TYPE = {ort_type: name for name, (_, ort_type) in _ML_DTYPES.items()}


def to_ort(arr: np.ndarray):  # -> ort.OrtValue
    """OrtValue for ``arr``, including bfloat16/float8 arrays ORT's numpy bridge rejects."""
    import onnxruntime as ort

    arr = np.ascontiguousarray(arr)
    special = _ML_DTYPES.get(arr.dtype.name)
    if special is None:
        return ort.OrtValue.ortvalue_from_numpy(arr)
    view = arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(view, special[0])


def from_ort(value) -> np.ndarray:
    """Copy an output OrtValue to numpy; bfloat16/float8 are read raw and viewed via ml_dtypes."""
    name = _BY_ORT_TYPE.get(value.data_type())
    if name is None:
        return np.asarray(value.numpy())
    import ctypes

    import ml_dtypes

    dtype = np.dtype(getattr(ml_dtypes, name))
    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(value.data_ptr())
    return np.frombuffer(raw, dtype=np.uint8).copy().view(dtype).reshape(shape)


@dataclass(frozen=True)
class OutputCheck:
    """Comparison of one output.  ``shape`` is the reference's; ``note`` says why it failed."""

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Verification:
    """Result of comparing all outputs of two runs; ``ok`` only if every output matched."""

    rows: tuple[OutputCheck, ...]
    rtol: float
    reference: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def max_rel_err(self) -> float:
        return max((r.max_rel_err for r in self.rows), default=0.0)


def _is_floating(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def _check(name: str, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    shape = tuple(int(d) for d in ref.shape)
    if ref.shape != cand.shape:
        return OutputCheck(
            name, shape, math.inf, math.inf, False, f"shape {list(cand.shape)} != reference {list(ref.shape)}"
        )
    if ref.dtype != cand.dtype:
        return OutputCheck(
            name, shape, math.inf, math.inf, False, f"dtype {cand.dtype} != reference {ref.dtype}"
        )
    if ref.size == 0:
        return OutputCheck(name, shape, 0.0, 0.0, True, "empty")

    if not _is_floating(ref.dtype):
        if ref.dtype.kind in "biu":
            a, b = ref.astype(np.int64), cand.astype(np.int64)
            if ref.dtype == np.uint64:
                a, b = ref.astype(np.float64), cand.astype(np.float64)
            diff = np.abs(a - b)
            abs_err = float(diff.max())
            rel_err = abs_err / max(float(np.abs(a).max()), _TINY)
            mismatches = int(np.count_nonzero(diff))
        else:  # strings or objects: equality only
            mismatches = int(np.count_nonzero(ref != cand))
            abs_err = rel_err = 0.0 if mismatches == 0 else math.inf
        note = f"{mismatches} element(s) differ (integer outputs must match exactly)" if mismatches else ""
        return OutputCheck(name, shape, abs_err, rel_err, mismatches == 0, note)

    if ref.dtype.kind == "c":
        a, b = ref.astype(np.complex128), cand.astype(np.complex128)
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        nonfinite_bad = int(np.count_nonzero(fin_a != fin_b))
        both = fin_a & fin_b
        nonfinite_same = int(np.count_nonzero(~fin_a & ~fin_b))
    else:
        a, b = ref.astype(np.float64), cand.astype(np.float64)
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        both = fin_a & fin_b
        # Non-finite positions must be the same kind in both: NaN/NaN, +inf/+inf or -inf/-inf.
        same_nonfinite = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))
        nonfinite_bad = int(np.count_nonzero(~both & ~same_nonfinite))
        nonfinite_same = int(np.count_nonzero(~both & same_nonfinite))

    if not both.any():  # nothing finite to compare: such a check could never fail
        return OutputCheck(name, shape, math.inf, math.inf, False, "no finite value to compare (all NaN/inf)")
    abs_err = float(np.abs(a[both] - b[both]).max())
    scale = float(np.abs(a[both]).max())
    rel_err = abs_err / max(scale, _TINY)
    within = rel_err <= rtol or abs_err <= atol
    notes = []
    if nonfinite_bad:
        notes.append(f"NaN/Inf mismatch at {nonfinite_bad} element(s)")
    if nonfinite_same:
        notes.append(f"both NaN/Inf at {nonfinite_same} element(s)")
    if not within:
        notes.append(f"rel err {rel_err:.3g} > rtol {rtol:.3g}")
    return OutputCheck(name, shape, abs_err, rel_err, within and nonfinite_bad == 0, "; ".join(notes))


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    rtol: float = DEFAULT_RTOL,
    *,
    atol: float = 0.0,
) -> Verification:
    """Compare every output of ``candidate`` against ``reference``.

    Per output, over the positions where both values are finite:

    * ``max_abs_err = max |ref - cand|``
    * ``max_rel_err = max_abs_err / max(max |ref|, tiny)`` -- relative to the output's largest
      magnitude, not element-wise, so values near zero (softmax tails, post-norm activations)
      do not blow the error up, while a real error of 1e-5 of the output's scale still fails.

    An output is ok if ``max_rel_err <= rtol`` (or ``max_abs_err <= atol``, off by default), the
    shapes and dtypes agree, and every non-finite value is matched by the same kind (NaN with
    NaN, +inf with +inf): a NaN on one side only is a failure.  Integer and bool outputs must be
    equal element-wise.  The verification is ok if all rows are ok and both sides have the same
    output names; rows follow the reference order, then outputs only the candidate has.
    """
    rows: list[OutputCheck] = []
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if name not in candidate:
            rows.append(
                OutputCheck(name, tuple(ref.shape), math.inf, math.inf, False, "missing from converted model")
            )
            continue
        rows.append(_check(name, ref, np.asarray(candidate[name]), rtol, atol))
    for name, cand in candidate.items():
        if name not in reference:
            rows.append(
                OutputCheck(
                    name, tuple(np.asarray(cand).shape), math.inf, math.inf, False, "not in original model"
                )
            )
    return Verification(rows=tuple(rows), rtol=rtol, reference=dict(reference))


def verify(
    original_path: str | os.PathLike[str],
    converted_path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    optimization: Optimization = "basic",
) -> Verification:
    """Run both models on ``inputs`` and compare; ``result.reference`` holds the golden outputs."""
    reference = run_model(original_path, inputs, optimization=optimization)
    candidate = run_model(converted_path, inputs, optimization=optimization, ours=True)
    return compare_outputs(reference, candidate, rtol, atol=atol)


def estimate_ort_bytes(model: ir.Model, input_bytes: int = 0) -> tuple[int, ir.DataType | None]:
    """Estimated peak memory of running ``model`` whole in onnxruntime (CPU), and its low precision.

    Weights count :data:`ORT_BYTES_PER_WEIGHT_BYTE` (fp16/bf16 vs everything else), inputs twice
    (the outputs, e.g. present KV, are about as big). The second value is FLOAT16/BFLOAT16 when
    most float weights are, else None. Only shapes and dtypes are read, never weight data.
    """
    low: dict[ir.DataType, int] = {}
    other = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.dtype in _LOW_PRECISION:
            low[tensor.dtype] = low.get(tensor.dtype, 0) + tensor.nbytes
        else:
            other += tensor.nbytes
    estimate = (
        ORT_BYTES_PER_WEIGHT_BYTE["low"] * sum(low.values())
        + ORT_BYTES_PER_WEIGHT_BYTE["other"] * other
        + 2 * input_bytes
    )
    dtype = max(low, key=low.__getitem__) if sum(low.values()) > other else None
    return int(estimate), dtype


#: Peak memory of the whole-model quantized check per byte of float weights: ``to_qdq_ir`` holds
#: the float weights in memory (the model is copied through its proto), their quantized copy, and
#: onnxruntime loads the QDQ model it saved (weights once more, float and quantized).
QDQ_BYTES_PER_WEIGHT_BYTE = 3.5


def estimate_qdq_bytes(model: ir.Model, input_bytes: int = 0) -> int:
    """Estimated peak memory of the whole-model quantized (QDQ) comparison of ``model``."""
    weights = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    return int(QDQ_BYTES_PER_WEIGHT_BYTE * weights + 2 * input_bytes)
