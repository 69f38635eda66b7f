"""The conversion job: load, split every attention block, save atomically, verify, report.

``convert`` is what the CLI runs; :class:`MHA2SHAConverter` keeps the Python API of Qualcomm's
original tool working on top of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.encodings import (
    CoverageReport,
    EncodingSet,
    channel_axes,
    load_encodings,
    propagate,
    save_encodings,
)
from mha2sha.errors import UserError
from mha2sha.find.anchors import find_attention_cores
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.io.names import tensor_names
from mha2sha.io.prepare import prepare_for_split, remove_unused_initializers
from mha2sha.io.save import save_model, staging_dir
from mha2sha.layout import LayoutRecord, LayoutResult, PerHeadOProjPass, apply_htp_layout, remap_encodings
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.tables import blocks_json
from mha2sha.split.record import SplitRecord
from mha2sha.split.split_heads import BlockReport, SplitHeadsPass
from mha2sha.verify.htp import DEFAULT_SOC, HtpCheck, compare_on_htp
from mha2sha.verify.input_lists import write_input_lists
from mha2sha.verify.inputs import load_inputs, make_inputs
from mha2sha.verify.qdq import output_lsb, run_qdq_compare, to_qdq_ir
from mha2sha.verify.runner import Verification, compare_outputs, run_model, verify

__all__ = ["ConvertOptions", "ConversionResult", "ConversionFailed", "convert", "MHA2SHAConverter"]

logger = logging.getLogger(__name__)

NAME_MAP_FILE = "mha_to_sha_names.json"


class ConversionFailed(Exception):
    """The conversion ran but its result is not acceptable (verification failed). Exit code 1."""

    exit_code = 1


@dataclasses.dataclass
class ConvertOptions:
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    inputs: str | None = None  # .npz of user inputs for verification
    verify: bool = True
    rtol: float = 1e-5
    seed: int = 0
    allow_partial: bool = False
    force: bool = False  # write the model even when there is no attention to split
    create_input_lists: bool = False
    per_head_kv_io: bool = False  # past KV inputs / present KV outputs as one tensor per head
    encodings: str | None = None  # AIMET .encodings of the input model
    encodings_version: str | None = None  # write this version (default: the version read)
    strict_encodings: bool = False  # any coverage gap is an error
    max_lsb: float = 1.0  # quantized (QDQ) outputs may differ by at most this many LSBs
    htp_layout: bool = False  # projections as Conv 1x1 on [B, C, 1, S], layout ops cancelled (--target htp)
    optimize_o_proj: bool = False  # per-head o_proj on each head's rows of W_o, summed (measured slower)
    verify_htp: bool = False  # also compare MHA-QDQ and SHA-QDQ on the HTP emulator (onnxruntime-qnn)
    soc: str = DEFAULT_SOC


@dataclasses.dataclass
class ConversionResult:
    model: ir.Model
    blocks: list[BlockReport]
    record: SplitRecord
    verification: Verification | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    other_softmax: list[str] = dataclasses.field(default_factory=list)
    timer: PhaseTimer | None = None
    coverage: CoverageReport | None = None
    qdq_lsb: dict[str, float] | None = None  # max |MHA-QDQ - SHA-QDQ| per output, in LSBs
    htp: HtpCheck | None = None
    layout: LayoutResult | None = None

    @property
    def split_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "split"]

    @property
    def unsupported_blocks(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "unsupported"]

    @property
    def complete(self) -> bool:
        """Every attention block with more than one head was split."""
        return not self.unsupported_blocks


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def convert(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    options: ConvertOptions | None = None,
    timer: PhaseTimer | None = None,
) -> ConversionResult:
    """Split every multi-head attention of ``model_path`` and write the result to ``out_dir``.

    Writes ``<name>.onnx`` (+ ``.data`` for large models), ``mha_to_sha_names.json`` and
    ``<name>.report.json``. Nothing is written when the input is bad or verification fails.
    """
    options = options or ConvertOptions()
    model_path, out_dir = Path(model_path), Path(out_dir)
    name = name or model_path.stem
    out_model = out_dir / f"{name}.onnx"
    if _same_file(model_path, out_model) or _same_file(model_path, out_model.with_suffix(".data")):
        raise UserError(
            f"output {out_model} would overwrite the input model; choose another -o folder or --name"
        )

    timer = timer or PhaseTimer()
    with timer.phase("load"):
        model = load_model(model_path)
        fix_input_shapes(model, options.input_shapes)
        require_static_inputs(model)
        inputs = _verification_inputs(model, options) if options.verify else None
        encodings = load_encodings(options.encodings, model=model) if options.encodings else None
    with timer.phase("prepare (fold shapes, infer)"):
        prepare_for_split(model)
        weight_axes = channel_axes(model) if encodings is not None else None
        original_names = tensor_names(model) if encodings is not None else None
    record = SplitRecord()
    with timer.phase("split heads", total=len(find_attention_cores(model.graph)[0])) as advance:
        split = SplitHeadsPass(record, per_head_io=options.per_head_kv_io, on_block=advance)
        split(model)
        remove_unused_initializers(model)
    result = ConversionResult(model, split.blocks, record, other_softmax=split.other_softmax, timer=timer)
    if not result.split_blocks and not options.force:
        return result
    layout_record = LayoutRecord()
    if options.optimize_o_proj:  # before propagation: it adds W_o row slices to the split record
        with timer.phase("per-head o_proj"):
            PerHeadOProjPass(layout_record, split_record=record)(model)
            remove_unused_initializers(model)
    sha_encodings = None
    if encodings is not None:
        with timer.phase("propagate encodings"):
            sha_encodings, result.coverage = propagate(
                encodings,
                record,
                model,
                channel_axes_map=weight_axes,
                strict=options.strict_encodings,
                original_names=original_names,
            )

    if options.htp_layout:
        with timer.phase("HTP layout (Linear -> Conv 1x1)"):
            quantized = set(sha_encodings.activations) if sha_encodings is not None else ()
            result.layout = apply_htp_layout(model, record=layout_record, quantized=quantized)
            remove_unused_initializers(model)
            if sha_encodings is not None:
                sha_encodings = remap_encodings(sha_encodings, layout_record, model)

    with staging_dir(out_dir) as stage:
        with timer.phase("save"):
            staged = save_model(model, stage / out_model.name)
            _check_model(staged[0])
            (stage / NAME_MAP_FILE).write_text(json.dumps(record.name_map(), indent=1))
            if sha_encodings is not None:
                version = options.encodings_version or sha_encodings.version
                save_encodings(sha_encodings, stage / f"{name}.encodings", version, model=model)
        if inputs is not None:
            with timer.phase("verify (onnxruntime)"):
                result.verification = _verify(model_path, staged[0], inputs, split, options.rtol)
            if not result.verification.ok:
                raise ConversionFailed(_failure_line(result.verification))
            if encodings is not None and sha_encodings is not None:
                with timer.phase("verify quantized (QDQ)"):
                    result.qdq_lsb = _verify_qdq(
                        model_path, encodings, staged[0], sha_encodings, inputs, split
                    )
                if options.verify_htp:
                    with timer.phase(f"verify on HTP emulator ({options.soc})"):
                        result.htp = _verify_htp(
                            model_path, encodings, staged[0], sha_encodings, inputs, options.soc
                        )
                    if result.htp.error:
                        raise ConversionFailed(f"HTP verification could not run: {result.htp.error}")
                # The HTP runs the device's numerics and is the reference when the whole model runs
                # there; otherwise (or without --verify-htp) the CPU QDQ comparison decides.
                if result.htp is not None and not result.htp.cpu_fallback_used:
                    _require_within_lsb("HTP verification", result.htp.max_lsb, options.max_lsb)
                else:
                    _require_within_lsb("quantized verification", result.qdq_lsb, options.max_lsb)
            if options.create_input_lists and result.verification.reference is not None:
                feeds = _per_head_feeds(inputs, split)
                goldens = _per_head_outputs(result.verification.reference, split)
                order = [v.name for v in model.graph.inputs if v.name in feeds]
                write_input_lists(stage, feeds, goldens, order, host_dir=out_dir)
        (stage / f"{name}.report.json").write_text(json.dumps(_report(result), indent=1))
        result.files = [out_dir / p.relative_to(stage) for p in sorted(stage.rglob("*")) if p.is_file()]
    return result


def _per_head_feeds(inputs: Mapping[str, np.ndarray], split: SplitHeadsPass) -> dict[str, np.ndarray]:
    """The converted model's feeds: inputs that became per-head inputs are cut along the head axis."""
    feeds = {k: v for k, v in inputs.items() if k not in split.input_pieces}
    for name, (axis, names) in split.input_pieces.items():
        feeds.update(zip(names, np.split(inputs[name], len(names), axis=axis), strict=True))
    return feeds


