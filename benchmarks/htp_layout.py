"""MHA vs SHA vs SHA + Conv 1x1 layout on the QNN HTP emulator, for a Qualcomm-prepared Llama step graph.

Three QDQ models of the same prepared Llama-GQA step graph (RoPE cos/sin inputs, transposed key cache,
additive mask, only new KV returned), quantized with real AIMET encodings (W8A16: int8 per-channel
weights, uint16 activations, AIMET's HTP config):

- ``MHA-QDQ``: the original model with its encodings as QuantizeLinear/DequantizeLinear;
- ``SHA-QDQ``: after ``mha2sha convert`` (heads split);
- ``SHA-conv-QDQ``: after ``mha2sha convert --target htp`` (heads split + Conv 1x1 layout).

Two model sizes: the zoo's ``prepared_llama_gqa_step`` (2 layers, hidden 96, 8/2 heads, AR 3, CL 17)
and a wider one built here from the zoo's prepared-graph functions (default hidden 1024, 16/4 heads,
head_dim 64, 2 layers, AR 64, CL 512). Each is calibrated by ``aimet_onnx`` and exported as encodings
1.0.0 and/or 2.0.0 (the two exports differ in what reaches HTP, see HTP_RESULTS.md).

For each model x SoC two sessions run on the HTP backend of ``onnxruntime-qnn`` (x86_64 emulator), each
in its own process and its own temporary working directory (optrace writes ``*_schematic.bin`` there):

1. probe: CPU fallback disabled, verbose ORT log; killed once the first ``GetCapability`` pass is
   logged (no compile). Gives the nodes QNN takes and the unsupported ones, with ORT's reason.
2. compile + run: ``ep.context_enable=1`` (the creation time is the offline compile time, the
   ``*_qnn.bin`` written its size), ``profiling_level=optrace``, CPU fallback disabled unless (1) found
   unsupported nodes; one warm-up run and ``--runs`` timed runs. Gives: runs without fallback, the op
   types of the QNN graph and of the HTP-prepared graph (optrace schematic), the emulator's cycles and
   execute time per run (host time, a sanity number only), and the outputs, compared with MHA-QDQ's on
   the same SoC in LSBs of the output encodings.

    python benchmarks/htp_layout.py                                # zoo (1.0.0, 2.0.0) + wide (2.0.0), ~3 min
    python benchmarks/htp_layout.py --quick                        # zoo model only, ~30 s
    python benchmarks/htp_layout.py --wide-versions 1.0.0,2.0.0    # ~16 min: SHA-conv 1.0.0 compiles slowly
    python benchmarks/htp_layout.py --tables                       # re-render the last run's tables
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "HTP_RESULTS.md"
MODELS = ("MHA-QDQ", "SHA-QDQ", "SHA-conv-QDQ")
SOCS = ("SM8650", "SM8750")
VERSIONS = ("1.0.0", "2.0.0")
ZOO_CASE = "prepared_llama_gqa_step"
# HTP-prepared op types that only change the memory layout (Transpose / Reshape / format changes
# between the tiled "crouton" and flat layouts, depth<->space); matched on the op type name
LAYOUT_OP = re.compile(
    r"transpose|reshape|forceformat|crouton_to|to_crouton|flat_to_|_to_flat|depthtospace|"
    r"spacetodepth|channelshuffle",
    re.I,
)
# QNN graph (what ORT hands to HTP) layout ops
QNN_LAYOUT_OP = re.compile(r"QNN_(Transpose|Reshape|DepthToSpace|SpaceToDepth|ChannelShuffle)$")
# bookkeeping entries of the HTP runlist that are not ops of the model: tile slices, syncs, constants
HTP_PSEUDO_OP = re.compile(r"^(q::\*InputSlice\w*|q::\*OutputSlice\w*|@Sync|\$Const|\$Shape)$")


@dataclasses.dataclass(frozen=True)
class Size:
    """A prepared-style Llama: hidden, heads, KV heads, head_dim, layers, AR, CL, MLP width."""

    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    layers: int = 2
    ar: int = 64
    context: int = 512
    ffn: int = 2816

    def label(self) -> str:
        return (
            f"hidden {self.hidden}, {self.heads}/{self.kv_heads} heads x {self.head_dim}, "
            f"{self.layers} layers, AR {self.ar}, CL {self.context}, MLP {self.ffn}"
        )


# ----------------------------------------------------------------------------------------------------
# models


def _big_inputs(hf, size: Size, seed: int) -> dict:
    import torch

    from mha2sha.zoo import prepared
    from mha2sha.zoo.decoders import VOCAB

    gen = torch.Generator().manual_seed(seed)
    past = size.context - size.ar
    cos, sin = prepared.rope_tables(hf, torch.arange(past, past + size.ar))
    feeds = {
        "input_ids": torch.randint(0, VOCAB, (1, size.ar), generator=gen),
        "attention_mask": prepared.prepared_mask(size.ar, size.context),
        "position_ids_cos": cos,
        "position_ids_sin": sin,
    }
    for layer in range(size.layers):
        feeds[f"past_key_{layer}_in"] = torch.randn(1, size.kv_heads, size.head_dim, past, generator=gen)
        feeds[f"past_value_{layer}_in"] = torch.randn(1, size.kv_heads, past, size.head_dim, generator=gen)
    return feeds


def build_big(size: Size, work: Path) -> tuple[Path, list[dict], dict]:
    """Export the wide prepared Llama step (cached in ``work``): model, calibration inputs, eval inputs."""
    folder = work / ("llama_" + "_".join(str(v) for v in dataclasses.astuple(size)))
    path = folder / "model.onnx"
    names = ("calib0", "calib1", "eval")
    if not path.is_file():
        from mha2sha.zoo import prepared
        from mha2sha.zoo.decoders import VOCAB, DecoderSpec, make_causal_lm
        from mha2sha.zoo.export import export
        from mha2sha.zoo.spec import Built

        def config():
            import transformers

            cfg = transformers.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=size.hidden,
                intermediate_size=size.ffn,
                num_hidden_layers=size.layers,
                num_attention_heads=size.heads,
                num_key_value_heads=size.kv_heads,
                head_dim=size.head_dim,
                max_position_embeddings=size.context,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
            cfg._attn_implementation = "eager"
            return cfg

        spec = DecoderSpec(
            "llama", "prepared Llama GQA (bench)", config, size.heads, size.kv_heads, size.head_dim
        )
        hf = make_causal_lm(spec)
        feeds = [_big_inputs(hf, size, seed) for seed in (13, 14, 15)]
        outputs = ["logits"] + [f"past_{kv}_{i}_out" for i in range(size.layers) for kv in ("key", "value")]
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=work))
        export(
            Built(prepared.PreparedLlamaStep(hf).eval(), feeds[0], outputs), tmp / "model.onnx", "torchscript"
        )
        for name, feed in zip(names, feeds, strict=True):
            np.savez(tmp / f"{name}.npz", **{k: v.numpy() for k, v in feed.items()})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    loaded = [_load_npz(folder / f"{name}.npz") for name in names]
    return path, loaded[:2], loaded[2]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclasses.dataclass
class Prepared:
    qdq: dict[str, Path]  # model tag -> QDQ model
    lsb: dict[str, np.ndarray | None]  # output -> LSB of MHA's output encoding
    cpu_lsb: dict[str, dict[str, float]]  # model tag -> output -> max |x - MHA| on ORT CPU, in LSB


def prepare(model: Path, calib: list[dict], feeds: dict, version: str, work: Path) -> Prepared:
    """AIMET encodings, the two conversions and the three QDQ models."""
    import onnx_ir as ir

    from mha2sha.api import ConvertOptions, convert
    from mha2sha.encodings import load_encodings
    from mha2sha.io.save import save_model
    from mha2sha.verify.qdq import output_lsb, run_qdq_compare, to_qdq_ir
    from tests.encodings.aimet_gen import aimet_encodings

    aimet_model, aimet_enc = aimet_encodings(
        model, calib, config="w8a16", version=version, cache=work / "aimet"
    )
    out = work / f"v{version}"
    shutil.rmtree(out, ignore_errors=True)
    files = {"MHA-QDQ": (aimet_model, aimet_enc)}
    for tag, htp in (("SHA-QDQ", False), ("SHA-conv-QDQ", True)):
        # max_lsb off: the CPU QDQ difference is measured below (float MatMul sums are not bit-exact)
        opts = ConvertOptions(encodings=str(aimet_enc), htp_layout=htp, max_lsb=math.inf)
        with contextlib.redirect_stdout(sys.stderr):
            convert(aimet_model, out / tag, options=opts)
        files[tag] = (out / tag / "model.onnx", out / tag / "model.encodings")
    qdq, encs = {}, {}
    for tag, (path, enc) in files.items():
        m = ir.load(path)
        encs[tag] = load_encodings(enc, model=m)
        qdq[tag] = out / f"{tag}.onnx"
        save_model(to_qdq_ir(path, encs[tag]), qdq[tag])
    shapes = {v.name: tuple(v.shape or ()) for v in ir.load(files["MHA-QDQ"][0]).graph.outputs}
    lsb = {name: output_lsb(encs["MHA-QDQ"].get(name), shape) for name, shape in shapes.items()}
    cpu = {"MHA-QDQ": dict.fromkeys(shapes, 0.0)}
    for tag in MODELS[1:]:
        cpu[tag] = run_qdq_compare(files["MHA-QDQ"][0], encs["MHA-QDQ"], files[tag][0], encs[tag], feeds)
    return Prepared(qdq, lsb, cpu)


# ----------------------------------------------------------------------------------------------------
# one HTP session, in a child process


def _worker(job_path: str) -> int:
    """Child: one HTP session as described by the job file; result.json (+ outputs.npz) beside it."""
    job = json.loads(Path(job_path).read_text())
    os.chdir(job["dir"])  # optrace writes its schematic .bin files to the working directory
    import onnxruntime as ort
    import onnxruntime_qnn

    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 0 if job["verbose"] else 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if job["fallback"] else "1")
    if job.get("context"):
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", job["context"])
    provider = {"backend_type": "htp", "soc_model": job["soc"], "offload_graph_io_quantization": "0"}
    if job.get("profiling"):
        provider.update(profiling_level=job["profiling"], profiling_file_path=os.path.abspath("profile.csv"))
    so.add_provider_for_devices(devices, provider)
    result: dict = {}
    t = time.perf_counter()
    try:
        session = ort.InferenceSession(job["model"], so)
    except Exception as e:
        result.update(created=False, error=" ".join(str(e).split())[:300])
        Path("result.json").write_text(json.dumps(result))
        return 0
    result.update(created=True, create_s=time.perf_counter() - t, run_s=[])
    if job["runs"]:
        feeds_all = _load_npz(Path(job["inputs"]))
        feeds = {i.name: feeds_all[i.name] for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        for i in range(job["warmup"] + job["runs"]):
            t = time.perf_counter()
            outputs = session.run(names, feeds)
            if i >= job["warmup"]:
                result["run_s"].append(time.perf_counter() - t)
            if i == 0:
                np.savez("outputs.npz", **dict(zip(names, outputs, strict=True)))
    del session  # flushes the profile
    Path("result.json").write_text(json.dumps(result))
    return 0


def run_session(job: dict, folder: Path, *, stop_at: str = "", timeout: float = 900) -> tuple[dict, str]:
    """Run one session job in a child process working in ``folder``: (result, its native log).

    ``stop_at``: kill the child as soon as this text appears in its log (used to read the capability
    log without paying for the compile).
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = {**job, "dir": str(folder)}
    (folder / "job.json").write_text(json.dumps(job))
    log = folder / "log.txt"
    seen, status = "", ""
    with open(log, "w") as out, open(log, errors="replace") as tail:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder / "job.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            time.sleep(0.1)
            seen = seen[-200:] + tail.read()
            if stop_at and stop_at in seen:
                status = "stopped"
            elif time.monotonic() > deadline:
                status = f"timeout after {timeout:.0f} s"
            if status:
                proc.kill()
                proc.wait()
                break
    text = log.read_text(errors="replace")
    path = folder / "result.json"
    if status:
        return {"created": False, "error": status}, text
    if proc.returncode != 0 or not path.is_file():
        tail_lines = [ln for ln in text.splitlines() if ln.strip()][-3:]
        return {
            "created": False,
            "error": f"worker exit {proc.returncode}: {' | '.join(tail_lines)[-300:]}",
        }, text
    return json.loads(path.read_text()), text


