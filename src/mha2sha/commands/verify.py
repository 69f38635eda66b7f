"""``mha2sha verify ORIGINAL CONVERTED``: prove an existing conversion (whole models or block by block),
or two LLM step graphs of one model through the same token loop (an AR / CL variant)."""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console
from rich.table import Table

from mha2sha.adapters.alpha import LORA_ALPHA, scale_of_input
from mha2sha.errors import UserError
from mha2sha.io.load import fix_input_shapes, load_model, require_static_inputs
from mha2sha.report.progress import PhaseTimer
from mha2sha.report.tables import verification_table
from mha2sha.verify.blocks import infer_pieces, verify_blocks
from mha2sha.verify.inputs import ROPE_THETA, parse_input_shapes, plan_inputs
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
        choices=[*(m for m in VERIFY_MODES if m != "none"), "loop"],
        default="blocks",
        help="blocks (default): each attention block on its own, bounded memory; full: whole models; "
        "loop: LLM step graphs through the same token loop (any AR / CL each; chosen by itself when "
        "the two graphs' input shapes differ)",
    )
    p.add_argument("--tokens", type=int, metavar="T", help="loop: prompt length (default: fits both graphs)")
    p.add_argument(
        "--rope-theta",
        type=float,
        default=ROPE_THETA,
        help=f"loop: RoPE base of cos/sin inputs (default {ROPE_THETA:g})",
    )
    p.add_argument("--rtol", type=float, default=_DEFAULTS["rtol"], help="max relative error per output")
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="seed of the generated inputs")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    p.add_argument("--inputs", metavar="NPZ", help="verify on these inputs (.npz keyed by input name)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    if args.verify == "loop" or _io_shapes_differ(args.original, args.converted):
        return _run_loop(args, console, timer)
    shapes = parse_input_shapes(args.input_shape)
    with timer.phase("load"):
        original = load_model(args.original)
        fix_input_shapes(original, shapes)
        require_static_inputs(original)
        inputs = plan_inputs(original, args.seed, npz=args.inputs)
        alpha = scale_of_input(original, load_model(args.converted))  # --lora-alpha-from-input
        if alpha is not None:
            inputs.add_fixed(LORA_ALPHA, alpha)
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


def _io_shapes_differ(original: str, converted: str) -> bool:
    """Another AR / CL of the same model: the same input names, other sizes (blocks cannot compare it)."""
    a, b = load_model(original).graph.inputs, load_model(converted).graph.inputs
    shapes = lambda vs: {v.name: tuple(v.shape or ()) for v in vs}  # noqa: E731
    sa, sb = shapes(a), shapes(b)
    return set(sa) == set(sb) and sa != sb


def _run_loop(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    """Both step graphs through the same token loop: every token's logits and the final cache."""
    from mha2sha.arcl.contract import compare_step_graphs

    with timer.phase("verify: token loop (onnxruntime)"):
        checks, tokens, (steps_a, steps_b) = compare_step_graphs(
            args.original, args.converted, tokens=args.tokens, rtol=args.rtol, seed=args.seed,
            rope_theta=args.rope_theta,
        )  # fmt: skip
    table = Table(
        title=f"Token loop: {tokens} tokens, {steps_a} steps vs {steps_b} steps", title_justify="left"
    )
    for col in ("compared", "max rel err", "worst token", "result"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, f"{c.max_err:.3e}", "-" if c.worst_token is None else str(c.worst_token),
                      "[green]PASS[/]" if c.ok else "[red]FAIL[/]")  # fmt: skip
    console.print(table)
    ok = all(c.ok for c in checks)
    seconds = sum(r.seconds for r in timer.records)
    console.print(f"verify loop: {'PASS' if ok else 'FAIL'} in {seconds:.1f} s")
    return 0 if ok else 1
