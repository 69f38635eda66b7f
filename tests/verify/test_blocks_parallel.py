"""Blockwise verification in parallel, with one session per block structure, float and QDQ.

- the result does not depend on the number of worker threads, nor on the original side having been
  computed ahead (while the conversion was saved) from the converted model still in memory;
- the quantized proof runs block by block (QDQ of each block pair with its encodings) and names a
  wrongly sliced per-head weight encoding, or a wrong activation encoding, where it is;
- a wrong head still fails (float), and then the quantized check does not run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings
from mha2sha.errors import ConversionFailed
from mha2sha.io.load import load_model
from mha2sha.verify.blocks import BlockCheck, BlockQuantized, check_blocks, find_blocks
from mha2sha.verify.inputs import make_inputs
from mha2sha.zoo import build
from tests.encodings.calibrate import calibrate_all
from tests.split._graphs import attention_model, causal_mask

CASE = "llama_gqa_step"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("blocks_parallel")
    source = build(CASE)
    feeds = [make_inputs(load_model(source), seed) for seed in (0, 1)]
    encodings = work / "model.encodings"
    encodings.write_text(json.dumps(calibrate_all(source, feeds, bits=16, per_channel=True)))
    options = ConvertOptions(verify="none", encodings=str(encodings))
    result = convert(source, work / "out", options=options)
    origins = {p.name: (t.original, p.ranges) for t in result.record.tensors.values() for p in t.pieces}
    return {
        "source": source,
        "saved": work / "out" / f"{source.stem}.onnx",
        "encodings": encodings,
        "sha_encodings": work / "out" / f"{source.stem}.encodings",
        "origins": origins,
        "model": result.model,
    }


def _quantized(c: dict, sha_encodings=None) -> BlockQuantized:
    original = load_model(c["source"])
    mha = load_encodings(str(c["encodings"]), model=original)
    sha = sha_encodings or load_encodings(str(c["sha_encodings"]), model=load_model(c["saved"]))
    return BlockQuantized(mha, sha, c["origins"], 1.0)


def _q_pieces(model, layer: int) -> list[str]:
    """The per-head q_proj weights of ``layer`` (exporter names: found by the node reading them)."""
    inits = model.graph.initializers
    return sorted(
        (
            n
            for n, v in inits.items()
            if any(f"layers.{layer}/self_attn/q_proj" in u.node.name for u in v.uses())
        ),
        key=lambda n: int(n.rsplit(".h", 1)[1]),
    )


def _rows(check) -> list[tuple]:
    return [(r.name, r.ok, r.max_abs_err, r.max_rel_err, r.note) for r in check.float.rows]


def test_parallel_result_equals_serial(converted: dict) -> None:
    results = []
    for workers in (1, 2, 3):
        check = check_blocks(
            load_model(converted["source"]), load_model(converted["saved"]), workers=workers,
            quantized=_quantized(converted),
        )  # fmt: skip
        assert check.float.ok and check.qdq_failure is None
        assert check.workers == min(
            workers, len(find_blocks(load_model(converted["source"]), load_model(converted["saved"])))
        )
        results.append(check)
    serial = results[0]
    assert serial.qdq_lsb and max(serial.qdq_lsb.values()) <= 1
    for other in results[1:]:
        assert _rows(other) == _rows(serial)
        assert other.qdq_lsb == serial.qdq_lsb
    # blocks of one structure share their sessions: far fewer sessions than block runs
    assert serial.sessions <= 8


def test_computed_ahead_from_the_model_in_memory_equals_checked_after(converted: dict) -> None:
    original = load_model(converted["source"])
    plain = check_blocks(original, load_model(converted["saved"]), quantized=_quantized(converted))
    with BlockCheck(
        load_model(converted["source"]), converted["model"], quantized=_quantized(converted)
    ) as check:
        check.start()
        check.wait()
        ahead = check.run(load_model(converted["saved"]))
    blocks = len(find_blocks(original, load_model(converted["saved"])))
    # every block was checked whole on the model in memory; the saved blocks matched it byte for byte
    assert ahead.ahead == ahead.checked_ahead == blocks
    assert _rows(ahead) == _rows(plain) and ahead.qdq_lsb == plain.qdq_lsb


def test_a_block_checked_ahead_is_checked_again_when_the_saved_block_differs(converted: dict) -> None:
    """Checked ahead on the model in memory, then the saved file holds other bytes (two heads'
    q weights swapped): that block's result computed ahead must not count; checked again, it fails."""
    sha = load_model(converted["saved"])
    inits = sha.graph.initializers
    h0, h1 = _q_pieces(sha, 0)[:2]
    inits[h0].const_value, inits[h1].const_value = inits[h1].const_value, inits[h0].const_value
    with BlockCheck(
        load_model(converted["source"]), converted["model"], quantized=_quantized(converted)
    ) as check:
        check.start()
        check.wait()
        result = check.run(sha)
    blocks = len(check.blocks)
    assert result.ahead == blocks and result.checked_ahead == blocks - 1
    assert not result.float.ok
    assert all("layers.0/" in r.name for r in result.float.rows if not r.ok)


