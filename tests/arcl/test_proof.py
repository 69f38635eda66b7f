"""The token loop has teeth: a rewrite that gets the positions wrong fails the proof, nothing written."""

from __future__ import annotations

import pytest

from mha2sha import zoo
from mha2sha.arcl import tables
from mha2sha.arcl.build import BuildArOptions, build_ar
from mha2sha.arcl.record import VerificationFailed


def test_wrong_query_positions_fail(tmp_path, monkeypatch):
    """HF's baked ``cache_position`` table re-made without the new past length: every token of the
    new graph would see a wrong causal window."""
    original = tables.regenerate

    def wrong(array, dims, ar0, p0, ar, past):
        new, meaning = original(array, dims, ar0, p0, ar, past)
        if "positions past+i" in meaning:
            new = new - (past - p0)  # positions that still start at the old past length
        return new, meaning

    monkeypatch.setattr("mha2sha.arcl.rewrite.regenerate", wrong)
    out = tmp_path / "out"
    with pytest.raises(VerificationFailed, match="differs from the original"):
        build_ar(zoo.build("llama_step"), [1], 24, out, options=BuildArOptions(verify="full"))
    assert not out.exists() or not any(out.iterdir())


def test_no_verify_writes_unproven(tmp_path):
    record = build_ar(zoo.build("llama_step"), [1], None, tmp_path, options=BuildArOptions(verify="none"))
    assert record.verify_mode == "none" and not record.verification and record.variants[0].path.exists()
