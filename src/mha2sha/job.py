"""The conversion job: the stages in order, each returning a record, nothing else.

    load -> lower -> prepare -> [lora_alpha input] -> split (plan, describe, emit) -> encodings -> layout
         -> [adapters] -> save -> verify -> report

A stage is a pass or a function of its own module (``io/``, ``lower/``, ``split/``,
``encodings/``, ``layout/``, ``verify/``, ``report/``); this module only decides which run and in
which order, and collects their records into a :class:`ConversionResult`. Adding a stage is one
file plus one step in :func:`convert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import onnx
import onnx_ir as ir

from mha2sha.adapters import (
    AdapterSet,
    AdaptersRecord,
    AlphaRecord,
    adapter_scale,
    alpha_encoding,
    alpha_encodings,
    find_lora,
    fit_adapters,
    load_adapters,
    lora_alpha_to_input,
    plan_adapters,
    read_adapter_list,
    save_adapters,
)
from mha2sha.analyze import ModelFacts, StructureRecord, describe_attention
from mha2sha.analyze.facts import input_infos, model_facts
from mha2sha.analyze.record import InputInfo
from mha2sha.encodings import (
    CoverageReport,
    EncodingSet,
    OutputFacts,
    RequantRecord,
    channel_axes,
    load_encodings,
    output_facts,
    propagate,
    requantize,
    save_encodings,
)
from mha2sha.encodings.remap import remap_encodings
from mha2sha.errors import ConversionFailed, InternalError, UserError
from mha2sha.graph import name_of
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.io.names import tensor_names
from mha2sha.io.prepare import prepare_for_split, remove_unused_initializers
from mha2sha.io.save import save_model, staging_dir
from mha2sha.io.shapes import ShapeRoles, check_shapes, resolve_input_shapes
from mha2sha.layout import LayoutRecord, apply_htp_layout, split_o_proj_per_head
from mha2sha.lower import LowerRecord, lower_fused_ops
from mha2sha.report.html import conversion_html
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.summary import report_json
from mha2sha.split.record import BlockReport, SplitRecord
from mha2sha.split.split_heads import SplitHeadsPass
from mha2sha.verify.adapters import verify_adapters
from mha2sha.verify.htp import DEFAULT_SOC, HtpCheck, check_soc
from mha2sha.verify.plan import (
    FULL_VERIFY_MAX_BYTES,
    VERIFY_MODES,
    BlocksAhead,
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

__all__ = ["FAILED_REPORT_SUFFIX", "NAME_MAP_FILE", "ConvertOptions", "ConversionResult", "convert"]

logger = logging.getLogger(__name__)

NAME_MAP_FILE = "mha_to_sha_names.json"
#: ``<name>.failed.report.json``: the report a run whose verification failed leaves (nothing else).
FAILED_REPORT_SUFFIX = ".failed.report.json"


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
    lora_adaptor_list: str | None = None  # YAML list of LoRA adapters to split like the graph
    lora_alpha_from_input: bool = False  # the LoRA scale becomes the graph input lora_alpha

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
        if self.lora_alpha_from_input and not self.lora_adaptor_list:
            raise UserError(
                "--lora-alpha-from-input needs --lora-adaptor-list: the adapters name the graph's LoRA tensors"
            )
        self.soc = check_soc(self.soc)
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
    adapters: AdaptersRecord | None = None
    requant: RequantRecord | None = None
    verify: VerifyRecord | None = None
    files: list[Path] = dataclasses.field(default_factory=list)
    timer: PhaseTimer | None = None
    # for the HTML report: the attention blocks as planned (before the split emitted), the inputs
    # (declared and used), the graph's facts before the split and as written
    structure: StructureRecord | None = None
    inputs: list[InputInfo] = dataclasses.field(default_factory=list)
    outputs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    facts_before: ModelFacts | None = None
    facts_after: ModelFacts | None = None

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
        report = report_json(
            lowering=self.lowering,
            split=self.split,
            layout=self.layout,
            coverage=self.coverage,
            adapters=self.adapters,
            verify=self.verify,
            phases=self.timer.records if self.timer else [],
        )
        if self.structure is not None:
            report["attention"] = self.structure.to_dict(sketches=False)
        return report

    def to_html(self, name: str, model_path: str, files: list[str]) -> str:
        return conversion_html(
            name=name,
            model_path=model_path,
            structure=self.structure,
            inputs=self.inputs,
            outputs=self.outputs,
            facts_before=self.facts_before,
            facts_after=self.facts_after,
            lowering=self.lowering,
            layout=self.layout,
            coverage=self.coverage,
            verify=self.verify,
            phases=self.timer.records if self.timer else [],
            files=files,
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

    Writes ``<name>.onnx`` (+ ``.data`` for large models), ``mha_to_sha_names.json``,
    ``<name>.report.json`` and ``<name>.report.html`` (+ ``<name>.encodings``, input lists, adapters).
    Nothing is written when the input is bad; when verification fails only
    ``<name>.failed.report.json`` (what was checked, and where it failed) is.
    """
    job = _Job.start(model_path, out_dir, name, options or ConvertOptions(), timer or PhaseTimer())
    with _FrozenHeap() as heap:
        _load(job)
        with job.timer.phase("lower fused ops"):
            job.result.lowering = lower_fused_ops(job.model)
        _prepare(job)
        heap.freeze()
        if not _split(job):
            return job.result
        _encodings(job)
        _layout(job)
        heap.freeze()
        _save_verify_report(job)
    return job.result


