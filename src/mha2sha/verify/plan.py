"""How a conversion is proven, and what the proof found: the verify stage of the job.

Two calls: :func:`plan_verification` at load time (inputs checked, whole-model or blockwise
decided, impossible requests refused before any heavy work) and :func:`verify_conversion` after
the save (float comparison, then with encodings the quantized comparison on ORT CPU, the HTP
emulator when asked, the tensor-by-tensor check when CPU outputs differ, goldens and input lists).
The result is one :class:`VerifyRecord`; a failed check raises
:class:`~mha2sha.errors.ConversionFailed` naming the output or tensor, and nothing is written.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.errors import ConversionFailed, UserError
from mha2sha.graph import is_onnx_domain, name_of
from mha2sha.io.load import fix_input_shapes, load_model
from mha2sha.io.prepare import infer_shapes
from mha2sha.io.save import save_model
from mha2sha.lower import lower_fused_ops
from mha2sha.split.record import SplitRecord
from mha2sha.verify.adapters import AdapterCheck
from mha2sha.verify.blocks import BlockCheck, BlockQuantized, BlockResults, low_precision_bound
from mha2sha.verify.htp import DEFAULT_SOC, HtpCheck, check_soc, compare_on_htp, require_htp
from mha2sha.verify.htp_local import locate_divergence
from mha2sha.verify.input_lists import write_input_lists
from mha2sha.verify.inputs import ModelInputs, plan_inputs
from mha2sha.verify.lowered import prove_through_lowering
from mha2sha.verify.qdq import DEFAULT_MAX_LSB, output_lsb, run_qdq_compare, to_qdq_ir
from mha2sha.verify.qdq_local import LocalCheck, Origin, compare_quantized_tensors
from mha2sha.verify.runner import (
    DEFAULT_RTOL,
    Verification,
    estimate_ort_bytes,
    estimate_qdq_bytes,
    run_model,
)
from mha2sha.verify.split_io import per_head_feeds, per_head_outputs, verify_whole

__all__ = [
    "FULL_VERIFY_MAX_BYTES",
    "VERIFY_MODES",
    "VerifyMode",
    "VerifyOptions",
    "VerifyPlan",
    "VerifyRecord",
    "plan_verification",
    "prepare_blocks",
    "require_memory",
    "verify_conversion",
]

logger = logging.getLogger(__name__)

VerifyMode = Literal["auto", "full", "blocks", "none"]
VERIFY_MODES: tuple[VerifyMode, ...] = ("auto", "full", "blocks", "none")

#: ``auto`` runs the whole models in onnxruntime when their estimated footprint
#: (:func:`~mha2sha.verify.runner.estimate_ort_bytes`, from the "verify full" measurements in
#: benchmarks/RESULTS.md) is at most this and a quarter of the available RAM, else verifies block
#: by block. 1 GiB keeps a conversion within the 1 GB peak-RSS target: fp16 models up to ~0.28 GB
#: of weights, fp32 up to ~0.9 GB, are verified whole.
FULL_VERIFY_MAX_BYTES = 1 << 30

Progress = Callable[[int], None]
Phase = Callable[..., Any]  # PhaseTimer.phase: (name, total=None) -> context yielding an advance function


@dataclasses.dataclass
class VerifyOptions:
    """What the user asked of the proof (defaults live here and in the checks they belong to)."""

    mode: VerifyMode = "auto"
    rtol: float = DEFAULT_RTOL
    max_lsb: float = DEFAULT_MAX_LSB
    seed: int = 0
    inputs: str | None = None  # .npz of user inputs
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    full_verify_max_bytes: int = FULL_VERIFY_MAX_BYTES
    verify_htp: bool = False
    soc: str = DEFAULT_SOC
    create_input_lists: bool = False


@dataclasses.dataclass
class VerifyPlan:
    """How a conversion is verified, decided at load time (before any heavy work)."""

    requested: VerifyMode  # "auto" | "full" | "blocks"
    mode: Literal["full", "blocks"]  # what decided (a failed fp16 full run can hand over to "blocks")
    inputs: ModelInputs  # checked now, arrays made when verifying
    estimate_bytes: int  # onnxruntime footprint of a whole-model run (estimate_ort_bytes)
    limit_bytes: int  # whole-model runs allowed up to this (unless --verify full)
    low_precision: ir.DataType | None  # FLOAT16/BFLOAT16 when most weights are
    notes: list[str] = dataclasses.field(default_factory=list)  # fallbacks, skipped checks
    full: Verification | None = None  # the whole-model result when blockwise verification decided after it
    quantized: bool = False  # encodings given: the quantized (QDQ) proof runs too, in the same mode

    @property
    def whole_model_runs(self) -> bool:
        """Whole-model runs (float, QDQ, HTP, goldens) fit, or the user asked for them."""
        return self.requested == "full" or self.estimate_bytes <= self.limit_bytes

    def reason(self) -> str:
        size = f"{_gb(self.estimate_bytes)} estimated for onnxruntime"
        if self.quantized:
            size += " (float and QDQ models)"
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


@dataclasses.dataclass
class VerifyRecord:
    """What the verify stage proved, and how."""

    plan: VerifyPlan
    float: Verification | None = None
    # builtins.float: the field above shadows ``float`` in this class body
    qdq_lsb: dict[str, builtins.float] | None = None  # max |MHA-QDQ - SHA-QDQ| per output, in LSBs
    qdq_local: LocalCheck | None = None  # tensor-by-tensor check, run when the QDQ outputs differ
    qdq_mode: Literal["full", "blocks"] | None = None  # whole QDQ models, or each block pair
    qdq_blocks_local: list[str] = dataclasses.field(default_factory=list)  # blocks decided tensor by tensor
    qdq_failure: str | None = None  # blockwise: the first block pair off by more than --max-lsb
    htp: HtpCheck | None = None
    input_lists: list[Path] = dataclasses.field(default_factory=list)
    adapters: list[AdapterCheck] = dataclasses.field(default_factory=list)  # one per LoRA adapter
    block_workers: int = 0  # threads that verified blocks (0: no blockwise run)

    def proven(self) -> str:
        """What was proven and how, e.g. "float: block by block; quantized (QDQ): block by block"."""
        how = {"full": "whole models", "blocks": "block by block"}
        parts = [f"float: {how[self.plan.mode]}"] if self.float is not None else []
        if self.qdq_mode is not None:
            parts.append(f"quantized (QDQ): {how[self.qdq_mode]}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        v, plan = self.float, self.plan
        return {
            "verification": None
            if v is None
            else {
                "ok": v.ok,
                **plan.to_dict(),
                "proven": self.proven(),
                "block_workers": self.block_workers,
                "rtol": v.rtol,
                "outputs": [dataclasses.asdict(r) for r in v.rows],
                **({"full_outputs": [dataclasses.asdict(r) for r in plan.full.rows]} if plan.full else {}),
            },
            "quantized_max_lsb": self.qdq_lsb,
            "quantized_mode": self.qdq_mode,
            "quantized_tensor_by_tensor": (
                {
                    **self.qdq_local.to_dict(),
                    **({"blocks": self.qdq_blocks_local} if self.qdq_blocks_local else {}),
                }
                if self.qdq_local
                else None
            ),
            "htp": self.htp.to_dict() if self.htp else None,
            "adapters": [a.to_dict() for a in self.adapters] or None,
        }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def available_ram() -> int:
    """Bytes of memory available now (MemAvailable), what a whole-model run may use."""
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


def plan_verification(model: ir.Model, options: VerifyOptions, *, encodings: bool) -> VerifyPlan | None:
    """Check the inputs, estimate a whole-model run, pick the mode; refuse what cannot be done.

    ``auto`` runs the whole models when onnxruntime's estimated footprint is at most
    ``options.full_verify_max_bytes`` and a quarter of the available RAM, else block by block.
    ``--create-input-lists`` and ``--verify-htp`` need whole-model runs (the goldens are the whole
    original model's outputs; the HTP emulator runs whole QDQ models): when those do not fit they
    are refused here, before any heavy work, rather than silently skipped (``--verify full``
    forces them). ``--verify-htp`` compares quantized models, so it needs ``--encodings`` (and
    verification, and onnxruntime-qnn, and a SoC the backend knows: checked here, not after the split).
    """
    if options.verify_htp and not encodings:
        raise UserError("--verify-htp compares the quantized models: add --encodings")
    if options.verify_htp and options.mode == "none":
        raise UserError("--verify-htp is a verification: drop --no-verify (or --verify-htp)")
    if options.verify_htp:
        require_htp()
        check_soc(options.soc, probe=True)
    if options.mode == "none":
        return None
    inputs = plan_inputs(model, options.seed, npz=options.inputs)
    estimate, low = estimate_ort_bytes(model, inputs.nbytes)
    if encodings:  # the whole-model quantized check holds the QDQ models too
        estimate = max(estimate, estimate_qdq_bytes(model, inputs.nbytes))
    limit = min(options.full_verify_max_bytes, available_ram() // 4)
    fits: Literal["full", "blocks"] = "full" if estimate <= limit else "blocks"
    mode = fits if options.mode == "auto" else options.mode
    plan = VerifyPlan(options.mode, mode, inputs, estimate, limit, low, quantized=encodings)
    if inputs.generated:
        plan.notes.append(f"inputs not in {options.inputs} were generated: {', '.join(inputs.generated)}")
    if not plan.whole_model_runs:
        asked = [f for f, on in (("--create-input-lists", options.create_input_lists),
                                 ("--verify-htp", options.verify_htp)) if on]  # fmt: skip
        if asked:
            raise UserError(
                f"{' and '.join(asked)} need(s) whole-model onnxruntime runs, estimated at "
                f"{_gb(estimate)} for this model (limit {_gb(limit)}); verification is block by block "
                f"({plan.reason()}): add --verify full to run whole models anyway, or drop {asked[0]}"
            )
    return plan


def require_memory(plan: VerifyPlan, model: ir.Model) -> None:
    """The largest tensor of a verification run must fit in memory: refuse now, before anything is
    allocated, rather than be killed by the kernel (a 1e8-token ``--input-shape`` makes 25 GB
    activations). Needs the static shapes of the prepared model."""
    largest, name = 0, ""
    for node in model.graph:
        for value in node.outputs:
            shape = value.shape
            if shape is None or not shape.is_static() or value.dtype is None:
                continue
            size = int(math.prod(shape.numpy()) * value.dtype.itemsize)
            if size > largest:
                largest, name = size, value.name or ""
    need = largest * 3 + plan.inputs.nbytes  # a tensor, its consumer's output, the feeds
    available = available_ram()
    if need > available:
        raise UserError(
            f"verification would need more memory than this machine has: tensor '{name}' alone is "
            f"{_gb(largest)} ({_gb(available)} available); use smaller input sizes or --verify none"
        )


@dataclasses.dataclass
class Quantized:
    """The quantized side of a conversion: the original encodings, the converted ones, and where
    each converted tensor's values come from (for the tensor-by-tensor check)."""

    original: EncodingSet
    converted: EncodingSet
    origins: Origin


def verify_conversion(
    plan: VerifyPlan,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    split: SplitRecord,
    quantized: Quantized | None,
    phase: Phase,
    stage: Path,
    host_dir: Path,
    lowered_ops: Sequence[str] = (),
    blocks: BlocksAhead | None = None,
) -> VerifyRecord:
    """Every check the plan and options ask for; raises ConversionFailed on the first that fails.

    ``blocks`` (from :func:`prepare_blocks`, started before the save) has computed the original
    side of the blocks meanwhile; blockwise verification checks the saved model with it.

    ``phase`` times each check (:meth:`~mha2sha.report.progress.PhaseTimer.phase`); input lists
    are written under ``stage`` naming paths under ``host_dir`` (where the staging folder goes).
    ``lowered_ops`` names the fused ops the lowering stage rewrote (see :mod:`.lowered`).
    """
    record = VerifyRecord(plan)
    try:
        _verify_all(
            record, options, original, converted, split, quantized, phase, stage, host_dir, lowered_ops, blocks
        )
    except ConversionFailed as failed:
        failed.record = record  # what was proven up to the failure: the job keeps it as a report
        raise
    return record


def _verify_all(
    record: VerifyRecord,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    split: SplitRecord,
    quantized: Quantized | None,
    phase: Phase,
    stage: Path,
    host_dir: Path,
    lowered_ops: Sequence[str],
    blocks: BlocksAhead | None,
) -> None:
    plan = record.plan
    if quantized is not None and (split.input_pieces or split.output_pieces):
        raise UserError("quantized verification with --per-head-kv-io is not supported yet; add --no-verify")
    inputs, golden = _verify_float(
        record, options, original, converted, split, phase, options.create_input_lists, lowered_ops, quantized,
        blocks,
    )  # fmt: skip
    assert record.float is not None
    if not record.float.ok:
        raise ConversionFailed(_failure_line(record.float, plan.mode))
    if record.qdq_mode == "blocks":
        assert record.qdq_lsb is not None
        _report_blocks_quantized(record, options.max_lsb)
    elif quantized is not None:
        inputs = inputs if inputs is not None else dict(plan.inputs)
        _verify_quantized(record, options, original, converted, split, quantized, inputs, phase)
    if options.create_input_lists and inputs is not None:
        if golden is None:  # blockwise verification ran no whole model
            with phase("goldens (onnxruntime)"):
                golden = run_model(original, inputs)
        feeds = per_head_feeds(inputs, split)
        goldens = per_head_outputs(golden, split)
        order = [v.name for v in load_model(converted).graph.inputs if v.name in feeds]
        record.input_lists = write_input_lists(stage, feeds, goldens, order, host_dir=host_dir)


def _report_blocks_quantized(record: VerifyRecord, max_lsb: float) -> None:
    """The blockwise quantized check ran with the float one: fail on the first block off, say when
    some blocks were decided tensor by tensor (their outputs differed by float summation order)."""
    if record.qdq_failure is not None:
        raise ConversionFailed(record.qdq_failure)
    local = record.qdq_local
    if local is None or record.qdq_lsb is None:
        return
    name, worst = max(record.qdq_lsb.items(), key=lambda kv: kv[1])
    logger.warning(
        "quantized outputs of %d block(s) differ by up to %.3g LSB on onnxruntime CPU ('%s'), but each of their"
        " %d quantized tensors is within %g LSB of the MHA model given the same quantized inputs (%d exact): float"
        " summation order flips roundings that grow downstream; --verify-htp checks on the device's arithmetic",
        len(record.qdq_blocks_local), worst, name, len(local.tensors), max_lsb,
        sum(t.lsb == 0 for t in local.tensors),
    )  # fmt: skip


def _verify_quantized(
    record: VerifyRecord,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    split: SplitRecord,
    quantized: Quantized,
    inputs: Mapping[str, np.ndarray],
    phase: Phase,
) -> None:
    """QDQ on ORT CPU; the HTP emulator when asked; tensor by tensor when CPU outputs differ.

    The HTP runs the device's numerics and is the reference when the whole model runs there;
    otherwise (or without --verify-htp) the CPU QDQ comparison decides.
    """
    record.qdq_mode = "full"
    with phase("verify quantized (QDQ)"):
        record.qdq_lsb = run_qdq_compare(original, quantized.original, converted, quantized.converted, inputs)
    if options.verify_htp:
        with phase(f"verify on HTP emulator ({options.soc})"):
            record.htp = _verify_htp(record, original, converted, quantized, inputs, options, phase)
        if record.htp.error:
            raise ConversionFailed(f"HTP verification could not run: {record.htp.error}")
    if record.htp is not None and not record.htp.cpu_fallback_used:
        _require_htp_within_lsb(record.htp, options.max_lsb)
    elif max(record.qdq_lsb.values(), default=0.0) > options.max_lsb:
        with phase("verify quantized tensor by tensor"):
            record.qdq_local = compare_quantized_tensors(
                original, quantized.original, converted, quantized.converted, inputs, quantized.origins
            )
        _require_local_within_lsb(record.qdq_local, record.qdq_lsb, options.max_lsb)




def _require_local_within_lsb(local: LocalCheck, outputs: Mapping[str, float], max_lsb: float) -> None:
    """Outputs differ on ORT CPU: accept only if every quantized tensor is within ``max_lsb`` given
    the MHA model's quantized inputs (then the output difference is rounding flips that grew)."""
    name, worst = max(outputs.items(), key=lambda kv: kv[1])
    bad = local.first_above(max_lsb)
    if bad is not None:
        piece = f" (head piece of '{bad.origin}')" if bad.origin != bad.name else ""
        raise ConversionFailed(
            f"quantized verification failed: '{bad.name}'{piece} differs from the MHA model by {bad.lsb:.3g} LSB"
            f" (> {max_lsb:g}) given the same quantized inputs"
        )
    if not local.tensors:
        raise ConversionFailed(
            f"quantized verification failed: output '{name}' differs by {worst:.3g} LSB (> {max_lsb:g}) and no"
            " quantized tensor could be compared on its own (try --verify-htp)"
        )
    logger.warning(
        "quantized outputs differ by up to %.3g LSB on onnxruntime CPU ('%s'), but each of the %d quantized"
        " tensors is within %g LSB of the MHA model given the same quantized inputs (%d exact): float"
        " summation order flips roundings that grow downstream; --verify-htp checks on the device's arithmetic",
        worst, name, len(local.tensors), max_lsb, sum(t.lsb == 0 for t in local.tensors),
    )  # fmt: skip


def _verify_htp(
    record: VerifyRecord,
    original: Path,
    converted: Path,
    quantized: Quantized,
    inputs: Mapping[str, np.ndarray],
    options: VerifyOptions,
    phase: Phase,
) -> HtpCheck:
    """Both models as QDQ on the HTP emulator: unsupported nodes, and MHA vs SHA in LSBs. When the
    outputs differ (and no CPU fallback was needed), where they part and whose that is
    (:mod:`.htp_local`; the tensor-by-tensor CPU check gives the verdict and is kept in the record)."""
    with tempfile.TemporaryDirectory(prefix="mha2sha-qdq-") as tmp:
        paths = []
        for tag, path, es in (("mha", original, quantized.original), ("sha", converted, quantized.converted)):
            target = Path(tmp) / f"{tag}.onnx"
            save_model(to_qdq_ir(path, es), target)
            paths.append(target)
        shapes = {name_of(v): tuple(v.shape or ()) for v in ir.load(converted).graph.outputs}
        lsb = {name: output_lsb(quantized.original.get(name), shape) for name, shape in shapes.items()}
        check = compare_on_htp(paths[0], paths[1], inputs, lsb, options.soc)
        if check.cpu_fallback_used or check.error or check.outputs is None:
            return check
        check.ok = check.worst[1] <= options.max_lsb
        if check.worst[1] == 0:
            return check
        with phase("locate the HTP difference (tensor by tensor, HTP and CPU)"):
            record.qdq_local = compare_quantized_tensors(
                original, quantized.original, converted, quantized.converted, inputs, quantized.origins
            )
            check.divergence = locate_divergence(
                paths[0], paths[1], quantized.original, quantized.converted, inputs, quantized.origins,
                options.soc, outputs=check.outputs, cpu=record.qdq_local, max_lsb=options.max_lsb,
            )  # fmt: skip
        return check


def _require_htp_within_lsb(check: HtpCheck, max_lsb: float) -> None:
    """HTP ran both models alone: its outputs decide. A failure names the output, the first tensor
    where MHA and SHA part on HTP, and whose the difference is (HTP's arithmetic or the conversion)."""
    name, worst = check.worst
    if worst <= max_lsb:
        if worst > 0 and check.divergence is not None and check.divergence.tensor:
            logger.info("HTP: outputs within %g LSB; %s", max_lsb, check.divergence.explain())
        return
    where = f"; {check.divergence.explain()}" if check.divergence is not None else ""
    raise ConversionFailed(
        f"HTP verification failed: output '{name}' differs by {worst:.3g} LSB (> {max_lsb:g}) on the HTP "
        f"emulator ({check.soc}){where}"
    )


def _verify_float(
    record: VerifyRecord,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    split: SplitRecord,
    phase: Phase,
    whole_model_checks: bool,
    lowered_ops: Sequence[str] = (),
    quantized: Quantized | None = None,
    ahead: BlocksAhead | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """Float verification in ``plan.mode``; sets ``record.float``. In ``blocks`` mode with
    ``quantized`` each block pair is also compared as QDQ (``record.qdq_*``, ``qdq_mode="blocks"``).

    Inputs are made here, after the model was saved. Returns the inputs when whole-model checks
    (QDQ, HTP, goldens) follow and fit, and the original's outputs when a whole-model run made them.
    A low-precision model whose full verification fails only within fp16/bf16 kernel rounding
    (:func:`~mha2sha.verify.blocks.low_precision_bound`; CPU kernels round a 64-column fp16
    matmul differently from a 2048-column one) is decided block by block, where failing fp16 blocks
    are re-run in fp32; ``rtol`` itself is never loosened.
    """
    plan = record.plan
    blocks = len(split.split_blocks) or None
    if plan.mode == "blocks":
        name = "verify blocks, float and QDQ (onnxruntime)" if quantized else "verify blocks (onnxruntime)"
        with phase(name, total=blocks) as advance:
            _verify_blocks(record, options, original, converted, split, advance, quantized, ahead)
        keep = plan.whole_model_runs and whole_model_checks
        return (dict(plan.inputs) if keep else None), None

    with phase("verify (onnxruntime)"):
        inputs = dict(plan.inputs)
        record.float = full = verify_whole(original, converted, inputs, split, options.rtol)
    if not full.ok and lowered_ops and not (split.input_pieces or split.output_pieces):
        with phase("verify the split and each lowered op"):
            _verify_through_lowering(record, options, original, converted, inputs, lowered_ops)
        return inputs, full.reference
    if not full.ok and _rounding_only(full, plan.low_precision):
        assert plan.low_precision is not None
        worst = max((r for r in full.rows if not r.ok), key=lambda r: r.max_rel_err)
        dtype = plan.low_precision.name.lower()
        note = (
            f"full verification of this {dtype} model differs by {worst.max_rel_err:.2g} on '{worst.name}'"
            f" (within {dtype} kernel rounding, <= {low_precision_bound(plan.low_precision):.2g}); decided"
            " block by block, re-running differing blocks in fp32"
        )
        logger.info(note)
        plan.notes.append(note)
        plan.mode, plan.full = "blocks", full
        with phase("verify blocks (onnxruntime)", total=blocks) as advance:
            _verify_blocks(record, options, original, converted, split, advance, None)
    return inputs, full.reference


def _verify_through_lowering(
    record: VerifyRecord,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    inputs: Mapping[str, np.ndarray],
    lowered_ops: Sequence[str],
) -> None:
    """The end-to-end comparison failed on a model with lowered fused ops: prove the split and each
    lowered op separately (:mod:`mha2sha.verify.lowered`); both must pass at ``rtol``."""
    plan, full = record.plan, record.float
    assert full is not None
    split_check, ops = prove_through_lowering(
        original, converted, lowered_ops, inputs, options.input_shapes, options.rtol
    )
    worst = max((r for r in full.rows if not r.ok), key=lambda r: r.max_rel_err)
    plan.full = full
    record.float = Verification(rows=split_check.rows + ops.rows, rtol=options.rtol)
    if record.float.ok:
        plan.notes.append(
            f"end to end the outputs differ by up to {worst.max_rel_err:.2g} ('{worst.name}'), the float "
            f"rounding of {len(lowered_ops)} lowered fused op(s) compounding; proven in two parts instead: "
            f"the split (lowered vs converted model, max rel err {split_check.max_rel_err:.2g}) and each "
            f"lowered op on the original's own inputs (max rel err {ops.max_rel_err:.2g})"
        )


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


def _block_check(
    options: VerifyOptions,
    plan: VerifyPlan,
    original: Path,
    converted: ir.Model,
    split: SplitRecord,
    quantized: Quantized | None,
) -> BlockCheck:
    source = load_model(original)
    fix_input_shapes(source, options.input_shapes)
    _borrow_shapes_through_fused_ops(source, original, options)
    return BlockCheck(
        source,
        converted,
        inputs=plan.inputs,  # made block by block (a layer's past KV only for its block)
        rtol=options.rtol,
        seed=options.seed,
        input_pieces=split.input_pieces,
        output_pieces=split.output_pieces,
        quantized=None
        if quantized is None
        else BlockQuantized(quantized.original, quantized.converted, quantized.origins, options.max_lsb),
    )


#: The interpreter's thread switch interval while blocks are computed beside the save (Python's
#: default is 5 ms). The save thread needs the GIL only briefly between kernel copies and writes, but
#: after each wait it gets it back only when the computing thread yields: on 7B with encodings the
#: save took 42 s against 28.5 s alone; with 0.2 ms, 29.7 s.
AHEAD_SWITCH_INTERVAL_S = 0.0002


class BlocksAhead:
    """A :class:`BlockCheck` made and started in a background thread (see :func:`prepare_blocks`).
    While it is open the interpreter switches threads every :data:`AHEAD_SWITCH_INTERVAL_S`."""

    def __init__(self, make: Callable[[], BlockCheck]):
        def build() -> BlockCheck:
            check = make()
            check.start()
            return check

        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, AHEAD_SWITCH_INTERVAL_S))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mha2sha-blocks")
        self._future = self._pool.submit(build)

    def result(self) -> BlockCheck:
        """The check (its failure, e.g. a block input that cannot be drawn, is raised here)."""
        return self._future.result()

    def close(self) -> None:
        try:
            self._pool.shutdown(wait=True)
            if self._future.done() and self._future.exception() is None:
                self._future.result().close()
        finally:
            sys.setswitchinterval(self._switch_interval)

    def __enter__(self) -> BlocksAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_blocks(
    plan: VerifyPlan,
    options: VerifyOptions,
    original: Path,
    converted: ir.Model,
    split: SplitRecord,
    quantized: Quantized | None,
) -> BlocksAhead | None:
    """For a blockwise plan: in a background thread, load the original again, find the blocks on the
    converted model still in memory and start computing their original side (:meth:`BlockCheck.start`),
    so that this CPU work overlaps the save. Close it (a context manager) whatever happens;
    :func:`verify_conversion` checks the saved model with it (blocks found again on that model)."""
    if plan.mode != "blocks":
        return None
    if quantized is not None and (split.input_pieces or split.output_pieces):
        return None  # refused by verify_conversion
    return BlocksAhead(lambda: _block_check(options, plan, original, converted, split, quantized))