# ----------------------------------------------------------------------------------------------------
# reading what the backend wrote

PASS_2 = "GetCapability pass 2"
_UNSUPPORTED = re.compile(r"\{ name: ([^,]+), type: (\w+) \}")
_VALIDATION = re.compile(r"Validation (PASSED|FAILED) for (\d+) nodes in (\w+) \((\w+)\)")
_NODE = re.compile(r"Operator type: (\w+) Node name: (.*?) Node index: (\d+)")
_REASON = re.compile(r"REASON : (.*)")


def parse_log(text: str) -> dict:
    """QNN EP capability from the verbose ORT log, first ``GetCapability`` pass.

    The QNN EP runs ``GetCapability`` on the graph as ORT loaded it (after its level-1 optimisations,
    which among others give every consumer of a shared DequantizeLinear its own copy) and again after
    the NHWC layout transformation. In the first pass every node is listed once, inside a node unit
    whose validation PASSED or FAILED (with a ``REASON`` line); a node that QNN cannot take ends up on
    the CPU EP (with fallback) or fails the session (without).
    """
    first = text.split(PASS_2, 1)[0]
    passed: set[str] = set()
    failed: dict[str, list] = {}
    state, last = None, None
    for line in first.splitlines():
        if m := _VALIDATION.search(line):
            state = m.group(1)
        elif (m := _NODE.search(line)) and state:
            last = m.group(2)
            if state == "PASSED":
                passed.add(last)
            else:
                failed.setdefault(last, [m.group(1), ""])
        elif (m := _REASON.search(line)) and state == "FAILED" and last in failed:
            failed[last][1] = m.group(1).strip()
    unsupported = sorted(set(_UNSUPPORTED.findall(first)))
    return {
        "qnn_nodes": len(passed - set(failed)),
        "total_nodes": len(passed | set(failed)),
        "unsupported": unsupported,
        "reasons": {name: reason for name, (_, reason) in failed.items()},
        "capability_logged": PASS_2 in text,
    }


