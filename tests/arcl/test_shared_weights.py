"""Variants of one run share ONE weights file, load on their own, keep every name, carry the encodings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort

from mha2sha import zoo
from mha2sha.io.load import load_model
from mha2sha.io.names import tensor_names
from mha2sha.verify.inputs import make_inputs
from mha2sha.verify.runner import run_model
from tests.arcl._helpers import build
from tests.encodings.calibrate import calibrate_all


def _external(path):
    """{initializer: (location, offset, length)} of the external tensors of ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def test_variants_share_one_weights_file(tmp_path):
    source = zoo.build("prepared_llama_gqa_step")
    enc_file = tmp_path / "model.encodings"
    enc_file.write_text(json.dumps(calibrate_all(source, [make_inputs(load_model(source))], bits=16)))
    out = tmp_path / "out"
    record = build(source, [1, 8], 24, out, encodings=enc_file)

    data = [p for p in out.iterdir() if p.suffix == ".data"]
    assert [p.name for p in data] == ["model.data"]
    refs = [_external(v.path) for v in record.variants]
    assert refs[0] and all(r == refs[0] for r in refs)  # the same tensors at the same offsets
    assert {loc for loc, _, _ in refs[0].values()} == {"model.data"}
    lengths = sum(length for _, _, length in refs[0].values())
    assert lengths <= data[0].stat().st_size < lengths + 4096 * len(refs[0])  # each weight once
    weights = sum(v.const_value.nbytes for v in load_model(source).graph.initializers.values()
                  if v.const_value.dtype.is_floating_point())  # fmt: skip
    assert lengths == weights  # every float weight is shared, none duplicated in a graph
    assert all(v.path.stat().st_size < 64 * 1024 for v in record.variants)

    source_names = tensor_names(load_model(source))
    source_nodes = {n.name for n in load_model(source).graph}
    encoded = json.loads(enc_file.read_text())
    for variant in record.variants:
        # alone in a folder with the weights: loads and runs in onnxruntime
        alone = tmp_path / f"alone_ar{variant.ar}"
        alone.mkdir()
        shutil.copy(variant.path, alone)
        shutil.copy(data[0], alone)
        ort.InferenceSession(str(alone / variant.path.name), providers=["CPUExecutionProvider"])
        model = load_model(alone / variant.path.name)
        got = run_model(alone / variant.path.name, make_inputs(model))
        assert all(np.isfinite(a).all() for a in got.values())
        # names kept: every tensor and node of the source, so the encodings apply unchanged
        assert source_names <= tensor_names(model)
        assert source_nodes == {n.name for n in model.graph}
        assert variant.encodings is not None and variant.encodings.read_text() == enc_file.read_text()
        for section in ("activation_encodings", "param_encodings"):
            assert {e["name"] for e in encoded[section]} <= tensor_names(model)
    assert any(r.mode == "qdq" for r in record.verification)


def test_external_weights_file_is_copied_whole(tmp_path):
    """An input with its weights in one external file: the shared file is a byte copy of it (the
    cost of a cp), each tensor at its input offset, and both variants still run on their own."""
    model = onnx.load(str(zoo.build("llama_gqa_step")))
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save(model, source, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    record = build(source, [1, 8], 24, tmp_path / "out")
    copied = tmp_path / "out" / "model.data"
    assert copied.read_bytes() == (source.parent / "weights.bin").read_bytes()
    original = {name: (off, n) for name, (_, off, n) in _external(source).items()}
    for variant in record.variants:
        refs = _external(variant.path)
        assert {name: (off, n) for name, (_, off, n) in refs.items() if name in original} == {
            name: ref for name, ref in original.items() if name in refs
        }
