"""HTP support probe: which nodes the QNN execution provider takes, with CPU fallback disabled.

The whole model is never run or compiled. The probe builds one small model holding, side by side:
- one attention block of each kind (the block's ops as :mod:`mha2sha.analyze.structure` found them,
  with its weights -- only that block's are read), and
- one node of every other op type of the model as it would be converted (after lowering and shape
  folding). A big weight of such a node (> 4 MB: an embedding table, an LM head) is cut to its
  first 256 output rows / columns: QNN validates an op from its type, attributes, ranks and dtypes,
  not the number of output channels, and the probe stays small.

A child process (:mod:`mha2sha.analyze._probe_worker`) makes a QDQ version of that model -- with
the user's encodings, or generated ones (uint16 min/max activations from one float run on
generated inputs, int8 symmetric weights: per-tensor for MatMul/Gemm/Gather, per-channel for Conv;
labelled as generated) -- and opens an onnxruntime session on the QNN HTP backend with CPU fallback
disabled and verbose logging. The QNN EP validates every node unit and logs ``Validation PASSED`` /
``Validation FAILED ... REASON: ...`` per unit: that log is the answer, node by node; a Q/DQ node that
fails is charged to the op it quantizes. When every node is taken, the session also compiles the
QNN graph (a failure there is reported too).

Without ``onnxruntime-qnn`` every op is "unknown" with that reason: support is never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mha2sha.analyze.record import OpSupport, ProbeRecord
from mha2sha.graph import is_onnx_domain, name_of, static_shape
from mha2sha.io.save import save_model
from mha2sha.verify.htp import DEFAULT_SOC, htp_available

__all__ = [
    "PreparedProbe",
    "ProbeComponent",
    "build_probe_model",
    "op_support",
    "prepare_probe",
    "probe_htp",
    "run_probe",
    "select_components",
]

logger = logging.getLogger(__name__)

#: Weights of single-node probes above this size are cut to their first :data:`_KEEP_ROWS` outputs.
_SHRINK_BYTES = 4 << 20
_KEEP_ROWS = 256
_TIMEOUT = 900
_NO_PROBE_OPS = frozenset({"Constant"})


@dataclasses.dataclass
class ProbeComponent:
    """A part of the probe model: an attention block, or one node standing for its op type."""

    label: str
    nodes: list[ir.Node]
    single: bool = False


def _op_key(node: ir.Node) -> tuple[str, str]:
    return ("" if is_onnx_domain(node.domain) else node.domain, node.op_type)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def select_components(model: ir.Model, blocks: Sequence[tuple[str, Sequence[ir.Node]]]) -> list[ProbeComponent]:
    """The blocks given (one per kind), then the first node of every op type they do not contain."""
    components = [ProbeComponent(label, list(nodes)) for label, nodes in blocks if nodes]
    covered = {_op_key(n) for c in components for n in c.nodes}
    in_blocks = {id(n) for c in components for n in c.nodes}
    for node in model.graph:
        key = _op_key(node)
        if key in covered or id(node) in in_blocks or node.op_type in _NO_PROBE_OPS or _has_subgraph(node):
            continue
        covered.add(key)
        label = node.op_type if not key[0] else f"{key[0]}.{node.op_type}"
        components.append(ProbeComponent(f"{label} '{node.name or node.outputs[0].name}'", [node], single=True))
    return components


# ----------------------------------------------------------------------------- probe model


def _shrink_axis(node: ir.Node, index: int) -> int | None:
    """The output-channel axis of a big weight input of a single-node probe, or None."""
    op = node.op_type
    if op == "MatMul" and index == 1:
        return -1
    if op == "Gemm" and index == 1:
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if op == "Gemm" and index == 2:
        return -1
    if op in ("Conv", "ConvTranspose") and index in (1, 2):
        return 0
    if op == "Gather" and index == 0:
        axis = node.attributes.get("axis")
        return 0 if axis is None or axis.as_int() == 0 else None
    return None


def _sliced(tensor: ir.TensorProtocol, axis: int, keep: int, name: str) -> ir.LazyTensor:
    shape = [int(d) for d in tensor.shape.numpy()]
    axis %= len(shape)
    index = tuple(slice(0, keep) if a == axis else slice(None) for a in range(len(shape)))
    shape[axis] = keep
    return ir.LazyTensor(
        lambda: ir.tensor(np.ascontiguousarray(tensor.numpy()[index]), name=name),
        tensor.dtype,
        ir.Shape(shape),
        name=name,
    )


@dataclasses.dataclass
class ProbeModel:
    model: ir.Model
    names: dict[str, tuple[str, str, str]]  # probe node name -> (node, op label, component label)
    shrunk: dict[str, tuple[int, int, tuple[int, ...]]]  # weight -> (axis, kept, original shape)
    skipped: list[str]  # components left out, with the reason


def build_probe_model(model: ir.Model, components: Sequence[ProbeComponent]) -> ProbeModel:
    """One model holding every component: values a component reads from outside become graph
    inputs (static shapes required, else the component is skipped), weights are the original
    lazy tensors (nothing read here), every value nothing reads becomes a graph output."""
    graph = ir.Graph([], [], nodes=[], name="htp_probe", opset_imports=dict(model.opset_imports))
    mapped: dict[int, ir.Value] = {}
    names: dict[str, tuple[str, str, str]] = {}
    shrunk: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    skipped: list[str] = []
    taken: set[int] = set()
    used: set[str] = set()  # value names of the probe model
    order = {id(n): i for i, n in enumerate(model.graph)}
    for component in components:
        nodes = sorted((n for n in component.nodes if id(n) not in taken), key=lambda n: order.get(id(n), 0))
        inside = {id(o) for n in nodes for o in n.outputs}
        problem = _boundary_problem(nodes, inside, mapped)
        if problem:
            skipped.append(f"{component.label}: {problem}")
            continue
        for node in nodes:
            taken.add(id(node))
            inputs: list[ir.Value | None] = []
            for index, value in enumerate(node.inputs):
                if value is None:
                    inputs.append(None)
                    continue
                if id(value) not in mapped:
                    axis = _shrink_axis(node, index) if component.single else None
                    mapped[id(value)] = _new_input(graph, value, axis, shrunk)
                    used.add(name_of(value))
                inputs.append(mapped[id(value)])
            name = f"p{len(names)}"
            clone = ir.Node(
                node.domain, node.op_type, inputs, list(node.attributes.values()),
                num_outputs=len(node.outputs), name=name, version=node.version,
            )  # fmt: skip
            label = node.op_type if is_onnx_domain(node.domain) else f"{node.domain}.{node.op_type}"
            names[name] = (node.name or name_of(node.outputs[0]), label, component.label)
            for old, new in zip(node.outputs, clone.outputs, strict=True):
                # a value another component reads as an input keeps that name: this copy is renamed
                new_name = name_of(old) if name_of(old) not in used else f"{old.name}.probe{len(names)}"
                new.name, new.type = new_name, old.type
                used.add(new_name)
                new.shape = old.shape if not (component.single and any(i.name in shrunk for i in inputs if i)) else None
                mapped[id(old)] = new
            graph.append(clone)
    for node in graph:
        for out in node.outputs:
            if not out.uses() and out.type is not None:
                graph.outputs.append(out)
    probe = ir.Model(graph, ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        probe.opset_imports[domain] = version
    return ProbeModel(probe, names, shrunk, skipped)


def _boundary_problem(nodes: Iterable[ir.Node], inside: set[int], mapped: Mapping[int, ir.Value]) -> str:
    for node in nodes:
        for value in node.inputs:
            if value is None or id(value) in inside or id(value) in mapped or value.const_value is not None:
                continue
            if static_shape(value) is None or value.dtype is None:
                return f"input '{value.name}' has no static shape"
    return ""


def _new_input(graph: ir.Graph, value: ir.Value, axis: int | None, shrunk: dict) -> ir.Value:
    tensor = value.const_value
    if tensor is not None:
        if axis is not None and tensor.nbytes > _SHRINK_BYTES and len(tensor.shape) >= 1:
            full = tuple(int(d) for d in tensor.shape.numpy())
            keep = min(_KEEP_ROWS, full[axis % len(full)])
            tensor = _sliced(tensor, axis, keep, name_of(value))
            shrunk[name_of(value)] = (axis % len(full), keep, full)
        shape = ir.Shape(tensor.shape.numpy())
        new = ir.Value(name=value.name, shape=shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(new)
        return new
    new = ir.Value(name=value.name, shape=ir.Shape(static_shape(value) or ()), type=value.type)
    graph.inputs.append(new)
    return new


# ----------------------------------------------------------------------------- running


_UNIT = re.compile(r"Validation (PASSED|FAILED) for \d+ nodes in OrtNodeUnit \(([^)]*)\)")
_NODE = re.compile(r"Operator type: (\S+) Node name: (.*?) Node index:")
_REASON = re.compile(r"REASON : (.*)")
_UNSUPPORTED = re.compile(r"\{ name: ([^,]+), type: (\w+) \}")


def parse_validation_log(lines: Sequence[str]) -> dict[str, tuple[str, bool, str]]:
    """``node name -> (op type, taken, reason)`` from the QNN EP's verbose log: each ``Validation
    PASSED|FAILED for N nodes in OrtNodeUnit`` message applies to the nodes it lists (a FAILED
    verdict wins over a PASSED one), cross-checked with the ``Unsupported nodes in QNN EP`` summary."""
    result: dict[str, tuple[str, bool, str]] = {}
    unit: list[tuple[str, str]] = []
    verdict, reason, in_unit = False, "", False

    def close() -> None:
        for op, name in unit:
            old = result.get(name)
            if old is None or (old[1] and not verdict):
                result[name] = (op, verdict, reason)
        unit.clear()

    for line in lines:
        match = _UNIT.search(line)
        if match:
            close()
            verdict, reason, in_unit = match.group(1) == "PASSED", "", True
            continue
        if in_unit and line.startswith("\t"):
            node = _NODE.search(line)
            if node:
                unit.append((node.group(1), node.group(2).strip()))
            elif (why := _REASON.search(line)) is not None:
                reason = why.group(1).strip()
            continue
        if in_unit:
            close()
            in_unit = False
    close()
    for line in lines:
        if "Unsupported nodes in QNN EP" in line:
            for name, op in _UNSUPPORTED.findall(line):
                old = result.get(name)
                if old is None or old[1]:
                    result[name] = (op, False, old[2] if old and old[2] else "unsupported by the QNN EP")
    return result


@dataclasses.dataclass
class PreparedProbe:
    """A probe model written to ``folder`` (weights copied file to file, nothing read), ready for
    :func:`run_probe`; the analysed model may be freed before it runs."""

    folder: Path
    names: dict[str, tuple[str, str, str]]
    tensors: dict[str, list[str]]  # tensor -> probe nodes charged for its Q/DQ
    record: ProbeRecord
    encodings: str | None


def prepare_probe(
    model: ir.Model,
    components: Sequence[ProbeComponent],
    folder: Path,
    *,
    soc: str = DEFAULT_SOC,
    encodings: str | None = None,
) -> PreparedProbe:
    """Write the probe model of ``components`` to ``folder`` (see the module docstring)."""
    record = ProbeRecord("unavailable", soc)
    prepared = PreparedProbe(folder, {}, {}, record, encodings)
    if not htp_available():
        record.message = "onnxruntime-qnn is not installed (pip install 'mha2sha[htp]'): HTP support unknown"
        return prepared
    started = time.perf_counter()
    built = build_probe_model(model, components)
    record.components = [c.label for c in components if not any(s.startswith(c.label + ":") for s in built.skipped)]
    if built.skipped:
        record.message = "not probed: " + "; ".join(built.skipped)
    if not built.names:
        record.status = "skipped"
        return prepared
    record.encodings = f"user encodings ({os.path.basename(encodings)})" if encodings else ""
    save_model(built.model, folder / "probe.onnx", shard_bytes=1 << 40)
    shrunk = {k: [v[0], v[1], list(v[2])] for k, v in built.shrunk.items()}
    (folder / "job.json").write_text(json.dumps({"soc": soc, "encodings": encodings, "shrunk": shrunk}))
    prepared.names, prepared.tensors = built.names, _qdq_tensor_index(built.model)
    record.status = "failed"  # until it ran
    record.seconds = time.perf_counter() - started
    return prepared


def run_probe(prepared: PreparedProbe) -> ProbeRecord:
    """Run the two child processes on a prepared probe and read the QNN EP's verdicts."""
    record, folder = prepared.record, prepared.folder
    if not prepared.names:
        return record
    started = time.perf_counter() - record.seconds
    log = folder / "qnn.log"
    session = Path(__file__).with_name("_qnn_session.py")
    steps = [
        [sys.executable, "-m", "mha2sha.analyze._probe_worker", str(folder)],
        [sys.executable, str(session), str(folder)],
    ]
    try:
        with open(log, "w") as err:
            for argv in steps:
                proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=err, text=True, timeout=_TIMEOUT)
                if proc.returncode != 0:
                    break
    except subprocess.TimeoutExpired:
        record.message = f"the HTP probe did not finish in {_TIMEOUT} s"
        return record
    result_path = folder / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    with open(log, errors="replace") as f:
        lines = f.readlines()
    record.seconds = time.perf_counter() - started
    record.peak_rss_mb = float(result.get("peak_rss_mb", 0.0))
    logger.info("HTP probe children: peak RSS by stage %s", result.get("peaks"))
    if not prepared.encodings:
        record.encodings = (
            "generated, not yours: uint16 activations on "
            + result.get("activations", "min/max ranges")
            + "; int8 symmetric weights from each weight's largest value (per-tensor, per-channel on Conv)"
        )
    if result.get("stage") != "done":
        detail = result.get("error") or next(
            (ln.strip()[:300] for ln in reversed(lines) if "Error" in ln or "error" in ln), f"exit code {proc.returncode}"
        )
        record.message = f"HTP probe failed while {result.get('stage', 'starting')}: {detail}"
        return record
    for probe_name, (op, taken, reason) in parse_validation_log(lines).items():
        if probe_name in prepared.names:
            original, label, _ = prepared.names[probe_name]
            _merge(record.nodes, original, label, taken, reason)
            continue
        tensor = _qdq_tensor(probe_name, prepared.tensors)
        if tensor is None:
            continue
        for owner in prepared.tensors[tensor]:
            original, label, _ = prepared.names[owner]
            why = f"its {op} on '{tensor}': {reason or 'rejected'}"
            _merge(record.nodes, original, label, taken, "" if taken else why)
    for original, label, _ in prepared.names.values():
        if original not in record.nodes:
            record.unseen[original] = label
    record.compiled = result.get("compiled")
    record.status = "ran"
    if result.get("error") and record.compiled is False:
        record.message = (record.message + "; " if record.message else "") + f"QNN compile failed: {result['error']}"
    return record