def test_a_swapped_head_fails_before_the_quantized_check(converted: dict) -> None:
    sha = load_model(converted["saved"])
    inits = sha.graph.initializers
    h0, h1 = _q_pieces(sha, 0)[:2]
    inits[h0].const_value, inits[h1].const_value = inits[h1].const_value, inits[h0].const_value
    check = check_blocks(load_model(converted["source"]), sha, quantized=_quantized(converted))
    assert not check.float.ok
    assert all("layers.0/" in r.name for r in check.float.rows if not r.ok)
    assert check.qdq_lsb is None


# -- through convert: the wide attention of tests/verify/test_qdq_local.py, block by block ------------

HEADS, SEQ, HEAD_DIM = 16, 64, 64


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wide_blocks")
    onnx.save(attention_model(HEADS, SEQ, HEAD_DIM, (1, 1, SEQ, SEQ)), work / "m.onnx")
    x = np.random.default_rng(0).normal(size=(1, SEQ, HEADS * HEAD_DIM)).astype(np.float32)
    calibration = [{"x": x, "mask": causal_mask((1, 1, SEQ, SEQ))}]
    encodings = calibrate_all(work / "m.onnx", calibration, bits=16, per_channel=True)
    (work / "m.encodings").write_text(json.dumps(encodings))
    return work


def test_blockwise_qdq_names_a_wrongly_sliced_weight_encoding(wide: Path) -> None:
    """Head 0's q weight quantized with head 1's channel scales: the float model is right, only the
    quantized proof can see it, and it names the head."""
    options = ConvertOptions(verify="none", encodings=str(wide / "m.encodings"))
    result = convert(wide / "m.onnx", wide / "slice", options=options)
    origins = {p.name: (t.original, p.ranges) for t in result.record.tensors.values() for p in t.pieces}
    saved = load_model(wide / "slice" / "m.onnx")
    sha = load_encodings(str(wide / "slice" / "m.encodings"), model=saved)
    a, b = sha.params["wq.h0"], sha.params["wq.h1"]
    assert a.enc_type == "PER_CHANNEL" and not np.array_equal(a.scale, b.scale)
    mha = load_encodings(str(wide / "m.encodings"), model=load_model(wide / "m.onnx"))
    good = check_blocks(load_model(wide / "m.onnx"), saved, quantized=BlockQuantized(mha, sha, origins))
    assert good.float.ok and good.qdq_failure is None

    a.scale, b.scale = b.scale.copy(), a.scale.copy()
    bad = check_blocks(load_model(wide / "m.onnx"), saved, quantized=BlockQuantized(mha, sha, origins))
    assert bad.float.ok  # the float model is right
    assert bad.qdq_failure is not None and "quantized verification failed in block" in bad.qdq_failure
    first = bad.qdq_local.first_above(1.0)
    assert first is not None and first.name in ("q_proj.h0", "q_proj.h1") and first.lsb > 1, first


def test_convert_proves_the_quantized_model_block_by_block(wide: Path) -> None:
    options = ConvertOptions(encodings=str(wide / "m.encodings"), verify="blocks")
    result = convert(wide / "m.onnx", wide / "out", options=options)
    assert result.verification.ok and result.verify.qdq_mode == "blocks"
    assert result.qdq_lsb and all(k.count("/") >= 1 for k in result.qdq_lsb)
    if max(result.qdq_lsb.values()) > 1:  # float summation order: decided tensor by tensor
        assert result.qdq_local is not None and max(t.lsb for t in result.qdq_local.tensors) <= 1
    report = json.loads((wide / "out" / "m.report.json").read_text())
    assert report["verification"]["proven"] == "float: block by block; quantized (QDQ): block by block"


def test_a_wrong_activation_encoding_fails_the_conversion_block_by_block(
    wide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mha2sha.job as job

    real = job.propagate

    def broken(*args, **kwargs):
        sha, coverage = real(*args, **kwargs)
        sha.activations["attn.h5"].scale = sha.activations["attn.h5"].scale * 0.5  # values clip
        return sha, coverage

    monkeypatch.setattr(job, "propagate", broken)
    options = ConvertOptions(encodings=str(wide / "m.encodings"), verify="blocks")
    with pytest.raises(ConversionFailed, match=r"'attn\.h5' \(head piece of 'attn'\) differs .* LSB"):
        convert(wide / "m.onnx", wide / "bad", options=options)
    assert not (wide / "bad" / "m.onnx").exists()
