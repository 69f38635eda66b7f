"""Summary of the lowering exactness checks: per fused op, the number of checks and the worst error."""

from __future__ import annotations

import collections


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.lower._util import ERRORS

    if not ERRORS:
        return
    by_op: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: {"node": [], "model": []})
    for op, kind, _, err in ERRORS:
        by_op[op][kind].append(err)
    terminalreporter.section("lowering exactness (max rel err vs onnxruntime CPU)")
    terminalreporter.write_line(f"{'op':45s} {'one-node checks':>22s} {'whole-model checks':>24s}")
    for op in sorted(by_op):
        cells = []
        for kind in ("node", "model"):
            errs = by_op[op][kind]
            cells.append(f"{len(errs):4d} x max {max(errs):.2e}" if errs else "-")
        terminalreporter.write_line(f"{op:45s} {cells[0]:>22s} {cells[1]:>24s}")
