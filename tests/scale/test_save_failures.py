"""Failures while writing, and sharded external data.

Every failure is real, never mocked:
- the file size limit (``RLIMIT_FSIZE`` in the child; CPython ignores SIGXFSZ, so a write past it
  fails with EFBIG "File too large") while writing the model or its external data: always run;
- a full disk (ENOSPC) on a small tmpfs, sized from a reference run so the write fails at a chosen
  file (a data shard, the .onnx, the name map, the report): skipped where tmpfs cannot be mounted;
- the input's external data truncated or deleted after the model was loaded, before it is saved
  (weights are read lazily while saving): a phase hook of the real CLI run does it.

Each failure must exit 2 with one line naming the file and the reason, leave the output folder as
it was (pre-existing files byte-identical, no staging folder), and leave the input untouched.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from mha2sha import cli
from mha2sha.api import ConvertOptions, convert
from mha2sha.commands import guard
from mha2sha.errors import UserError
from mha2sha.io.load import load_model
from mha2sha.io.save import parse_size, save_model
from mha2sha.report.progress import PhaseTimer
from tests.split._graphs import attention_model

# The CLI in a child whose file size limit is argv[1] bytes.
_LIMITED_CLI = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "from mha2sha.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def run(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}
    if fsize is None:
        command = [sys.executable, "-m", "mha2sha.cli", *args]
    else:
        command = [sys.executable, "-c", _LIMITED_CLI, str(fsize), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every entry under ``folder`` (hidden ones too): relative path -> sha256 (or 'dir')."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line_error(stderr: str, code: int, *patterns: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for pattern in patterns:
        assert re.search(pattern, lines[0], re.IGNORECASE), (pattern, lines[0])
    return lines[0]


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """Weights embedded: the .onnx is the largest file written."""
    path = tmp_path / "in" / "attn.onnx"
    path.parent.mkdir()
    onnx.save(attention_model(4, 6, 8, (1, 1, 6, 6)), path)
    return path


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """8 heads of 64, four 1 MiB weights in ``attn.data`` (each per-head slice is 128 KiB)."""
    path = tmp_path / "in" / "attn.onnx"
    path.parent.mkdir(exist_ok=True)
    ir.save(ir.from_proto(attention_model(8, 16, 64, None)), path, external_data="attn.data")
    return path


def inputs_of(model: Path) -> dict[str, str]:
    return snapshot(model.parent) or {}


def prefill(out: Path) -> None:
    """What a previous run (and the user) left in the output folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("keep me\n")
    (out / "attn.onnx").write_bytes(b"previous model")
    (out / "mha_to_sha_names.json").write_text("{}")


# -- file size limit (EFBIG): always runs ----------------------------------------------------------


def test_file_size_limit_while_writing_the_model(tmp_path, small_model):
    out = tmp_path / "out"
    prefill(out)
    before, inputs = snapshot(out), inputs_of(small_model)
    proc = run("convert", str(small_model), "-o", str(out), fsize=4096)
    assert_one_line_error(
        proc.stderr, proc.returncode, re.escape(f"could not write {out / 'attn.onnx'}: "), "file too large"
    )
    assert snapshot(out) == before
    assert inputs_of(small_model) == inputs


@pytest.mark.parametrize(
    ("shard_size", "data_file"), [("1GB", r"attn\.data"), ("600KB", r"attn-00001-of-\d{5}\.data")]
)
def test_file_size_limit_while_writing_external_data(tmp_path, external_model, shard_size, data_file):
    out = tmp_path / "new" / "out"  # does not exist: must not exist afterwards either
    inputs = inputs_of(external_model)
    proc = run("convert", str(external_model), "-o", str(out), "--shard-size", shard_size, fsize=300_000)
    assert_one_line_error(
        proc.stderr,
        proc.returncode,
        re.escape(f"could not write {out}/") + data_file + ": ",
        "file too large",
    )
    assert not (tmp_path / "new").exists()
    assert inputs_of(external_model) == inputs


# -- disk full (ENOSPC) on a tmpfs: where it can be mounted ----------------------------------------

PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("tmpfs disk-full tests need Linux and mount(8)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "mha2sha-test", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _used(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("fail_at", ["shard 2", "model", "name map", "report"])
def test_disk_full(tmp_path, tmpfs, external_model, fail_at):
    args = ["--shard-size", "600KB"]
    ref = tmpfs / "ref"
    proc = run("convert", str(external_model), "-o", str(ref), *args)
    assert proc.returncode == 0, proc.stderr
    # Pages each file takes on the tmpfs, in the order they are written.
    shards = sorted(ref.glob("attn-*-of-*.data"))
    order = [*shards, ref / "attn.onnx", ref / "mha_to_sha_names.json", ref / "attn.report.json"]
    pages = [math.ceil(p.stat().st_blocks * 512 / PAGE) for p in order]
    target = {"shard 2": 1, "model": len(shards), "name map": len(shards) + 1, "report": len(shards) + 2}[
        fail_at
    ]
    budget = (sum(pages[:target]) + pages[target] - 1) * PAGE  # one page short of the target file
    shutil.rmtree(ref)

    out = tmpfs / "out"
    prefill(out)
    before, inputs = snapshot(out), inputs_of(external_model)
    subprocess.run(["mount", "-o", f"remount,size={_used(tmpfs) + budget}", str(tmpfs)], check=True)
    proc = run("convert", str(external_model), "-o", str(out), *args)
    name = order[target].name
    assert_one_line_error(
        proc.stderr, proc.returncode, re.escape(f"could not write {out / name}: "), "no space left on device"
    )
    assert snapshot(out) == before
    assert inputs_of(external_model) == inputs


# -- the input's external data changes between load and save ---------------------------------------


def _run_cli_with_save_hook(monkeypatch, capsys, action, *args: str) -> tuple[int, str]:
    """The real CLI in this process; ``action`` runs when the save phase starts (after loading)."""

    class SaveHook(PhaseTimer):
        def phase(self, name, total=None):
            if name == "save":
                action()
            return super().phase(name, total)

    monkeypatch.setattr(guard, "PhaseTimer", SaveHook)
    code = cli.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("change", ["truncated", "missing"])
def test_external_data_changed_after_load(tmp_path, monkeypatch, capsys, external_model, change):
    data = external_model.with_name("attn.data")
    size = data.stat().st_size

    def damage():
        if change == "missing":
            data.unlink()
        else:
            with open(data, "r+b") as f:
                f.truncate(size // 2)

    out = tmp_path / "out"
    prefill(out)
    before = snapshot(out)
    code, err = _run_cli_with_save_hook(
        monkeypatch, capsys, damage, "convert", str(external_model), "-o", str(out)
    )
    damaged = inputs_of(external_model)
    assert_one_line_error(
        err, code, f"external data file {change}: {re.escape(str(data))}", "after the model was loaded"
    )
    assert snapshot(out) == before
    assert inputs_of(external_model) == damaged  # the tool read the input, never wrote it


@pytest.mark.parametrize("change", ["truncated", "missing"])
def test_streamed_tensor_read_checks_its_file(tmp_path, external_model, change):
    """The per-tensor check behind the pre-save one: a clear error, never SIGBUS or a ValueError."""
    model = load_model(external_model)
    data = external_model.with_name("attn.data")
    if change == "missing":
        data.unlink()
    else:
        os.truncate(data, 1000)
    tensor = model.graph.initializers["wk"].const_value
    with pytest.raises(UserError, match=f"external data file {change}: .*'wk'"):
        tensor.numpy()
    with (
        open(tmp_path / "copy.bin", "wb") as f,
        pytest.raises(UserError, match=f"external data file {change}"),
    ):
        tensor.tofile(f)


def test_output_would_overwrite_the_inputs_external_data(tmp_path, external_model):
    """``--name`` whose .data is the input's external file: refused, the input kept intact."""
    src = external_model.with_name("src.onnx")
    external_model.rename(src)  # src.onnx still points at attn.data
    inputs = inputs_of(src)
    proc = run(
        "convert", str(src), "-o", str(src.parent), "--name", "attn", "--shard-size", "1GB", "--no-verify"
    )
    assert_one_line_error(proc.stderr, proc.returncode, "would overwrite the input's external data")
    assert inputs_of(src) == inputs


# -- sharded external data -------------------------------------------------------------------------


def _external_info(model_path: Path) -> dict[str, dict[str, str]]:
    proto = onnx.load(str(model_path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def _outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("shard_bytes", [600_000, 1 << 20, 300_000])
def test_sharded_convert_matches_unsharded(tmp_path, external_model, shard_bytes):
    whole = convert(external_model, tmp_path / "whole", options=ConvertOptions(verify=False))
    sharded = convert(external_model, tmp_path / "sharded", options=ConvertOptions(shard_bytes=shard_bytes))
    assert sharded.verification is not None and sharded.verification.ok
    model = tmp_path / "sharded" / "attn.onnx"
    onnx.checker.check_model(str(model))  # by path: checks every tensor's external location

    info = _external_info(model)
    shards = sorted((tmp_path / "sharded").glob("attn-*-of-*.data"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "attn.data").exists()
    assert {i["location"] for i in info.values()} == {p.name for p in shards}
    assert all(p.name.endswith(f"-of-{len(shards):05d}.data") for p in shards)
    assert [p for p in sharded.files if p.suffix == ".data"] == [
        tmp_path / "sharded" / p.name for p in shards
    ]
    for shard in shards:
        tensors = [i for i in info.values() if i["location"] == shard.name]
        assert shard.stat().st_size <= shard_bytes or len(tensors) == 1, (shard.name, len(tensors))
        assert all(int(i.get("offset", 0)) % 4096 == 0 for i in tensors)
        assert shard.stat().st_size == max(int(i.get("offset", 0)) + int(i["length"]) for i in tensors)

    x = np.random.default_rng(0).normal(size=(1, 16, 512)).astype(np.float32)
    for got, want in zip(
        _outputs(model, {"x": x}), _outputs(tmp_path / "whole" / "attn.onnx", {"x": x}), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # the input kept its weights in an external file: so does the output, unsharded in one file
    assert sorted(whole.files) == [
        tmp_path / "whole" / n
        for n in ("attn.data", "attn.onnx", "attn.report.html", "attn.report.json", "mha_to_sha_names.json")
    ]


def test_external_data_whenever_the_input_had_it(tmp_path, external_model):
    """Never a whole-model protobuf in memory: an input with external data gives one external data
    file, however small its weights."""
    external = convert(external_model, tmp_path / "ext", options=ConvertOptions(verify=False))
    assert {p.name for p in external.files} >= {"attn.onnx", "attn.data"}
    assert {i["location"] for i in _external_info(tmp_path / "ext" / "attn.onnx").values()} == {"attn.data"}


def test_embedded_up_to_the_embed_limit_external_above(tmp_path, small_model, monkeypatch):
    """An embedded input stays embedded up to EMBED_LIMIT_BYTES of weights, not above."""
    import mha2sha.io.save as save

    embedded = convert(small_model, tmp_path / "emb", options=ConvertOptions(verify=False))
    assert not [p for p in embedded.files if p.suffix == ".data"]
    assert not _external_info(tmp_path / "emb" / "attn.onnx")

    monkeypatch.setattr(save, "EMBED_LIMIT_BYTES", 64)  # the small model's weights exceed it
    big = convert(small_model, tmp_path / "big", options=ConvertOptions(verify=True))
    assert big.verification is not None and big.verification.ok
    assert [p.name for p in big.files if p.suffix == ".data"] == ["attn.data"]
    assert _external_info(tmp_path / "big" / "attn.onnx")


def test_one_shard_is_named_like_the_unsharded_file(tmp_path, external_model):
    """A shard size above the weights: one ``attn.data``, even for a model that would embed them."""
    model = load_model(external_model)
    files = save_model(model, tmp_path / "attn.onnx", shard_bytes=10**9)
    assert files == [tmp_path / "attn.onnx", tmp_path / "attn.data"]
    assert {i["location"] for i in _external_info(files[0]).values()} == {"attn.data"}
    x = np.ones((1, 16, 512), np.float32)
    np.testing.assert_array_equal(_outputs(files[0], {"x": x})[0], _outputs(external_model, {"x": x})[0])


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 1 << 30), ("1073741824", 1 << 30), ("1.5kb", 1500)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12XB", "", "GB", "-1GB", "0"])
def test_bad_shard_size_is_one_line_exit_2(tmp_path, small_model, text):
    proc = run("convert", str(small_model), "-o", str(tmp_path / "out"), f"--shard-size={text}")
    assert_one_line_error(proc.stderr, proc.returncode, "size")
    assert not (tmp_path / "out").exists()
