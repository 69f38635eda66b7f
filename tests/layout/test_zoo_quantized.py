"""Quantized equivalence on the model zoo: the SHA model, with and without the HTP layout, computes
what the MHA model computes once both carry their encodings as QDQ.

Every split pair of ``test_zoo_layout`` (each zoo case exported with torchscript, the focus cases
with dynamo too) is calibrated once (min/max over the zoo's traced inputs and a redraw: 16-bit
activations, int8 per-channel weights, a 1.0.0 file) and converted with ``htp_layout`` off and on.
The conversion itself runs the float verification and the CPU QDQ gate; the test states the same
contract explicitly: the quantized outputs are within 1 LSB of the MHA model's, or, where float
summation order flipped a rounding that grew downstream, every quantized tensor is within 1 LSB
given the MHA model's quantized inputs. Encoding coverage must be complete and every written
encoding must name a tensor of the output model. A W8A8 (per-tensor) variant runs on four cases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from mha2sha import zoo
from mha2sha.api import ConversionResult, ConvertOptions, convert
from mha2sha.verify.qdq import max_steps
from tests.encodings.calibrate import calibrate_all

from .test_zoo_layout import SHA_PAIRS

MAX_LSB = 1.0
W8A8_CASES = ["llama_gqa_step", "bert", "clip_vision", "prepared_llama_gqa_step"]

_CALIBRATED: dict[tuple[str, str, int, bool], tuple[Path, Path, Path]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo_quantized")


def _calibrated(
    case: str, exporter: str, bits: int, per_channel: bool, workdir: Path
) -> tuple[Path, Path, Path]:
    """(model, .encodings, .npz of the verification inputs); calibrated once for both layouts."""
    key = (case, exporter, bits, per_channel)
    if key not in _CALIBRATED:
        source = zoo.build(case, exporter)
        feeds = [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]
        here = workdir / f"{case}-{exporter}-{bits}{'pc' if per_channel else 'pt'}"
        here.mkdir()
        encodings = here / "model.encodings"
        encodings.write_text(json.dumps(calibrate_all(source, feeds, bits=bits, per_channel=per_channel)))
        graph_inputs = {i.name for i in onnx.load(str(source), load_external_data=False).graph.input}
        inputs = here / "inputs.npz"
        np.savez(inputs, **{k: v for k, v in feeds[0].items() if k in graph_inputs})
        _CALIBRATED[key] = source, encodings, inputs
    return _CALIBRATED[key]


def _convert(case: str, exporter: str, htp_layout: bool, bits: int, per_channel: bool, workdir: Path):
    source, encodings, inputs = _calibrated(case, exporter, bits, per_channel, workdir)
    out_dir = workdir / f"{case}-{exporter}-{bits}{'pc' if per_channel else 'pt'}" / f"htp{int(htp_layout)}"
    options = ConvertOptions(encodings=str(encodings), inputs=str(inputs), htp_layout=htp_layout)
    logging.disable(logging.WARNING)
    try:
        result = convert(source, out_dir, options=options)
    finally:
        logging.disable(logging.NOTSET)
    _check(result, out_dir)
    assert result.coverage.ok, result.coverage.dropped  # GPT-2's Split outputs: folded into their Reshape


def _check(result: ConversionResult, out_dir: Path) -> None:
    assert result.verification is not None and result.verification.ok
    # the quantized contract of the conversion, stated explicitly
    outputs = {v.name for v in result.model.graph.outputs}
    assert result.qdq_lsb is not None and set(result.qdq_lsb) == outputs
    worst = max(result.qdq_lsb.values())
    local = result.qdq_local
    if worst > MAX_LSB:
        assert local is not None and local.tensors, f"outputs differ by {worst} LSB, no local check ran"
        bad = local.first_above(MAX_LSB)
        assert bad is None, f"{bad.name} (of {bad.origin}) differs by {bad.lsb} LSB given MHA's inputs"
    else:
        assert local is None  # bit-exact or within 1 LSB: the tensor-by-tensor check is not needed
    # coverage: every quantized MHA tensor has all its SHA counterparts encoded
    coverage = result.coverage
    assert coverage is not None
    assert not coverage.missing, dict(list(coverage.missing.items())[:5])
    # every written encoding names a tensor of the written model
    (model_file,) = [f for f in result.files if f.suffix == ".onnx"]
    (enc_file,) = [f for f in result.files if f.suffix == ".encodings"]
    assert model_file.parent == enc_file.parent == out_dir
    graph = onnx.load(str(model_file), load_external_data=False).graph
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names |= {o for n in graph.node for o in n.output if o}
    written = json.loads(enc_file.read_text())
    assert written["version"] == "1.0.0"
    encoded = [e["name"] for kind in ("activation_encodings", "param_encodings") for e in written[kind]]
    assert encoded
    unknown = sorted(set(encoded) - names)
    assert not unknown, unknown[:5]


@pytest.mark.parametrize("htp_layout", [False, True], ids=["sha", "htp"])
@pytest.mark.parametrize(("case", "exporter"), SHA_PAIRS, ids=[f"{c}-{e}" for c, e in SHA_PAIRS])
def test_w8a16_per_channel(case: str, exporter: str, htp_layout: bool, workdir: Path) -> None:
    _convert(case, exporter, htp_layout, 16, True, workdir)


@pytest.mark.parametrize("case", W8A8_CASES)
def test_w8a8_htp_layout(case: str, workdir: Path) -> None:
    _convert(case, "torchscript", True, 8, False, workdir)


def test_max_steps_masked_scores() -> None:
    """Masked scores are -inf in both models: equal, not NaN, so they hide no other difference."""
    inf, nan = np.inf, np.nan
    a = np.array([-inf, 0.0, 5.0])
    assert max_steps(a, np.array([-inf, 0.0, 5.0]), np.asarray(1.0)) == 0.0
    assert max_steps(a, np.array([-inf, 0.0, 2.0]), np.asarray(1.0)) == 3.0
    assert max_steps(a, np.array([nan, 0.0, 5.0]), np.asarray(1.0)) == inf
    assert max_steps(np.array([nan, 1.0]), np.array([nan, 1.0]), None) == 0.0