class _FrozenHeap:
    """The model's objects kept out of Python's cyclic garbage collector while the job runs.

    A model is hundreds of thousands of objects (nodes, values, attributes). Every full collection,
    triggered by the allocations of the save and of the verification threads, walks all of them
    again: ~0.4 CPU-s on a 28-layer model, paid beside the save and the block checks. ``freeze()``
    moves the objects alive at a stage's end to the permanent generation (they are still freed by
    reference counting); leaving unfreezes them, so a long-lived caller's garbage is collected as
    before. A caller that froze objects itself is left alone.
    """

    def __init__(self) -> None:
        self._ours = gc.get_freeze_count() == 0

    def freeze(self) -> None:
        if self._ours:
            gc.freeze()

    def __enter__(self) -> _FrozenHeap:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ours:
            gc.unfreeze()


@dataclasses.dataclass
class _Job:
    """One conversion in progress: its inputs, the model being rewritten, and what stages hand on."""

    options: ConvertOptions
    timer: PhaseTimer
    model_path: Path
    out_dir: Path
    name: str
    model: ir.Model = dataclasses.field(init=False)
    result: ConversionResult = dataclasses.field(init=False)
    verify_options: VerifyOptions = dataclasses.field(init=False)
    plan: VerifyPlan | None = None
    encodings: EncodingSet | None = None  # of the original model, as read
    sha_encodings: EncodingSet | None = None
    adapter_set: AdapterSet | None = None
    alpha: AlphaRecord | None = None
    before: _EncodingsContext | None = None

    @classmethod
    def start(cls, model_path: str | os.PathLike, out_dir: str | os.PathLike, name: str | None,
              options: ConvertOptions, timer: PhaseTimer) -> _Job:  # fmt: skip
        """Check the output location before any work (never the input's files, a plain name)."""
        if not os.fspath(out_dir).strip():
            raise UserError("the output folder (-o) is empty")
        path = Path(model_path)
        name = path.stem if name is None else name
        if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise UserError(f"--name must be a plain file name (no folder, not '.' or '..'), not {name!r}")
        _refuse_overwriting_input(path, Path(out_dir) / f"{name}.onnx")
        return cls(options, timer, path, Path(out_dir), name)

    @property
    def adapters(self) -> AdaptersRecord | None:
        return self.result.adapters


def _load(job: _Job) -> None:
    """The model with static input shapes, the verification planned, encodings and adapters read."""
    options = job.options
    with job.timer.phase("load"):
        model = job.model = load_model(job.model_path)
        shapes = resolve_input_shapes(model, options.input_shapes, options.shape_roles)
        inputs = input_infos(model, shapes)
        outputs = [(name_of(v), _shape_text(v.shape)) for v in model.graph.outputs]
        fix_input_shapes(model, shapes)
        require_static_inputs(model)
        check_shapes(model)
        job.verify_options = dataclasses.replace(options.verify_options, input_shapes=shapes)
        job.plan = plan_verification(model, job.verify_options, encodings=options.encodings is not None)
        job.encodings = load_encodings(options.encodings, model=model) if options.encodings else None
        job.adapter_set = _load_adapters(options, model)
    job.result = ConversionResult(model, SplitRecord(), timer=job.timer)
    job.result.inputs, job.result.outputs = inputs, outputs


def _prepare(job: _Job) -> None:
    """Static shapes everywhere; the LoRA scale as an input when asked; the adapters planned."""
    with job.timer.phase("prepare (fold shapes, infer)"):
        prepare_for_split(job.model)
        if job.plan is not None:
            require_memory(job.plan, job.model)
    if job.adapter_set is not None and job.options.lora_alpha_from_input:
        with job.timer.phase("LoRA scale -> input lora_alpha"):
            job.alpha = lora_alpha_to_input(job.model, find_lora(job.model, job.adapter_set.names))
            if job.plan is not None:
                job.plan.inputs.add_fixed(job.alpha.input, job.alpha.feed())
    if job.adapter_set is not None:
        job.result.adapters = plan_adapters(job.adapter_set, job.alpha, job.encodings)
    adapter_encodings = any(a.mha_encodings is not None for a in _adapter_results(job))
    if job.encodings is not None or adapter_encodings:
        job.before = _EncodingsContext.of(job.model)
    job.result.facts_before = model_facts(job.model)


