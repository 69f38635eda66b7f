"""Second child process of the HTP support probe: one QNN HTP session on ``FOLDER/qdq.onnx``.

Run by path (``python _qnn_session.py FOLDER``), not as a module, so it imports nothing but the
standard library and onnxruntime (~45 MB instead of ~120 MB with the package): the QNN backend's
validation of a full-width block is what this process holds. CPU fallback is disabled and the log
is verbose: the QNN EP's per-node-unit ``Validation PASSED / FAILED ... REASON`` messages go to
stderr, which the parent reads. ``result.json`` gets whether the graph compiled and the error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main(folder: str) -> int:
    import onnxruntime as ort
    import onnxruntime_qnn

    root = Path(folder)
    job = json.loads((root / "job.json").read_text())
    result = json.loads((root / "result.json").read_text())
    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 0  # the QNN EP's per-node validation verdicts are verbose messages
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(
        devices, {"backend_type": "htp", "soc_model": job["soc"], "offload_graph_io_quantization": "0"}
    )
    try:
        ort.InferenceSession(str(root / "qdq.onnx"), options)
        result["compiled"] = True
    except Exception as e:
        message = " ".join(str(e).split())
        refused = "fallback to CPU EP has been explicitly disabled" in message
        result["compiled"] = None if refused else False
        result["error"] = "" if refused else message[:500]
    result["stage"] = "done"
    peak = _peak_rss_mb()
    result["peak_rss_mb"] = max(peak, result.get("peak_rss_mb", 0.0))
    result.setdefault("peaks", {})["session"] = peak
    (root / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
