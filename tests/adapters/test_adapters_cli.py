"""The adapters on the command line: bad adapter input is one line, exit 2, nothing written; the
original tool's ``--lora-model --lora-adaptor-list`` and ``MHA2SHAConverter(lora_adaptor_list=)`` work
through the one flag translation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from mha2sha.legacy import MHA2SHAConverter
from mha2sha.legacy import main as legacy_main
from tests.adapters._lora_models import lora_case, lora_tensors
from tests.cli.test_bad_input import assert_nothing_written, assert_one_line_error, run
from tests.cli.test_commands import _files

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def case():
    return lora_case("llama")


def _adapter(folder: Path, case, tensors: dict[str, np.ndarray] | None = None, **entry) -> Path:
    """A list with one adapter ``bad``: the ``french`` weights, changed by ``tensors``."""
    weights = load_file(str(case.weights("french")))
    weights.update(tensors or {})
    save_file({k: v for k, v in weights.items() if v is not None}, str(folder / "bad.safetensors"))
    listing = folder / "bad.yaml"
    doc = {"name": "bad", "safetensor_path": "bad.safetensors", **entry}
    listing.write_text(yaml.safe_dump({"lora_adaptor_list": [doc]}))
    return listing


def _convert(case, listing: Path | str, out: Path, *more: str):
    return run("convert", str(case.model), "--lora-adaptor-list", str(listing), "-o", str(out), *more)


def test_missing_and_malformed_list(case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_line_error(_convert(case, tmp_path / "nope.yaml", out), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_adaptor_list:\n  - name: [x\n")
    assert_one_line_error(_convert(case, bad, out), "malformed YAML")
    bad.write_text("lora_adaptor_list:\n  - name: x\n    safetensor_path: gone.safetensors\n")
    assert_one_line_error(_convert(case, bad, out), "gone.safetensors does not exist")
    assert_nothing_written(out)


def _cases(case) -> list[tuple[dict, dict, str]]:
    graph = lora_tensors(case)
    a = np.zeros((graph[A].shape[0], 4), np.float32)
    return [
        ({"nope.weight": a}, {}, "tensor 'nope.weight' is not an initializer or input of the graph"),
        ({A: np.zeros((graph[A].shape[0] + 1, 4), np.float32)}, {}, f"tensor '{A}' has shape"),
        ({A: a.astype(np.float16)}, {}, "is float16, the graph's is float (F32)"),
        ({A: np.zeros((graph[A].shape[0], 16), np.float32)}, {}, "LoRA rank 16 (axis 1), above the graph's 8"),
        ({A: np.zeros((graph[A].shape[0], 2), np.float32)}, {}, "has LoRA rank 2 but"),
        ({}, {"alpha": 8}, "only --lora-alpha-from-input uses"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_adapter_tensors(case, tmp_path: Path, index: int) -> None:
    tensors, entry, fragment = _cases(case)[index]
    listing = _adapter(tmp_path, case, tensors, **entry)
    out = tmp_path / "out"
    assert_one_line_error(_convert(case, listing, out), "adapter 'bad'", fragment)
    assert_nothing_written(out)


def test_encodings_naming_unknown_tensors(case, tmp_path: Path) -> None:
    encodings = tmp_path / "bad.encodings"
    entry = {"name": "not_a_tensor", "enc_type": "PER_TENSOR", "dtype": "INT", "bw": 16, "is_sym": False,
             "scale": [0.001], "offset": [0]}  # fmt: skip
    known = {**entry, "name": A}
    encodings.write_text(json.dumps({"version": "1.0.0", "activation_encodings": [entry], "param_encodings": [known]}))
    listing = _adapter(tmp_path, case, encodings_path=str(encodings))
    out = tmp_path / "out"
    assert_one_line_error(_convert(case, listing, out), "adapter 'bad'", "1 tensor(s) the graph does not have", "'not_a_tensor'")
    assert_nothing_written(out)


def test_alpha_from_input_needs_the_list(case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run("convert", str(case.model), "--lora-alpha-from-input", "-o", str(out))
    assert_one_line_error(proc, "--lora-alpha-from-input needs --lora-adaptor-list")
    assert_nothing_written(out)


def test_convert_prints_one_row_per_adapter(case, tmp_path: Path) -> None:
    proc = _convert(case, case.yaml("alpha"), tmp_path / "out", "--lora-alpha-from-input")
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapters" in proc.stdout and "lora_alpha" in proc.stdout
    for name in ("french", "oasst", "tiny"):
        assert any(line.strip("│ ").startswith(name) for line in proc.stdout.splitlines()), proc.stdout
    # ``mha2sha verify`` proves it again: the lora_alpha input gets the original's scale
    for mode in ("full", "blocks"):
        again = run("verify", str(case.model), str(tmp_path / "out" / "model.onnx"), "--verify", mode)
        assert again.returncode == 0 and f"verify {mode}: PASS" in again.stdout, again.stdout + again.stderr


def test_original_cli_and_python_api(case, tmp_path: Path) -> None:
    """``mha2sha-onnx-converter --lora-model --lora-adaptor-list Y`` as the original tool ran it, and
    ``MHA2SHAConverter(..., lora_adaptor_list=Y)``: the same files."""
    argv = [
        "--model-name", "m", "--exported-model-path", str(case.model), "--sha-export-path", str(tmp_path / "cli"),
        "--lora-model", "--lora-adaptor-list", str(case.yaml("alpha")), "--lora-alpha-from-input", "--mha-conv",
    ]  # fmt: skip
    assert legacy_main(argv) == 0
    flags = {"lora_model": True, "lora_adaptor_list": str(case.yaml("alpha")), "lora_alpha_from_input": True,
             "mha_conv": True}  # fmt: skip
    _, status = MHA2SHAConverter("m", tmp_path / "api", case.model, **flags).convert()
    assert status is True
    cli, api = _files(tmp_path / "cli"), _files(tmp_path / "api")
    assert cli == api
    assert {"adapters.yaml", "adapters/french/french.safetensors", "adapters/tiny/tiny.names.json"} <= set(cli)