def _split(job: _Job) -> bool:
    """Every attention block split per head (and ``o_proj`` per head when asked); False when there
    is nothing to write (no block split, and no ``--force``)."""
    result, options, model = job.result, job.options, job.model
    if options.split_heads:
        with job.timer.phase("split heads") as progress:
            split_pass = SplitHeadsPass(result.split, per_head_io=options.per_head_kv_io, progress=progress.to)
            split_plan = split_pass.plan(model)
            # what the report draws and lists, read from the graph before the split changes it
            result.structure = describe_attention(model, split_plan, result.lowering)
            result.structure.other_softmax = list(result.split.other_softmax)
            split_pass.apply(model, split_plan)
            remove_unused_initializers(model)
        if not result.split_blocks and not options.force:
            return False
    if options.htp_layout or options.optimize_o_proj:
        result.layout = LayoutRecord()
    if options.optimize_o_proj:  # before propagation: its W_o row slices are per-head weights
        with job.timer.phase("per-head o_proj"):
            split_o_proj_per_head(model, result.layout, result.split)
            remove_unused_initializers(model)
    return True


def _encodings(job: _Job) -> None:
    """Requantisation where heads need it, then every encodings file propagated per head."""
    if job.before is None:
        return
    result, before, options = job.result, job.before, job.options
    facts: OutputFacts | None = None  # of the model once requantize() changed it

    def propagated(es: EncodingSet, only: set[str] | None = None) -> tuple[EncodingSet, CoverageReport]:
        return propagate(es, result.split, job.model, channel_axes_map=before.axes, strict=options.strict_encodings,
                         original_names=before.names, only=only, facts=facts)  # fmt: skip

    with job.timer.phase("propagate encodings"):
        sha_source = job.encodings
        if job.encodings is not None and job.alpha is not None:
            enc, job.alpha.encoding_source = alpha_encoding(job.encodings, job.alpha, job.alpha.value)
            sha_source = alpha_encodings(job.encodings, job.alpha, enc)
        if sha_source is not None:
            # where one per-head tensor stands for originals with different encodings, requantise
            # per head as the MHA model did (a full-range Slice per extra encoding)
            result.requant = requantize(job.model, result.split, sha_source)
        facts = output_facts(job.model)
        if sha_source is not None:
            job.sha_encodings, result.coverage = propagated(sha_source)
        for adapter in _adapter_results(job):  # only its own encodings: the others are the base graph's
            if adapter.mha_encodings is not None:
                adapter.encodings, adapter.coverage = propagated(adapter.mha_encodings, adapter.scope)


def _layout(job: _Job) -> None:
    """The HTP layout (encodings follow it), then the adapters cut like the graph."""
    result, model = job.result, job.model
    if job.options.htp_layout:
        assert result.layout is not None  # made by _split for the layout passes
        with job.timer.phase("HTP layout (Linear -> Conv 1x1)"):
            every = [job.sha_encodings, *(a.encodings for a in _adapter_results(job))]
            quantized = {n for es in every if es is not None for n in es.activations}
            keep = set(result.requant.tensors) if result.requant is not None else set()
            apply_htp_layout(model, result.layout, quantized=quantized, keep=keep)
            remove_unused_initializers(model)
            if job.sha_encodings is not None:
                job.sha_encodings = remap_encodings(job.sha_encodings, result.layout, model)
            for adapter in _adapter_results(job):
                if adapter.encodings is not None:
                    adapter.encodings = remap_encodings(adapter.encodings, result.layout, model)
    if job.adapters is not None:
        with job.timer.phase("split adapters"):
            fit_adapters(job.adapters, result.split, result.layout, model)
    result.facts_after = model_facts(model)


