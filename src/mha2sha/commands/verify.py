"""``mha2sha verify ORIGINAL CONVERTED``: prove an existing conversion (whole models or block by block)."""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console

from mha2sha.errors import UserError
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.tables import verification_table
from mha2sha.verify.blocks import infer_pieces, verify_blocks
from mha2sha.verify.inputs import parse_input_shapes, plan_inputs
from mha2sha.verify.plan import VERIFY_MODES, VerifyOptions
from mha2sha.verify.runner import verify

__all__ = ["add_parser", "run"]

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(VerifyOptions)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="compare a converted model with its original (onnxruntime)")
    p.add_argument("original", help="the original .onnx model")
    p.add_argument("converted", help="the converted .onnx model")
    p.add_argument(
        "--verify",
        choices=[m for m in VERIFY_MODES if m != "none"],
        default="blocks",
        help="blocks (default): each attention block on its own, bounded memory; full: whole models",
    )
    p.add_argument("--rtol", type=float, default=_DEFAULTS["rtol"], help="max relative error per output")
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="seed of the generated inputs")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    p.add_argument("--inputs", metavar="NPZ", help="verify on these inputs (.npz keyed by input name)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    shapes = parse_input_shapes(args.input_shape)
    with timer.phase("load"):
        original = load_model(args.original)
        fix_input_shapes(original, shapes)
        require_static_inputs(original)
        inputs = plan_inputs(original, args.seed, npz=args.inputs)
    full = args.verify == "full"
    with timer.phase("verify (onnxruntime)" if full else "verify blocks (onnxruntime)") as advance:
        if full:
            converted = load_model(args.converted)
            pieces = infer_pieces(list(original.graph.inputs), list(converted.graph.inputs))
            if pieces:
                raise UserError("--verify full of a model with per-head KV inputs: use --verify blocks")
            result = verify(args.original, args.converted, dict(inputs), rtol=args.rtol)
        else:
            result = verify_blocks(
                original, load_model(args.converted), inputs=inputs, rtol=args.rtol, seed=args.seed,
                on_block=advance,
            )  # fmt: skip
    if len(result.rows) > 12 and result.ok:
        what = "outputs" if full else "block outputs"
        console.print(f"{len(result.rows)} {what} compared, max rel err {result.max_rel_err:.3e}")
    else:
        console.print(verification_table(result, args.verify))
    seconds = sum(r.seconds for r in timer.records)
    console.print(f"verify {args.verify}: {'PASS' if result.ok else 'FAIL'} in {seconds:.1f} s")
    return 0 if result.ok else 1
