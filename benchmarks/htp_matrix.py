"""``mha2sha convert --verify-htp`` over a matrix of zoo models x AIMET W8A16 exports x layouts x inputs.

Each cell is one conversion through the Python API, exactly what ``mha2sha convert model.onnx
--encodings model.encodings --verify-htp [--target htp] --seed N`` does: AIMET's HTP config
(``tests.encodings.aimet_gen``, config ``w8a16``, calibrated on the zoo's example inputs of seeds 0
and 1, exported as 1.0.0 / 2.0.0), the zoo model as AIMET re-exports it, verification inputs of
seed N. A cell records whether HTP (CPU fallback disabled) decided, the max LSB over the outputs on
HTP and on CPU QDQ, and, when MHA and SHA differ on HTP, the first diverging tensor and whose it is
(``verify/htp_local.py``).

    python benchmarks/htp_matrix.py                       # the 32-run matrix of HTP_RESULTS.md, ~8 min
    python benchmarks/htp_matrix.py --seeds 0-7 --soc SM8750
    python benchmarks/htp_matrix.py --cases clip_vision --versions 2.0.0 --seeds 0

Results go to ``--out`` (JSON, one entry per cell) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

CASES = ("llama_gqa_step", "qwen3_step", "clip_vision", "prepared_llama_gqa_step")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run_cell(case: str, version: str, layout: bool, seed: int, soc: str, work: Path) -> dict:
    from mha2sha import zoo
    from mha2sha.api import ConvertOptions, convert
    from mha2sha.errors import ConversionFailed
    from tests.encodings.aimet_gen import aimet_encodings

    calibration = [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]
    model, encodings = aimet_encodings(zoo.build(case), calibration, config="w8a16", version=version)
    options = ConvertOptions(encodings=str(encodings), verify_htp=True, htp_layout=layout, seed=seed, soc=soc)
    start = time.perf_counter()
    try:
        result = convert(model, work, options=options)
        htp, qdq, error = result.htp, result.qdq_lsb, ""
    except ConversionFailed as failed:
        record = failed.record
        htp = record.htp if record is not None else None
        qdq = record.qdq_lsb if record is not None else None
        error = str(failed)
    cell = {
        "case": case,
        "version": version,
        "layout": "conv" if layout else "matmul",
        "seed": seed,
        "soc": soc,
        "passed": not error,
        "htp_only": bool(htp and not htp.cpu_fallback_used),
        "htp_lsb": max(htp.max_lsb.values(), default=0.0) if htp else None,
        "cpu_lsb": max(qdq.values(), default=0.0) if qdq else None,
        "seconds": round(time.perf_counter() - start, 1),
        "error": error,
    }
    d = htp.divergence if htp else None
    if d is not None:
        cell["first_divergence"] = {"tensor": d.tensor, "lsb": d.lsb, "whose": d.whose, "unit": d.unit}
    return cell


def table(cells: list[dict]) -> str:
    lines = [
        "| case | encodings | layout | seed | HTP alone | MHA vs SHA on HTP, LSB | on CPU QDQ, LSB | first diverging tensor on HTP (LSB, whose) |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for c in cells:
        d = c.get("first_divergence")
        where = f"`{d['tensor']}` ({d['lsb']:g}, {d['whose']})" if d else "-"
        lines.append(
            f"| {c['case']} | {c['version']} | {c['layout']} | {c['seed']} | {'yes' if c['htp_only'] else 'no'} "
            f"| {c['htp_lsb']:g}{'' if c['passed'] else ' **fail**'} | {c['cpu_lsb']:g} | {where} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--versions", default="1.0.0,2.0.0")
    parser.add_argument("--layouts", default="matmul,conv")
    parser.add_argument("--seeds", default="0,1", help="verification input seeds: 0,1 or 0-7")
    parser.add_argument("--soc", default="SM8650")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mha2sha-htp-matrix.json"))
    args = parser.parse_args()
    cells = []
    with tempfile.TemporaryDirectory(prefix="mha2sha-htp-matrix-") as tmp:
        for case in args.cases.split(","):
            for version in args.versions.split(","):
                for layout in args.layouts.split(","):
                    for seed in _seeds(args.seeds):
                        work = Path(tmp) / f"{case}-{version}-{layout}-{seed}"
                        cell = run_cell(case, version, layout == "conv", seed, args.soc, work)
                        cells.append(cell)
                        print(json.dumps(cell), file=sys.stderr, flush=True)
                        args.out.write_text(json.dumps(cells, indent=1))
    print(table(cells))
    failed = sum(not c["passed"] for c in cells)
    print(f"\n{len(cells) - failed} of {len(cells)} pass (--max-lsb 1); {failed} fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
