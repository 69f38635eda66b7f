"""``mha2sha build-ar MODEL --ar 1[,128] [--cl 2048] -o OUT``: LLM step graphs for other ARs / a CL.

Writes ``OUT/<name>_ar<N>_cl<M>.onnx`` per AR, one ``OUT/<name>.data`` all of them share, a copy of
``--encodings`` beside each graph, and ``OUT/<name>.ar.report.json``; every variant is proven by
the token loop against the original (see :mod:`mha2sha.arcl.build`).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from mha2sha.arcl.build import VERIFY_MODES, BuildArOptions, build_ar, convert_and_build_ar
from mha2sha.arcl.record import ArRecord
from mha2sha.report.progress import PhaseTimer
from mha2sha.verify.inputs import ROPE_THETA, parse_input_shapes

__all__ = ["add_parser", "add_ar_options", "options_from_args", "print_record", "run", "run_convert_with_ar"]

_DEFAULTS = BuildArOptions()


def add_ar_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--ar`` / ``--cl`` and the token-loop options (``build-ar``, and ``convert --ar``)."""
    p.add_argument(
        "--ar",
        required=required,
        metavar="N[,M...]",
        help="tokens per step of each graph to build (1 <= AR <= CL-1), e.g. 1 or 1,128"
        + ("" if required else ": the converted model is rewritten for each (one shared weights file)"),
    )
    p.add_argument(
        "--cl", type=int, metavar="N", help="context length of the new graphs (default: the model's)"
    )
    p.add_argument(
        "--tokens",
        type=int,
        metavar="T",
        help="prompt length of the token-loop proof (default: fits every graph)",
    )
    p.add_argument(
        "--rope-theta",
        type=float,
        default=ROPE_THETA,
        help=f"RoPE base for cos/sin inputs in the token loop (default {ROPE_THETA:g})",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-ar",
        help="LLM step graphs for other ARs (tokens per step) / a context length, one shared weights file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="input .onnx step graph (prepared or Hugging Face style, prefill, split, htp)"
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--name", help="output name stem (default: the input's)")
    add_ar_options(p, required=True)
    p.add_argument(
        "--encodings", metavar="FILE", help="AIMET .encodings: copied beside each graph, QDQ-verified"
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default=_DEFAULTS.verify,
        help="token-loop proof: auto (default) = when a whole-model run needs <= 1 GiB; full; none",
    )
    p.add_argument("--no-verify", action="store_true", help="same as --verify none")
    p.add_argument("--rtol", type=float, default=_DEFAULTS.rtol, help="max relative error per token's logits")
    p.add_argument("--max-lsb", type=float, default=_DEFAULTS.max_lsb, help="quantized: max LSBs per token")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the prompt's token ids")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="fix a dynamic input shape",
    )
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower
    )
    p.set_defaults(run=run)


def options_from_args(args: argparse.Namespace) -> BuildArOptions:
    return BuildArOptions(
        verify="none" if getattr(args, "no_verify", False) else getattr(args, "verify", _DEFAULTS.verify),
        rtol=getattr(args, "rtol", _DEFAULTS.rtol),
        max_lsb=getattr(args, "max_lsb", _DEFAULTS.max_lsb),
        tokens=args.tokens,
        seed=getattr(args, "seed", _DEFAULTS.seed),
        rope_theta=args.rope_theta,
        input_shapes=parse_input_shapes(getattr(args, "input_shape", None) or []),
    )


def run(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    record = build_ar(
        args.model, args.ar, args.cl, args.output, encodings=args.encodings, name=args.name,
        options=options_from_args(args), timer=timer,
    )  # fmt: skip
    print_record(console, record)
    console.print(timer.table())
    return 0


def print_record(console: Console, record: ArRecord) -> None:
    console.print(record.table())
    for note in record.notes:
        console.print(f"[yellow]Note:[/] {note}")
    if record.data_file is not None:
        console.print(
            f"Weights: {record.shared_tensors} tensors, {record.shared_bytes / 1e6:.1f} MB in {record.data_file.name}, "
            f"shared by {len(record.variants)} graph(s)"
        )
    console.print("Wrote " + ", ".join(str(f) for f in record.files))


def run_convert_with_ar(
    model: str, out: str, name: str | None, convert_options, ar: str, cl: int | None, ar_options: BuildArOptions,
    console: Console, timer: PhaseTimer,
) -> int:  # fmt: skip
    """``convert --ar`` / the original tool's ``--build-ar``: convert, then build the AR/CL variants."""
    from mha2sha.commands.convert import print_result

    result, record = convert_and_build_ar(
        model, out, ar, cl, name=name, convert_options=convert_options, options=ar_options, timer=timer
    )
    if record is None:
        return print_result(console, result, convert_options.allow_partial, timer)
    print_result(console, result, convert_options.allow_partial, None)
    print_record(console, record)
    console.print(timer.table())
    return 0
