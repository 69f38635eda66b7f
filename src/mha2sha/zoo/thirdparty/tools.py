"""Third-party exporters, each in its own cached venv, and their cached outputs.

A tool is a script in ``scripts/`` run with the python of a venv whose packages are pinned here.
Both are cached under ``$MHA2SHA_CACHE`` (default ``~/.cache/mha2sha``):

- ``venvs/<venv>-<hash of python version + pins>/``: built in place under a lock, marked complete
  by ``.installed`` (a half-built venv is removed and rebuilt);
- ``thirdparty/<tool>-<hash of the venv key + the scripts' source>/``: the script's output folder
  (``manifest.json`` + ONNX files), exported into a temp folder and published with one rename.

So a new pin rebuilds the venv and every output made with it, and an edited export script rebuilds
its outputs, never anything else. torch is pinned to the CPU wheel on local disk (any other
version would download CUDA), through a constraints file as well as the pin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..cache import base_root, locked

logger = logging.getLogger(__name__)

SCRIPTS = Path(__file__).parent / "scripts"
TORCH_PIN = "torch==2.13.0"

# Exact versions, the whole resolved set (pip freeze of a fresh install of the first lines).
VENVS: dict[str, tuple[str, ...]] = {
    # optimum-onnx 0.1.0 needs transformers < 4.58 and optimum ~= 2.1; onnxruntime for its
    # [onnxruntime] extra and for onnxruntime.transformers.optimizer.
    "optimum": (
        "optimum-onnx==0.1.0",
        "optimum==2.1.0",
        "transformers==4.57.6",
        "onnxruntime==1.32.0",
        "onnx==1.23.2",
        TORCH_PIN,
        "tokenizers==0.22.2",
        "huggingface_hub==0.36.2",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "protobuf==7.36.2",
        "sympy==1.14.0",
        "packaging==26.4",
        "PyYAML==6.0.4",
        "regex==2026.11.19",
        "requests==2.34.2",
        "tqdm==4.70.1",
        "filelock==4.3.2",
        "fsspec==2026.9.0",
        "hf-xet==1.8.0",
        "ml_dtypes==0.7.0",
        "flatbuffers==25.12.19",
    ),
    # The model builder ships inside the onnxruntime-genai wheel; it imports torch, transformers
    # (5.x for current architectures), onnx_ir and onnxruntime's quantization tools.
    "genai": (
        "onnxruntime-genai==0.18.0",
        "onnxruntime==1.32.0",
        "transformers==5.23.0",
        "onnx==1.23.2",
        "onnx-ir==1.1.0",
        TORCH_PIN,
        "tokenizers==0.23.3",
        "huggingface_hub==2.4.0",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "protobuf==7.36.2",
        "sympy==1.14.0",
        "packaging==26.4",
        "PyYAML==6.0.4",
        "regex==2026.11.19",
        "tqdm==4.70.1",
        "filelock==4.3.2",
        "fsspec==2026.9.0",
        "hf-xet==1.8.0",
        "ml_dtypes==0.7.0",
        "flatbuffers==25.12.19",
    ),
}


@dataclass(frozen=True)
class Tool:
    """One exporter: ``venv`` python runs ``scripts/<script> OUT``; ``sources`` key its outputs."""

    name: str
    label: str  # the tool as a user knows it
    venv: str
    script: str
    sources: tuple[str, ...]
    version_of: str  # the package whose version names the tool in the catalogue


TOOLS: dict[str, Tool] = {
    "optimum": Tool(
        "optimum",
        "optimum-onnx (onnx_export_from_model = optimum-cli export onnx)",
        "optimum",
        "optimum_export.py",
        ("_tiny.py", "optimum_export.py"),
        "optimum-onnx",
    ),
    "ortopt": Tool(
        "ortopt",
        "onnxruntime.transformers.optimizer.optimize_model",
        "optimum",
        "ort_optimize.py",
        ("_tiny.py", "optimum_export.py", "ort_optimize.py"),
        "onnxruntime",
    ),
    "genai": Tool(
        "genai",
        "onnxruntime-genai model builder (python -m onnxruntime_genai.models.builder)",
        "genai",
        "genai_build.py",
        ("_tiny.py", "genai_build.py"),
        "onnxruntime-genai",
    ),
}


class ToolUnavailable(RuntimeError):
    """The tool's venv cannot be installed on this machine (no wheel, no index): skip, don't fail."""


class ToolFailed(RuntimeError):
    """The venv is there but the export script crashed as a whole (a per-graph error is in the manifest)."""


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def venv_key(venv: str) -> str:
    """``<venv>-<hash>``: the python it runs on (major.minor) and its pins."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return f"{venv}-{_digest(py, *sorted(VENVS[venv]))}"


