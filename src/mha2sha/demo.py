"""``make demo``: build a tiny Llama-style KV-cache step graph, analyse it, split its heads, show the
proof, and print the paths of the two HTML reports (before and after).

``python -m mha2sha.demo build-ar`` (``make demo-ar``): the same model exported with AR 8 and CL 32,
rewritten to AR 1 (same CL) and to AR 1 and AR 8 at CL 64, each proven by the token loop.

Needs the ``export`` extra (torch, transformers) to build the demo model; the conversion itself
does not.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from mha2sha import zoo
from mha2sha.cli import main as cli_main

DEMO_CASE = "llama_gqa_step"


def main() -> int:
    console = Console()
    info = zoo.CASES[DEMO_CASE]
    console.print(f"[bold]mha2sha demo[/]: {info.description}")
    console.print(f"  {info.layers} layers, {info.heads} query heads, {info.kv_heads} KV heads, head dim {info.head_dim}, "
                  f"{info.seq_len} new tokens on {info.past_len} cached")  # fmt: skip
    started = time.perf_counter()
    source = zoo.build(DEMO_CASE, "torchscript")
    console.print(
        f"  exported with torch.onnx.export in {time.perf_counter() - started:.1f} s (cached): {source}"
    )
    out = Path(tempfile.mkdtemp(prefix="mha2sha-demo-"))
    console.print(f"\n$ mha2sha analyze {source} -o {out / 'analysis'}\n")
    code = cli_main(["analyze", str(source), "-o", str(out / "analysis")])
    if code != 0:
        return code
    console.print(f"\n$ mha2sha convert {source} -o {out}\n")
    code = cli_main(["convert", str(source), "-o", str(out), "--create-input-lists"])
    console.print("\nHTML reports (open in a browser; self-contained, no network):")
    console.print(f"  before: {out / 'analysis' / 'report.html'}")
    console.print(f"  after:  {out / 'model.report.html'}")
    return code


DEMO_AR, DEMO_CL = 8, 32


def build_ar_demo() -> int:
    """AR 8 -> AR 1, and a context-length change, on the demo model."""
    console = Console()
    source = zoo.build(DEMO_CASE, "torchscript", ar=DEMO_AR, cl=DEMO_CL)
    console.print(f"[bold]mha2sha build-ar demo[/]: {DEMO_CASE} exported with AR {DEMO_AR}, CL {DEMO_CL}: {source}")
    out = Path(tempfile.mkdtemp(prefix="mha2sha-demo-ar-"))
    for argv in (["--ar", "1"], ["--ar", "1,8", "--cl", "64"]):
        target = out / ("ar1" if len(argv) == 2 else "cl64")
        console.print(f"\n$ mha2sha build-ar {source} {' '.join(argv)} -o {target}\n")
        code = cli_main(["build-ar", str(source), *argv, "-o", str(target)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(build_ar_demo() if sys.argv[1:] == ["build-ar"] else main())
