"""``mha2sha convert``: split multi-head attention into per-head attention, verified."""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console

from mha2sha.commands.build_ar import add_ar_options, options_from_args, run_convert_with_ar
from mha2sha.commands.options import add_conversion_options, options_from_flags
from mha2sha.errors import UserError
from mha2sha.job import ConversionResult, ConvertOptions, convert
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.summary import print_conversion
from mha2sha.verify.plan import VERIFY_MODES

__all__ = ["add_parser", "print_result", "run", "run_conversion"]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="split multi-head attention into per-head attention, verified")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--name", help="output model name (default: the input's)")
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default=_DEFAULTS["verify"],
        help="onnxruntime comparison of the whole models, or of each attention block on its own "
        "(bounded memory); auto (default) = full when it needs <= 1 GiB (and 1/4 of free RAM), else blocks",
    )
    p.add_argument("--no-verify", action="store_true", help="same as --verify none")
    p.add_argument(
        "--rtol",
        type=float,
        default=_DEFAULTS["rtol"],
        help=f"max relative error per output (default {_DEFAULTS['rtol']:g})",
    )
    p.add_argument(
        "--shard-size",
        metavar="SIZE",
        help="save the weights in external files of at most SIZE each (e.g. 2GB, 500MB, 1073741824)",
    )
    add_conversion_options(p)
    add_ar_options(p, required=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    options = options_from_flags(vars(args))
    if args.ar is not None or args.cl is not None:
        if args.ar is None:
            raise UserError("--cl needs --ar (the tokens per step of each graph to build)")
        ar_options = dataclasses.replace(
            options_from_args(args), verify="none" if options.verify == "none" else "auto"
        )
        return run_convert_with_ar(
            args.model, args.output, args.name, options, args.ar, args.cl, ar_options, console, timer
        )
    return run_conversion(args.model, args.output, args.name, options, console, timer)


def run_conversion(
    model: str, out: str, name: str | None, options: ConvertOptions, console: Console, timer: PhaseTimer
) -> int:
    """Convert, print every record, and say by the exit code whether the result is complete."""
    result = convert(model, out, name=name, options=options, timer=timer)
    return print_result(console, result, options.allow_partial, timer)


def print_result(
    console: Console, result: ConversionResult, allow_partial: bool, timer: PhaseTimer | None
) -> int:
    """Print a conversion's records (and the time table unless ``timer`` is None); the exit code."""
    if not result.blocks and not result.files:
        console.print("No attention found (no Softmax feeding a MatMul with V); nothing written.")
        return 0
    print_conversion(
        console,
        lowering=result.lowering,
        split=result.split,
        layout=result.layout,
        coverage=result.coverage,
        verify=result.verify,
        adapters=result.adapters,
    )
    if result.files:
        root = min(result.files, key=lambda f: len(f.parts)).parent  # the output folder
        folders = {f.relative_to(root).parts[0] for f in result.files if f.parent != root}
        shown = [str(f) for f in result.files if f.parent == root]
        shown += [f"{root / d}/ ({sum(f.is_relative_to(root / d) for f in result.files)} files)" for d in sorted(folders)]
        console.print(f"Wrote {', '.join(shown)}")
        if timer is not None:
            console.print(timer.table())
    elif not result.split_blocks:
        console.print("No multi-head attention was split; nothing written (use --force to write anyway).")
    unsupported = result.unsupported_blocks
    if unsupported:
        console.print(
            f"[yellow]{len(unsupported)} attention block(s) left as multi-head[/]; see the table above."
        )
        return 0 if allow_partial else 1
    return 0
