"""Fault injection on a real process: every bad input or fault is one line and the right exit code,
the input is byte-for-byte unchanged, and the output folder holds exactly what it should.

Complements test_bad_input.py (missing / truncated / not-ONNX files, read-only output, output ==
input) and tests/scale/test_save_failures.py (disk full on a tmpfs, file-size limits).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.encodings.calibrate import calibrate_all
from tests.split._graphs import attention_model

CLI = [sys.executable, "-m", "mha2sha.cli"]
S = 6


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, hidden ones included."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def one_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "attn.onnx"
    path.parent.mkdir()
    onnx.save(attention_model(4, S, 8, (1, 1, S, S)), path)
    return path


@pytest.fixture
def encodings(model: Path) -> Path:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, S, 32)).astype(np.float32), "mask": np.zeros((1, 1, S, S), np.float32)}]
    path = model.with_suffix(".encodings")
    path.write_text(json.dumps(calibrate_all(model, feeds, bits=8)))
    return path


# -- data loss and leftovers ------------------------------------------------------------------


def test_user_files_in_output_subfolders_survive(tmp_path, model) -> None:
    out = tmp_path / "o"
    (out / "inputs").mkdir(parents=True)
    (out / "inputs" / "mine.txt").write_text("x")
    (out / "goldens").mkdir()
    (out / "goldens" / "keep.raw").write_bytes(b"1")
    proc = run("convert", str(model), "-o", str(out), "--create-input-lists")
    assert proc.returncode == 0, proc.stderr
    assert (out / "inputs" / "mine.txt").read_text() == "x" and (out / "goldens" / "keep.raw").exists()
    assert (out / "inputs" / "x.raw").exists()


def test_rerun_replaces_outputs_as_a_set(tmp_path, model, encodings) -> None:
    """An older run's .encodings does not survive beside a model converted without encodings."""
    out = tmp_path / "o"
    assert run("convert", str(model), "-o", str(out), "--encodings", str(encodings)).returncode == 0
    assert (out / "attn.encodings").exists()
    (out / "notes.txt").write_text("mine")
    assert run("convert", str(model), "-o", str(out)).returncode == 0
    assert listing(out) == ["attn.onnx", "attn.report.html", "attn.report.json", "mha_to_sha_names.json", "notes.txt"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_mid_run_leaves_nothing(tmp_path, model, sig, code) -> None:
    """Stopped while its staging folder exists, the process ends with one line and removes it."""
    out = tmp_path / "o"
    out.mkdir()
    before = digest(model)
    proc = subprocess.Popen(
        [*CLI, "convert", str(model), "-o", str(out), "--create-input-lists"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background (`make test &`) ignores SIGINT, and so would the child:
        # Python turns SIGINT into KeyboardInterrupt only when it was not ignored at start
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".mha2sha-") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "finished before a signal could be sent"
        time.sleep(0.001)
    proc.send_signal(signal.SIGSTOP)  # hold it inside the staging phase
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in stderr
    assert listing(out) == [] and digest(model) == before


def test_staging_folder_of_a_killed_run_is_removed_next_time(tmp_path, model) -> None:
    out = tmp_path / "o"
    dead = out / ".mha2sha-999999999-abc"  # no such process
    dead.mkdir(parents=True)
    (dead / "attn.onnx").write_bytes(b"half")
    alive = out / f".mha2sha-{os.getpid()}-xyz"  # a running process's staging folder is left alone
    alive.mkdir()
    assert run("convert", str(model), "-o", str(out)).returncode == 0
    assert not dead.exists() and alive.exists()


def test_concurrent_runs_into_one_folder(tmp_path, model) -> None:
    out = tmp_path / "o"
    procs = [subprocess.Popen([*CLI, "convert", str(model), "-o", str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(3)]  # fmt: skip
    assert all(p.wait(timeout=180) == 0 for p in procs)
    assert listing(out) == ["attn.onnx", "attn.report.html", "attn.report.json", "mha_to_sha_names.json"]
    assert onnx.load(out / "attn.onnx") is not None


# -- success reported for what did not happen ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--input-shape", "x=1,0,32"], ["dims must be >= 1"]),
        (["--input-shape", "x=1,7,32"], ["conflicts with the model's static shape [1,6,32]"]),
        (["--input-shape", "x=1,6,32,1"], ["rank"]),
        (["--rtol", "-1"], ["--rtol"]),
        (["--rtol", "nan"], ["--rtol"]),
        (["--max-lsb", "-5"], ["--max-lsb"]),
        (["--name", ".."], ["--name"]),
        (["--name", "a/b"], ["--name"]),
        (["--seq-len", "0"], ["--seq-len"]),
    ],
    ids=["zero-dim", "conflicting-dim", "wrong-rank", "rtol-negative", "rtol-nan", "max-lsb-negative",
         "name-dotdot", "name-slash", "seq-len-zero"],
)  # fmt: skip
def test_bad_arguments(tmp_path, model, args, fragments) -> None:
    before = digest(model)
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), *args), 2, *fragments)
    assert listing(tmp_path / "o") == [] and digest(model) == before


