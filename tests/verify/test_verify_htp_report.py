"""What --verify-htp says and keeps, without the emulator: the summary lines and the report entry."""

from __future__ import annotations

import json

from mha2sha.report.tables import htp_summary
from mha2sha.verify.htp import HtpCheck
from mha2sha.verify.htp_local import HtpDivergence


def _check(divergence: HtpDivergence | None) -> HtpCheck:
    return HtpCheck(
        "SM8650", True, [], True, [], False, {"logits": 3.0, "present": 0.0}, ok=False, divergence=divergence,
        outputs=({}, {}),
    )  # fmt: skip


def test_summary_names_the_first_diverging_tensor_and_whose() -> None:
    d = HtpDivergence(
        "q.h1", "q", 1.0, 1, 272, ["MatMul", "Add"], True, 0.0, "htp", 84, 52, "act", 8.0, False, "known: x"
    )
    text = htp_summary(_check(d))
    assert "max 3 LSB ('logits')" in text
    assert "first diverging tensor on HTP: 'q.h1' (head piece of 'q'), 1 LSB on 1/272 values" in text
    assert "HTP's own arithmetic" in text and "known: x" in text


def test_report_entry_keeps_the_divergence_not_the_outputs() -> None:
    d = HtpDivergence("w.h2", "w", 5.0, 9, 64, ["MatMul"], True, 6.0, "conversion", 10, 3, "y", 9.0, False)
    entry = _check(d).to_dict()
    assert "outputs" not in entry and entry["ok"] is False
    assert entry["first_divergence"]["whose"] == "conversion" and entry["first_divergence"]["cpu_lsb"] == 6.0
    json.dumps(entry)  # plain JSON
    assert "the conversion's" in d.explain()
    assert _check(None).to_dict()["first_divergence"] is None
