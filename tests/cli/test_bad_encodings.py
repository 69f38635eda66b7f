"""Bad encodings: one line, exit 2, nothing written; unknown names are a warning in the report."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tests.cli.test_bad_input import assert_nothing_written, assert_one_line_error, run
from tests.split._graphs import attention_model


def _per_channel(name: str, channels: int) -> dict:
    return {"name": name, "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
            "scale": [0.01] * channels, "offset": [-128] * channels}  # fmt: skip


def _activation(name: str) -> dict:
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_TENSOR",
        "bw": 8,
        "is_sym": False,
        "scale": [0.05],
        "offset": [-128],
    }


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "attn.onnx"
    onnx.save(attention_model(4, 6, 8, (1, 1, 6, 6)), path)
    return path


def _write(tmp_path: Path, content: str | dict) -> Path:
    path = tmp_path / "model.encodings"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _doc(params: list[dict], activations: list[dict]) -> dict:
    return {
        "version": "1.0.0",
        "param_encodings": params,
        "activation_encodings": activations,
        "quantizer_args": {},
    }


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"version": "1.0.0", "param_encodings": [', "JSON"),
        ({"version": "9.9.9", "param_encodings": [], "activation_encodings": []}, "version"),
        (_doc([_per_channel("wq", 32), _per_channel("wq", 32)], []), "duplicate"),
        (_doc([_per_channel("wq", 7)], []), "wq"),  # 7 channels for a 32-channel weight
    ],
    ids=["malformed-json", "unknown-version", "duplicate-name", "wrong-channel-count"],
)
def test_bad_encodings_file(tmp_path, model_path, content, fragment):
    encodings = _write(tmp_path, content)
    proc = run("convert", str(model_path), "-o", str(tmp_path / "out"), "--encodings", str(encodings))
    assert_one_line_error(proc, fragment)
    assert_nothing_written(tmp_path / "out")


def test_unknown_name_is_a_warning_not_an_error(tmp_path, model_path):
    doc = _doc([_per_channel("wq", 32)], [_activation("scores"), _activation("not_a_tensor")])
    proc = run(
        "convert", str(model_path), "-o", str(tmp_path / "out"), "--encodings", str(_write(tmp_path, doc))
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "attn.report.json").read_text())
    assert "not_a_tensor" in json.dumps(report["encodings_coverage"])
    written = json.loads((tmp_path / "out" / "attn.encodings").read_text())
    names = {e["name"] for e in written["param_encodings"] + written["activation_encodings"]}
    assert {f"wq.h{h}" for h in range(4)} <= names and {f"scores.h{h}" for h in range(4)} <= names
    assert "not_a_tensor" not in names