def _verify_blocks(
    record: VerifyRecord,
    options: VerifyOptions,
    original: Path,
    converted: Path,
    split: SplitRecord,
    advance: Progress,
    quantized: Quantized | None,
    ahead: BlocksAhead | None = None,
) -> None:
    """Each attention block of both saved models cut out and compared (blocks in parallel, one
    block per worker in memory); with ``quantized`` also each QDQ block pair."""
    saved = load_model(converted)
    if ahead is None:
        with _block_check(options, record.plan, original, saved, split, quantized) as check:
            results: BlockResults = check.run(on_block=advance)
    else:
        results = ahead.result().run(saved, on_block=advance)
    record.float = results.float
    record.block_workers = results.workers
    if quantized is not None and results.qdq_lsb is not None:
        record.qdq_mode = "blocks"
        record.qdq_lsb = results.qdq_lsb
        record.qdq_local = results.qdq_local
        record.qdq_blocks_local = results.qdq_blocks_local
        record.qdq_failure = results.qdq_failure


def _borrow_shapes_through_fused_ops(source: ir.Model, path: Path, options: VerifyOptions) -> None:
    """ONNX shape inference stops at contrib ops, and block boundaries need shapes: take them from
    a lowered copy of the original (the lowering keeps every fused op's output names)."""
    if all(is_onnx_domain(n.domain) for n in source.graph):
        return
    lowered = load_model(path)  # weights stay memory-mapped: this costs the graph only
    fix_input_shapes(lowered, options.input_shapes)
    lower_fused_ops(lowered)
    infer_shapes(lowered)
    shapes = {v.name: v for n in lowered.graph for v in n.outputs if v.name and v.shape is not None}
    for node in source.graph:
        for value in node.outputs:
            known = shapes.get(value.name or "")
            if value.shape is None and known is not None:
                value.shape = known.shape
                if known.dtype is not None:
                    value.dtype = known.dtype


def _failure_line(v: Verification, mode: str = "full") -> str:
    bad = [r for r in v.rows if not r.ok]
    worst = max(bad, key=lambda r: r.max_rel_err) if bad else None
    detail = (
        f"output '{worst.name}' differs (max rel err {worst.max_rel_err:.3g}) {worst.note}"
        if worst
        else "outputs differ"
    )
    what = "blockwise verification" if mode == "blocks" else "verification"
    return f"{what} failed: {detail}"
