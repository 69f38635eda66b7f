"""First child process of the HTP support probe (:mod:`mha2sha.analyze.probe`).

``python -m mha2sha.analyze._probe_worker FOLDER``: reads ``FOLDER/probe.onnx`` and ``job.json``,
makes the QDQ model ``qdq.onnx`` (the user's encodings, or generated ones) and writes
``result.json`` (the stage reached, the error, its peak RSS). ``_qnn_session.py`` then opens the
QNN session on it. Kept out of the package imports so ``-m`` runs it cleanly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

_FLOATS = (np.float32, np.float16)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _feeds(model: ir.Model) -> dict[str, np.ndarray]:
    """Generated inputs: N(0, 1) floats, zero integers (valid indices), true booleans."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        shape = tuple(d if isinstance(d, int) else 1 for d in value.shape) if value.shape is not None else ()
        name = value.name or ""
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, np.bool_)
        else:
            feeds[name] = np.zeros(shape, dtype)
    return feeds


def _activation_ranges(path: Path, model: ir.Model) -> dict[str, tuple[float, float]]:
    """min/max of every float tensor of one float run (onnxruntime CPU, optimisations off)."""
    import onnxruntime as ort

    proto = onnx.load(str(path), load_external_data=False)
    known = {o.name for o in proto.graph.output}
    for node in model.graph:
        for out in node.outputs:
            if out.name and out.name not in known and out.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                proto.graph.output.append(onnx.helper.make_tensor_value_info(out.name, out.dtype.value, None))
                known.add(out.name)
    extended = path.with_name("calibrate.onnx")
    onnx.save(proto, str(extended))  # weights stay in probe.data (same folder)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(extended), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(model)
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for name, array in zip(names, session.run(names, feeds), strict=True):
        if array.dtype in _FLOATS and array.size and np.isfinite(array).all():
            ranges[name] = (float(array.min()), float(array.max()))
    for name, array in feeds.items():
        if array.dtype in _FLOATS:
            ranges[name] = (float(array.min()), float(array.max()))
    return ranges


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _nominal_ranges(model: ir.Model) -> dict[str, tuple[float, float]]:
    """[-NOMINAL, NOMINAL] for every float tensor (when a float run would cost too much memory)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    names = [v.name for v in model.graph.inputs if v.name and v.dtype in floats]
    for node in model.graph:
        names += [o.name for o in node.outputs if o.name and o.dtype in floats]
    return dict.fromkeys(names, (-NOMINAL, NOMINAL))


#: Activation ranges come from one float run when the probe's weights are at most this big (the
#: CPU run of an fp16 block holds its weights twice more, in fp32); else they are nominal.
CALIBRATE_MAX_BYTES = 64 << 20
NOMINAL = 8.0


def _generated(model: ir.Model, path: Path, result: dict[str, Any]) -> Any:
    from mha2sha.encodings.model import Encoding, EncodingSet

    es = EncodingSet(version="1.0.0")
    if _weight_bytes(model) <= CALIBRATE_MAX_BYTES:
        ranges = _activation_ranges(path, model)
        result["activations"] = "min/max of one float run on generated inputs"
    else:
        ranges = _nominal_ranges(model)
        result["activations"] = f"a nominal [-{NOMINAL:g}, {NOMINAL:g}] range (weights too big for a float run)"
    for name, (lo, hi) in ranges.items():
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-6) / 65535
        es.activations[name] = Encoding(
            name, bitwidth=16, is_symmetric=False, scale=np.asarray(scale), offset=np.asarray(float(np.round(lo / scale)))
        )
    for node in model.graph:
        weights = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None]
        if node.op_type not in ("MatMul", "Gemm", "Conv", "Gather", "Einsum"):
            continue
        for index, value in weights:
            tensor = value.const_value
            name = value.name or ""
            if name in es.params or tensor is None or len(tensor.shape) < 2:
                continue
            if np.dtype(tensor.dtype.numpy()).kind != "f" or (node.op_type == "Gather" and index != 0):
                continue
            array = np.asarray(tensor.numpy())  # abs max in the weight's own dtype: no fp32 copy
            if node.op_type == "Conv" and index == 1:
                peak = np.abs(array).reshape(array.shape[0], -1).max(axis=1).astype(np.float64)
                scale = np.maximum(peak, 1e-8) / 127.0
                es.params[name] = Encoding(
                    name, bitwidth=8, is_symmetric=True, scale=scale.astype(np.float64),
                    offset=np.full(scale.shape, -128.0), enc_type="PER_CHANNEL", axis=0,
                )  # fmt: skip
            else:
                scale = max(float(np.abs(array).max()), 1e-8) / 127.0
                es.params[name] = Encoding(
                    name, bitwidth=8, is_symmetric=True, scale=np.asarray(scale), offset=np.asarray(-128.0)
                )
            del array
    return es


def _user(model: ir.Model, path: str, shrunk: dict[str, list]) -> Any:
    from mha2sha.encodings.axes import resolve_axes
    from mha2sha.encodings.formats import load_encodings
    from mha2sha.encodings.propagate import slice_encoding
    from mha2sha.io.names import tensor_names

    es = load_encodings(path)
    names = tensor_names(model)
    for section in (es.activations, es.params):
        for name in [n for n in section if n not in names]:
            del section[name]
    if es.order is not None:
        es.order = [n for n in es.order if n in names]
    full = {name: tuple(shape) for name, (_, _, shape) in shrunk.items()}
    resolve_axes(es, model=model, shapes=full)
    for name, (axis, keep, shape) in shrunk.items():
        enc = es.params.get(name) or es.activations.get(name)
        if enc is None:
            continue
        piece = slice_encoding(enc, tuple(shape), ((axis, 0, keep),), name)
        if isinstance(piece, str):
            raise ValueError(f"encoding of {name} cannot be cut for the probe: {piece}")
        (es.params if name in es.params else es.activations)[name] = piece
    return es


def main(folder: str) -> int:
    """Build ``qdq.onnx``; the QNN session is ``_qnn_session.py``, a fresh process that imports
    nothing but onnxruntime (its memory does not add to this one's)."""
    root = Path(folder)
    job = json.loads((root / "job.json").read_text())
    result_path = root / "result.json"
    result: dict[str, Any] = {"stage": "loading"}

    def save() -> None:
        peak = _peak_rss_mb()
        result["peak_rss_mb"] = max(peak, result.get("peak_rss_mb", 0.0))
        result.setdefault("peaks", {})[result["stage"]] = peak
        result_path.write_text(json.dumps(result))

    save()
    try:
        from mha2sha.io.load import load_model
        from mha2sha.io.prepare import remove_unused_initializers
        from mha2sha.verify.qdq import to_qdq_ir

        path = root / "probe.onnx"
        model = load_model(path)
        result["stage"] = "making encodings"
        save()
        es = _user(model, job["encodings"], job["shrunk"]) if job.get("encodings") else _generated(model, path, result)
        result["stage"] = "building the QDQ model"
        save()
        qdq = to_qdq_ir(model, es, copy=False)
        remove_unused_initializers(qdq)
        ir.save(qdq, root / "qdq.onnx", external_data="qdq.data", size_threshold_bytes=1 << 16)
        result["stage"] = "session"
        save()
    except Exception as e:
        result["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        save()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
