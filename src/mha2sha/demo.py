"""``make demo``: build a tiny Llama-style KV-cache step graph, analyse it, split its heads, show the
proof, and print the paths of the two HTML reports (before and after).

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


if __name__ == "__main__":
    sys.exit(main())
