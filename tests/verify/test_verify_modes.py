"""``--verify {auto,full,blocks,none}``: whole-model vs blockwise verification inside ``convert``.

- full and blocks both pass on a zoo model and say which ran (result, report.json, CLI summary);
- auto picks full for a small model and blocks once the size limit is below its estimate;
- blockwise verification catches a broken conversion (a perturbed head) on lazily made inputs;
- inputs are checked at load time and made when verifying (same values as ``make_inputs``);
- whole-model extras (QDQ, goldens) are skipped with a note, or refused up front, when the
  model is too big for whole-model runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.cli import legacy_main, main
from mha2sha.errors import UserError
from mha2sha.io.load import load_model
from mha2sha.report.progress import PhaseTimer
from mha2sha.verify.blocks import verify_blocks
from mha2sha.verify.inputs import make_inputs, plan_inputs
from mha2sha.zoo import build

CASE = "llama_gqa_step"


@pytest.fixture(scope="module")
def source() -> Path:
    return build(CASE)


def _report(result) -> dict:
    path = next(p for p in result.files if p.name.endswith(".report.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("mode", ["full", "blocks"])
@pytest.mark.parametrize("per_head_kv_io", [False, True], ids=["kv-whole", "kv-per-head"])
def test_full_and_blocks_pass_and_report_their_mode(
    source: Path, tmp_path: Path, mode: str, per_head_kv_io: bool
):
    options = ConvertOptions(verify=mode, per_head_kv_io=per_head_kv_io)
    result = convert(source, tmp_path / "out", options=options)
    assert result.verification is not None and result.verification.ok, result.verification
    assert result.verification.max_rel_err <= 1e-5
    assert result.verify_mode == mode
    report = _report(result)["verification"]
    assert report["mode"] == mode and report["requested"] == mode and report["ok"]
    assert report["notes"] == []
    if mode == "blocks":  # rows are <block>/<output>, one or more per attention block
        names = [r["name"] for r in report["outputs"]]
        for block in result.split_blocks:
            assert any(n.startswith(block.name + "/") for n in names), (block.name, names)


def test_auto_picks_full_for_a_small_model_and_blocks_above_the_limit(source: Path, tmp_path: Path):
    small = convert(source, tmp_path / "a", options=ConvertOptions(verify="auto"))
    assert small.verify_mode == "full" and small.verification.ok
    plan = small.verify_plan
    assert plan is not None and 0 < plan.estimate_bytes <= plan.limit_bytes
    assert convert(source, tmp_path / "t", options=ConvertOptions(verify=True)).verify_mode == "full"

    limit = plan.estimate_bytes - 1
    big = convert(source, tmp_path / "b", options=ConvertOptions(verify="auto", full_verify_max_bytes=limit))
    assert big.verify_mode == "blocks" and big.verification.ok
    report = _report(big)["verification"]
    assert report["requested"] == "auto" and report["mode"] == "blocks"
    assert report["limit_bytes"] == limit < report["estimated_ort_bytes"]


def test_verify_none_and_bad_value(source: Path, tmp_path: Path):
    for off in (False, "none"):
        result = convert(source, tmp_path / str(off), options=ConvertOptions(verify=off))
        assert result.verification is None and result.verify_mode is None
        assert _report(result)["verification"] is None
    with pytest.raises(UserError, match="verify must be one of"):
        convert(source, tmp_path / "bad", options=ConvertOptions(verify="sometimes"))
    assert not (tmp_path / "bad").exists()


def test_blocks_catch_a_perturbed_head_on_lazy_inputs(source: Path, tmp_path: Path):
    convert(source, tmp_path / "out", options=ConvertOptions(verify="none"))
    original, converted = load_model(source), load_model(tmp_path / "out" / f"{source.stem}.onnx")
    inputs = plan_inputs(original, seed=0)  # made block by block inside verify_blocks
    assert verify_blocks(original, converted, inputs=inputs).ok

    inits = converted.graph.initializers
    name = next(
        n
        for n, v in inits.items()
        if n.endswith(".h1") and any("layers.1/self_attn/q_proj" in u.node.name for u in v.uses())
    )
    weight = inits[name].const_value.numpy()
    inits[name].const_value = ir.tensor(weight * np.float32(1.001), name=name)  # 0.1% off, one head
    check = verify_blocks(original, converted, inputs=inputs)
    assert not check.ok
    failed = [r.name for r in check.rows if not r.ok]
    assert failed and all("layers.1/" in n for n in failed), failed  # the second block only


def test_inputs_are_planned_early_and_made_late(source: Path, tmp_path: Path):
    model = load_model(source)
    planned = plan_inputs(model, seed=3)
    made = make_inputs(model, 3)
    assert list(planned) == list(made)
    for name, array in made.items():
        assert np.array_equal(planned[name], array) and planned[name].dtype == array.dtype
    assert planned.nbytes == sum(a.nbytes for a in made.values())

    # A bad --inputs file fails in the load phase: nothing split, saved or written.
    ids = made["input_ids"]
    np.savez(tmp_path / "bad.npz", input_ids=ids.astype(np.float32))
    timer = PhaseTimer()
    with pytest.raises(UserError, match="input_ids.*dtype float32"):
        convert(
            source, tmp_path / "out", options=ConvertOptions(inputs=str(tmp_path / "bad.npz")), timer=timer
        )
    assert [r.name for r in timer.records] == ["load"]
    assert not (tmp_path / "out").exists()

    # The user's arrays are used as given, in both modes.
    np.savez(tmp_path / "ok.npz", input_ids=np.zeros_like(ids))
    for mode in ("full", "blocks"):
        options = ConvertOptions(verify=mode, inputs=str(tmp_path / "ok.npz"))
        assert convert(source, tmp_path / mode, options=options).verification.ok


def test_input_lists_with_blocks(source: Path, tmp_path: Path):
    # Small model: the goldens come from one whole run of the original.
    options = ConvertOptions(verify="blocks", create_input_lists=True)
    result = convert(source, tmp_path / "ok", options=options)
    assert result.verify_mode == "blocks"
    assert (tmp_path / "ok" / "input_list.txt").exists() and any((tmp_path / "ok" / "goldens").iterdir())

    # Too big for whole-model runs: refused before any heavy work, nothing written.
    timer = PhaseTimer()
    options = ConvertOptions(verify="blocks", create_input_lists=True, full_verify_max_bytes=0)
    with pytest.raises(UserError, match="--create-input-lists need.*--verify full"):
        convert(source, tmp_path / "big", options=options, timer=timer)
    assert [r.name for r in timer.records] == ["load"]
    assert not (tmp_path / "big").exists()


def test_quantized_check_runs_block_by_block_when_too_big(source: Path, tmp_path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.encodings.calibrate import calibrate_all

    encodings = tmp_path / "model.encodings"
    encodings.write_text(json.dumps(calibrate_all(source, [make_inputs(load_model(source))])))

    whole = convert(source, tmp_path / "small", options=ConvertOptions(encodings=str(encodings)))
    assert whole.verify_mode == "full" and whole.verify.qdq_mode == "full" and whole.qdq_lsb is not None

    options = ConvertOptions(verify="auto", encodings=str(encodings), full_verify_max_bytes=0)
    blocks = convert(source, tmp_path / "big", options=options)
    assert blocks.verify_mode == "blocks" and blocks.verification.ok
    assert blocks.verify.qdq_mode == "blocks" and blocks.qdq_lsb is not None
    names = set(blocks.qdq_lsb)
    for block in blocks.split_blocks:  # one LSB number per block output
        assert any(n.startswith(block.name + "/") for n in names), (block.name, names)
    assert max(blocks.qdq_lsb.values()) <= 1
    report = _report(blocks)["verification"]
    assert report["notes"] == [] and report["proven"] == "float: block by block; quantized (QDQ): block by block"
    assert _report(blocks)["quantized_mode"] == "blocks"
    assert (tmp_path / "big" / f"{source.stem}.encodings").exists()


def test_cli_verify_option(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["convert", str(source), "-o", str(tmp_path / "b"), "--verify", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "Verify mode: blocks (--verify blocks" in out and "Verification (blocks)" in out
    assert _report_at(tmp_path / "b", source)["verification"]["mode"] == "blocks"

    assert main(["convert", str(source), "-o", str(tmp_path / "a")]) == 0
    assert "Verify mode: full (auto:" in capsys.readouterr().out

    assert main(["convert", str(source), "-o", str(tmp_path / "n"), "--no-verify"]) == 0
    assert _report_at(tmp_path / "n", source)["verification"] is None
    argv = [
        "--model-name",
        "m",
        "--exported-model-path",
        str(source),
        "--sha-export-path",
        str(tmp_path / "l"),
    ]
    assert legacy_main([*argv, "--no-verification"]) == 0
    assert json.loads((tmp_path / "l" / "m.report.json").read_text())["verification"] is None

    with pytest.raises(SystemExit) as exc:
        main(["convert", str(source), "-o", str(tmp_path / "x"), "--verify", "sometimes"])
    assert exc.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _report_at(out: Path, source: Path) -> dict:
    return json.loads((out / f"{source.stem}.report.json").read_text())


def test_a_run_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, monkeypatch) -> None:
    """Sizes whose activations exceed the machine's memory are bad input, not an OOM kill."""
    import mha2sha.verify.plan as plan

    monkeypatch.setattr(plan, "available_ram", lambda: 4096)  # bytes: every activation is too big
    model = zoo.build("llama_gqa_step", "torchscript")
    with pytest.raises(UserError, match="more memory than this machine has"):
        convert(model, tmp_path / "out", options=ConvertOptions())
    assert not (tmp_path / "out").exists()
