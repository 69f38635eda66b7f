"""Shared helpers of the AR/CL tests: zoo case lists and a checked ``build_ar`` run."""

from __future__ import annotations

from pathlib import Path

from mha2sha import zoo
from mha2sha.arcl.build import BuildArOptions, build_ar
from mha2sha.arcl.record import ArRecord

RTOL = 1e-5

#: Decoder step graphs (KV cache as I/O): every one must pass the token loop at AR 1, AR = heads, new CL.
STEP_CASES = [c for c, i in zoo.CASES.items() if i.kind in ("step", "prepared_step")]
#: Decoder prefill graphs (no KV cache): AR changes only, proven on one call.
PREFILL_CASES = [c for c, i in zoo.CASES.items() if i.kind == "prefill"]


def context(case: str) -> int:
    info = zoo.CASES[case]
    return info.seq_len + info.past_len


def build(source: Path, ars, cl, out: Path, **kw) -> ArRecord:
    """``build_ar`` with the token-loop proof forced; asserts every loop ran and passed."""
    options = kw.pop("options", None) or BuildArOptions(verify="full")
    record = build_ar(source, ars, cl, out, options=options, **kw)
    float_rows = [r for r in record.verification if r.mode == "float"]
    assert len(float_rows) == len(record.variants), record.notes
    for row in record.verification:
        assert row.ok, row
        assert row.unit != "rel" or row.logits_err <= RTOL and row.kv_err <= RTOL, row
    return record
