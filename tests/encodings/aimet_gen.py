"""Real AIMET encodings for test models, made by ``aimet_onnx`` and cached on disk.

``aimet_encodings(model_path, calib_inputs, config=..., version=...)`` runs
``QuantizationSimModel`` (quant_scheme min_max) on the model, ``compute_encodings`` on the
calibration inputs and ``export``; the result (exported model, encodings, and the simulation's
own outputs on the calibration inputs, for numerics checks) is cached under
``${MHA2SHA_CACHE:-~/.cache/mha2sha}/aimet/<key>/`` keyed by model bytes, inputs, config, version
and the aimet-onnx version. The encodings version is chosen with ``export(encoding_version=...)``
(aimet-onnx >= 2: 0.6.1, 1.0.0, 2.0.0, 2.1.0; default 1.0.0, or ``$AIMET_ENCODING_VERSION``).

Configs:
- ``w8a16``: int8 per-channel weights, int16 activations, AIMET's HTP config
  (``htp_quantsim_config_v75_per_channel_linear.json``, shipped in the wheel);
- ``w8a8``: int8 weights and activations, AIMET's default config. aimet-onnx 2.42 turns off the
  output quantizer of every grid-preserving op (Slice, Expand, Pad, ...) whose type the config does
  not name, so data movement carries no encoding of its own here;
- ``w8a8_dm``: ``w8a8`` with every op output AIMET can quantize quantized, data movement included
  (the default config plus ``is_output_quantized`` for the grid-preserving op types AIMET places a
  quantizer on: Slice, Expand, Pad, ...): a packed-QKV Slice output gets its own encoding, not its
  input's (older AIMET releases and user configs that list these ops behave so);
- ``w4a16_bq``: like w8a16 with int4 per-block weights (block 8) on MatMul/Gemm;
- ``w4a16_lpbq``: like w8a16 with LPBQ weights (int4, decompressed 8 bit, block 8).

Install (aimet-onnx pins nothing we can use as is): ``pip install --no-deps aimet-onnx==2.42.0``
then ``pip install tqdm bokeh jsonschema psutil scipy scikit-learn``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CONFIGS", "aimet_available", "aimet_encodings", "cache_root", "quantsim_run"]

CONFIGS = ("w8a16", "w8a8", "w8a8_dm", "w4a16_bq", "w4a16_lpbq")

#: Grid-preserving op types whose output AIMET can quantize (those not in ``op_outputs_to_ignore``).
_DATA_MOVEMENT_QUANTIZED = (
    "Slice", "Expand", "Pad", "DepthToSpace", "SpaceToDepth", "GatherElements", "GatherND",
    "MaxPool", "ReduceMax", "ReduceMin", "Dropout",
)  # fmt: skip


def config_file(config: str) -> str | None:
    """The aimet-onnx quantsim config file of ``config`` (None: aimet's default)."""
    import aimet_onnx

    cfg_dir = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config"
    if config == "w8a8":
        return None
    if config == "w8a8_dm":
        cfg = json.loads((cfg_dir / "default_config_per_channel.json").read_text())
        for op in _DATA_MOVEMENT_QUANTIZED:
            cfg["op_type"].setdefault(op, {})["is_output_quantized"] = "True"
        path = cache_root() / "configs" / "w8a8_dm.json"
        text = json.dumps(cfg, indent=1)
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return str(path)
    htp = cfg_dir / "htp_quantsim_config_v75_per_channel_linear.json"
    return str(htp) if htp.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("MHA2SHA_CACHE") or Path.home() / ".cache" / "mha2sha") / "aimet"


def aimet_available() -> bool:
    try:
        import aimet_onnx  # noqa: F401
    except Exception:
        return False
    return True


def _key(model_bytes: bytes, inputs: Sequence[Mapping[str, np.ndarray]], config: str, version: str) -> str:
    import aimet_onnx

    h = hashlib.sha256()
    h.update(model_bytes)
    for feed in inputs:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(name.encode())
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(arr.tobytes())
    h.update(f"{config}|{version}|{aimet_onnx.__version__}".encode())
    return h.hexdigest()[:20]


