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

import numpy as np

from mha2sha.errors import UserError
from mha2sha.verify.qdq import max_steps

__all__ = ["HtpRun", "HtpCheck", "htp_available", "run_on_htp", "compare_on_htp", "DEFAULT_SOC"]

DEFAULT_SOC = "SM8650"
_UNSUPPORTED = re.compile(r"\{ name: ([^,]+), type: (\w+) \}")


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


def run_on_htp(
    model_path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    soc: str = DEFAULT_SOC,
    *,
    cpu_fallback: bool = False,
) -> HtpRun:
    """Run ``model_path`` (a QDQ model) on the HTP emulator (CPU fallback disabled by default)."""
    if not htp_available():
        raise UserError("--verify-htp needs onnxruntime-qnn: pip install 'mha2sha[htp]'")
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return HtpCheck(soc, sha.ran, sha.unsupported, mha.ran, mha.unsupported, fallback, diffs, error)
