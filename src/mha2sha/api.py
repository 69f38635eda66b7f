"""The conversion job: load, split every attention block, save atomically, verify, report.

``convert`` is what the CLI runs; :class:`MHA2SHAConverter` keeps the Python API of Qualcomm's
original tool working on top of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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
from mha2sha.verify.blocks import low_precision_bound, verify_blocks
from mha2sha.verify.htp import DEFAULT_SOC, HtpCheck, compare_on_htp
from mha2sha.verify.input_lists import write_input_lists
from mha2sha.verify.inputs import ModelInputs, plan_inputs
from mha2sha.verify.qdq import output_lsb, run_qdq_compare, to_qdq_ir
from mha2sha.verify.qdq_local import LocalCheck, Origin, compare_quantized_tensors
from mha2sha.verify.runner import Verification, compare_outputs, estimate_ort_bytes, run_model, verify

__all__ = ["ConvertOptions", "ConversionResult", "ConversionFailed", "convert", "MHA2SHAConverter"]

logger = logging.getLogger(__name__)

NAME_MAP_FILE = "mha_to_sha_names.json"

#: ``verify="auto"`` runs the whole models in onnxruntime when their estimated footprint
#: (:func:`mha2sha.verify.runner.estimate_ort_bytes`, from the "verify full" measurements in
#: benchmarks/RESULTS.md) is at most this and a quarter of the available RAM, else verifies block
#: by block. 1 GiB keeps a conversion within the 1 GB peak-RSS target: fp16 models up to ~0.28 GB
#: of weights, fp32 up to ~0.9 GB, are verified whole. ``ConvertOptions.full_verify_max_bytes``.
FULL_VERIFY_MAX_BYTES = 1 << 30
VERIFY_MODES = ("auto", "full", "blocks", "none")


class ConversionFailed(Exception):
    """The conversion ran but its result is not acceptable (verification failed). Exit code 1."""

    exit_code = 1


@dataclasses.dataclass
class ConvertOptions:
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    inputs: str | None = None  # .npz of user inputs for verification
    verify: bool | str = True  # "auto" (= True) | "full" | "blocks" | "none" (= False)
    full_verify_max_bytes: int = FULL_VERIFY_MAX_BYTES  # "auto": whole models up to this ORT footprint
    rtol: float = 1e-5
    seed: int = 0
    allow_partial: bool = False
    force: bool = False  # write the model even when there is no attention to split
    split_heads: bool = True  # False (--no-split): only the layout passes (needs htp_layout)
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
    shard_bytes: int | None = None  # external data in files of at most this many bytes (--shard-size)


@dataclasses.dataclass
class VerifyPlan:
    """How a conversion is verified, decided at load time (before any heavy work)."""

    requested: str  # "auto" | "full" | "blocks"
    mode: str  # "full" | "blocks": what decided (a failed fp16 full run can hand over to "blocks")
    inputs: ModelInputs  # checked now, arrays made when verifying
    estimate_bytes: int  # onnxruntime footprint of a whole-model run (estimate_ort_bytes)
    limit_bytes: int  # whole-model runs allowed up to this (unless --verify full)
    low_precision: ir.DataType | None  # FLOAT16/BFLOAT16 when most weights are
    notes: list[str] = dataclasses.field(default_factory=list)  # fallbacks, skipped checks
    full: Verification | None = None  # the whole-model result when blockwise verification decided after it

    @property
    def whole_model_runs(self) -> bool:
        """Whole-model runs (float, QDQ, HTP, goldens) fit, or the user asked for them."""
        return self.requested == "full" or self.estimate_bytes <= self.limit_bytes

    def reason(self) -> str:
        size = f"{_gb(self.estimate_bytes)} estimated for onnxruntime"
        if self.requested != "auto":
            return f"--verify {self.requested}; {size}"
        return f"auto: {size}, {'<=' if self.mode == 'full' else '>'} limit {_gb(self.limit_bytes)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "mode": self.mode,
            "estimated_ort_bytes": self.estimate_bytes,
            "limit_bytes": self.limit_bytes,
            "notes": list(self.notes),
        }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


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
    qdq_local: LocalCheck | None = None  # tensor-by-tensor check, run when the QDQ outputs differ
    verify_plan: VerifyPlan | None = None  # None when verification is off

    @property
    def verify_mode(self) -> str | None:
        """How the float verification was decided: "full" or "blocks" (None when off)."""
        return self.verify_plan.mode if self.verify_plan is not None else None

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

    requested = _verify_request(options.verify)
    if not options.split_heads and (not options.htp_layout or options.optimize_o_proj):
        raise UserError(
            "--no-split runs only the layout passes: add --replace-linear-with-conv or --target htp"
            " (and drop --optimize-o-proj, which works on split heads)"
        )
    timer = timer or PhaseTimer()
    with timer.phase("load"):
        model = load_model(model_path)
        fix_input_shapes(model, options.input_shapes)
        require_static_inputs(model)
        # Inputs are checked now (a bad --inputs fails before any heavy work) and made when verifying.
        plan = _plan_verification(model, options, requested) if requested != "none" else None
        encodings = load_encodings(options.encodings, model=model) if options.encodings else None
    with timer.phase("prepare (fold shapes, infer)"):
        prepare_for_split(model)
        weight_axes = channel_axes(model) if encodings is not None else None
        original_names = tensor_names(model) if encodings is not None else None
    record = SplitRecord()
    split = SplitHeadsPass(record, per_head_io=options.per_head_kv_io)
    if options.split_heads:
        with timer.phase("split heads", total=len(find_attention_cores(model.graph)[0])) as advance:
            split.on_block = advance
            split(model)
            remove_unused_initializers(model)
    result = ConversionResult(model, split.blocks, record, other_softmax=split.other_softmax, timer=timer)
    if not result.split_blocks and not options.force and options.split_heads:
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
            staged = save_model(model, stage / out_model.name, shard_bytes=options.shard_bytes)
            _check_model(staged[0])
            (stage / NAME_MAP_FILE).write_text(json.dumps(record.name_map(), indent=1))
            if sha_encodings is not None:
                version = options.encodings_version or sha_encodings.version
                save_encodings(sha_encodings, stage / f"{name}.encodings", version, model=model)
        if plan is not None:
            result.verify_plan = plan
            wanted = encodings is not None or options.create_input_lists
            inputs, golden = _verify_float(result, plan, model_path, staged[0], split, options, wanted)
            if not result.verification.ok:
                raise ConversionFailed(_failure_line(result.verification, plan.mode))
            if inputs is None and encodings is not None:
                _skip_whole_model_check(plan, "quantized (QDQ) verification")
            if inputs is not None and encodings is not None and sha_encodings is not None:
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
                elif max(result.qdq_lsb.values(), default=0.0) > options.max_lsb:
                    with timer.phase("verify quantized tensor by tensor"):
                        result.qdq_local = compare_quantized_tensors(
                            model_path, encodings, staged[0], sha_encodings, inputs,
                            _origins(record, layout_record),
                        )  # fmt: skip
                    _require_local_within_lsb(result.qdq_local, result.qdq_lsb, options.max_lsb)
            if options.create_input_lists and inputs is not None:
                if golden is None:  # blockwise verification ran no whole model
                    with timer.phase("goldens (onnxruntime)"):
                        golden = run_model(model_path, inputs)
                feeds = _per_head_feeds(inputs, split)
                goldens = _per_head_outputs(golden, split)
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
        raise ConversionFailed(
            f"{what} failed: output '{name}' differs by {worst:.3g} LSB (> {max_lsb:g}); nothing was written"
        )


def _origins(record: SplitRecord, layout: LayoutRecord) -> Origin:
    """SHA tensor -> (MHA tensor, ranges of its piece): per-head pieces, and layout copies of them."""
    origins = {p.name: (t.original, p.ranges) for t in record.tensors.values() for p in t.pieces}
    for new, old in layout.aliases.items():
        origins.setdefault(new, origins.get(old, (old, ())))
    return origins


def _require_local_within_lsb(local: LocalCheck, outputs: Mapping[str, float], max_lsb: float) -> None:
    """Outputs differ on ORT CPU: accept only if every quantized tensor is within ``max_lsb`` given
    the MHA model's quantized inputs (then the output difference is rounding flips that grew)."""
    name, worst = max(outputs.items(), key=lambda kv: kv[1])
    bad = local.first_above(max_lsb)
    if bad is not None:
        piece = f" (head piece of '{bad.origin}')" if bad.origin != bad.name else ""
        raise ConversionFailed(
            f"quantized verification failed: '{bad.name}'{piece} differs from the MHA model by {bad.lsb:.3g} LSB"
            f" (> {max_lsb:g}) given the same quantized inputs; nothing was written"
        )
    if not local.tensors:
        raise ConversionFailed(
            f"quantized verification failed: output '{name}' differs by {worst:.3g} LSB (> {max_lsb:g}) and no"
            " quantized tensor could be compared on its own; nothing was written (try --verify-htp)"
        )
    logger.warning(
        "quantized outputs differ by up to %.3g LSB on onnxruntime CPU ('%s'), but each of the %d quantized"
        " tensors is within %g LSB of the MHA model given the same quantized inputs (%d exact): float"
        " summation order flips roundings that grow downstream; --verify-htp checks on the device's arithmetic",
        worst, name, len(local.tensors), max_lsb, sum(t.lsb == 0 for t in local.tensors),
    )  # fmt: skip


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