def test_empty_output_folder_name(tmp_path, model) -> None:
    one_line(run("convert", str(model), "-o", ""), 2, "output folder")


def test_non_finite_inputs(tmp_path, model) -> None:
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.full((1, S, 32), np.nan, np.float32), mask=np.zeros((1, 1, S, S), np.float32))
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), "--inputs", str(feeds)), 2, "NaN/inf", "'x'")
    assert listing(tmp_path / "o") == []


def test_inputs_missing_from_the_npz_are_named(tmp_path, model) -> None:
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.ones((1, S, 32), np.float32))
    out = tmp_path / "o"
    proc = run("convert", str(model), "-o", str(out), "--inputs", str(feeds))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "attn.report.json").read_text())
    assert any("mask" in note for note in report["verification"]["notes"])


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda e: e["activation_encodings"][0].update(scale=[float("nan")]), "scale nan"),
        (lambda e: e["activation_encodings"][0].update(scale=[0.0]), "scale 0.0"),
        (lambda e: e["activation_encodings"][0].update(scale=[-1.0]), "scale -1.0"),
        (lambda e: e["activation_encodings"][0].update(bw=64), "bitwidth 64"),
        (lambda e: e["activation_encodings"][0].update(bw=3), "bitwidth 3"),
        (lambda e: e["activation_encodings"][0].update(offset=[-9999.0]), "zero point"),
    ],
    ids=["nan-scale", "zero-scale", "negative-scale", "bitwidth-64", "bitwidth-3", "offset-off-grid"],
)
def test_invalid_quantization_values(tmp_path, model, encodings, mutate, fragment) -> None:
    doc = json.loads(encodings.read_text())
    mutate(doc)
    bad = tmp_path / "bad.encodings"
    bad.write_text(json.dumps(doc))
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), "--encodings", str(bad)), 2, fragment)
    assert listing(tmp_path / "o") == []


def test_encodings_of_another_model(tmp_path, model, encodings) -> None:
    doc = json.loads(encodings.read_text())
    for section in ("activation_encodings", "param_encodings"):
        for entry in doc[section]:
            entry["name"] = "other/" + entry["name"]
    other = tmp_path / "other.encodings"
    other.write_text(json.dumps(doc))
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), "--encodings", str(other)), 2, "another model")


def test_encodings_top_level_array(tmp_path, model) -> None:
    bad = tmp_path / "array.encodings"
    bad.write_text("[1, 2]")
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), "--encodings", str(bad)), 2, "JSON object")


def test_verify_htp_without_encodings(tmp_path, model) -> None:
    one_line(run("convert", str(model), "-o", str(tmp_path / "o"), "--verify-htp"), 2, "--encodings")


def test_verify_htp_with_no_verify(tmp_path, model, encodings) -> None:
    args = ["convert", str(model), "-o", str(tmp_path / "o"), "--encodings", str(encodings), "--verify-htp"]
    one_line(run(*args, "--no-verify"), 2, "--no-verify")


@pytest.mark.parametrize("soc", ["SM9999", "foo", "8650"])
def test_bad_soc(tmp_path, model, encodings, soc) -> None:
    """A SoC the HTP backend does not know is one line listing the ones it does, before any work
    (a name it does not know it would otherwise ignore, running as its default target)."""
    args = ["convert", str(model), "-o", str(tmp_path / "o"), "--encodings", str(encodings), "--verify-htp"]
    if soc.isdigit():  # numeric ids are the backend's to judge: only with onnxruntime-qnn
        pytest.importorskip("onnxruntime_qnn")
    line = one_line(run(*args, "--soc", soc), 2, f"--soc '{soc}'", "SM8650", "SM8750")
    assert "Traceback" not in line and listing(tmp_path / "o") == []


def test_external_data_outside_the_model_folder(tmp_path, model) -> None:
    proto = onnx.load(model)
    onnx.save(proto, model, save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(proto, model)
    (model.parent / "w.bin").rename(tmp_path / "w.bin")
    one_line(run("convert", str(model), "-o", str(tmp_path / "o")), 2, "outside the model's folder")


# -- small ----------------------------------------------------------------------------------------


def test_force_on_no_attention_says_what_it_wrote(tmp_path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph), src)
    proc = run("convert", str(src), "-o", str(tmp_path / "o"), "--force")
    assert proc.returncode == 0 and "nothing written" not in proc.stdout and "Wrote" in proc.stdout


def test_output_paths_with_spaces_and_file_modes(tmp_path, model, encodings) -> None:
    out = tmp_path / "my outputs"
    proc = run("convert", str(model), "-o", str(out), "--create-input-lists", "--encodings", str(encodings))
    assert proc.returncode == 0, proc.stderr
    entries = (out / "input_list.txt").read_text().split()
    assert all(e.split(":=", 1)[1].startswith("inputs/") for e in entries)  # relative: no broken path
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["attn.encodings"] == modes["attn.onnx"], modes


def test_piped_tables_are_not_cut(tmp_path, model) -> None:
    out = tmp_path / ("a_rather_long_folder_name_" * 4)
    proc = run("convert", str(model), "-o", str(out))
    assert proc.returncode == 0
    assert str(out / "attn.onnx") in proc.stdout
