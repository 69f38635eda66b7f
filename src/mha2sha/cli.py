"""Command line: ``mha2sha <subcommand>`` (see :mod:`mha2sha.commands`) and the original tool's
``mha2sha-onnx-converter`` (:mod:`mha2sha.legacy`).

Exit codes, the same for every subcommand:
0 done (or nothing to do); 1 result not acceptable (verification failed, blocks left multi-head);
2 bad input (one line on stderr, nothing written); 3 internal error (one line naming the stage and
the log file holding the traceback); 130 / 143 interrupted by SIGINT / SIGTERM (nothing left behind).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mha2sha.commands import COMMANDS
from mha2sha.commands.guard import console, run_guarded
from mha2sha.legacy import main as legacy_main

__all__ = ["main", "legacy_main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mha2sha", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return run_guarded(lambda timer: args.run(args, console, timer), args.log_level)


if __name__ == "__main__":
    sys.exit(main())