def _verify_qdq(
    original: Path,
    encodings: EncodingSet,
    converted: Path,
    sha_encodings: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    split: SplitHeadsPass,
) -> dict[str, float]:
    """Max difference per output between the MHA and SHA models with encodings applied as QDQ."""
    if split.input_pieces or split.output_pieces:
        raise UserError("quantized verification with --per-head-kv-io is not supported yet; add --no-verify")
    return run_qdq_compare(original, encodings, converted, sha_encodings, inputs)


def _require_within_lsb(what: str, diffs: Mapping[str, float], max_lsb: float) -> None:
    name, worst = max(diffs.items(), key=lambda kv: kv[1], default=("", 0.0))
    if worst > max_lsb:
        hint = (
            " (on wide models ORT CPU's float MatMul sums per-head weight slices in another order and can"
            " flip a rounding: check on the HTP emulator with --verify-htp, or raise --max-lsb)"
            if what == "quantized verification"
            else ""
        )
        raise ConversionFailed(
            f"{what} failed: output '{name}' differs by {worst:.3g} LSB (> {max_lsb:g}); nothing was written{hint}"
        )


def _verify_htp(
    original: Path,
    encodings: EncodingSet,
    converted: Path,
    sha_encodings: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    soc: str,
) -> HtpCheck:
    """Both models as QDQ on the HTP emulator: unsupported nodes, and MHA vs SHA in LSBs."""
    with tempfile.TemporaryDirectory(prefix="mha2sha-qdq-") as tmp:
        paths = []
        for tag, path, es in (("mha", original, encodings), ("sha", converted, sha_encodings)):
            target = Path(tmp) / f"{tag}.onnx"
            save_model(to_qdq_ir(path, es), target)
            paths.append(target)
        shapes = {v.name: tuple(v.shape or ()) for v in ir.load(converted).graph.outputs}
        lsb = {name: output_lsb(encodings.get(name), shape) for name, shape in shapes.items()}
        return compare_on_htp(paths[0], paths[1], inputs, lsb, soc)


