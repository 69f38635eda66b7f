"""The adapter list: the original tool's format, aimet-onnx's top-level list, QAIRT's ``use_case``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mha2sha.adapters import read_adapter_list
from mha2sha.errors import UserError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("a.safetensors", "a.encodings", "b.safetensors"):
        (tmp_path / "w" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "w" / name).write_text("x")
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "adapters.yaml"
    path.write_text(text)
    return path


def test_original_format_paths_relative_to_the_yaml(files: Path) -> None:
    path = _write(
        files,
        "lora_adaptor_list:\n"
        "  - name: a\n    safetensor_path: w/a.safetensors\n    encodings_path: w/a.encodings\n"
        "  - name: b\n    safetensor_path: w/b.safetensors\n    alpha: 16\n",
    )
    a, b = read_adapter_list(path)
    assert (a.name, a.weights, a.encodings, a.alpha) == ("a", files / "w/a.safetensors", files / "w/a.encodings", None)
    assert (b.name, b.encodings, b.alpha, b.scale) == ("b", None, 16.0, None)


def test_top_level_list_and_qairt_use_case(files: Path) -> None:
    listed = _write(files, "- name: a\n  safetensor_path: w/a.safetensors\n  encodings_path: w/a.encodings\n")
    assert [e.name for e in read_adapter_list(listed)] == ["a"]
    qairt = _write(
        files,
        "use_case:\n  - name: a\n    model_name: model.onnx\n    lora_weights: w/a.safetensors\n"
        "    quant_overrides: w/a.encodings\n    output_path: ./output\n    lora_alpha: 2\n",
    )
    (entry,) = read_adapter_list(qairt)
    assert entry.weights == files / "w/a.safetensors" and entry.encodings == files / "w/a.encodings"
    assert entry.scale == 2.0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lora_adaptor_list: [a, b\n", "malformed YAML"),
        ("adapters:\n  - name: a\n", "expected a 'lora_adaptor_list:'"),
        ("lora_adaptor_list: {name: a}\n", "must be a list"),
        ("lora_adaptor_list: []\n", "no adapters"),
        ("lora_adaptor_list:\n  - safetensor_path: w/a.safetensors\n", "'name' is missing"),
        ("lora_adaptor_list:\n  - name: ../x\n    safetensor_path: w/a.safetensors\n", "plain file name"),
        ("lora_adaptor_list:\n  - name: a\n", "'safetensor_path' (or 'lora_weights') is missing"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/nope.safetensors\n", "does not exist"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/a.safetensors\n    encodings_path: no.enc\n",
         "encodings"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/a.safetensors\n    encoding_path: w/a.encodings\n",
         "unknown key(s) encoding_path"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/a.safetensors\n    lora_weights: w/b.safetensors\n",
         "not both"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/a.safetensors\n    alpha: -1\n", "positive"),
        ("lora_adaptor_list:\n  - name: a\n    safetensor_path: w/a.safetensors\n"
         "  - name: a\n    safetensor_path: w/b.safetensors\n", "two adapters are named 'a'"),
    ],
)  # fmt: skip
def test_bad_lists_are_one_line_errors(files: Path, text: str, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        read_adapter_list(_write(files, text))
    message = str(err.value)
    assert fragment in message and "\n" not in message and "adapters.yaml" in message


def test_missing_list(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_adapter_list(tmp_path / "nope.yaml")