def parse_schematic(folder: Path) -> dict | None:
    """Op types of the QNN graph and of the HTP-prepared graph from the optrace ``*_schematic.bin``.

    The schematic holds python-pprint text sections: ``graph_before_optimization`` (the QNN ops ORT
    built, ``'operation':'q::QNN_Conv2d'``) and ``opdesc_map`` (every op of the prepared graph's final
    runlist, ``opdesc( 0x<id>, "q::ConvLayer_s1.opt", ...)``). One file per QNN partition; summed.
    """
    files = sorted(folder.glob("*_schematic.bin"))
    if not files:
        return None
    qnn, htp = Counter(), Counter()
    for path in files:
        text = path.read_bytes().decode("latin-1")
        start = text.find("graph_before_optimization = {")
        end = text.find(":::END:graph_before_optimization:::")
        qnn.update(re.findall(r"'operation':'([^']+)'", text[start:end]))
        htp.update(re.findall(r'opdesc\( 0x[0-9a-f]+, "([^"]+)"', text))
    for key in ("$Const", "$Shape", "q::Input", "q::Output"):
        qnn.pop(key, None)
    return {"partitions": len(files), "qnn": dict(qnn), "htp": dict(htp)}


def parse_profile(path: Path) -> dict:
    """Per-run emulator numbers from the QNN profile CSV."""
    cycles, exec_us = [], []
    if path.is_file():
        with open(path) as fh:
            for row in csv.DictReader(fh):
                ident = row.get("Event Identifier", "")
                if ident == "Accelerator (execute) time (cycles)":
                    cycles.append(int(row["Time"]))
                elif ident == "Accelerator (execute) time":
                    exec_us.append(int(row["Time"]))
    return {"cycles": cycles, "exec_us": exec_us}


