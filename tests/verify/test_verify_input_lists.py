"""write_input_lists: raw files, qnn-net-run input lists, goldens and shapes.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mha2sha.errors import UserError
from mha2sha.verify.input_lists import write_input_lists


def test_files_sizes_and_format(tmp_path: Path) -> None:
    inputs = {
        "input_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
        "attention_mask": np.zeros((1, 1, 8, 16), np.float16),
        "past_key_values.0/key": np.ones((1, 2, 4, 8), np.float32),
    }
    goldens = {"logits": np.ones((1, 8, 50), np.float32), "present.0/key": np.ones((2, 3), np.float16)}
    order = ["input_ids", "attention_mask", "past_key_values.0/key"]
    out = tmp_path / "lists"
    written = write_input_lists(out, inputs, goldens, order)
    root = out.resolve()
    assert all(p.resolve().is_relative_to(root) and p.exists() for p in written)

    assert (out / "inputs/input_ids.raw").stat().st_size == 8 * 8
    assert (out / "inputs/attention_mask.raw").stat().st_size == 8 * 16 * 2
    assert (out / "inputs/past_key_values.0_key.raw").stat().st_size == 64 * 4
    assert (out / "goldens/logits.raw").stat().st_size == 8 * 50 * 4
    assert (out / "goldens/present.0_key.raw").stat().st_size == 6 * 2
    back = np.fromfile(out / "inputs/input_ids.raw", dtype="<i8").reshape(1, 8)
    np.testing.assert_array_equal(back, inputs["input_ids"])

    host = (out / "input_list.txt").read_text()
    assert host.endswith("\n") and host.count("\n") == 1
    items = host.split()
    assert [i.split(":=")[0] for i in items] == order
    for item in items:
        path = Path(item.split(":=", 1)[1])
        assert path.is_absolute() and path.exists()
    device = (out / "on_device_input_list.txt").read_text().split()
    assert device[0] == "input_ids:=inputs/input_ids.raw"
    assert device[2] == "past_key_values.0/key:=inputs/past_key_values.0_key.raw"

    manifest = json.loads((out / "shapes.json").read_text())
    assert [e["name"] for e in manifest["inputs"]] == order
    assert manifest["inputs"][1] == {
        "name": "attention_mask",
        "file": "inputs/attention_mask.raw",
        "shape": [1, 1, 8, 16],
        "dtype": "float16",
    }
    assert [e["name"] for e in manifest["outputs"]] == ["logits", "present.0/key"]


def test_big_endian_arrays_are_written_little_endian(tmp_path: Path) -> None:
    x = np.arange(3, dtype=">f4")
    write_input_lists(tmp_path, {"x": x}, {}, ["x"])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "inputs/x.raw", dtype="<f4"), [0, 1, 2])


def test_name_collisions_and_bad_names(tmp_path: Path) -> None:
    a = np.zeros(1, np.float32)
    write_input_lists(tmp_path / "c", {"a/b": a, "a:b": a, "../x": a}, {}, ["a/b", "a:b", "../x"])
    files = sorted(p.name for p in (tmp_path / "c/inputs").iterdir())
    assert files == ["_x.raw", "a_b.raw", "a_b_1.raw"]
    with pytest.raises(UserError):
        write_input_lists(tmp_path / "d", {"a b": a}, {}, ["a b"])
    with pytest.raises(ValueError):
        write_input_lists(tmp_path / "e", {"a": a}, {}, ["a", "b"])
