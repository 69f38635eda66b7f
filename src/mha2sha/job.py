"""The conversion job: the stages in order, each returning a record, nothing else.

    load -> lower -> prepare -> split -> encodings -> layout -> save -> verify -> report

A stage is a pass or a function of its own module (``io/``, ``lower/``, ``split/``,
``encodings/``, ``layout/``, ``verify/``, ``report/``); this module only decides which run and in
which order, and collects their records into a :class:`ConversionResult`. Adding a stage is one
file plus one step in :func:`convert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import onnx
import onnx_ir as ir

from mha2sha.encodings import (
    CoverageReport,
    RequantRecord,
    channel_axes,
    load_encodings,
    propagate,
    requantize,
    save_encodings,
)
from mha2sha.encodings.remap import remap_encodings
from mha2sha.errors import InternalError, UserError
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.io.names import tensor_names
from mha2sha.io.prepare import prepare_for_split, remove_unused_initializers
from mha2sha.io.save import save_model, staging_dir
from mha2sha.io.shapes import ShapeRoles, check_shapes, resolve_input_shapes
from mha2sha.layout import LayoutRecord, apply_htp_layout, split_o_proj_per_head
from mha2sha.lower import LowerRecord, lower_fused_ops
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.summary import report_json
from mha2sha.split.record import BlockReport, SplitRecord
from mha2sha.split.split_heads import SplitHeadsPass
from mha2sha.verify.htp import DEFAULT_SOC, HtpCheck
from mha2sha.verify.plan import (
    FULL_VERIFY_MAX_BYTES,
    VERIFY_MODES,
    Quantized,
    VerifyMode,
    VerifyOptions,
    VerifyPlan,
    VerifyRecord,
    plan_verification,
    prepare_blocks,
    require_memory,
    verify_conversion,
)
from mha2sha.verify.qdq import DEFAULT_MAX_LSB
from mha2sha.verify.qdq_local import LocalCheck, origins
from mha2sha.verify.runner import DEFAULT_RTOL, Verification

__all__ = ["NAME_MAP_FILE", "ConvertOptions", "ConversionResult", "convert"]

NAME_MAP_FILE = "mha_to_sha_names.json"


def _is_verify_mode(mode: str) -> TypeGuard[VerifyMode]:
    return mode in VERIFY_MODES


@dataclasses.dataclass
class ConvertOptions:
    """Everything a user can ask of a conversion (the CLI's options, by the same names)."""

    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # sizes of dynamic dims by role, matched to the exporter's dim names (--seq-len, --past-len, ...)
    shape_roles: ShapeRoles = dataclasses.field(default_factory=ShapeRoles)
    inputs: str | None = None  # .npz of user inputs for verification
    verify: VerifyMode | bool = "auto"  # True = "auto", False = "none"
    full_verify_max_bytes: int = FULL_VERIFY_MAX_BYTES  # "auto": whole models up to this ORT footprint
    rtol: float = DEFAULT_RTOL
    seed: int = 0
    allow_partial: bool = False
    force: bool = False  # write the model even when there is no attention to split
    split_heads: bool = True  # False (--no-split): only the layout passes (needs htp_layout)
    create_input_lists: bool = False
    per_head_kv_io: bool = False  # past KV inputs / present KV outputs as one tensor per head
    encodings: str | None = None  # AIMET .encodings of the input model
    encodings_version: str | None = None  # write this version (default: the version read)
    strict_encodings: bool = False  # any coverage gap is an error
    max_lsb: float = DEFAULT_MAX_LSB  # quantized (QDQ) outputs may differ by at most this many LSBs
    htp_layout: bool = False  # projections as Conv 1x1 on [B, C, 1, S], layout ops cancelled (--target htp)
    optimize_o_proj: bool = False  # per-head o_proj on each head's rows of W_o, summed (measured slower)
    verify_htp: bool = False  # also compare MHA-QDQ and SHA-QDQ on the HTP emulator (onnxruntime-qnn)
    soc: str = DEFAULT_SOC
    shard_bytes: int | None = None  # external data in files of at most this many bytes (--shard-size)

    def __post_init__(self) -> None:
        if self.verify is True or self.verify is False:
            self.verify = "auto" if self.verify else "none"
        mode = self.verify.lower() if isinstance(self.verify, str) else None
        if mode is None or not _is_verify_mode(mode):
            raise UserError(
                f"verify must be one of {', '.join(VERIFY_MODES)} (or True/False), not {self.verify!r}"
            )
        self.verify = mode
        if not (math.isfinite(self.rtol) and self.rtol > 0):
            raise UserError(f"--rtol must be a positive number, not {self.rtol}")
        if not (math.isfinite(self.max_lsb) and self.max_lsb >= 0):
            raise UserError(f"--max-lsb must be a number >= 0, not {self.max_lsb}")
        if not self.split_heads and (not self.htp_layout or self.optimize_o_proj):
            raise UserError(
                "--no-split runs only the layout passes: add --replace-linear-with-conv or --target htp"
                " (and drop --optimize-o-proj, which works on split heads)"
            )

    @property
    def verify_options(self) -> VerifyOptions:
        assert isinstance(self.verify, str)
        return VerifyOptions(
            mode=self.verify,
            rtol=self.rtol,
            max_lsb=self.max_lsb,
            seed=self.seed,
            inputs=self.inputs,
            input_shapes=self.input_shapes,
            full_verify_max_bytes=self.full_verify_max_bytes,
            verify_htp=self.verify_htp,
            soc=self.soc,
            create_input_lists=self.create_input_lists,
        )


@dataclasses.dataclass
class ConversionResult:
    """The records of every stage that ran (and the converted model, in memory)."""

    model: ir.Model
    split: SplitRecord
    lowering: LowerRecord | None = None
    layout: LayoutRecord | None = None
    coverage: CoverageReport | None = None
    requant: RequantRecord | None = None
    verify: VerifyRecord | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    timer: PhaseTimer | None = None

    # -- shortcuts into the records -------------------------------------------------------------
    @property
    def record(self) -> SplitRecord:
        return self.split

    @property
    def blocks(self) -> list[BlockReport]:
        return self.split.blocks

    @property
    def other_softmax(self) -> list[str]:
        return self.split.other_softmax

    @property
    def split_blocks(self) -> list[BlockReport]:
        return self.split.split_blocks

    @property
    def unsupported_blocks(self) -> list[BlockReport]:
        return self.split.unsupported_blocks

    @property
    def complete(self) -> bool:
        """Every attention block with more than one head was split."""
        return not self.unsupported_blocks

    @property
    def verification(self) -> Verification | None:
        return self.verify.float if self.verify else None

    @property
    def verify_plan(self) -> VerifyPlan | None:
        return self.verify.plan if self.verify else None

    @property
    def verify_mode(self) -> str | None:
        """How the float verification was decided: "full" or "blocks" (None when off)."""
        return self.verify.plan.mode if self.verify else None

    @property
    def qdq_lsb(self) -> dict[str, float] | None:
        return self.verify.qdq_lsb if self.verify else None

    @property
    def qdq_local(self) -> LocalCheck | None:
        return self.verify.qdq_local if self.verify else None

    @property
    def htp(self) -> HtpCheck | None:
        return self.verify.htp if self.verify else None

    def to_json(self) -> dict[str, Any]:
        return report_json(
            lowering=self.lowering,
            split=self.split,
            layout=self.layout,
            coverage=self.coverage,
            verify=self.verify,
            phases=self.timer.records if self.timer else [],
        )


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
    ``<name>.report.json`` (+ ``<name>.encodings``, input lists). Nothing is written when the input
    is bad or verification fails.
    """
    options = options or ConvertOptions()
    timer = timer or PhaseTimer()
    if not os.fspath(out_dir).strip():
        raise UserError("the output folder (-o) is empty")
    model_path, out_dir = Path(model_path), Path(out_dir)
    name = model_path.stem if name is None else name
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise UserError(f"--name must be a plain file name (no folder, not '.' or '..'), not {name!r}")
    out_model = out_dir / f"{name}.onnx"
    _refuse_overwriting_input(model_path, out_model)

    with timer.phase("load"):
        model = load_model(model_path)
        shapes = resolve_input_shapes(model, options.input_shapes, options.shape_roles)
        fix_input_shapes(model, shapes)
        require_static_inputs(model)
        check_shapes(model)
        verify_options = dataclasses.replace(options.verify_options, input_shapes=shapes)
        plan = plan_verification(model, verify_options, encodings=options.encodings is not None)
        encodings = load_encodings(options.encodings, model=model) if options.encodings else None
    with timer.phase("lower fused ops"):
        result_lowering = lower_fused_ops(model)
    with timer.phase("prepare (fold shapes, infer)"):
        prepare_for_split(model)
        if plan is not None:
            require_memory(plan, model)
        before = _EncodingsContext.of(model) if encodings is not None else None

    result = ConversionResult(model, SplitRecord(), lowering=result_lowering, timer=timer)
    if options.split_heads:
        with timer.phase("split heads") as progress:
            SplitHeadsPass(result.split, per_head_io=options.per_head_kv_io, progress=progress.to)(model)
            remove_unused_initializers(model)
        if not result.split_blocks and not options.force:
            return result
    if options.htp_layout or options.optimize_o_proj:
        result.layout = LayoutRecord()
    if options.optimize_o_proj:  # before propagation: its W_o row slices are per-head weights
        with timer.phase("per-head o_proj"):
            split_o_proj_per_head(model, result.layout, result.split)
            remove_unused_initializers(model)
    sha_encodings = None
    if encodings is not None and before is not None:
        with timer.phase("propagate encodings"):
            # where one per-head tensor stands for originals with different encodings, requantise
            # per head as the MHA model did (a full-range Slice per extra encoding)
            result.requant = requantize(model, result.split, encodings)
            sha_encodings, result.coverage = propagate(
                encodings,
                result.split,
                model,
                channel_axes_map=before.axes,
                strict=options.strict_encodings,
                original_names=before.names,
            )
    if options.htp_layout:
        with timer.phase("HTP layout (Linear -> Conv 1x1)"):
            quantized = set(sha_encodings.activations) if sha_encodings is not None else ()
            keep = set(result.requant.tensors) if result.requant is not None else set()
            apply_htp_layout(model, result.layout, quantized=quantized, keep=keep)
            remove_unused_initializers(model)
            if sha_encodings is not None:
                assert result.layout is not None  # made above for the layout passes
                sha_encodings = remap_encodings(sha_encodings, result.layout, model)

    report_file = f"{name}.report.json"
    quantized_pair = (
        Quantized(encodings, sha_encodings, origins(result.split, result.layout))
        if encodings is not None and sha_encodings is not None
        else None
    )
    with (
        contextlib.ExitStack() as background,
        staging_dir(out_dir, replaces=_previous_outputs(out_dir / report_file)) as stage,
    ):
        # blockwise verification: blocks found, original sides computed in the background meanwhile
        ahead = None
        if plan is not None:
            ahead = prepare_blocks(plan, verify_options, model_path, model, result.split, quantized_pair)
            if ahead is not None:
                background.enter_context(ahead)
        with timer.phase("save") as progress:
            staged = save_model(model, stage / out_model.name, options.shard_bytes, progress.to)[0]
            _check_model(staged)
            (stage / NAME_MAP_FILE).write_text(json.dumps(result.split.name_map(), indent=1))
            if sha_encodings is not None:
                version = options.encodings_version or sha_encodings.version
                save_encodings(sha_encodings, stage / f"{name}.encodings", version, model=model)
        if plan is not None:
            result.verify = verify_conversion(
                plan, verify_options, model_path, staged, result.split, quantized_pair,
                timer.phase, stage, out_dir, [name for name, _, _ in result_lowering.lowered], ahead,
            )  # fmt: skip
        outputs = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        outputs.append(report_file)
        (stage / report_file).write_text(json.dumps({**result.to_json(), "outputs": outputs}, indent=1))
        result.files = [out_dir / f for f in outputs]
    return result


def _previous_outputs(report: Path) -> list[str]:
    """The files an earlier run of the same output wrote (its report lists them): replaced as a set."""
    try:
        outputs = json.loads(report.read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [
        o for o in outputs if isinstance(o, str) and ".." not in Path(o).parts and not Path(o).is_absolute()
    ]


@dataclasses.dataclass
class _EncodingsContext:
    """What the encodings stage needs to know of the model before the split: which tensor names
    exist (an encoding naming none of them is reported) and each weight's channel axis."""

    names: set[str]
    axes: dict[str, Any]

    @classmethod
    def of(cls, model: ir.Model) -> _EncodingsContext:
        return cls(tensor_names(model), dict(channel_axes(model)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_overwriting_input(model_path: Path, out_model: Path) -> None:
    if _same_file(model_path, out_model) or _same_file(model_path, out_model.with_suffix(".data")):
        raise UserError(
            f"output {out_model} would overwrite the input model; choose another -o folder or --name"
        )


def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # a bug of ours, never the user's
        raise InternalError(f"converted model fails onnx.checker: {str(e).splitlines()[0]}") from e
