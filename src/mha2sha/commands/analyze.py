"""``mha2sha analyze MODEL -o FOLDER``: what is in a model and what ``convert`` would do; no model written.

Writes ``<name>.report.json``, ``attention.csv`` (one row per attention block), ``ops.csv`` (one
row per op type, with HTP support from the QNN execution provider) and ``report.html`` (one
self-contained file: tables, drawings of each kind of attention block). Exit 0 when the analysis
ran (whatever it found); 2 on bad input, as ``convert``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from mha2sha.analyze import AnalysisRecord, AnalyzeOptions, analyze
from mha2sha.commands.options import add_shape_options, shape_roles_from_flags
from mha2sha.errors import UserError
from mha2sha.io.save import staging_dir
from mha2sha.report.analysis import attention_csv, ops_csv, print_analysis
from mha2sha.report.html import analysis_html
from mha2sha.report.progress import PhaseTimer
from mha2sha.verify.htp import DEFAULT_SOC
from mha2sha.verify.inputs import parse_input_shapes

__all__ = ["HTML_FILE", "add_parser", "run", "write_analysis"]

HTML_FILE = "report.html"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="report a model's attention blocks, HTP op support, dynamic inputs and encodings (writes no model)",
    )
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--encodings", metavar="FILE", help="AIMET .encodings of the model: coverage, and the HTP probe's QDQ")
    p.add_argument("--soc", default=DEFAULT_SOC, help=f"HTP SoC model of the support probe (default {DEFAULT_SOC})")
    p.add_argument(
        "--no-htp-probe", action="store_true", help="skip asking the QNN EP (onnxruntime-qnn) which ops it takes"
    )
    add_shape_options(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], type=str.lower)
    p.set_defaults(run=run)


def write_analysis(record: AnalysisRecord, out_dir: Path) -> list[Path]:
    """The report files, written as a set (a failed write leaves the folder as it was)."""
    report = f"{record.name}.report.json"
    files = {
        report: json.dumps(record.to_dict(), indent=1),
        "attention.csv": attention_csv(record),
        "ops.csv": ops_csv(record),
        HTML_FILE: analysis_html(record),
    }
    with staging_dir(out_dir) as stage:
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files]


def run(args: argparse.Namespace, console: Console, timer: PhaseTimer) -> int:
    if not str(args.output).strip():
        raise UserError("the output folder (-o) is empty")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder is a file: {out_dir}")
    options = AnalyzeOptions(
        input_shapes=parse_input_shapes(args.input_shape),
        shape_roles=shape_roles_from_flags(vars(args)),
        encodings=args.encodings,
        soc=args.soc,
        probe=not args.no_htp_probe,
    )
    record = analyze(args.model, options, timer.phase)
    with timer.phase("write report"):
        record.phases = list(timer.records)
        files = write_analysis(record, out_dir)
    print_analysis(console, record)
    console.print(timer.table())
    console.print(escape(f"Wrote {', '.join(str(f) for f in files)}"))
    console.print(escape(f"Report: {out_dir / HTML_FILE}"))
    return 0