def probe_htp(
    model: ir.Model,
    components: Sequence[ProbeComponent],
    *,
    soc: str = DEFAULT_SOC,
    encodings: str | None = None,
) -> ProbeRecord:
    """Ask the QNN execution provider which nodes of ``components`` it takes (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="mha2sha-probe-") as tmp:
        return run_probe(prepare_probe(model, components, Path(tmp), soc=soc, encodings=encodings))


def _merge(nodes: dict[str, tuple[str, bool, str]], name: str, op: str, taken: bool, reason: str) -> None:
    old = nodes.get(name)
    if old is None or (old[1] and not taken):
        nodes[name] = (op, taken, reason)


def _qdq_tensor_index(model: ir.Model) -> dict[str, list[str]]:
    """Tensor name -> probe nodes charged for its Q/DQ: a weight's readers, an activation's
    producer (its readers when it is a graph input)."""
    index: dict[str, list[str]] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and (value.is_initializer() or value.is_graph_input()):
                index.setdefault(name_of(value), []).append(node.name or "")
        for out in node.outputs:
            index.setdefault(name_of(out), []).append(node.name or "")
    return {k: [n for n in v if n] for k, v in index.items()}


def _qdq_tensor(node_name: str, tensors: Mapping[str, list[str]]) -> str | None:
    """The tensor a Q/DQ (or fp16 Cast pair) node of the QDQ builder quantizes (``{tensor}_q``)."""
    for suffix in ("_dq", "_q", "_cast_q", "_cast_dq"):
        if node_name.endswith(suffix) and node_name[: -len(suffix)] in tensors:
            return node_name[: -len(suffix)]
    best = max((t for t in tensors if node_name.startswith(t)), key=len, default=None)
    return best


def op_support(
    original: Mapping[tuple[str, str], int],
    converted: Mapping[tuple[str, str], int],
    probe: ProbeRecord | None,
    lowered: Mapping[str, int],
) -> list[OpSupport]:
    """One row per op type of the model (as given, and as it would be converted)."""
    per_op: dict[tuple[str, str], list[tuple[bool, str]]] = {}
    seen_unseen: dict[tuple[str, str], int] = {}
    if probe is not None:
        for label, taken, reason in probe.nodes.values():
            domain, _, op = label.rpartition(".")
            per_op.setdefault((domain, op), []).append((taken, reason))
        for label in probe.unseen.values():
            domain, _, op = label.rpartition(".")
            seen_unseen[(domain, op)] = seen_unseen.get((domain, op), 0) + 1
    rows = []
    for key in sorted(set(original) | set(converted), key=lambda k: (k[0], k[1])):
        domain, op = key
        label = f"{domain}.{op}" if domain else op
        row = OpSupport(domain, op, original.get(key, 0))
        if key not in converted:
            row.converted = False
            row.note = (
                f"lowered to primitives by mha2sha ({lowered[label]} node(s))"
                if label in lowered
                else "folded away once shapes are static"
            )
            row.reason = "not probed: not in the graph mha2sha converts"
        elif key not in original:
            row.note = f"introduced by the lowering of fused ops ({converted[key]} node(s))"
        elif converted[key] != original[key]:
            row.note = f"{converted[key]} after lowering / shape folding"
        verdicts = per_op.get(key, [])
        row.probed = len(verdicts) + seen_unseen.get(key, 0)
        row.rejected = sum(1 for taken, _ in verdicts if not taken)
        if key not in converted:
            pass
        elif probe is None:
            row.reason = "HTP support not probed"
        elif probe.status in ("unavailable", "failed"):
            row.reason = probe.message
        elif row.rejected:
            reasons = sorted({r for taken, r in verdicts if not taken and r})
            row.htp = "no"
            row.reason = f"{row.rejected} of {row.probed} probed node(s) rejected by the QNN EP: " + "; ".join(reasons[:3])
        elif verdicts:
            row.htp = "yes"
            row.reason = f"{len(verdicts)} probed node(s) taken by the QNN EP ({probe.soc})"
            if probe.compiled is False:
                row.htp = "unknown"
                row.reason = f"validated, but the probe's QNN graph failed to compile: {probe.message}"
        elif seen_unseen.get(key):
            row.reason = "probed, but onnxruntime removed the node before the QNN EP saw it"
        else:
            row.reason = "not probed (no static shape, or inside a subgraph)"
        rows.append(row)
    return rows
