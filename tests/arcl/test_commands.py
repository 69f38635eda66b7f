"""The AR/CL front doors: ``mha2sha build-ar``, ``mha2sha convert --ar``, the original tool's
``--build-ar`` (CLI and Python API) and ``mha2sha verify`` on step graphs of another AR / CL."""

from __future__ import annotations

import json

from mha2sha import zoo
from mha2sha.arcl.contract import compare_step_graphs
from mha2sha.cli import legacy_main, main
from mha2sha.legacy import MHA2SHAConverter
from tests.arcl._helpers import RTOL

CASE = "prepared_llama_gqa_step"


def test_build_ar_command(tmp_path, capsys):
    source = zoo.build(CASE)
    assert main(["build-ar", str(source), "--ar", "1,8", "--cl", "24", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "model_ar1_cl24.onnx" in out and "model_ar8_cl24.onnx" in out
    report = json.loads((tmp_path / "model.ar.report.json").read_text())
    assert [(v["ar"], v["cl"]) for v in report["variants"]] == [(1, 24), (8, 24)]
    assert all(r["ok"] for r in report["verification"]["rows"])
    # verify picks the token loop by itself for graphs of another AR / CL
    assert main(["verify", str(source), str(tmp_path / "model_ar1_cl24.onnx")]) == 0
    assert "verify loop: PASS" in capsys.readouterr().out
    # and it catches another model
    assert main(["verify", str(zoo.build("prepared_llama_gqa_ar1")), str(tmp_path / "model_ar8_cl24.onnx")]) == 0
    other = zoo.build("llama_gqa_step")
    checks, _, _ = compare_step_graphs(other, zoo.build("llama_gqa_step", ar=1, cl=17))
    assert all(c.ok and c.max_err <= RTOL for c in checks)


def test_convert_with_ar(tmp_path, capsys):
    """Split + HTP layout proven at AR 3, then AR 1 and AR 8 of the converted graph, one weights file."""
    source = zoo.build(CASE)
    argv = ["convert", str(source), "-o", str(tmp_path), "--target", "htp", "--ar", "1,8", "--cl", "24"]
    assert main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "mha_to_sha_names.json", "model.ar.report.json", "model.data", "model.report.json",
        "model_ar1_cl24.onnx", "model_ar8_cl24.onnx",
    ]  # fmt: skip
    report = json.loads((tmp_path / "model.ar.report.json").read_text())
    assert all(r["ok"] and r["logits_err"] <= RTOL for r in report["verification"]["rows"])
    convert_report = json.loads((tmp_path / "model.report.json").read_text())
    assert convert_report["verification"]["ok"]


def test_original_tool_build_ar(tmp_path):
    source = zoo.build("llama_gqa_step")
    argv = ["--model-name", "llama", "--exported-model-path", str(source), "--sha-export-path", str(tmp_path / "cli"),
            "--build-ar", "1", "--gqa-model", "--handle-rope-ops"]  # fmt: skip
    assert legacy_main(argv) == 0
    assert (tmp_path / "cli" / "llama_ar1_cl17.onnx").exists()
    model, status = MHA2SHAConverter("llama", tmp_path / "api", source, build_ar=1).convert()
    assert status is True
    assert [list(v.shape) for v in model.graph.inputs][0] == [1, 1]
