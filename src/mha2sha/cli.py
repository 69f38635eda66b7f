"""Command line: ``mha2sha convert`` and the original tool's ``mha2sha-onnx-converter``.

Exit codes: 0 done (or nothing to do), 1 conversion incomplete or verification failed,
2 bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from mha2sha.api import ConversionFailed, ConversionResult, ConvertOptions, convert
from mha2sha.errors import UserError
from mha2sha.io.save import parse_size
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.tables import blocks_table
from mha2sha.verify.inputs import parse_input_shapes
from mha2sha.verify.runner import verification_table

__all__ = ["main", "legacy_main"]

console = Console(stderr=False)


def _error(message: object) -> None:
    """Errors are one plain line (never wrapped, never a traceback): scripts grep them."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


# Flags of the original tool that the automatic split makes unnecessary: accepted, ignored.
_LEGACY_HINTS = (
    "--handle-rope-ops", "--handle-past-key-value", "--gqa-model", "--llm-model", "--prepared-model",
    "--disable-auto-attn-finder", "--handle-alibi", "--lora-model", "--strict",
)  # fmt: skip
# Flags of the original tool that later releases implement; until then they are refused clearly.
_LEGACY_LATER = ("--build-ar", "--lora-adaptor-list")
# Flags of the original tool for conv-based graphs: the HTP layout covers them (detected otherwise).
_LEGACY_LAYOUT = ("--mha-conv", "--nchw-aligned")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        choices=["generic", "htp"],
        default="generic",
        help="htp: Conv 1x1 projections, clean layout",
    )
    parser.add_argument(
        "--replace-linear-with-conv",
        action="store_true",
        help="projections as Conv 1x1 on [B,C,1,S] (in --target htp)",
    )
    parser.add_argument(
        "--no-split",
        action="store_true",
        help="only the layout passes (with --replace-linear-with-conv / --target htp): heads stay as they are",
    )
    parser.add_argument(
        "--optimize-o-proj",
        action="store_true",
        help="per-head o_proj slices summed (measured slower; off in htp)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="fix a dynamic input shape",
    )
    parser.add_argument("--inputs", metavar="NPZ", help="verify on these inputs (.npz keyed by input name)")
    parser.add_argument(
        "--allow-partial", action="store_true", help="exit 0 even if some attention blocks stay multi-head"
    )
    parser.add_argument(
        "--force", action="store_true", help="write the model even when it has no attention to split"
    )
    parser.add_argument(
        "--create-input-lists", action="store_true", help="write raw inputs, input_list.txt and goldens"
    )
    parser.add_argument(
        "--encodings", metavar="FILE", help="AIMET .encodings of the model: propagated per head"
    )
    parser.add_argument(
        "--encodings-version", choices=["0.6.1", "1.0.0", "2.0.0"], help="write this encodings version"
    )
    parser.add_argument(
        "--strict-encodings", action="store_true", help="any encodings coverage gap is an error"
    )
    parser.add_argument(
        "--max-lsb",
        type=float,
        default=1.0,
        help="quantized outputs may differ by this many LSBs (default 1)",
    )
    parser.add_argument(
        "--verify-htp", action="store_true", help="also compare on the HTP emulator (needs mha2sha[htp])"
    )
    parser.add_argument("--soc", default="SM8650", help="HTP SoC model for --verify-htp (default SM8650)")
    parser.add_argument(
        "--per-head-kv-io",
        action="store_true",
        help="one past/present KV input/output per head (default: keep the model's I/O contract)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower
    )


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="split multi-head attention into per-head attention, verified")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--name", help="output model name (default: the input's)")
    p.add_argument(
        "--verify",
        choices=["auto", "full", "blocks", "none"],
        default="auto",
        help="onnxruntime comparison of the whole models, or of each attention block on its own "
        "(bounded memory); auto (default) = full when it needs <= 1 GiB (and 1/4 of free RAM), else blocks",
    )
    p.add_argument("--no-verify", action="store_true", help="same as --verify none")
    p.add_argument("--rtol", type=float, default=1e-5, help="max relative error per output (default 1e-5)")
    p.add_argument(
        "--shard-size",
        metavar="SIZE",
        help="save the weights in external files of at most SIZE each (e.g. 2GB, 500MB, 1073741824)",
    )
    _add_common(p)


def _options(args: argparse.Namespace, verify: bool | str) -> ConvertOptions:
    return ConvertOptions(
        input_shapes=parse_input_shapes(args.input_shape),
        inputs=args.inputs,
        verify=verify,
        rtol=getattr(args, "rtol", 1e-5),
        allow_partial=args.allow_partial,
        force=args.force,
        split_heads=not args.no_split,
        create_input_lists=args.create_input_lists,
        per_head_kv_io=args.per_head_kv_io,
        encodings=args.encodings or getattr(args, "exported_model_encoding_path", None),
        encodings_version=args.encodings_version,
        strict_encodings=args.strict_encodings,
        htp_layout=args.target == "htp"
        or args.replace_linear_with_conv
        or any(getattr(args, f.lstrip("-").replace("-", "_"), False) for f in _LEGACY_LAYOUT),
        optimize_o_proj=args.optimize_o_proj,
        verify_htp=args.verify_htp,
        max_lsb=args.max_lsb,
        soc=args.soc,
        shard_bytes=parse_size(args.shard_size) if getattr(args, "shard_size", None) is not None else None,
    )


def _print_result(result: ConversionResult, allow_partial: bool) -> int:
    if not result.blocks:
        console.print("No attention found (no Softmax feeding a MatMul with V); nothing written.")
        return 0
    console.print(blocks_table(result.blocks))
    if result.other_softmax:
        console.print(f"Softmax not in an attention core (left as is): {', '.join(result.other_softmax)}")
    if result.coverage is not None:
        console.print(result.coverage.table())
    if result.verification is not None:
        v, plan = result.verification, result.verify_plan
        mode = result.verify_mode
        if mode == "blocks" and v.ok and len(v.rows) > 12:
            console.print(
                f"Verification (blocks) [bold green]PASS[/]: {len(v.rows)} block outputs compared, "
                f"max rel err {v.max_rel_err:.3e} (rtol {v.rtol:.1e})"
            )
        else:
            console.print(verification_table(v, mode))
        if plan is not None:
            console.print(f"Verify mode: {plan.mode} ({plan.reason()})")
            for note in plan.notes:
                console.print(f"[yellow]Note:[/] {note}")
    if result.qdq_lsb is not None:
        worst = max(result.qdq_lsb.values(), default=0.0)
        verdict = "bit-exact" if worst == 0 else f"max {worst:g} LSB"
        console.print(
            f"Quantized (QDQ, onnxruntime CPU) MHA vs SHA: [green]{verdict}[/] over {len(result.qdq_lsb)} outputs"
        )
    if result.files:
        written = ", ".join(str(f) for f in result.files if f.parent.name not in ("goldens", "inputs"))
        console.print(f"Wrote {written}")
    elif not result.split_blocks:
        console.print("No multi-head attention was split; nothing written (use --force to write anyway).")
    unsupported = result.unsupported_blocks
    if unsupported:
        console.print(
            f"[yellow]{len(unsupported)} attention block(s) left as multi-head[/]; see the table above."
        )
        return 0 if allow_partial else 1
    return 0


def _run(model: str, out: str, name: str | None, options: ConvertOptions, log_level: str) -> int:
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    timer = PhaseTimer(show=True)
    try:
        result = convert(model, out, name=name, options=options, timer=timer)
    except UserError as e:
        _error(e)
        return e.exit_code
    except ConversionFailed as e:
        _error(e)
        return e.exit_code
    finally:
        timer.close()
    code = _print_result(result, options.allow_partial)
    if result.files:
        console.print(timer.table())
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mha2sha", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    args = parser.parse_args(argv)
    try:
        options = _options(args, verify="none" if args.no_verify else args.verify)
    except UserError as e:
        _error(e)
        return e.exit_code
    return _run(args.model, args.output, args.name, options, args.log_level)


def legacy_main(argv: Sequence[str] | None = None) -> int:
    """``mha2sha-onnx-converter``: the original tool's command line."""
    parser = argparse.ArgumentParser(
        prog="mha2sha-onnx-converter", description="Original MHA2SHA command line (flags are hints)."
    )
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--exported-model-path", required=True)
    parser.add_argument("--sha-export-path", required=True)
    parser.add_argument("--exported-model-encoding-path", help="AIMET .encodings (same as --encodings)")
    parser.add_argument("--base-llm")
    parser.add_argument("--no-verification", action="store_true")
    for flag in _LEGACY_HINTS:
        parser.add_argument(
            flag, action="store_true", help="accepted for compatibility; detected automatically"
        )
    for flag in _LEGACY_LATER:
        parser.add_argument(flag, nargs="?", const=True, default=None, help="not available yet")
    for flag in _LEGACY_LAYOUT:
        parser.add_argument(flag, action="store_true", help="same as --target htp")
    _add_common(parser)
    args = parser.parse_args(argv)
    later = [f for f in _LEGACY_LATER if getattr(args, f.lstrip("-").replace("-", "_")) is not None]
    if later:
        _error(
            f"{', '.join(later)} not supported yet by this release (planned: AR change, LoRA adaptor lists)"
        )
        return 2
    try:
        options = _options(args, verify=not args.no_verification)
    except UserError as e:
        _error(e)
        return e.exit_code
    return _run(args.exported_model_path, args.sha_export_path, args.model_name, options, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