def quantsim(model_path: Path, config: str):  # -> QuantizationSimModel
    """A QuantizationSimModel of the model at ``model_path`` under ``config`` (no encodings yet)."""
    import onnx
    from aimet_onnx.common.defs import QuantScheme
    from aimet_onnx.quantsim import (
        QuantizationSimModel,
        set_blockwise_quantization_for_weights,
        set_grouped_blockwise_quantization_for_weights,
    )

    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, not {config!r}")
    model = onnx.load(str(model_path))
    if config in ("w8a8", "w8a8_dm"):
        return QuantizationSimModel(
            model,
            quant_scheme=QuantScheme.min_max,
            param_type="int8",
            activation_type="int8",
            config_file=config_file(config),
        )
    sim = QuantizationSimModel(
        model,
        quant_scheme=QuantScheme.min_max,
        param_type="int8",
        activation_type="int16",
        config_file=config_file(config),
    )
    if config == "w4a16_bq":
        set_blockwise_quantization_for_weights(
            sim, ("MatMul", "Gemm"), bitwidth=4, symmetric=True, block_size=8
        )
    elif config == "w4a16_lpbq":
        set_grouped_blockwise_quantization_for_weights(
            sim, ("MatMul", "Gemm"), bitwidth=4, decompressed_bw=8, block_size=8
        )
    return sim


def aimet_encodings(
    model_path: str | os.PathLike[str],
    calib_inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    config: str = "w8a16",
    version: str = "1.0.0",
    cache: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """``(exported model path, encodings path)`` from aimet-onnx for ``model_path``, cached.

    The cache folder also holds ``sim_outputs.npz``: the simulation's outputs on
    ``calib_inputs[0]`` (see :func:`sim_outputs`).
    """
    model_path = Path(model_path)
    data = model_path.read_bytes()
    root = Path(cache) if cache is not None else cache_root()
    out_dir = root / _key(data, calib_inputs, config, version)
    onnx_path, enc_path = out_dir / "model.onnx", out_dir / "model.encodings"
    if onnx_path.is_file() and enc_path.is_file() and (out_dir / "sim_outputs.npz").is_file():
        return onnx_path, enc_path

    sim = quantsim(model_path, config)
    sim.compute_encodings([dict(f) for f in calib_inputs])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        sim.export(str(tmp), "model", encoding_version=version)
        outs = sim.session.run(None, dict(calib_inputs[0]))
        # the sim renames graph outputs (``y`` -> ``y_updated``); they keep the model's order
        import onnx

        names = [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]
        np.savez(tmp / "sim_outputs.npz", **dict(zip(names, outs, strict=True)))
        (tmp / "meta.json").write_text(
            json.dumps({"config": config, "version": version, "model": str(model_path)})
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return onnx_path, enc_path


def sim_outputs(encodings_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """AIMET's simulated outputs on the first calibration input, saved beside the encodings."""
    with np.load(Path(encodings_path).parent / "sim_outputs.npz") as z:
        return {k: z[k] for k in z.files}


def quantsim_run(
    model_path: str | os.PathLike[str],
    encodings_path: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    config: str,
    strict: bool = False,
) -> tuple[list[dict[str, np.ndarray]], list]:
    """aimet-onnx's own simulation of ``model_path`` with ``encodings_path`` loaded, on ``feeds``.

    A ``QuantizationSimModel`` of the model under ``config`` (AIMET places the quantizers by its
    own rules), ``load_encodings_to_sim`` (``strict``: AIMET refuses any encoding its placement does
    not have a quantizer for; otherwise 0.6.1/1.0.0 files get a quantizer added for such tensors,
    and 2.x files must move them onto an equal encoding upstream or fail), then one run per feed.
    Returns the outputs by the model's output names and the mismatches AIMET reported.
    """
    import onnx
    from aimet_onnx.quantsim import load_encodings_to_sim

    sim = quantsim(Path(model_path), config)
    mismatches = load_encodings_to_sim(sim, str(encodings_path), strict=strict)
    names = [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]
    runs = [dict(zip(names, sim.session.run(None, dict(feed)), strict=True)) for feed in feeds]
    return runs, mismatches
