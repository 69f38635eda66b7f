"""``python -m mha2sha.zoo.thirdparty [--build] [--json]``: the corpus catalogue.

Without ``--build`` only what is already cached is described (features need the file); with it,
every tool's venv and outputs and every zoo variant are built first, and the times printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .catalogue import CorpusExportError, thirdparty_graphs
from .tools import ToolFailed, ToolUnavailable, prebuild


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mha2sha.zoo.thirdparty", description=__doc__)
    parser.add_argument("--build", action="store_true", help="build venvs, tool outputs and zoo variants")
    parser.add_argument("--json", action="store_true", help="one JSON object per graph")
    parser.add_argument("--no-zoo", action="store_true", help="third-party tools only")
    args = parser.parse_args(argv)
    graphs = thirdparty_graphs(zoo=not args.no_zoo)
    if args.build:
        start = time.perf_counter()
        for tool, error in prebuild().items():
            print(f"{tool}: {error or 'ok'}", file=sys.stderr)
        print(f"tools built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for graph in graphs:
        try:
            path = graph.path() if args.build or graph.is_built() else None
            features = graph.features().summary() if path is not None else "(not built)"
        except (ToolUnavailable, ToolFailed, CorpusExportError) as e:
            path, features = None, f"unavailable: {e}"
        if args.json:
            row = {"id": graph.id, "tool": graph.tool_version, "features": features, "path": str(path or "")}
            print(json.dumps(row))
        else:
            print(f"{graph.id:48s} {graph.tool_version:28s} {features}")
    if args.build:
        print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