def _verify_request(verify: bool | str) -> str:
    """``ConvertOptions.verify`` as one of :data:`VERIFY_MODES` (True = auto, False = none)."""
    if verify is True or verify is False:
        return "auto" if verify else "none"
    if isinstance(verify, str) and verify.lower() in VERIFY_MODES:
        return verify.lower()
    raise UserError(f"verify must be one of {', '.join(VERIFY_MODES)} (or True/False), not {verify!r}")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _plan_verification(model: ir.Model, options: ConvertOptions, requested: str) -> VerifyPlan:
    """Check the inputs, estimate a whole-model run, pick the mode; refuse what cannot be done.

    "auto" runs the whole models when onnxruntime's estimated footprint is at most
    ``options.full_verify_max_bytes`` and a quarter of the available RAM, else block by block.
    ``--create-input-lists`` and ``--verify-htp`` need whole-model runs (the goldens are the whole
    original model's outputs; the HTP emulator runs whole QDQ models): when those do not fit they
    are refused here, before any heavy work, rather than silently skipped (``--verify full``
    forces them).
    """
    inputs = plan_inputs(model, options.seed, npz=options.inputs)
    estimate, low = estimate_ort_bytes(model, inputs.nbytes)
    limit = min(options.full_verify_max_bytes, _available_ram() // 4)
    mode = requested if requested != "auto" else ("full" if estimate <= limit else "blocks")
    plan = VerifyPlan(requested, mode, inputs, estimate, limit, low)
    if not plan.whole_model_runs:
        asked = [f for f, on in (("--create-input-lists", options.create_input_lists),
                                 ("--verify-htp", options.verify_htp and options.encodings)) if on]  # fmt: skip
        if asked:
            raise UserError(
                f"{' and '.join(asked)} need(s) whole-model onnxruntime runs, estimated at "
                f"{_gb(estimate)} for this model (limit {_gb(limit)}); verification is block by block "
                f"({plan.reason()}): add --verify full to run whole models anyway, or drop {asked[0]}"
            )
    return plan


def _skip_whole_model_check(plan: VerifyPlan, what: str) -> None:
    note = (
        f"{what} skipped: it runs whole models ({_gb(plan.estimate_bytes)} estimated for onnxruntime, "
        f"limit {_gb(plan.limit_bytes)}); the float conversion was verified block by block "
        "(--verify full runs it anyway)"
    )
    logger.warning(note)
    plan.notes.append(note)


def _verify_float(
    result: ConversionResult,
    plan: VerifyPlan,
    original: Path,
    converted: Path,
    split: SplitHeadsPass,
    options: ConvertOptions,
    whole_model_checks: bool,
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """Float verification in ``plan.mode``; sets ``result.verification``.

    Inputs are made here, after the model was saved. Returns the inputs when whole-model checks
    (QDQ, HTP, goldens) follow and fit, and the original's outputs when a whole-model run made them.
    A low-precision model whose full verification fails only within fp16/bf16 kernel rounding
    (:func:`~mha2sha.verify.blocks.low_precision_bound`; CPU kernels round a 64-column fp16
    matmul differently from a 2048-column one) is decided block by block, where failing fp16 blocks
    are re-run in fp32; ``rtol`` itself is never loosened.
    """
    timer = result.timer or PhaseTimer()
    if plan.mode == "blocks":
        with timer.phase("verify blocks (onnxruntime)", total=len(result.blocks)) as advance:
            result.verification = _verify_blocks(plan, original, converted, split, options, advance)
        keep = plan.whole_model_runs and whole_model_checks
        return (dict(plan.inputs) if keep else None), None

    with timer.phase("verify (onnxruntime)"):
        inputs = dict(plan.inputs)
        result.verification = full = _verify(original, converted, inputs, split, options.rtol)
    if not full.ok and _rounding_only(full, plan.low_precision):
        assert plan.low_precision is not None
        worst = max((r for r in full.rows if not r.ok), key=lambda r: r.max_rel_err)
        note = (
            f"full verification of this {plan.low_precision.name.lower()} model differs by "
            f"{worst.max_rel_err:.2g} on '{worst.name}' (within {plan.low_precision.name.lower()} kernel "
            f"rounding, <= {low_precision_bound(plan.low_precision):.2g}); decided block by block, "
            "re-running differing blocks in fp32"
        )
        logger.info(note)
        plan.notes.append(note)
        plan.mode, plan.full = "blocks", full
        with timer.phase("verify blocks (onnxruntime)", total=len(result.blocks)) as advance:
            result.verification = _verify_blocks(plan, original, converted, split, options, advance)
    return inputs, full.reference


def _rounding_only(check: Verification, dtype: ir.DataType | None) -> bool:
    """Every failing output is finite and differs by at most fp16/bf16 kernel rounding."""
    bad = [r for r in check.rows if not r.ok]
    return (
        dtype is not None
        and bool(bad)
        and all(
            math.isfinite(r.max_rel_err)
            and "NaN" not in r.note
            and r.max_rel_err <= low_precision_bound(dtype)
            for r in bad
        )
    )


def _verify_blocks(
    plan: VerifyPlan,
    original: Path,
    converted: Path,
    split: SplitHeadsPass,
    options: ConvertOptions,
    advance: Any,
) -> Verification:
    """Each attention block of both saved models cut out and compared (one block in memory)."""
    source = load_model(original)
    fix_input_shapes(source, options.input_shapes)
    return verify_blocks(
        source,
        load_model(converted),
        inputs=plan.inputs,  # made block by block (a layer's past KV only for its block)
        rtol=options.rtol,
        seed=options.seed,
        input_pieces=split.input_pieces,
        output_pieces=split.output_pieces,
        on_block=advance,
    )


def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # a bug of ours, never the user's
        raise RuntimeError(f"converted model fails onnx.checker: {str(e).splitlines()[0]}") from e


def _failure_line(v: Verification, mode: str = "full") -> str:
    bad = [r for r in v.rows if not r.ok]
    worst = max(bad, key=lambda r: r.max_rel_err) if bad else None
    detail = (
        f"output '{worst.name}' differs (max rel err {worst.max_rel_err:.3g}) {worst.note}"
        if worst
        else "outputs differ"
    )
    what = "blockwise verification" if mode == "blocks" else "verification"
    return f"{what} failed: {detail}; nothing was written"


def _report(result: ConversionResult) -> dict[str, Any]:
    v = result.verification
    return {
        "blocks": blocks_json(result.blocks),
        "non_attention_softmax": result.other_softmax,
        "phases": [dataclasses.asdict(r) for r in result.timer.records] if result.timer else [],
        "encodings_coverage": result.coverage.to_dict() if result.coverage else None,
        "quantized_max_lsb": result.qdq_lsb,
        "quantized_tensor_by_tensor": result.qdq_local.to_dict() if result.qdq_local else None,
        "htp": result.htp.to_dict() if result.htp else None,
        "layout": result.layout.to_dict() if result.layout else None,
        "verification": None
        if v is None
        else {
            "ok": v.ok,
            **(result.verify_plan.to_dict() if result.verify_plan else {}),
            "rtol": v.rtol,
            "outputs": [dataclasses.asdict(r) for r in v.rows],
            **(
                {"full_outputs": [dataclasses.asdict(r) for r in result.verify_plan.full.rows]}
                if result.verify_plan and result.verify_plan.full
                else {}
            ),
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
