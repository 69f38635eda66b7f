"""With --encodings the variants are also proven quantized: both QDQ models through the token loop,
every token's logits and the cache within 1 LSB of the original's."""

from __future__ import annotations

import json

import pytest

from mha2sha import zoo
from mha2sha.io.load import load_model
from mha2sha.verify.inputs import make_inputs
from tests.arcl._helpers import build
from tests.encodings.calibrate import calibrate_all


@pytest.mark.parametrize(
    ("case", "bits"), [("prepared_llama_gqa_step", 16), ("llama_gqa_step", 16), ("qwen3_step", 8)]
)
def test_quantized_token_loop(case, bits, tmp_path):
    source = zoo.build(case)
    enc_file = tmp_path / "model.encodings"
    enc_file.write_text(
        json.dumps(
            calibrate_all(source, [make_inputs(load_model(source), seed=s) for s in range(3)], bits=bits)
        )
    )
    record = build(source, [1, zoo.CASES[case].heads], 24, tmp_path / "out", encodings=enc_file)
    qdq = [r for r in record.verification if r.mode == "qdq"]
    assert len(qdq) == 2 and all(r.unit == "lsb" and r.logits_err <= 1 for r in qdq), qdq
