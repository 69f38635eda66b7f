"""Measure the two o_proj forms after the head split: (a) Concat + one projection, (b) per-head + Add tree.

Not a test (pytest does not collect it). Run: ``python -m tests.layout.bench_o_proj [--htp]``.

For each size the block is the end of a split attention layer: ``H`` per-head outputs ``[1,S,D]``
-> o_proj ``[H*D, C]``. Four graphs: (a)/(b) as MatMul (what ORT CPU runs best) and as the HTP
layout (LinearToConv + CancelLayout). Reported:
- ORT CPU: median latency (float32, all graph optimisations, 2 threads);
- with ``--htp`` (needs ``onnxruntime-qnn``): the QDQ model (A16W8: uint16 activations calibrated
  by min/max, int8 symmetric per-channel weights) on the QNN HTP backend (x86 emulator, SM8650,
  CPU fallback disabled): whether it compiles, the number of ops in the prepared HTP graph, the
  emulator's accelerator cycles (host emulation: compare the two forms with it, do not read it as
  device time), and the max difference from ORT CPU running the same QDQ model, in output LSBs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from mha2sha.encodings.remap import remap_encodings
from mha2sha.layout import CancelLayoutPass, LayoutRecord, LinearToConvPass, PerHeadOProjPass

from ._helpers import model, vi, weight
from ._quant import calibrate

SIZES = [  # (heads, head_dim, seq)
    (8, 64, 128),
    (32, 128, 128),  # LLaMA-7B attention, AR=128 prefill chunk
    (32, 128, 1),  # LLaMA-7B decode step
]


def o_proj_block(heads: int, head_dim: int, seq: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    return model(
        [
            helper.make_node("Concat", [f"h{i}" for i in range(heads)], ["attn"], axis=-1),
            helper.make_node("MatMul", ["attn", "W_o"], ["o_proj"], name="o_proj"),
        ],
        [vi(f"h{i}", [1, seq, head_dim]) for i in range(heads)],
        [vi("o_proj", [1, seq, hidden])],
        [weight(rng, (hidden, hidden), "W_o")],
        opset=21,
    )


def variants(proto: onnx.ModelProto) -> dict[str, ir.Model]:
    out = {}
    for per_head in (False, True):
        for htp in (False, True):
            m = ir.from_proto(copy.deepcopy(proto))
            if per_head:
                PerHeadOProjPass()(m)
            if htp:
                LinearToConvPass()(m)
                CancelLayoutPass()(m)
            out[f"{'b' if per_head else 'a'}-{'conv' if htp else 'matmul'}"] = m
    return out


def cpu_latency(m: ir.Model, feeds: dict[str, np.ndarray], runs: int = 30) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(), opts)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def htp_run(qdq: onnx.ModelProto, feeds: dict[str, np.ndarray], workdir: Path) -> dict[str, object]:
    import onnxruntime_qnn as oq

    with contextlib.suppress(Exception):  # already registered
        ort.register_execution_provider_library("QNNExecutionProvider", oq.get_library_path())
    path = workdir / "qdq.onnx"
    onnx.save(qdq, path)
    prof = workdir / "prof.csv"
    devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(
        devs,
        {
            "backend_type": "htp",
            "soc_model": "SM8650",
            "offload_graph_io_quantization": "0",
            "profiling_level": "optrace",
            "profiling_file_path": str(prof),
        },
    )
    cwd = os.getcwd()
    os.chdir(workdir)  # optrace profiling writes its schematic .bin files to the working directory
    try:
        sess = ort.InferenceSession(str(path), so)
        t = time.perf_counter()
        got = sess.run(None, feeds)[0]
        wall = time.perf_counter() - t
        del sess
    except Exception as e:
        return {"supported": False, "error": " ".join(str(e).split())[:200]}
    finally:
        os.chdir(cwd)
    ops, cycles = 0, 0
    with open(prof) as f:
        for row in csv.DictReader(f):
            if row["Message"] == "NODE" and not row["Event Identifier"].startswith(("Input", "Output")):
                ops += 1
            if row["Event Identifier"] == "Accelerator (execute) time (cycles)":
                cycles = int(row["Time"])
    cpu_opts = ort.SessionOptions()
    cpu_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(path), cpu_opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return {"supported": True, "ops": ops, "cycles": cycles, "wall_ms": wall * 1e3, "ref": ref, "got": got}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--htp", action="store_true", help="also run the QDQ models on the QNN HTP emulator")
    args = parser.parse_args()
    from mha2sha.verify.qdq import run_qdq, to_qdq

    print(
        "| heads x dim, seq | form | nodes | ORT CPU ms | QDQ vs (a) on CPU (LSB) | HTP ops | HTP emu cycles | HTP vs CPU (LSB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for heads, dim, seq in SIZES:
        proto = o_proj_block(heads, dim, seq)
        rng = np.random.default_rng(1)
        feeds = {f"h{i}": rng.standard_normal((1, seq, dim)).astype(np.float32) for i in range(heads)}
        quant: dict[str, tuple[ir.Model, object]] = {}
        for name, m in variants(proto).items():
            cpu = cpu_latency(m, feeds)
            row = f"| {heads}x{dim}, S={seq} | {name} | {len(m.graph)} | {cpu:.3f} |"
            if not args.htp:
                print(row)
                continue
            form = name[0]
            if name.endswith("matmul"):  # calibrate the MatMul form, as AIMET would see it
                quant[form] = (m, calibrate(m, feeds, act_bits=16))
                print(row + " | | | |")
                continue
            mm, enc = quant[form]
            conv = ir.from_proto(ir.serde.serialize_model(mm))
            record = LayoutRecord()
            LinearToConvPass(record, quantized=set(enc.activations))(conv)
            CancelLayoutPass(record)(conv)
            conv_enc = remap_encodings(enc, record, conv)
            lsb = float(quant["a"][1].activations["o_proj"].scale)
            ref_a = run_qdq(quant["a"][0], quant["a"][1], feeds)["o_proj"]
            vs_a = float(np.abs(run_qdq(conv, conv_enc, feeds)["o_proj"] - ref_a).max() / lsb)
            with tempfile.TemporaryDirectory() as tmp:
                r = htp_run(to_qdq(conv, conv_enc), feeds, Path(tmp))
            if r["supported"]:
                diff = float(np.abs(np.asarray(r["got"]) - np.asarray(r["ref"])).max() / lsb)
                print(row + f" {vs_a:.0f} | {r['ops']} | {r['cycles']} | {diff:.0f} |")
            else:
                print(row + f" {vs_a:.0f} | unsupported: {r['error']} | | |")


if __name__ == "__main__":
    main()