def _per_head_outputs(outputs: Mapping[str, np.ndarray], split: SplitHeadsPass) -> dict[str, np.ndarray]:
    """Outputs named as the converted model names them (per-head outputs cut along the head axis)."""
    result: dict[str, np.ndarray] = {}
    for name, array in outputs.items():
        if name in split.output_pieces:
            axis, names = split.output_pieces[name]
            result.update(zip(names, np.split(array, len(names), axis=axis), strict=True))
        else:
            result[name] = array
    return result


def _verify(
    original: Path, converted: Path, inputs: Mapping[str, np.ndarray], split: SplitHeadsPass, rtol: float
) -> Verification:
    """Compare on the same data; per-head outputs are joined back before comparing."""
    if not (split.input_pieces or split.output_pieces):
        return verify(original, converted, inputs, rtol=rtol)
    reference = run_model(original, inputs)
    got = run_model(converted, _per_head_feeds(inputs, split))
    for name, (axis, names) in split.output_pieces.items():
        got[name] = np.concatenate([got.pop(n) for n in names], axis=axis)
    return compare_outputs(reference, {k: got[k] for k in reference if k in got} | got, rtol)


def _verification_inputs(model: ir.Model, options: ConvertOptions) -> dict[str, np.ndarray]:
    if options.inputs:
        return load_inputs(options.inputs, model, options.seed)
    return make_inputs(model, options.seed)


def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # a bug of ours, never the user's
        raise RuntimeError(f"converted model fails onnx.checker: {str(e).splitlines()[0]}") from e


def _failure_line(v: Verification) -> str:
    bad = [r for r in v.rows if not r.ok]
    worst = max(bad, key=lambda r: r.max_rel_err) if bad else None
    detail = (
        f"output '{worst.name}' differs (max rel err {worst.max_rel_err:.3g}) {worst.note}"
        if worst
        else "outputs differ"
    )
    return f"verification failed: {detail}; nothing was written"


def _report(result: ConversionResult) -> dict[str, Any]:
    v = result.verification
    return {
        "blocks": blocks_json(result.blocks),
        "non_attention_softmax": result.other_softmax,
        "phases": [dataclasses.asdict(r) for r in result.timer.records] if result.timer else [],
        "encodings_coverage": result.coverage.to_dict() if result.coverage else None,
        "quantized_max_lsb": result.qdq_lsb,
        "htp": result.htp.to_dict() if result.htp else None,
        "layout": result.layout.to_dict() if result.layout else None,
        "verification": None
        if v is None
        else {
            "ok": v.ok,
            "rtol": v.rtol,
            "outputs": [dataclasses.asdict(r) for r in v.rows],
        },
    }


class MHA2SHAConverter:
    """Python API of the original tool: ``MHA2SHAConverter(name, export_path, model).convert()``.

    The old tool's flags are accepted; the split needs none of them (it finds every attention block
    and its layout by itself). Returns ``(model, verification_status)`` where the model is the
    converted ``onnx_ir.Model`` and the status is True, False, or None when verification was off.
    """

    def __init__(
        self,
        model_name: str,
        sha_export_path: str | os.PathLike,
        model_or_path: str | os.PathLike | onnx.ModelProto,
        **flags: Any,
    ):
        self.model_name = model_name
        self.sha_export_path = Path(sha_export_path)
        self.model_or_path = model_or_path
        self.flags = flags

    def convert(self) -> tuple[ir.Model, bool | None]:
        if isinstance(self.model_or_path, onnx.ModelProto):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{self.model_name}.onnx"
                onnx.save(
                    self.model_or_path, path, save_as_external_data=self.model_or_path.ByteSize() > (1 << 30)
                )
                return self._convert(path)
        return self._convert(Path(self.model_or_path))

    def _convert(self, path: Path) -> tuple[ir.Model, bool | None]:
        options = ConvertOptions(
            verify=not self.flags.get("no_verification", False),
            create_input_lists=bool(self.flags.get("create_input_lists", False)),
            allow_partial=True,
        )
        result = convert(path, self.sha_export_path, name=self.model_name, options=options)
        status = None if result.verification is None else result.verification.ok
        return result.model, status
