"""onnxruntime-genai's Llama on the HTP emulator: lowered, split, HTP layout, quantized, no CPU fallback.

The genai model builder writes ``com.microsoft.GroupQueryAttention`` (RoPE inside, ``seqlens_k`` from
``ReduceSum(attention_mask) - 1``, total length from ``Shape(attention_mask)``). With batch 1 and
static shapes the lowering knows where the new entries go (the op defines the total length as the
batch's longest ``seqlens_k + 1``), so the lowered graph has no index math: RoPE positions and the
mask are constants and ``present`` is the cache ``Concat(past, new)`` itself. The quantized MHA
model (the lowered graph, min/max encodings: 16-bit activations, 8-bit per-channel weights) and the
converted SHA model (``--target htp``) both run on the HTP emulator with CPU fallback disabled and
agree within ``--max-lsb`` (1 LSB).
"""

from __future__ import annotations

import json

import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.prepare import prepare_for_split
from mha2sha.io.save import save_model
from mha2sha.lower import lower_fused_ops
from mha2sha.verify.htp import htp_available
from mha2sha.verify.inputs import parse_input_shapes, plan_inputs
from mha2sha.zoo import thirdparty as tp
from tests.encodings.calibrate import calibrate_all

pytestmark = pytest.mark.skipif(not htp_available(), reason="onnxruntime-qnn is not installed")

#: index math the dynamic GroupQueryAttention lowering needs (ragged batches); none is left here
_INDEX_OPS = {"GatherElements", "Where", "Less", "ReduceSum", "Range", "Cast", "Max", "Min"}


def test_genai_llama_runs_on_htp_and_sha_matches_mha(tmp_path) -> None:
    graph = next(g for g in tp.thirdparty_graphs() if g.id == "genai_llama")
    try:
        path = graph.path()
    except tp.ToolUnavailable as e:
        pytest.skip(f"{graph.tool} cannot be installed here: {e}")
    shapes = parse_input_shapes(graph.input_shape_args()[1::2])

    # the MHA side: the genai graph as the converter's lowering stage leaves it
    model = load_model(path)
    fix_input_shapes(model, shapes)
    record = lower_fused_ops(model)
    prepare_for_split(model)
    assert not record.refused and {op for _, op, _ in record.lowered} >= {"com.microsoft.GroupQueryAttention"}
    left = {n.op_type for n in model.graph} & _INDEX_OPS
    assert not left, f"index math left in the lowered graph: {sorted(left)}"
    mha = tmp_path / "genai_llama.onnx"
    save_model(model, mha)

    # min/max encodings of every float tensor (data movement sharing its input's, as AIMET's
    # configs do; masked scores saturating at -100 instead of stretching the grid to finfo.min)
    feeds = [dict(plan_inputs(model, seed)) for seed in (0, 1)]
    encodings = tmp_path / "genai_llama.encodings"
    doc = calibrate_all(mha, feeds, bits=16, per_channel=True, mask_floor=-100.0, data_movement_inherits=True)
    encodings.write_text(json.dumps(doc))

    options = ConvertOptions(encodings=str(encodings), htp_layout=True, verify_htp=True)
    result = convert(mha, tmp_path / "out", options=options)
    assert result.split_blocks and result.complete
    check = result.htp
    assert check is not None and not check.error
    assert check.sha_on_htp_only and not check.sha_unsupported, check.sha_unsupported
    assert check.mha_on_htp_only and not check.mha_unsupported and not check.cpu_fallback_used
    assert check.ok and max(check.max_lsb.values()) <= options.max_lsb, check.max_lsb
    report = json.loads((tmp_path / "out" / "genai_llama.report.json").read_text())
    assert report["htp"]["ok"] is True
