"""The command line's contract: subcommands, one translation of the old flags, exit code 3."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mha2sha import zoo
from mha2sha.cli import main
from mha2sha.commands.options import LEGACY_LATER, options_from_flags
from mha2sha.legacy import MHA2SHAConverter
from mha2sha.legacy import main as legacy_main
from tests.encodings.aimet_gen import aimet_encodings
from tests.split._graphs import attention_model

CASE = "llama_gqa_step"


def _files(folder: Path) -> dict[str, str]:
    """Every output file's content hash, the reports (timings, dates) excepted."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith((".report.json", ".report.html")):
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_old_cli_and_old_python_api_agree(tmp_path: Path) -> None:
    """The same old flags give the same files through either door, encodings included."""
    calibration = [zoo.example_inputs(CASE), zoo.example_inputs(CASE, seed=1)]
    model, encodings = aimet_encodings(zoo.build(CASE), calibration, config="w8a16", version="1.0.0")
    flags = {"exported_model_encoding_path": str(encodings), "mha_conv": True, "handle_rope_ops": True}
    argv = [
        "--model-name", "m", "--exported-model-path", str(model), "--sha-export-path", str(tmp_path / "cli"),
        "--exported-model-encoding-path", str(encodings), "--mha-conv", "--handle-rope-ops",
    ]  # fmt: skip
    assert legacy_main(argv) == 0
    _, status = MHA2SHAConverter("m", tmp_path / "api", model, **flags).convert()
    assert status is True
    cli_files, api_files = _files(tmp_path / "cli"), _files(tmp_path / "api")
    assert "m.encodings" in cli_files and cli_files == api_files
    options = options_from_flags(flags)
    assert options.htp_layout and options.encodings == str(encodings)


def test_translation_understands_both_spellings() -> None:
    old = options_from_flags({"no_verification": True, "nchw_aligned": True, "exported_model_encoding_path": "e"})
    new = options_from_flags({"verify": "none", "target": "htp", "encodings": "e"})
    assert old == new


def test_every_original_flag_is_implemented(tmp_path: Path, capsys) -> None:
    """No flag of the original tool is refused any more; a bad adapter list is still one line."""
    assert LEGACY_LATER == ()
    src = tmp_path / "attn.onnx"
    onnx.save(attention_model(4, 6, 8, None), src)
    argv = ["--model-name", "m", "--exported-model-path", str(src), "--sha-export-path", str(tmp_path / "out"),
            "--lora-model", "--lora-adaptor-list", str(tmp_path / "a.yaml")]  # fmt: skip
    assert legacy_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: adapter list") and "does not exist" in err[0]


def test_verify_subcommand(tmp_path: Path, capsys) -> None:
    model = zoo.build(CASE, "torchscript")
    assert main(["convert", str(model), "-o", str(tmp_path), "--no-verify"]) == 0
    for mode in ("blocks", "full"):
        assert main(["verify", str(model), str(tmp_path / "model.onnx"), "--verify", mode]) == 0
        assert f"verify {mode}: PASS" in capsys.readouterr().out
    # a wrong model fails the proof: exit 1
    other = zoo.build("llama_step", "torchscript")
    assert main(["verify", str(other), str(tmp_path / "model.onnx"), "--verify", "full"]) != 0


def test_our_own_failure_is_exit_3_with_a_log(tmp_path: Path) -> None:
    """An exception inside a stage is a bug of ours: one line naming the stage and a log file."""
    src = tmp_path / "m.onnx"
    onnx.save(attention_model(4, 6, 8, None), src)
    code = (
        "import sys\n"
        "import mha2sha.split.split_heads as s\n"
        "def boom(self, model): raise ZeroDivisionError('injected')\n"
        "s.SplitHeadsPass.plan = boom\n"
        "from mha2sha.cli import main\n"
        f"sys.exit(main(['convert', {str(src)!r}, '-o', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error in stage 'split heads'" in lines[0] and "Traceback" not in proc.stderr
    log = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "ZeroDivisionError: injected" in log.read_text()
    log.unlink()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["verify", "--help"]])
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: mha2sha" in capsys.readouterr().out


def test_command_ends_fast_with_its_output_flushed(tmp_path: Path) -> None:
    """``python -m mha2sha.cli`` / the ``mha2sha`` script skip the interpreter's teardown
    (``os._exit``): the exit code, the printed summary and the files are all there before it."""
    src = tmp_path / "m.onnx"
    onnx.save(attention_model(4, 6, 8, None), src)
    proc = subprocess.run([sys.executable, "-m", "mha2sha.cli", "convert", str(src), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Verification" in proc.stdout and "total" in proc.stdout
    assert (tmp_path / "out" / "m.onnx").is_file() and (tmp_path / "out" / "m.report.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "mha2sha.cli", "convert", str(tmp_path / "none.onnx"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_convert_leaves_the_garbage_collector_as_found(tmp_path: Path) -> None:
    """The job freezes the model's objects out of the cyclic collector while it runs and unfreezes
    them after; a caller that froze objects itself keeps its own frozen set, nothing added."""
    import gc

    from mha2sha.api import convert

    src = tmp_path / "m.onnx"
    onnx.save(attention_model(4, 6, 8, None), src)
    assert gc.get_freeze_count() == 0
    convert(src, tmp_path / "a")
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        convert(src, tmp_path / "b")
        # never more (the job froze nothing of its own); a few fewer: frozen objects still die by refcount
        assert frozen - 100 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