def explain(qdq_path: Path, names: list[str]) -> dict[str, str]:
    """Why a weight DequantizeLinear stands alone: what its consumer's activation input and output are.

    ORT groups ``DQ(act) + DQ(weight) -> Conv/MatMul -> Q`` into one quantized node unit only when the
    activation comes from a DQ and the activation input and output types agree; otherwise the weight
    DQ is left standalone, and QNN cannot run a standalone per-channel DQ.
    """
    import onnx

    m = onnx.load(str(qdq_path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    zp_type = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in m.graph.initializer}
    for n in m.graph.node:  # zero points written as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.data_type:
            zp_type[n.output[0]] = onnx.helper.tensor_dtype_to_np_dtype(n.attribute[0].t.data_type).name

    def qtype(node) -> str:
        return zp_type.get(node.input[2], "?") if len(node.input) > 2 else "uint8"

    out = {}
    for name in names:
        node = next((n for n in m.graph.node if n.name == name), None)
        if node is None:
            continue
        parts = []
        for c in consumers.get(node.output[0], []):
            act = producer.get(c.input[0])
            a = (
                f"{qtype(act)} (DQ)"
                if act is not None and act.op_type == "DequantizeLinear"
                else (
                    f"float from {act.op_type} `{c.input[0]}` (no encoding)"
                    if act is not None
                    else "graph input"
                )
            )
            qs = [q for q in consumers.get(c.output[0], []) if q.op_type == "QuantizeLinear"]
            o = qtype(qs[0]) if qs else "float (no Q)"
            parts.append(f"{c.op_type} `{c.name}`: activation {a}, output {o}")
        out[name] = "; ".join(parts)
    return out


# ----------------------------------------------------------------------------------------------------
# measurement


def measure(
    prep: Prepared, soc: str, feeds_path: Path, work: Path, runs: int, timeout: float
) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for tag in MODELS:
        base = {"model": str(prep.qdq[tag]), "soc": soc, "inputs": str(feeds_path)}
        # 1. capability: fallback disabled, verbose log; stopped once the first pass is logged
        _, log = run_session(
            {**base, "fallback": False, "verbose": True, "runs": 0, "warmup": 0},
            work / f"{soc}-{tag}-probe",
            stop_at=PASS_2,
            timeout=timeout,
        )
        row = parse_log(log)
        row["why"] = explain(prep.qdq[tag], [n for n, _ in row["unsupported"]]) if row["unsupported"] else {}
        # 2. compile (offline context) + runs, fallback disabled unless (1) found unsupported nodes
        run_dir = work / f"{soc}-{tag}-run"
        job = {
            **base,
            "verbose": False,
            "profiling": "optrace",
            "context": str(run_dir / "ctx.onnx"),
            "runs": runs,
            "warmup": 1,
        }
        res, _ = run_session({**job, "fallback": bool(row["unsupported"])}, run_dir, timeout=timeout)
        row["no_fallback"] = bool(res.get("created")) and not row["unsupported"]
        row["error"] = "" if res.get("created") else res.get("error", "")
        if not res.get("created") and not row["unsupported"] and "timeout" not in row["error"]:
            res, _ = run_session({**job, "fallback": True}, run_dir, timeout=timeout)  # not an op: retry
        row["compile_s"] = res.get("create_s")
        row["context_bin_bytes"] = sum(p.stat().st_size for p in run_dir.glob("ctx*.bin")) or None
        row["context_onnx_bytes"] = sum(p.stat().st_size for p in run_dir.glob("ctx*.onnx")) or None
        row["wall_s"] = res.get("run_s", [])
        prof = parse_profile(run_dir / "profile.csv")
        row["cycles"], row["exec_us"] = prof["cycles"][1:], prof["exec_us"][1:]  # [0] is the warm-up
        row["schematic"] = parse_schematic(run_dir)
        row["outputs"] = _load_npz(run_dir / "outputs.npz") if (run_dir / "outputs.npz").is_file() else None
        for junk in [*run_dir.glob("ctx*"), *run_dir.glob("*_schematic.bin")]:
            junk.unlink()  # large; the numbers are kept
        rows[tag] = row
    ref = rows["MHA-QDQ"]["outputs"]
    for row in rows.values():
        row["htp_lsb"] = None
        if ref is not None and row["outputs"] is not None:
            row["htp_lsb"] = {k: _lsb_diff(ref[k], row["outputs"][k], prep.lsb.get(k)) for k in ref}
        row["fallback_in_diff"] = not (row["no_fallback"] and rows["MHA-QDQ"]["no_fallback"])
    for row in rows.values():
        row.pop("outputs")
    return rows


def _lsb_diff(a: np.ndarray, b: np.ndarray, unit: np.ndarray | None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if not diff.size:
        return 0.0
    return float((diff / unit).max() if unit is not None else diff.max())


# ----------------------------------------------------------------------------------------------------
# tables


def _spread(values: list[float], scale: float, fmt: str) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]"


def _max_lsb(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    name, worst = max(d.items(), key=lambda kv: kv[1])
    return "0" if worst == 0 else f"{worst:.3g} (`{name}`)"


def _count(types: dict[str, int], pattern: re.Pattern) -> int:
    return sum(n for t, n in types.items() if pattern.search(t))


def op_totals(sch: dict | None) -> tuple[str, str]:
    """'total (layout)' for the QNN graph and for the HTP-prepared runlist (pseudo ops not counted)."""
    if not sch:
        return "-", "-"
    real = {t: n for t, n in sch["htp"].items() if not HTP_PSEUDO_OP.match(t)}
    qnn = f"{sum(sch['qnn'].values())} ({_count(sch['qnn'], QNN_LAYOUT_OP)})"
    return qnn, f"{sum(real.values())} ({_count(real, LAYOUT_OP)})"


LEGEND = """\
Columns: *runs w/o CPU fallback*: the session is created with `session.disable_cpu_ep_fallback=1`.
*unsupported nodes*: nodes QNN rejects (`Unsupported nodes in QNN EP`). *nodes on QNN / total*: nodes
of the graph ORT hands to the EP (first GetCapability pass of the verbose log). *QNN ops (layout)*:
ops of the QNN graph ORT builds, Transpose + Reshape in brackets. *HTP-prepared ops (layout)*: ops of
the prepared graph's runlist without tile slices and syncs, Transpose + Reshape + ForceFormat (crouton
<-> flat) in brackets. *vs MHA*: max over outputs of max |x - x_MHA| in LSBs of MHA's output encoding
(worst output named; absolute difference for an output without an integer encoding); † = at least
one of the two ran with CPU fallback. *compile s*: session creation with `ep.context_enable=1`;
*context MB*: the `*_qnn.bin` written. *emu*: median [min-max] over the timed runs of the emulator's
cycles and execute time: host time, a sanity column only.
"""


def tables(results: list[dict]) -> str:
    out: list[str] = [LEGEND]
    for block in results:
        out.append(f"### {block['title']}, AIMET encodings {block['version']}\n")
        out.append(
            "| model | SoC | runs w/o CPU fallback | unsupported nodes | nodes on QNN / total | "
            "QNN ops (layout) | HTP-prepared ops (layout) | vs MHA on HTP, LSB | vs MHA on CPU QDQ, LSB | "
            "compile s | context MB | emu Mcycles | emu exec ms |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        why: dict[str, str] = {}
        for soc, rows in block["rows"].items():
            for tag, r in rows.items():
                uns = "-"
                if r["unsupported"]:
                    kinds = Counter(t for _, t in r["unsupported"])
                    uns = ", ".join(f"{n} {t}" for t, n in kinds.items())
                    for name, _ in r["unsupported"]:
                        why.setdefault(
                            f"{tag}: `{name}`", f"{r['why'].get(name, '')} ({r['reasons'].get(name, '')})"
                        )
                qnn, htp = op_totals(r["schematic"])
                nodes = f"{r['qnn_nodes']} / {r['total_nodes']}"
                if r["schematic"] and r["schematic"]["partitions"] > 1:
                    nodes += f" ({r['schematic']['partitions']} partitions)"
                diff = _max_lsb(r["htp_lsb"]) if r["htp_lsb"] is not None else "-"
                if r["htp_lsb"] is not None and r["fallback_in_diff"]:
                    diff += " †"
                cpu = _max_lsb(block["cpu_lsb"][tag])
                if tag == MODELS[0]:
                    diff = cpu = "ref"
                size = f"{r['context_bin_bytes'] / 2**20:.2f}" if r["context_bin_bytes"] else "-"
                comp = f"{r['compile_s']:.2f}" if r["compile_s"] is not None else "-"
                out.append(
                    f"| {tag} | {soc} | {'yes' if r['no_fallback'] else 'no'} | {uns} | {nodes} | {qnn} | {htp} | "
                    f"{diff} | {cpu} | {comp} | {size} | "
                    f"{_spread(r['cycles'], 1e-6, '.1f')} | {_spread(r['exec_us'], 1e-3, '.1f')} |"
                )
                if r["error"] and not r["unsupported"]:
                    out.append(f"| | | error: {r['error'][:200]} | | | | | | | | | | |")
        if why:
            out.append(
                "\nUnsupported nodes (ORT's reason, and the consumer that kept the DQ from joining a node unit):\n"
            )
            out.extend(f"- {k}: {v}" for k, v in why.items())
        soc0 = next(iter(block["rows"]))
        out.append(
            f"\n<details><summary>Op types, {soc0} (QNN graph, then the HTP-prepared runlist)</summary>\n"
        )
        out.append(op_type_table(block["rows"][soc0]))
        out.append("\n</details>\n")
    return "\n".join(out)


def op_type_table(rows: dict[str, dict]) -> str:
    lines = ["| graph | op type | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
    for level in ("qnn", "htp"):
        types: Counter = Counter()
        for r in rows.values():
            if r["schematic"]:
                types.update(r["schematic"][level])
        for t, _ in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])):
            cells = [str((r["schematic"] or {}).get(level, {}).get(t, 0)) for r in rows.values()]
            mark = ""
            if level == "htp" and HTP_PSEUDO_OP.match(t):
                mark = " (not counted)"
            elif (level == "htp" and LAYOUT_OP.search(t)) or (level == "qnn" and QNN_LAYOUT_OP.search(t)):
                mark = " **layout**"
            lines.append(
                f"| {'QNN' if level == 'qnn' else 'HTP'} | `{t}`{mark} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


MARK_BEGIN, MARK_END = "<!-- tables: begin (written by htp_layout.py) -->", "<!-- tables: end -->"


def write_results(text: str, command: str) -> None:
    """Replace the generated part of HTP_RESULTS.md (between the markers); keep the prose around it."""
    body = f"{MARK_BEGIN}\nGenerated by `{command}`.\n\n{text}\n{MARK_END}"
    old = RESULTS.read_text() if RESULTS.is_file() else ""
    if MARK_BEGIN in old and MARK_END in old:
        new = old[: old.index(MARK_BEGIN)] + body + old[old.index(MARK_END) + len(MARK_END) :]
    else:
        new = f"# MHA vs SHA vs SHA + Conv layout on the HTP emulator\n\n{body}\n"
    RESULTS.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the zoo model")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per model (after 1 warm-up)")
    parser.add_argument("--versions", default=",".join(VERSIONS), help="AIMET encodings versions, zoo model")
    parser.add_argument(
        "--wide-versions",
        default="2.0.0",
        help="AIMET encodings versions, wide model (1.0.0 adds ~6 min per SoC: SHA-conv-QDQ compiles slowly)",
    )
    parser.add_argument("--socs", default=",".join(SOCS))
    parser.add_argument(
        "--size", default="", help="wide model, e.g. hidden=1024,heads=16,kv_heads=4,layers=2"
    )
    parser.add_argument("--timeout", type=float, default=900, help="per HTP session, seconds")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mha2sha-htp-bench"))
    parser.add_argument("--no-write", action="store_true", help="print only, do not write HTP_RESULTS.md")
    parser.add_argument(
        "--tables", action="store_true", help="only re-render the tables of --work/results.json"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker)
    if args.tables:
        return report(Path(args.work), args.no_write)
    sys.path.insert(0, str(ROOT))  # tests.encodings.aimet_gen
    from mha2sha import zoo

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = Size(**{k: int(v) for k, v in (kv.split("=") for kv in args.size.split(",") if kv)})
    t0 = time.perf_counter()

    def zoo_model():
        calib = [zoo.example_inputs(ZOO_CASE), zoo.example_inputs(ZOO_CASE, seed=1)]
        return zoo.build(ZOO_CASE), calib, zoo.example_inputs(ZOO_CASE, seed=2)

    models = [
        (f"zoo `{ZOO_CASE}` ({Size(96, 8, 2, 12, 2, 3, 17, 160).label()})", "zoo", zoo_model, args.versions)
    ]
    if not args.quick:
        models.append((f"wide ({size.label()})", "wide", lambda: build_big(size, work), args.wide_versions))
    results = []
    for title, key, make, versions in models:
        model, calib, feeds = make()
        feeds_path = work / key / "eval.npz"
        feeds_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(feeds_path, **feeds)
        for version in versions.split(","):
            t = time.perf_counter()
            prep = prepare(model, calib, feeds, version, work / key)
            _say(t0, f"{key} {version}: encodings, conversions, QDQ models in {time.perf_counter() - t:.1f}s")
            block = {"title": title, "version": version, "rows": {}, "cpu_lsb": prep.cpu_lsb}
            for soc in args.socs.split(","):
                t = time.perf_counter()
                htp_dir = work / key / f"v{version}" / "htp"
                block["rows"][soc] = measure(prep, soc, feeds_path, htp_dir, args.runs, args.timeout)
                _say(t0, f"{key} {version} {soc}: {time.perf_counter() - t:.1f}s")
            results.append(block)
    command = " ".join(["python benchmarks/htp_layout.py", *sys.argv[1:]])
    (work / "results.json").write_text(
        json.dumps({"command": command, "blocks": results}, indent=1, default=str)
    )
    return report(work, args.no_write)


def report(work: Path, no_write: bool) -> int:
    """Print the tables of ``work/results.json`` and (unless ``no_write``) put them in HTP_RESULTS.md."""
    saved = json.loads((work / "results.json").read_text())
    text = tables(saved["blocks"])
    print(text)
    if not no_write:
        write_results(text, saved["command"])
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


def _say(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