def _save_verify_report(job: _Job) -> None:
    """Save into a staging folder, prove it, write the reports; move it all in place as one set.
    A failed proof leaves only ``<name>.failed.report.json``."""
    result, name, out_dir = job.result, job.name, job.out_dir
    report_file, html_file = f"{name}.report.json", f"{name}.report.html"
    failed_report = out_dir / f"{name}{FAILED_REPORT_SUFFIX}"
    replaces = _previous_outputs(out_dir / report_file)
    if failed_report.is_file():  # an earlier run's failure report goes when this run's set comes
        replaces.append(failed_report.name)
    try:
        with contextlib.ExitStack() as background, staging_dir(out_dir, replaces=replaces) as stage:
            # blockwise verification: blocks found, original sides computed in the background meanwhile
            ahead = None
            if job.plan is not None:
                ahead = prepare_blocks(job.plan, job.verify_options, job.model_path, job.model, result.split,
                                       _quantized(job))  # fmt: skip
                if ahead is not None:
                    background.enter_context(ahead)
            staged = _save(job, stage)
            if job.plan is not None:
                _verify(job, job.plan, staged, stage, ahead)
            files = (p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
            written = sorted([report_file, html_file, *files])
            (stage / report_file).write_text(json.dumps({**result.to_json(), "outputs": written}, indent=1))
            html = result.to_html(name, str(job.model_path), written)
            (stage / html_file).write_text(html, encoding="utf-8")
            result.files = [out_dir / f for f in written]
    except ConversionFailed as failed:  # verification failed: the model is not written, the report is
        if not isinstance(failed.record, VerifyRecord):
            raise
        result.verify = failed.record
        _write_failed_report(failed_report, {**result.to_json(), "failure": str(failed), "outputs": []})
        raise ConversionFailed(
            f"{failed}; the model was not written (report of the failed check: {failed_report})",
            record=failed.record,
        ) from None


def _save(job: _Job, stage: Path) -> Path:
    """The model, the name map, the encodings and the adapters, into the staging folder."""
    with job.timer.phase("save") as progress:
        out = stage / f"{job.name}.onnx"
        staged = save_model(job.model, out, job.options.shard_bytes, progress.to)[0]
        _check_model(staged)
        (stage / NAME_MAP_FILE).write_text(json.dumps(job.result.split.name_map(), indent=1))
        version = job.options.encodings_version
        if job.sha_encodings is not None:
            path = stage / f"{job.name}.encodings"
            save_encodings(job.sha_encodings, path, version or job.sha_encodings.version, model=job.model)
        if job.adapters is not None:
            save_adapters(job.adapters, stage, out.name, version, model=job.model)
    return staged


def _quantized(job: _Job) -> Quantized | None:
    """The encodings pair the quantized proof compares, when the job has both sides."""
    if job.encodings is None or job.sha_encodings is None:
        return None
    return Quantized(job.encodings, job.sha_encodings, origins(job.result.split, job.result.layout))


def _verify(job: _Job, plan: VerifyPlan, staged: Path, stage: Path, ahead: BlocksAhead | None) -> None:
    """Every proof the plan holds: the base conversion, then each adapter's."""
    result, options = job.result, job.options
    lowered = [name for name, _, _ in result.lowering.lowered] if result.lowering else []
    result.verify = verify_conversion(plan, job.verify_options, job.model_path, staged, result.split,
                                      _quantized(job), job.timer.phase, stage, job.out_dir, lowered,
                                      ahead)  # fmt: skip
    if job.adapters is not None:
        result.verify.adapters = verify_adapters(
            job.adapters, job.model_path, staged, result.split, result.layout, job.sha_encodings,
            inputs=plan.inputs, mode=plan.mode, whole_model_runs=plan.whole_model_runs,
            rtol=options.rtol, max_lsb=options.max_lsb, seed=options.seed,
            input_shapes=job.verify_options.input_shapes, phase=job.timer.phase,
        )  # fmt: skip


def _adapter_results(job: _Job) -> list:
    return job.adapters.adapters if job.adapters is not None else []


def _write_failed_report(path: Path, report: dict[str, Any]) -> None:
    """The report of a run whose verification failed, beside where the model would have gone: the
    only file such a run leaves (written whole or not at all; a later successful run removes it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:  # the failure itself is what the user needs to hear about
        logger.warning("could not write %s: %s", path, e.strerror or e)


def _load_adapters(options: ConvertOptions, model: ir.Model) -> AdapterSet | None:
    """The adapters of ``--lora-adaptor-list``, read and checked against the base graph (or None)."""
    if not options.lora_adaptor_list:
        return None
    entries = read_adapter_list(options.lora_adaptor_list)
    if not options.lora_alpha_from_input:
        given = next((e for e in entries if e.alpha is not None or e.scale is not None), None)
        if given is not None:
            raise UserError(
                f"adapter {given.name!r} gives an alpha, which only --lora-alpha-from-input uses: without it "
                "the graph's LoRA scale is fixed (fold alpha / r / the graph's scale into B, or add the flag)"
            )
    adapter_set = load_adapters(entries, model)
    if options.lora_alpha_from_input:
        for adapter in adapter_set.adapters:
            adapter_scale(adapter, adapter_set.lora)  # refuse a scale that cannot be fed now
    return adapter_set


def _shape_text(shape: ir.Shape | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


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
