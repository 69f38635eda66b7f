"""``build-ar``: variants of one LLM step graph for other ARs / a context length, sharing one weights file.

The job: load the graph (weights stay on disk), check every requested AR / CL against it before
any work, re-shape one copy of the graph per AR (:class:`~mha2sha.arcl.rewrite.ChangeArPass`),
write the weights once and every variant pointing into them (:mod:`mha2sha.io.shared_weights`),
copy the encodings file beside each variant (names are kept, so it applies unchanged), then prove
each variant by the token loop (:mod:`mha2sha.verify.token_loop`): the same prompt through the
original and the variant, every token's logits and the final cache compared (and, with
encodings, the same through both QDQ models, in LSBs). Everything is written to a staging folder
and moved in place only when every variant passed: bad input is one line and exit 2, a failed
proof exit 1, and nothing is written in either case.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.arcl.contract import infer_contract
from mha2sha.arcl.record import ArRecord, LoopRow, VariantRecord, VerificationFailed
from mha2sha.arcl.rewrite import ChangeArPass, new_past
from mha2sha.arcl.roles import find_roles
from mha2sha.errors import UserError
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.io.save import staging_dir
from mha2sha.io.shared_weights import save_sharing_weights
from mha2sha.report.progress import PhaseTimer
from mha2sha.verify.inputs import ROPE_THETA
from mha2sha.verify.plan import available_ram
from mha2sha.verify.token_loop import StepContract, compare_loops, prompt_tokens, run_token_loop

__all__ = ["BuildArOptions", "build_ar", "convert_and_build_ar", "variant_name", "parse_ars"]

logger = logging.getLogger(__name__)

REPORT_SUFFIX = ".ar.report.json"
VERIFY_MODES = ("auto", "full", "none")
#: ``verify="auto"`` runs the token loops when a whole-model onnxruntime run is estimated at most
#: this (and a quarter of the free RAM); larger models are written with a note (``--verify full``).
LOOP_MAX_BYTES = 1 << 30


@dataclasses.dataclass
class BuildArOptions:
    verify: str = "auto"  # auto | full | none
    rtol: float = 1e-5
    max_lsb: float = 1.0
    tokens: int | None = None  # prompt length of the token loop (default: see _prompt_length)
    seed: int = 0
    rope_theta: float = ROPE_THETA
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    loop_max_bytes: int = LOOP_MAX_BYTES


def parse_ars(text: str | Sequence[int]) -> list[int]:
    """``"1,128"`` -> [1, 128] (order kept, duplicates refused)."""
    if not isinstance(text, str):
        values = [int(v) for v in text]
    else:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(
                f"--ar {text!r}: expected a number or a comma-separated list, e.g. 1,128"
            ) from None
    if not values:
        raise UserError("--ar: give at least one AR, e.g. --ar 1 or --ar 1,128")
    if len(set(values)) != len(values):
        raise UserError(f"--ar {text}: an AR is given twice")
    return values


def variant_name(name: str, ar: int, cl: int) -> str:
    return f"{name}_ar{ar}_cl{cl}"


def build_ar(
    model_path: str | os.PathLike,
    ars: Sequence[int] | str,
    cl: int | None,
    out_dir: str | os.PathLike,
    *,
    encodings: str | os.PathLike | None = None,
    name: str | None = None,
    options: BuildArOptions | None = None,
    timer: PhaseTimer | None = None,
    extra_files: Sequence[Path] = (),
) -> ArRecord:
    """Write ``<name>_ar<N>_cl<M>.onnx`` for every AR in ``ars`` (context length ``cl``, default the
    model's), one shared ``<name>.data``, a copy of ``encodings`` beside each graph and
    ``<name>.ar.report.json`` (and ``extra_files`` copied in with them); see the module docstring.
    Returns the record."""
    options = options or BuildArOptions()
    if options.verify not in VERIFY_MODES:
        raise UserError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {options.verify!r}")
    timer = timer or PhaseTimer()
    ars = parse_ars(ars)
    model_path, out_dir = Path(model_path), Path(out_dir)
    name = name or model_path.stem
    encodings_path = Path(encodings) if encodings is not None else None

    with timer.phase("load"):
        source = _load(model_path, options)
        roles = find_roles(source)
        pasts = [new_past(roles, ar, cl) for ar in ars]  # every AR / CL checked before any work
        enc = _load_encodings(encodings_path, source)
    record = ArRecord(model_path, roles.ar, roles.cl, "prefill" if not roles.has_cache else "?",
                      {n: r.to_dict() for n, r in roles.inputs.items()})  # fmt: skip

    variants: list[tuple[ir.Model, VariantRecord, StepContract | None]] = []
    for ar, past in zip(ars, pasts, strict=True):
        with timer.phase(f"AR {ar} CL {ar + past}: trace and rewrite"):
            model = _load(model_path, options)
            rewrite = ChangeArPass(ar, cl)
            rewrite(model)
            assert rewrite.trace is not None
            contract = _contract(model, rewrite)
            if record.style == "?":
                record.style = contract.style if contract is not None else "step"
            vname = variant_name(name, ar, ar + past)
            variant = VariantRecord(
                ar, ar + past, out_dir / f"{vname}.onnx",
                inputs={v.name or "": list(v.shape.numpy() if v.shape else ()) for v in model.graph.inputs if not v.is_initializer()},
                outputs={v.name or "": list(v.shape.numpy() if v.shape else ()) for v in model.graph.outputs},
                constants=rewrite.rewrites,
            )  # fmt: skip
            variants.append((model, variant, contract))
    exclude = {c.tensor for _, v, _ in variants for c in v.constants}

    report_file = f"{name}{REPORT_SUFFIX}"
    with staging_dir(out_dir, replaces=_previous_outputs(out_dir / report_file)) as stage:
        with timer.phase("save (one shared weights file)"):
            data = stage / f"{name}.data"
            staged = [(m, stage / v.path.name) for m, v, _ in variants]
            save_sharing_weights(staged, data, exclude=exclude)
            record.data_file = out_dir / data.name
            record.shared_tensors, record.shared_bytes = _shared_stats(staged[0][0], data)
            for (_, path), (_, variant, _) in zip(staged, variants, strict=True):
                _check_model(path)
                if encodings_path is not None:
                    shutil.copyfile(encodings_path, path.with_suffix(".encodings"))
                    variant.encodings = variant.path.with_suffix(".encodings")
                record.variants.append(variant)
        _verify(record, source, model_path, staged, variants, enc, options, timer)
        for extra in extra_files:
            shutil.copyfile(extra, stage / extra.name)
        record.phases = [dataclasses.asdict(r) for r in timer.records]
        outputs = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        outputs.append(report_file)
        (stage / report_file).write_text(json.dumps({**record.to_dict(), "outputs": outputs}, indent=1, default=str))
        record.files = [out_dir / f for f in outputs]
    return record


def _previous_outputs(report: Path) -> list[str]:
    """The files an earlier run into the same folder wrote (its report lists them): replaced as a set."""
    try:
        outputs = json.loads(report.read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [o for o in outputs if isinstance(o, str)]


def convert_and_build_ar(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    ars: Sequence[int] | str,
    cl: int | None,
    *,
    name: str | None = None,
    convert_options=None,
    options: BuildArOptions | None = None,
    timer: PhaseTimer | None = None,
):
    """``convert --ar``: split (and lay out) the model, proven at its own AR, then build the AR/CL
    variants of the converted graph into ``out_dir`` (one shared weights file; the SHA encodings,
    the name map and the conversion report beside them).

    Returns ``(ConversionResult, ArRecord | None)``; no record when the conversion wrote nothing
    (no attention, or blocks left multi-head without ``allow_partial``): then nothing is written.
    """
    from mha2sha.job import NAME_MAP_FILE, convert

    ars = parse_ars(ars)
    model_path = Path(model_path)
    name = model_path.stem if name is None else name
    options = options or BuildArOptions()
    timer = timer or PhaseTimer()
    with timer.phase("check AR / CL"):
        _check_ar_early(model_path, ars, cl, convert_options)
    with tempfile.TemporaryDirectory(prefix="mha2sha-convert-ar-") as tmp:
        result = convert(model_path, tmp, name=name, options=convert_options, timer=timer)
        incomplete = result.unsupported_blocks and not getattr(convert_options, "allow_partial", False)
        if not result.files or incomplete:
            return result, None
        sha = Path(tmp) / f"{name}.onnx"
        sha_encodings = Path(tmp) / f"{name}.encodings"
        extras = [p for p in (Path(tmp) / NAME_MAP_FILE, Path(tmp) / f"{name}.report.json") if p.exists()]
        record = build_ar(
            sha, ars, cl, out_dir, encodings=sha_encodings if sha_encodings.exists() else None, name=name,
            options=dataclasses.replace(options, input_shapes={}), timer=timer, extra_files=extras,
        )  # fmt: skip
    return result, record


def _check_ar_early(model_path: Path, ars: Sequence[int], cl: int | None, convert_options) -> None:
    """Refuse an impossible AR / CL before the conversion runs (when the input's shapes are static)."""
    model = load_model(model_path)
    fix_input_shapes(model, getattr(convert_options, "input_shapes", None) or {})
    if not all(v.shape is not None and v.shape.is_static() for v in model.graph.inputs):
        return  # dynamic dims are resolved by the conversion; build_ar checks after it
    roles = find_roles(model)
    for ar in ars:
        new_past(roles, ar, cl)


def _load(path: Path, options: BuildArOptions) -> ir.Model:
    model = load_model(path)
    fix_input_shapes(model, options.input_shapes)
    try:
        require_static_inputs(model)
    except UserError as e:
        raise UserError(f"{e} (the model's current AR and CL)") from None
    return model


def _load_encodings(path: Path | None, model: ir.Model):
    if path is None:
        return None
    from mha2sha.encodings import load_encodings

    return load_encodings(path, model=model)


def _contract(model: ir.Model, rewrite: ChangeArPass) -> StepContract | None:
    """The token-loop contract of the variant (from the trace of the original graph), or None when
    the graph's I/O has no token-loop reading (then it cannot be proven; see ``_verify``)."""
    try:
        contract = infer_contract(model, rewrite.trace)
    except UserError as e:
        logger.info("no token-loop contract: %s", e)
        return None
    return contract.at(rewrite.ar, rewrite.past)


def _shared_stats(model: ir.Model, data: Path) -> tuple[int, int]:
    count = sum(
        1
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location == data.name
    )
    return count, data.stat().st_size


def _check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # a bug of ours, never the user's
        raise RuntimeError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from e


# ----------------------------------------------------------------------------- verification


def _prompt_length(contracts: Sequence[StepContract], asked: int | None) -> int:
    """Long enough to take every graph through several steps, short enough to fit all of them."""
    fit = min(c.capacity for c in contracts)
    if asked is not None:
        if asked > fit:
            raise UserError(f"--tokens {asked}: at most {fit} tokens fit every graph's cache")
        if asked < 1:
            raise UserError("--tokens must be at least 1")
        return asked
    return min(fit, max(32, 2 * max(c.ar for c in contracts)))


def _verify(
    record: ArRecord,
    source: ir.Model,
    source_path: Path,
    staged: list[tuple[ir.Model, Path]],
    variants: list[tuple[ir.Model, VariantRecord, StepContract | None]],
    enc,
    options: BuildArOptions,
    timer: PhaseTimer,
) -> None:
    if options.verify == "none":
        record.verify_mode = "none"
        record.notes.append("not verified (--verify none)")
        return
    if any(c is None for _, _, c in variants):
        raise UserError(
            "this graph's inputs and outputs have no token-loop reading (token ids, mask, positions, "
            "past KV in / new entries or present out), so the variants cannot be proven; "
            "add --no-verify to write them unproven"
        )
    from mha2sha.verify.runner import estimate_ort_bytes

    estimate, low = estimate_ort_bytes(source)
    if options.verify == "auto" and estimate > min(options.loop_max_bytes, available_ram() // 4):
        record.verify_mode = "skipped"
        note = (
            f"token loops skipped: a whole-model onnxruntime run of this model is estimated at "
            f"{estimate / 1e9:.2f} GB (auto runs them up to {options.loop_max_bytes / 1e9:.2f} GB); "
            "--verify full runs them anyway"
        )
        logger.warning(note)
        record.notes.append(note)
        return
    record.verify_mode = "full" if options.verify == "full" else "auto"
    rtol = options.rtol
    if low is not None:
        from mha2sha.verify.blocks import low_precision_bound

        rtol = max(rtol, low_precision_bound(low))
        record.notes.append(f"{low.name.lower()} weights: relative tolerance {rtol:.1e} (kernel rounding)")
    base = variants[0][2]
    assert base is not None
    contract0 = base.at(record.ar, record.cl - record.ar if base.kv else 0)
    contracts = [contract0, *(c for _, _, c in variants)]
    length = _prompt_length(contracts, options.tokens)  # type: ignore[arg-type]
    tokens = prompt_tokens(contract0, length, options.seed)
    with timer.phase(f"verify: token loop ({length} tokens)", total=len(variants) + 1) as advance:
        reference = run_token_loop(source_path, contract0, tokens, rope_theta=options.rope_theta)
        advance(1)
        for (_, path), (_, variant, contract) in zip(staged, variants, strict=True):
            got = _run_variant(path, contract, tokens, options)  # type: ignore[arg-type]
            record.verification.append(_row(variant, "float", reference, got, length, rtol, None, 1.0))
            advance(1)
    if enc is not None:
        with timer.phase("verify: quantized token loop (QDQ)", total=len(variants) + 1) as advance:
            _verify_qdq(record, source_path, staged, variants, contract0, tokens, enc, options, advance)
    bad = [r for r in record.verification if not r.ok]
    if bad:
        worst = max(bad, key=lambda r: r.logits_err if np.isfinite(r.logits_err) else np.inf)
        unit = "LSB" if worst.unit == "lsb" else "relative"
        raise VerificationFailed(
            f"token loop of {worst.variant} ({worst.mode}) differs from the original: logits {worst.logits_err:.3g} "
            f"{unit} (token {worst.worst_token}), cache {worst.kv_err:.3g} (limit {worst.limit:g}); nothing was written"
        )


def _run_variant(
    path: Path, contract: StepContract, tokens, options: BuildArOptions, name: str | None = None
):
    """The variant's loop; a variant onnxruntime cannot run is a failed proof (exit 1), not bad input."""
    try:
        return run_token_loop(path, contract, tokens, rope_theta=options.rope_theta)
    except UserError as e:
        raise VerificationFailed(f"{name or path.name} does not run: {e}; nothing was written") from None


def _row(variant, mode, reference, got, length, limit, lsb, max_lsb) -> LoopRow:
    checks = compare_loops(reference, got, rtol=limit, lsb=lsb, max_lsb=max_lsb)
    logits = checks[0]
    kv = max((c.max_err for c in checks[1:]), default=0.0)
    return LoopRow(
        variant=variant.path.name, mode=mode, tokens=length, steps=got.steps,
        reference_steps=reference.steps, logits_err=logits.max_err, kv_err=kv,
        limit=max_lsb if logits.unit == "lsb" else limit, unit=logits.unit,
        worst_token=logits.worst_token, ok=all(c.ok for c in checks),
    )  # fmt: skip


def _verify_qdq(record, source_path, staged, variants, contract0, tokens, enc, options, advance) -> None:
    """The same loops through the QDQ models (encodings as QuantizeLinear/DequantizeLinear)."""
    from mha2sha.verify.qdq import output_lsb, to_qdq_ir
    from mha2sha.verify.qdq_exact import Float64Pass

    enc = _tie_cache_encodings(enc, contract0, record)
    lsb: dict[str, float] = {}
    out_enc = {"logits": contract0.logits, **{s.past: s.output for s in contract0.kv}}
    for key, output in out_enc.items():
        step = output_lsb(enc.get(output), ())
        if step is not None and np.ndim(step) == 0:
            lsb[key] = float(step)
    with tempfile.TemporaryDirectory(prefix="mha2sha-ar-qdq-") as tmp:

        def qdq(path: Path, tag: str) -> Path:
            target = Path(tmp) / f"{tag}.onnx"
            model = to_qdq_ir(path, enc)
            Float64Pass()(model)  # summation order of other shapes must not flip roundings
            ir.save(model, target, external_data=f"{tag}.data", size_threshold_bytes=1 << 20)
            return target

        reference = run_token_loop(
            qdq(source_path, "source"), contract0, tokens, rope_theta=options.rope_theta
        )
        advance(1)
        for i, ((_, path), (_, variant, contract)) in enumerate(zip(staged, variants, strict=True)):
            got = _run_variant(qdq(path, f"v{i}"), contract, tokens, options, path.name)
            record.verification.append(
                _row(variant, "qdq", reference, got, len(tokens), options.rtol, lsb, options.max_lsb)
            )
            advance(1)


def _tie_cache_encodings(enc, contract: StepContract, record: ArRecord):
    """The cache's round trip (an output of one step is the past input of the next) is lossless
    only when the past input is quantized like the output it comes from; then a token seen as a new
    entry inside one step and as a cached entry in a later step of another AR is the same number.
    Deployments share these encodings. When the file does not, the check uses the output's encoding
    for the past input too, so it measures the rewrite, not the requantization (said in the report)."""
    tied = None
    for slot in contract.kv:
        out, past = enc.get(slot.output), enc.get(slot.past)
        if (
            out is None
            or past is None
            or (
                np.array_equal(np.asarray(out.scale), np.asarray(past.scale))
                and np.array_equal(np.asarray(out.offset), np.asarray(past.offset))
            )
        ):
            continue
        tied = tied or enc.copy()
        tied.activations[slot.past] = out.renamed(slot.past)
    if tied is None:
        return enc
    record.notes.append(
        "the encodings quantize the past KV inputs differently from the outputs they are fed from; the "
        "quantized token loop uses each output's encoding for its past input (the cache round trip of a "
        "deployment), the file is copied unchanged"
    )
    return tied


