"""Run QDQ models on the HTP backend (``onnxruntime-qnn``'s x86_64 emulator) with CPU fallback off.

The emulator computes what the real HTP computes, so it answers three questions before a device is
involved: does every node run on HTP, which do not, and do the MHA and SHA models agree there. Each
model runs in a child process: QNN reports unsupported nodes only in its native log (stderr), and a
backend failure must not take the converter down.

Optional extra: ``pip install 'mha2sha[htp]'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.verify.qdq import max_steps

__all__ = [
    "DEFAULT_SOC",
    "HTP_SOCS",
    "HtpCheck",
    "HtpRun",
    "check_soc",
    "compare_on_htp",
    "htp_available",
    "require_htp",
    "run_on_htp",
]

DEFAULT_SOC = "SM8650"
#: The chip names onnxruntime-qnn 2.7's ``soc_model`` option maps to an HTP (probed: any other name is
#: ignored with a warning and the backend runs as its default target). Numeric QNN SoC ids are
#: passed through; the backend refuses an unknown one when the session is made.
HTP_SOCS = (
    "SC8380XP", "SC8480XP", "SM7675", "SM8325", "SM8350", "SM8450", "SM8475", "SM8550", "SM8635",
    "SM8650", "SM8750", "SM8850", "SM8975",
)  # fmt: skip
_UNSUPPORTED = re.compile(r"\{ name: ([^,]+), type: (\w+) \}")
_BAD_SOC = ("Unrecognized soc_model", "Invalid soc_model", "QNN_DEVICE_ERROR_INVALID_CONFIG")


def _bad_soc(soc: str, why: str = "") -> UserError:
    return UserError(
        f"--soc {soc!r} is not an HTP SoC the HTP backend knows{why}: use one of {', '.join(HTP_SOCS)}"
        " (or a numeric QNN SoC id)"
    )


def check_soc(soc: str, *, probe: bool = False) -> str:
    """The SoC as ``soc_model`` takes it (chip names upper case); a bad one is a one-line UserError.

    A numeric id is the backend's to judge: with ``probe`` a one-op model is run on it (a second or
    two), so a bad id is refused before the conversion rather than after it.
    """
    name = str(soc).strip()
    if name.upper() in HTP_SOCS:
        return name.upper()
    if not name.isdigit():
        raise _bad_soc(name)
    if probe:
        with tempfile.TemporaryDirectory(prefix="mha2sha-soc-") as tmp:
            value = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
            add = ir.Node("", "Add", [value, value], name="add")
            add.outputs[0].name, add.outputs[0].shape = "y", ir.Shape([1, 4])
            add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            graph = ir.Graph([value], [add.outputs[0]], nodes=[add], opset_imports={"": 17})
            ir.save(ir.Model(graph, ir_version=8), Path(tmp) / "probe.onnx")
            run_on_htp(Path(tmp) / "probe.onnx", {"x": np.zeros((1, 4), np.float32)}, name)
    return name


@dataclasses.dataclass
class HtpRun:
    """One model on the HTP backend: outputs when it ran, else why not."""

    ran: bool
    outputs: dict[str, np.ndarray]
    unsupported: list[tuple[str, str]]  # (node name, op type) QNN could not take
    error: str = ""


def htp_available() -> bool:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


def require_htp() -> None:
    """--verify-htp needs onnxruntime-qnn: refuse at load time, before any heavy work."""
    if not htp_available():
        raise UserError("--verify-htp needs onnxruntime-qnn: pip install 'mha2sha[htp]'")


def run_on_htp(
    model_path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    soc: str = DEFAULT_SOC,
    *,
    cpu_fallback: bool = False,
) -> HtpRun:
    """Run ``model_path`` (a QDQ model) on the HTP emulator (CPU fallback disabled by default)."""
    require_htp()
    with tempfile.TemporaryDirectory(prefix="mha2sha-htp-") as tmp:
        feeds, result = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        # numpy's stub checks **arrays against savez's own keyword allow_pickle: bool as well
        np.savez(feeds, **dict(inputs))  # type: ignore[arg-type]
        proc = subprocess.run(
            [sys.executable, "-m", "mha2sha.verify.htp", str(model_path), str(feeds), str(result), soc]
            + (["fallback"] if cpu_fallback else []),
            capture_output=True,
            text=True,
            timeout=3600,
        )
        unsupported = sorted(set(_UNSUPPORTED.findall(proc.stderr)))
        if any(marker in proc.stderr for marker in _BAD_SOC):
            raise _bad_soc(soc, " (the backend refused it)")
        if proc.returncode != 0 or not result.exists():
            lines = [ln for ln in proc.stderr.splitlines() if "FAIL" in ln or "Error" in ln or "error" in ln]
            return HtpRun(False, {}, unsupported, (lines[-1] if lines else proc.stderr.strip()[-300:]))
        with np.load(result) as z:
            outputs = {k: z[k] for k in z.files}
        order = json.loads((Path(tmp) / "outputs.json").read_text())
        return HtpRun(True, {k: outputs[k] for k in order}, unsupported)


def _worker(model: str, feeds_path: str, result_path: str, soc: str, fallback: str = "") -> int:
    """Child process: one HTP session, outputs to ``result_path``."""
    import onnxruntime as ort
    import onnxruntime_qnn

    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    provider = {"backend_type": "htp", "soc_model": soc, "offload_graph_io_quantization": "0"}
    options.add_provider_for_devices(devices, provider)
    session = ort.InferenceSession(model, options)
    with np.load(feeds_path) as z:
        feeds = {i.name: z[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    np.savez(result_path, **dict(zip(names, outputs, strict=True)))
    Path(result_path).with_name("outputs.json").write_text(json.dumps(names))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:6]))


@dataclasses.dataclass
class HtpCheck:
    """MHA-QDQ vs SHA-QDQ on the HTP backend."""

    soc: str
    sha_on_htp_only: bool  # the SHA model runs with CPU fallback disabled
    sha_unsupported: list[tuple[str, str]]
    mha_on_htp_only: bool
    mha_unsupported: list[tuple[str, str]]
    cpu_fallback_used: bool  # the comparison needed CPU fallback (some node unsupported)
    max_lsb: dict[str, float]  # per output, in LSBs of the output's encoding (abs diff if none)
    error: str = ""
    ok: bool | None = None  # within --max-lsb (None: not decided by HTP, CPU fallback was needed)
    # where MHA and SHA part when the outputs differ (verify.htp_local.HtpDivergence)
    divergence: Any = None
    # the outputs of both runs (MHA, SHA), kept for the divergence search; not in the report
    outputs: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.max_lsb.items(), key=lambda kv: kv[1], default=("", 0.0))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, outputs=None, divergence=None))
        d.pop("outputs")
        d.pop("divergence")
        d["first_divergence"] = self.divergence.to_dict() if self.divergence is not None else None
        return d


def compare_on_htp(
    mha_qdq: Path,
    sha_qdq: Path,
    inputs: Mapping[str, np.ndarray],
    lsb: Mapping[str, np.ndarray | None],
    soc: str,
) -> HtpCheck:
    """Run both QDQ models on HTP (without CPU fallback when both allow it) and diff the outputs."""
    sha, mha = run_on_htp(sha_qdq, inputs, soc), run_on_htp(mha_qdq, inputs, soc)
    fallback = not (sha.ran and mha.ran)
    if fallback:  # still compare the numerics: unsupported nodes run on the CPU in both
        sha_run, mha_run = (
            run_on_htp(sha_qdq, inputs, soc, cpu_fallback=True),
            run_on_htp(mha_qdq, inputs, soc, cpu_fallback=True),
        )
    else:
        sha_run, mha_run = sha, mha
    diffs: dict[str, float] = {}
    error = sha_run.error or mha_run.error
    if sha_run.ran and mha_run.ran:
        for name, ref in mha_run.outputs.items():
            diffs[name] = max_steps(ref, sha_run.outputs[name], lsb.get(name))
    outputs = (mha_run.outputs, sha_run.outputs) if sha_run.ran and mha_run.ran else None
    return HtpCheck(
        soc, sha.ran, sha.unsupported, mha.ran, mha.unsupported, fallback, diffs, error, outputs=outputs
    )