def output_key(tool: str) -> str:
    """``<tool>-<hash>``: the venv key and the text of every script the tool runs."""
    t = TOOLS[tool]
    texts = [f"{name}\n{(SCRIPTS / name).read_text()}" for name in t.sources]
    return f"{tool}-{_digest(venv_key(t.venv), *texts)}"


def venvs_root() -> Path:
    return base_root() / "venvs"


def outputs_root() -> Path:
    return base_root() / "thirdparty"


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


_UNAVAILABLE: dict[str, ToolUnavailable] = {}  # venv -> why it could not be installed (this process)


def ensure_venv(venv: str) -> Path:
    """The python of the cached venv ``venv``, creating it first if needed (~45 s each, cold).

    A venv that failed to install is not tried again in the same process: the error is re-raised.
    """
    if venv in _UNAVAILABLE:
        raise _UNAVAILABLE[venv]
    root = venvs_root()
    folder = root / venv_key(venv)
    python = folder / "bin" / "python"
    stamp = folder / ".installed"
    if stamp.is_file():
        return python
    with locked(root / ".locks" / f"{folder.name}.lock"):
        if stamp.is_file():
            return python
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        env = _pip_env()
        constraints = folder / "constraints.txt"
        requirements = folder / "requirements.txt"
        cmd = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), "-r", str(requirements)]
        try:
            _run([sys.executable, "-m", "venv", str(folder)], env, f"python -m venv for {venv}")
            constraints.write_text(TORCH_PIN + "\n")
            requirements.write_text("\n".join(VENVS[venv]) + "\n")
            _run(cmd, env, f"pip install for the {venv} venv")
        except ToolUnavailable as e:
            shutil.rmtree(folder, ignore_errors=True)
            _UNAVAILABLE[venv] = e
            raise
        seconds = round(time.perf_counter() - start, 1)
        stamp.write_text(json.dumps({"pins": list(VENVS[venv]), "seconds": seconds}, indent=2))
        logger.info("built venv %s in %.1f s", folder.name, seconds)
    return python


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-3:]
        raise ToolUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def build_tool(tool: str) -> Path:
    """The output folder of ``tool`` (``manifest.json`` + ONNX files), building venv and outputs if missing."""
    root = outputs_root()
    final = root / output_key(tool)
    manifest = final / "manifest.json"
    if manifest.is_file():
        return final
    t = TOOLS[tool]
    python = ensure_venv(t.venv)
    with locked(root / ".locks" / f"{final.name}.lock"):
        if manifest.is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            start = time.perf_counter()
            env = {
                **_pip_env(),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
            proc = subprocess.run(
                [str(python), str(SCRIPTS / t.script), str(tmp)],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            (tmp / "export.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0 or not (tmp / "manifest.json").is_file():
                tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
                raise ToolFailed(f"{t.script} exited {proc.returncode}: {' '.join(tail)}")
            data = json.loads((tmp / "manifest.json").read_text())
            data["export_seconds"] = round(time.perf_counter() - start, 1)
            data["venv"] = venv_key(t.venv)
            data["pins"] = list(VENVS[t.venv])
            (tmp / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True))
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@cache
def listed_exports(tool: str) -> list[dict]:
    """What ``tool`` exports, without building anything: ``script --list`` run with this python.

    The scripts import only ``_tiny`` at module level, so listing needs none of the tool's packages.
    """
    t = TOOLS[tool]
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / t.script), "--list"], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def manifest(tool: str) -> dict:
    return json.loads((build_tool(tool) / "manifest.json").read_text())


def prebuild(tools: tuple[str, ...] | None = None) -> dict[str, BaseException | None]:
    """Build the tools' venvs and outputs concurrently (one thread per tool, each mostly waiting on
    its pip / export subprocess); tools sharing a venv wait for it on its lock. Returns the error of
    each tool that could not be built (``None`` when it was)."""
    from concurrent.futures import ThreadPoolExecutor

    names = tools if tools is not None else tuple(TOOLS)
    results: dict[str, BaseException | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        futures = {name: pool.submit(build_tool, name) for name in names}
        for name, future in futures.items():
            error = future.exception()
            results[name] = error
    return results
